"""The noise families and the norms they certify.

``"gaussian"``: ``x + sigma * eps``, ``eps ~ N(0, I)``; CERTIFY's radius ``sigma * Phi^-1(p_lower)`` is an
L2 radius (Cohen et al. 2019).

``"uniform"``: ``x + theta * u``, ``u`` uniform on the cube ``[-1, 1]^D`` (``theta`` is the half-width,
passed where a Gaussian takes ``sigma``); the radius ``theta * (2 p_lower - 1)`` is an L1 radius
(Yang et al. 2020, "Randomized smoothing of all shapes and sizes"; the l1 certificate of the authors'
``ddsmoothing`` package). Why: the uniform densities on the cubes around ``x`` and ``x + delta`` differ
in total variation by ``1 - prod_i (1 - |delta_i| / (2 theta)) <= ||delta||_1 / (2 theta)``, so no class's
probability under the noise moves by more than that. If the top class has probability at least
``p_lower > 1/2`` at ``x``, it keeps more than 1/2, and every other class less than 1/2, wherever
``||delta||_1 < theta * (2 p_lower - 1)``.

Both abstain below ``p_lower = 1/2``. A procedure uses one family throughout; the kernels draw the two
families from Philox under different keys (``csrc/uniform.h``), so they are independent even under
one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddrs_ext import stats

NOISES = ("gaussian", "uniform")
#: The norm each noise family's radius is in.
NORMS = {"gaussian": "l2", "uniform": "l1"}


@dataclass(frozen=True)
class Noise:
    """A noise family: its name, the norm its certificates are in and what its scale is called."""

    name: str
    norm: str
    scale: str

    def perturb_out(
        self, x, scale, stream, seed: int, sample_offset: int, m: int, row_start: int, out
    ) -> None:
        """Rows ``[row_start, row_start + len(out))`` of the virtual batch into ``out`` (``seed`` signed)."""
        if self.name == "uniform":
            torch.ops.ddrs_ext.perturb_uniform_out(x, scale, stream, seed, sample_offset, m, row_start, out)
        else:
            torch.ops.ddrs_ext.perturb_gaussian_out(
                x, scale, stream, seed, sample_offset, m, row_start, out, None
            )

    def radius(self, p_lower: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """CERTIFY's radius for lower bounds ``p_lower`` at noise scales ``scale`` (0 below 1/2)."""
        if self.name == "uniform":
            return l1_radius(p_lower, scale)
        return stats.certified_radius(p_lower, scale)


GAUSSIAN = Noise("gaussian", "l2", "sigma")
UNIFORM = Noise("uniform", "l1", "theta")
_FAMILIES = {"gaussian": GAUSSIAN, "uniform": UNIFORM}


def resolve_noise(noise) -> Noise:
    """``"gaussian"`` or ``"uniform"`` (or a :class:`Noise`) -> the family; anything else is an error."""
    if isinstance(noise, Noise):
        noise = noise.name  # the one instance per family (code compares with `is`)
    if not isinstance(noise, str):
        raise TypeError(f"noise must be one of {NOISES}, got {noise!r}")
    family = _FAMILIES.get(noise)
    if family is None:
        raise ValueError(
            f"noise must be one of {NOISES} (Gaussian noise certifies L2 radii, uniform noise L1 radii), "
            f"got {noise!r}"
        )
    return family


def l1_radius(p_lower: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``theta * (2 p_lower - 1)`` where ``p_lower >= 1/2``, else 0 (abstention): the L1 radius of
    uniform noise of half-width ``theta``."""
    p = np.asarray(p_lower, dtype=np.float64)
    return np.where(p >= 0.5, np.asarray(theta, dtype=np.float64) * (2.0 * np.maximum(p, 0.5) - 1.0), 0.0)


def scale_name(noise: Noise, name: str = "sigma") -> str:
    """How to call the argument ``name`` (which holds the noise scale) in an error message."""
    if noise.name == "uniform":
        return f"{name} (theta, the uniform noise's half-width)"
    return name
