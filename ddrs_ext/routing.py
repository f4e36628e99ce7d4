"""Training-free routes between experts smoothed at several sigma levels, each with a sound certificate.

**Cascade** (after the cascaded smoothing of Jeong & Shin, NeurIPS 2023). With levels
``sigma_1 < ... < sigma_K``, expert ``f_k`` and a threshold ``p0`` in [1/2, 1), the smoothed expert at
level k answers where one class is likely enough and abstains elsewhere::

    g_k(x) = c        if p_k(c | x) >= p0,  p_k(c | x) = P(f_k(x + sigma_k eps) = c)
           = abstain  otherwise (then every class has p_k(c | x) < p0)

and the cascade answers with the first level, from the largest sigma down, that does not abstain:
``h(x) = g_k(x)`` for the largest k with ``g_k(x) != abstain`` (abstain when every level does).

Certificate. Each ``x -> sigma_k Phi^-1(p_k(c | x))`` is 1-Lipschitz (Salman et al. 2019), so a
lower bound ``L`` on ``p_k(c | x)`` keeps ``p_k(c | x') > p0`` for ``||x' - x|| < sigma_k (Phi^-1(L) -
Phi^-1(p0))``, and an upper bound ``U`` on ``max_c p_k(c | x)`` keeps every class below ``p0`` (level k
abstains) for ``||x' - x|| < sigma_k (Phi^-1(p0) - Phi^-1(U))``. The procedure goes down from level K:
at level k it draws CERTIFY's samples (``n0`` to pick ``c``, ``n`` fresh ones to count); if ``L >= p0``
it answers ``c`` with radius the smaller of that level's radius and the abstention radii of all the
levels above; if ``U < p0`` it records level k's abstention radius and goes down; otherwise it
abstains (it cannot tell whether ``g_k`` answers at x). Inside the ball every level above abstains and
level k returns ``c``, so ``h`` returns ``c``.

Statistics. ``L`` is a one-sided Clopper-Pearson bound for the count of ``c`` (chosen on independent
samples). ``U`` bounds the largest class probability with the same one-sided bound applied to the
largest count: if ``c*`` is the class with the largest probability (a fixed class), its count is at
most the largest count, and the upper bound grows with the count, so ``U >= `` ``c*``'s own bound,
which fails with probability at most its level. Each level k spends ``alpha_k`` (default ``alpha /
K``), split in halves between ``L`` and ``U`` for the levels above the lowest (whose ``U`` is never
used); by the union bound over all the bounds of all levels, fixed in advance whatever the cascade
ends up drawing, every claim holds at once with probability at least ``1 - alpha``.

Dropping the ``min`` with the abstention radii of the levels above is *not* sound: just outside a
higher level's abstention region that level answers, possibly with another class (the tests hold such
a variant as a negative control).

**L1 (``noise="uniform"``)**: ``p_k(c | x) = P(f_k(x + theta_k u) = c)``, ``u`` uniform on ``[-1, 1]^D``
(the levels are half-widths theta_k). The uniform densities on the cubes around x and x' differ in total
variation by at most ``||x' - x||_1 / (2 theta_k)`` (:mod:`ddrs_ext.noise`), so every class probability,
and so the largest one, is ``1/(2 theta_k)``-Lipschitz in L1: ``|p_k(c | x') - p_k(c | x)| <=
||x' - x||_1 / (2 theta_k)``. The argument above then goes through with ``2 theta_k p`` in place of
``sigma_k Phi^-1(p)``: level k answers c for ``||x' - x||_1 < 2 theta_k (L - p0)`` and abstains for
``||x' - x||_1 < 2 theta_k (p0 - U)``; the statistics and the union bound are unchanged. At ``p0 = 1/2``
the first is CERTIFY's L1 radius ``theta_k (2L - 1)``.

**Confidence routing** (after ACES, Horvath et al. 2022): :class:`ConfidenceSelector` is a base
selector built from the experts alone: the largest level whose expert is confident enough on the
(noisy) input. Smoothed and certified by :func:`ddrs_ext.certify_dual` like a trained selector, it
inherits that certificate, ``min(R_selector, R_classifier)`` (in L1 with ``noise="uniform"``: the
selector's smoothing makes no assumption about the base selector, so the experts' confidence under
uniform noise routes as well as under Gaussian noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ddrs_ext import rng, stats
from ddrs_ext._validate import check_alpha, check_count, check_inputs, check_model, check_num_classes
from ddrs_ext.certification import ABSTAIN, VoteSampler, _Phase, check_sampling_args
from ddrs_ext.dual import Model, _experts, check_sigma_levels
from ddrs_ext.noise import UNIFORM, Noise, resolve_noise

__all__ = ["CascadeCertifyResult", "ConfidenceSelector", "cascade_alphas", "certify_cascade"]


@dataclass
class CascadeCertifyResult:
    """Per-input results of :func:`certify_cascade` (all tensors on the CPU).

    prediction: (B,) int64, the certified class or ``ABSTAIN`` (-1).
    radius: (B,) float64, ``min(radius_level, radius_above)``; 0 when abstaining.
    level: (B,) int64, the level that answered (index into ``sigma_levels``), ``ABSTAIN`` if none did.
    sigma: (B,) float64, that level's sigma (NaN where none answered).
    radius_level: (B,) float64, the answering level's own radius ``sigma_k (Phi^-1(L) - Phi^-1(p0))``.
    radius_above: (B,) float64, the smallest abstention radius of the levels above the answering one
        (``inf`` when the largest level answered).
    stopped: (B,) int64, the level where an input stopped: where it answered or where neither bound
        decided (then it abstains), or 0 when every level abstained.
    samples: (B,) int64, model evaluations per input (``n0 + n`` per level visited).
    alpha_levels: the failure probability each level spends (they add up to ``alpha``).
    threshold: ``p0``.
    seed: the seed; level k's noise is that of ``certify(model_k, x, sigma_k, seed=seed, index=...)``.
    norm: the norm of the radii: ``"l2"`` (Gaussian noise), or ``"l1"`` (``noise="uniform"``: then the
        radii are ``2 theta_k (L - p0)`` and ``2 theta_k (p0 - U)``, and ``sigma`` holds theta_k).
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    level: torch.Tensor
    sigma: torch.Tensor
    radius_level: torch.Tensor
    radius_above: torch.Tensor
    stopped: torch.Tensor
    samples: torch.Tensor
    alpha_levels: tuple[float, ...]
    threshold: float
    seed: int
    norm: str = "l2"


def cascade_alphas(
    alpha: float, levels: int, alpha_levels: Sequence[float] | None = None
) -> tuple[float, ...]:
    """The failure probability of each level: ``alpha / levels`` each, or ``alpha_levels`` checked (each in
    (0, 1), one per level, adding up to at most ``alpha``)."""
    alpha = check_alpha(alpha)
    if alpha_levels is None:
        return tuple([alpha / levels] * levels)
    values = tuple(check_alpha(a) for a in alpha_levels)
    if len(values) != levels:
        raise ValueError(f"alpha_levels must have one entry per level ({levels}), got {len(values)}")
    if sum(values) > alpha * (1 + 1e-12):
        raise ValueError(f"alpha_levels add up to {sum(values)}, more than alpha ({alpha})")
    return values


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"threshold must be a number in [0.5, 1), got {threshold!r}")
    value = float(threshold)
    if not 0.5 <= value < 1.0:
        raise ValueError(f"threshold must lie in [0.5, 1) (a class above it is unique), got {value}")
    return value


def certify_cascade(
    model: Model | Sequence[Model],
    x: torch.Tensor,
    sigma_levels: Sequence[float] | torch.Tensor,
    *,
    threshold: float = 0.5,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    alpha_levels: Sequence[float] | None = None,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str | Noise = "gaussian",
) -> CascadeCertifyResult:
    """Certifies every input of ``x`` with the cascade over ``sigma_levels`` (module docstring): from the
    largest level down, the first level whose smoothed expert gives one class probability at least
    ``threshold`` answers; the radius also stays inside the abstention regions of the levels above.

    ``model`` is one model for every level or one expert per level. Level k is certified with CERTIFY's
    ``n0`` and ``n`` samples at failure probability ``alpha_levels[k]`` (default ``alpha / K`` each; the
    levels above the lowest split theirs between the lower and the upper bound). An input visits a level
    only while all the levels above it are certified to abstain. With probability at least ``1 - alpha``
    every certified input's class is the cascade's everywhere in its ball. ``seed`` and ``index`` fix
    all noise, as for :func:`ddrs_ext.certify`; nothing depends on ``batch_size`` or on other inputs.

    ``noise="uniform"``: every level smooths with uniform noise on the cube of half-width
    ``sigma_levels[k]`` (theta_k), and the radii are L1 radii by the ``1/(2 theta_k)``-Lipschitz bound of
    the module docstring (``result.norm`` is ``"l1"``).
    """
    family = resolve_noise(noise)
    levels = check_sigma_levels(sigma_levels)
    K = levels.numel()
    experts = _experts(model, K)
    threshold = _check_threshold(threshold)
    n0, n = check_count(n0, "n0"), check_count(n, "n")
    alphas = cascade_alphas(alpha, K, alpha_levels)
    num_classes = check_num_classes(num_classes)
    for expert in experts:
        check_model(expert)
    x, _, batch_size, seed, stream = check_sampling_args(
        experts[0], check_inputs(x), 1.0, batch_size, seed, index
    )
    B = x.shape[0]

    prediction = torch.full((B,), ABSTAIN, dtype=torch.int64)
    level = torch.full((B,), ABSTAIN, dtype=torch.int64)
    radius_level = torch.zeros(B, dtype=torch.float64)
    radius_above = torch.full((B,), math.inf, dtype=torch.float64)
    stopped = torch.zeros(B, dtype=torch.int64)
    samples = torch.zeros(B, dtype=torch.int64)
    going = torch.arange(B)  # inputs whose levels so far are all certified to abstain
    for k in reversed(range(K)):
        if going.numel() == 0:
            break
        sigma_k = float(levels[k])
        where = going.to(x.device)
        sampler = VoteSampler(
            experts[k],
            x[where],
            torch.full((going.numel(),), sigma_k, dtype=torch.float64, device=x.device),
            stream[where],
            seed,
            batch_size,
            num_classes,
            family,
        )
        select, estimate = sampler.counts([_Phase(rng.PHASE_SELECTION, n0), _Phase(rng.PHASE_ESTIMATION, n)])
        num_classes = sampler.num_classes
        samples[going] += n0 + n
        guess = select.argmax(1)
        n_guess = estimate.gather(1, guess[:, None])[:, 0].numpy()
        lowest = k == 0
        beta_lower = alphas[k] if lowest else alphas[k] / 2
        lower = stats.clopper_pearson_lower(n_guess, n, beta_lower)
        answers = torch.from_numpy(lower >= threshold)
        if lowest:
            abstains = torch.zeros_like(answers)
        else:
            upper = stats.clopper_pearson_upper(estimate.max(1).values.numpy(), n, alphas[k] / 2)
            abstains = torch.from_numpy(upper < threshold) & ~answers
        done = going[answers]
        prediction[done] = guess[answers]
        level[done] = k
        radius_level[done] = torch.from_numpy(_gap(family, sigma_k, lower[answers.numpy()], threshold))
        stopped[done] = k
        undecided = ~(answers | abstains)
        stopped[going[undecided]] = k
        if not lowest:
            cont = abstains.numpy()
            radius_k = _gap(family, sigma_k, threshold, upper[cont])
            radius_above[going[abstains]] = torch.minimum(
                radius_above[going[abstains]], torch.from_numpy(radius_k)
            )
        going = going[abstains]
    answered = prediction != ABSTAIN
    radius = torch.where(
        answered, torch.minimum(radius_level, radius_above), torch.zeros(B, dtype=torch.float64)
    )
    sigma = torch.full((B,), math.nan, dtype=torch.float64)
    sigma[answered] = levels[level[answered]]
    return CascadeCertifyResult(
        prediction=prediction,
        radius=radius,
        level=level,
        sigma=sigma,
        radius_level=radius_level,
        radius_above=radius_above,
        stopped=stopped,
        samples=samples,
        alpha_levels=alphas,
        threshold=threshold,
        seed=seed,
        norm=family.norm,
    )


def _gap(noise: Noise, scale: float, high, low) -> np.ndarray:
    """The radius within which a probability bounded at ``high`` stays above ``low`` (or one at ``low``
    below ``high``): ``sigma (Phi^-1(high) - Phi^-1(low))`` for Gaussian noise (``sigma Phi^-1(p)`` is
    1-Lipschitz in L2), ``2 theta (high - low)`` for uniform noise (``p`` is ``1/(2 theta)``-Lipschitz in
    L1)."""
    high, low = np.asarray(high, dtype=np.float64), np.asarray(low, dtype=np.float64)
    if noise is UNIFORM:
        return 2.0 * scale * (high - low)
    return scale * (norm.ppf(high) - norm.ppf(low))


class ConfidenceSelector(torch.nn.Module):
    """A base selector for :func:`ddrs_ext.certify_dual` made of the experts themselves (ACES-style routing):
    for an input z it returns the one-hot logits of the largest level k >= 1 whose expert's top softmax
    probability on z is at least ``thresholds[k - 1]``, and of level 0 when none is.

    ``experts``: one model per level (increasing sigma); ``thresholds``: ``K - 1`` numbers in (0, 1],
    for levels 1 .. K-1 (a threshold above every softmax, e.g. 1.0, never routes to that level). The
    experts are evaluated as they are called by the selector's smoothing: in eval mode, deterministic,
    so the smoothed selector, and therefore the dual certificate, are well defined. Only the levels
    above 0 are evaluated, from the top, and only on the rows still undecided.
    """

    def __init__(
        self, experts: Sequence[Callable[[torch.Tensor], torch.Tensor]], thresholds: Sequence[float]
    ):
        super().__init__()
        experts = list(experts)
        if len(experts) < 2:
            raise ValueError("ConfidenceSelector routes between at least 2 experts (one per level)")
        for e in experts:
            check_model(e)
        values = [float(t) for t in thresholds]
        if len(values) != len(experts) - 1:
            raise ValueError(
                f"thresholds must have one entry per level above the lowest ({len(experts) - 1}), "
                f"got {len(values)}"
            )
        if not all(0.0 < t <= 1.0 for t in values):
            raise ValueError(f"thresholds must lie in (0, 1], got {values}")
        modules = [e for e in experts if isinstance(e, torch.nn.Module)]
        self.experts_modules = torch.nn.ModuleList(modules)  # so that eval() and .to() reach them
        self._experts = experts
        self.thresholds = values

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        K = len(self._experts)
        choice = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        open_rows = torch.arange(z.shape[0], device=z.device)
        for k in reversed(range(1, K)):
            if open_rows.numel() == 0:
                break
            confidence = torch.softmax(self._experts[k](z[open_rows]).float(), 1).max(1).values
            picked = confidence >= self.thresholds[k - 1]
            choice[open_rows[picked]] = k
            open_rows = open_rows[~picked]
        return torch.nn.functional.one_hot(choice, K).to(z.dtype)
