"""Data-dependent sigma (Alfarra et al., UAI 2022, Algorithm 1): choose a noise level per input
by gradient ascent on a surrogate of its certified radius.

For an input x, psi(sigma) = mean_i softmax(f(x + sigma eps_i)) over m noise samples, E_A >= E_B
its two largest entries (re-chosen every iteration) and the surrogate certified radius

    R(sigma) = sigma / 2 * (Phi^-1(clip E_A) - Phi^-1(clip E_B)).

Each iteration draws fresh noise, estimates E_A, E_B and their derivatives in sigma, and one
kernel (csrc/sigma.h) turns them into dR/dsigma in closed form and moves sigma.

:func:`optimize_theta` does the same for uniform noise on the cube of half-width theta (the l1
certificate), whose surrogate is linear in the probabilities: ``R(theta) = theta * (E_A - E_B)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from ddrs_ext import ops, rng
from ddrs_ext._validate import check_count, check_logits, evaluating
from ddrs_ext.certification import check_sampling_args, plan_chunks
from ddrs_ext.noise import GAUSSIAN, UNIFORM, Noise, resolve_noise, scale_name

ESTIMATORS = ("reparam", "score")
RULES = {"ascent": 0, "bisect": 1}
SURROGATES = ("paper", "certify")

#: The published procedure as in the authors' ``OptimzeSigma.py`` (the function their README says to
#: embed): 900 iterations of 100 samples, lr 0.04, autograd through the model (reparameterisation),
#: plain ascent, ``E_A, E_B`` clipped to [0.02, 0.98]. It matches the published loop step for step
#: while sigma stays inside ``sigma_range`` (the published loop has no range and lets sigma go negative).
PAPER_SETTINGS = dict(
    iterations=900, lr=0.04, num_samples=100, estimator="reparam", rule="ascent", clip=(0.02, 0.98)
)

#: The same procedure as the authors' ``run_optimization_dataset.py`` runs it (through their
#: ``ddsmoothing`` package, whose ``L2Certificate`` clamps ``E_A, E_B`` to [0.001, 0.999]).
PAPER_DATASET_SETTINGS = dict(PAPER_SETTINGS, clip=(0.001, 0.999))

#: The authors' l1 procedure (their ``ddsmoothing`` package: ``run_optimization_dataset.py --norm l1``
#: through ``optimize_isotropic_dds`` and ``L1Certificate``), for :func:`optimize_theta`: 900 plain ascent
#: steps of lr 0.04 with 100 samples, autograd through the model, on ``theta * (E_A - E_B)`` with
#: ``E_A, E_B`` the two largest mean probabilities and no clamp (their ``L1Certificate`` clamps
#: nothing; its L2 twin clamps to [0.001, 0.999]). As for :data:`PAPER_SETTINGS`, it follows the
#: published loop while theta stays inside ``sigma_range`` (theirs has no range).
PAPER_L1_SETTINGS = dict(
    iterations=900, lr=0.04, num_samples=100, estimator="reparam", rule="ascent", surrogate="paper"
)


@dataclass
class SigmaStep:
    """What a ``callback`` of :func:`optimize_sigma` receives after each iteration (CPU tensors)."""

    iteration: int
    sigma: torch.Tensor  # (B,) the sigma the iteration evaluated
    radius: torch.Tensor  # (B,) surrogate radius at that sigma
    grad: torch.Tensor  # (B,) dR/dsigma there
    next_sigma: torch.Tensor  # (B,) after the step
    model_rows: int  # rows passed through the model in this iteration


def _check_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_range(
    value, name: str, lower: float, upper: float, allow_equal: bool = False
) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}") from None
    lo, hi = _check_float(lo, name), _check_float(hi, name)
    ordered = lo <= hi if allow_equal else lo < hi
    if not (lower < lo and hi < upper and ordered):
        relation = "<=" if allow_equal else "<"
        raise ValueError(f"{name} must satisfy {lower} < low {relation} high < {upper}, got ({lo}, {hi})")
    return lo, hi


class _SoftSampler:
    """Passes noisy copies of many inputs through the model, packed into forward batches of at most
    ``batch_size`` rows, and accumulates per-input soft votes and their sigma-derivatives."""

    def __init__(self, model, x, stream, seed, batch_size, estimator, probabilities, noise: Noise = GAUSSIAN):
        self.model, self.x, self.stream, self.noise = model, x, stream, noise
        self.seed = ops.as_signed64(seed)
        self.batch_size, self.estimator, self.probabilities = batch_size, estimator, probabilities
        self.dim = x[0].numel() if x.shape[0] else 0
        self.num_classes: int | None = None
        self._kind_checked = False
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape, dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < shape[0]:
            buf = torch.empty(shape, dtype=dtype, device=self.x.device)
            self._buffers[name] = buf
        return buf[: shape[0]]

    def _logits(self, out, rows: int) -> torch.Tensor:
        self.num_classes = check_logits(out, rows, self.num_classes, min_classes=2)
        if not self._kind_checked:  # once per call: it costs a device sync
            check_output_kind(out, self.probabilities)
            self._kind_checked = True
        return out

    def run(self, sigma: torch.Tensor, sample_offset: int, m: int, derivatives: bool):
        """(E, dE): mean class probabilities (B, C) and, if asked, their derivatives in sigma."""
        B = self.x.shape[0]
        sums: dict[str, torch.Tensor] = {}
        reparam = derivatives and self.estimator == "reparam"
        score = derivatives and self.estimator == "score"
        chunks = plan_chunks(B, [m], self.batch_size)
        rows_max = max(rows for rows, _ in chunks)
        shape = (rows_max, *self.x.shape[1:])
        sigma_x = sigma.to(self.x.dtype)
        zeros = self._buffers.get("zeros")
        if reparam and (zeros is None or zeros.shape != self.x.shape):
            zeros = self._buffers["zeros"] = torch.zeros_like(self.x)
        perturb = torch.ops.ddrs_ext.perturb_gaussian_out
        for rows, segments in chunks:
            ((_, row0, _, _),) = segments  # one phase: one segment per chunk
            if reparam:
                # x + sigma * eps with sigma carrying a forward-mode tangent of 1: the model's
                # outputs then carry d logits / d sigma (the reparameterisation gradient; for uniform
                # noise too: d/dtheta f(x + theta u) = grad f . u).
                eps = self._buffer("eps", shape, self.x.dtype)[:rows]
                self.noise.perturb_out(
                    zeros, torch.ones_like(sigma), self.stream, self.seed, sample_offset, m, row0, eps
                )
                owner = torch.arange(row0, row0 + rows, device=self.x.device) // m
                base = torch.index_select(
                    self.x, 0, owner, out=self._buffer("base", shape, self.x.dtype)[:rows]
                )
                with fwAD.dual_level(), warnings.catch_warnings():
                    # torch's forward-mode autograd still calls the deprecated torch.jit.script internally
                    warnings.filterwarnings(
                        "ignore", message=".*torch.jit.script.*", category=DeprecationWarning
                    )
                    s = fwAD.make_dual(
                        sigma_x[owner], torch.ones(rows, dtype=self.x.dtype, device=self.x.device)
                    )
                    noisy = base + s.view(rows, *([1] * (self.x.dim() - 1))) * eps
                    out = self.model(noisy)
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"model must return a tensor of logits, got {type(out).__name__}")
                    out = fwAD.unpack_dual(out)
                    if out.tangent is None:
                        raise ValueError(
                            "the model's output does not depend on its input through forward-mode autograd; "
                            "use estimator='score' for models that autograd cannot differentiate"
                        )
                    logits, dlogits = self._logits(out.primal, rows), out.tangent
            else:
                batch = self._buffer("batch", shape, self.x.dtype)[:rows]
                sq = self._buffer("sq", (rows_max,), torch.float64)[:rows] if score else None
                if score:
                    perturb(self.x, sigma, self.stream, self.seed, sample_offset, m, row0, batch, sq)
                else:
                    self.noise.perturb_out(
                        self.x, sigma, self.stream, self.seed, sample_offset, m, row0, batch
                    )
                logits, dlogits = self._logits(self.model(batch), rows), None
            if not sums:
                C = self.num_classes
                sums["prob"] = torch.zeros(B, C, dtype=torch.float64, device=logits.device)
                if derivatives:
                    sums["deriv"] = torch.zeros(B, C, dtype=torch.float64, device=logits.device)
                if score:
                    sums["total"] = torch.zeros(B, dtype=torch.float64, device=logits.device)
            ops.soft_votes_(
                logits,
                row0,
                m,
                sums["prob"],
                dlogits=dlogits,
                sq_norm=sq if score else None,
                dim=self.dim,
                probabilities=self.probabilities,
                deriv_sum=sums.get("deriv"),
                score_total=sums.get("total"),
            )
        mean = sums["prob"] / m
        if not derivatives:
            return mean, None
        if reparam:
            return mean, sums["deriv"] / m
        # Score function (Stein): dE_k/dsigma = E[p_k (||eps||^2 - D)] / sigma, with the
        # leave-one-out mean of p_k as a baseline: 1/((m-1) sigma) * (T_k - S_k U / m).
        s64 = sigma.to(torch.float64)[:, None]
        deriv = (sums["deriv"] - sums["prob"] * sums["total"][:, None] / m) / ((m - 1) * s64)
        return mean, deriv


def check_output_kind(out: torch.Tensor, probabilities: bool) -> None:
    """Refuses a model output that is plainly of the other kind than ``probabilities`` says.

    Softmax of probabilities is not the model's class distribution: taken as logits, a model that
    ends in softmax looks almost indifferent between its classes, and every sigma is driven to the
    floor of its range. Every row non-negative and summing to 1 is, for logits, a coincidence
    nobody meets in practice."""
    rows = out.detach().to(torch.float64)
    if rows.shape[0] == 0:
        return
    tolerance = 1e-3 if out.dtype in (torch.float32, torch.float64) else 2e-2
    finite = bool(torch.isfinite(rows).all())
    sums_to_one = finite and bool((rows >= 0).all()) and bool(((rows.sum(1) - 1).abs() <= tolerance).all())
    if not probabilities and sums_to_one:
        raise ValueError(
            "the model seems to return class probabilities (every row is non-negative and sums to 1), "
            "but they are taken as logits and a softmax of probabilities drives sigma to its floor; "
            "pass probabilities=True, or return logits (drop the final softmax)"
        )
    if probabilities and finite and not sums_to_one:
        raise ValueError(
            "probabilities=True, but the model's rows are not probability vectors (non-negative, "
            "summing to 1); pass probabilities=False if the model returns logits"
        )


def _prepare(model, x, sigma, batch_size, seed, index, estimator, probabilities, sigma_name, noise=GAUSSIAN):
    x, sigma, batch_size, seed, stream = check_sampling_args(
        model, x, sigma, batch_size, seed, index, scale_name(noise, sigma_name)
    )
    if not isinstance(probabilities, bool):
        raise TypeError(f"probabilities must be a bool, got {probabilities!r}")
    return _SoftSampler(model, x, stream, seed, batch_size, estimator, probabilities, noise), sigma, seed


def optimize_sigma(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma0: float | torch.Tensor,
    *,
    iterations: int = 16,
    lr: float = 0.04,
    num_samples: int = 512,
    estimator: str = "reparam",
    rule: str = "bisect",
    growth: float = 2.0,
    clip: tuple[float, float] = (0.02, 0.98),
    sigma_range: tuple[float, float] = (1e-3, 10.0),
    surrogate: str = "paper",
    keep_prediction: bool = True,
    probabilities: bool = False,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    progress: bool = False,
    callback: Callable[[SigmaStep], None] | None = None,
) -> torch.Tensor:
    """A noise level per input of ``x`` (shape ``(B, ...)``) that maximises its surrogate certified radius.

    Every iteration draws ``num_samples`` fresh noisy copies of each input (copies of many inputs
    share each forward batch of ``batch_size`` rows), estimates the two largest mean class
    probabilities ``E_A, E_B`` and their derivatives in sigma, and takes one step on
    ``R = sigma / 2 * (Phi^-1(clip E_A) - Phi^-1(clip E_B))``.

    estimator: ``"reparam"`` differentiates through the model (forward-mode autograd along the
    noise, the paper's reparameterisation gradient; about one extra forward pass of work);
    ``"score"`` needs forward passes only (black-box or non-differentiable models; Stein's
    lemma with a leave-one-out baseline; its variance grows with the input size, so it suits
    small inputs or many samples).
    rule: ``"bisect"`` (default) doubles or halves sigma (by ``growth``) until the gradient's
    sign brackets the optimum, then bisects the bracket geometrically: ``iterations`` steps pin
    sigma down to a factor ``growth ** 2 ** -(steps after bracketing)``. ``"ascent"`` is the
    paper's plain step ``sigma += lr * dR/dsigma``; with :data:`PAPER_SETTINGS` (or
    :data:`PAPER_DATASET_SETTINGS`) it follows the published algorithm step for step as long as
    sigma stays inside ``sigma_range``.
    clip: the range ``E_A, E_B`` are clipped to (the authors' ``OptimzeSigma.py`` uses (0.02, 0.98),
    their ``run_optimization_dataset.py`` (0.001, 0.999)); a clipped value contributes no derivative.
    sigma_range: sigma never leaves ``[low, high]`` (the published code lets it go negative).
    surrogate: ``"paper"`` maximises ``sigma/2 * (Phi^-1(E_A) - Phi^-1(E_B))`` with ``E_B`` the
    runner-up class; ``"certify"`` maximises ``sigma * Phi^-1(E_A)``, the radius CERTIFY actually
    gives (it bounds the runner-up by ``1 - E_A``), which the paper's surrogate overstates when the
    remaining probability is spread over several classes.
    keep_prediction: (bisection only) treat a sigma as past the optimum when the top class differs
    from the one at ``sigma0`` or its mean probability ``E_A`` falls below 1/2 (where CERTIFY
    abstains). Without it the bracket can run away to a huge sigma where noise swamps the input:
    the surrogate, ``sigma/2 * (Phi^-1(E_A) - Phi^-1(E_B))``, still grows there with sigma even
    when the model calls pure noise some other class, or no class with probability above 1/2.
    probabilities: the model returns class probabilities rather than logits (a model ending in
    softmax). Outputs of the other kind are refused with a ValueError (checked on the first forward
    batch). With logits, -Inf entries (log-probabilities of impossible classes) are allowed; NaN,
    +Inf and rows of only -Inf are refused, as is any non-finite probability.
    seed, index: as for :func:`ddrs_ext.certify`; the noise of iteration ``t`` is sample indices
    ``[t * num_samples, (t + 1) * num_samples)`` of the optimisation phase, so results do not
    depend on ``batch_size``, the chunking or threads.
    callback: called after every iteration with a :class:`SigmaStep`.

    Returns the optimised sigma (B,) float64 on the CPU.
    """
    return _optimize(
        GAUSSIAN,
        model,
        x,
        sigma0,
        iterations=iterations,
        lr=lr,
        num_samples=num_samples,
        estimator=estimator,
        rule=rule,
        growth=growth,
        clip=clip,
        sigma_range=sigma_range,
        surrogate=surrogate,
        keep_prediction=keep_prediction,
        probabilities=probabilities,
        batch_size=batch_size,
        seed=seed,
        index=index,
        progress=progress,
        callback=callback,
    )


def optimize_theta(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    theta0: float | torch.Tensor,
    *,
    iterations: int = 16,
    lr: float = 0.04,
    num_samples: int = 512,
    estimator: str = "reparam",
    rule: str = "bisect",
    growth: float = 2.0,
    clip: tuple[float, float] | None = None,
    sigma_range: tuple[float, float] = (1e-3, 10.0),
    surrogate: str = "certify",
    keep_prediction: bool = True,
    probabilities: bool = False,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    progress: bool = False,
    callback: Callable[[SigmaStep], None] | None = None,
) -> torch.Tensor:
    """A uniform-noise half-width theta per input of ``x`` that maximises its surrogate certified L1
    radius: :func:`optimize_sigma`'s procedure and options for ``certify(..., noise="uniform")``.

    The noise is ``x + theta * u``, ``u`` uniform on ``[-1, 1]^D``, and the surrogate is linear in the
    mean class probabilities: ``"paper"`` maximises ``theta * (E_A - E_B)`` (the authors'
    ``ddsmoothing`` ``L1Certificate``), ``"certify"`` (default) ``theta * (2 E_A - 1)``, the radius
    CERTIFY gives (it bounds the runner-up by ``1 - E_A``), which certified more on the digits (see the
    documentation's l1 section). :data:`PAPER_L1_SETTINGS` is the published procedure.

    The derivatives of ``E_A, E_B`` come from the reparameterisation ``d/dtheta f(x + theta u) =
    grad f(x + theta u) . u`` (forward-mode autograd along ``u``), the only estimator offered:
    Gaussian noise's score-function estimator (Stein's lemma, ``estimator="score"``) does not carry
    over, since the cube's support moves with theta (its derivative is a surface term,
    ``D / theta * (E_surface - E_cube)``). ``clip`` is Gaussian-only too (it keeps ``Phi^-1`` finite; the
    linear surrogate needs none) and must stay None. ``sigma_range`` bounds theta. The other options,
    ``keep_prediction`` (top class changed, or ``E_A < 1/2``: past the optimum), ``seed``, ``index`` and
    the reproducibility they give, are :func:`optimize_sigma`'s.

    Returns the optimised theta (B,) float64 on the CPU.
    """
    return _optimize(
        UNIFORM,
        model,
        x,
        theta0,
        iterations=iterations,
        lr=lr,
        num_samples=num_samples,
        estimator=estimator,
        rule=rule,
        growth=growth,
        clip=clip,
        sigma_range=sigma_range,
        surrogate=surrogate,
        keep_prediction=keep_prediction,
        probabilities=probabilities,
        batch_size=batch_size,
        seed=seed,
        index=index,
        progress=progress,
        callback=callback,
    )


def _optimize(
    noise: Noise,
    model,
    x,
    sigma0,
    *,
    iterations,
    lr,
    num_samples,
    estimator,
    rule,
    growth,
    clip,
    sigma_range,
    surrogate,
    keep_prediction,
    probabilities,
    batch_size,
    seed,
    index,
    progress,
    callback,
    return_radius=False,
):
    """optimize_sigma (Gaussian noise) or optimize_theta (uniform noise).

    ``return_radius``: returns ``(sigma, radius)``, ``radius`` the surrogate the last iteration measured
    at the sigma it started from (before its step), or, with no iterations, the surrogate at ``sigma0``
    measured with the noise a first iteration would draw; both (B,) float64 on the CPU."""
    uniform = noise is UNIFORM
    start_name = "theta0" if uniform else "sigma0"
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if uniform and estimator == "score":
        raise ValueError(
            "estimator='score' is Gaussian-only: its score function (Stein's lemma) needs a density whose "
            "support does not move with the noise level, and uniform noise's cube grows with theta; use "
            "estimator='reparam' (autograd through the model along the noise) with uniform noise"
        )
    if rule not in RULES:
        raise ValueError(f"rule must be one of {tuple(RULES)}, got {rule!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    iterations = check_count(iterations, "iterations", minimum=0)
    num_samples = check_count(num_samples, "num_samples", minimum=2 if estimator == "score" else 1)
    lr = _check_float(lr, "lr")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    growth = _check_float(growth, "growth")
    if not (math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be a finite number > 1, got {growth}")
    if uniform:
        if clip is not None:
            raise ValueError(
                "clip is Gaussian-only (it keeps Phi^-1(E_A), Phi^-1(E_B) finite); uniform noise's surrogate "
                f"theta * (E_A - E_B) is linear in them and needs no clip: leave clip=None, got {clip!r}"
            )
        clip = (0.0, 1.0)  # no clip
    else:
        clip = _check_range(clip, "clip", 0.0, 1.0)
    sigma_range = _check_range(sigma_range, "sigma_range", 0.0, math.inf, allow_equal=True)
    sampler, sigma, seed = _prepare(
        model, x, sigma0, batch_size, seed, index, estimator, probabilities, start_name, noise
    )
    if bool(((sigma < sigma_range[0]) | (sigma > sigma_range[1])).any()):
        raise ValueError(
            f"{start_name} must lie inside sigma_range {sigma_range}; widen the range or change {start_name}"
        )
    if not isinstance(keep_prediction, bool):
        raise TypeError(f"keep_prediction must be a bool, got {keep_prediction!r}")
    B = sampler.x.shape[0]
    bracket = torch.zeros(B, 2, dtype=torch.float64, device=sigma.device)
    anchor = None
    steps = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="optimize_theta" if uniform else "optimize_sigma", unit="it")
    step_options = dict(
        lr=lr, clip=clip, sigma_range=sigma_range, rule=RULES[rule], growth=growth, gap=1 if uniform else 0
    )
    radius = None
    for t in steps:
        if B == 0:
            break
        # forward-mode derivatives still flow under no_grad; no reverse graph is kept
        with torch.no_grad(), evaluating(sampler.model):
            mean, deriv = sampler.run(sigma, rng.PHASE_SIGMA + t * num_samples, num_samples, derivatives=True)
        top2, dtop2, which = _top_two(mean, deriv, surrogate)
        beyond = None
        if keep_prediction and rule == "bisect":
            if anchor is None:
                anchor = which[:, 0].clone()
            # Past the optimum for certification: another class on top, or the top class below
            # 1/2, where CERTIFY abstains however large the surrogate (which uses E_B) says R is.
            beyond = ((which[:, 0] != anchor) | (top2[:, 0] < 0.5)).to(sigma.device)
        new_sigma, radius, grad = ops.sigma_step(sigma, top2, dtop2, bracket, beyond=beyond, **step_options)
        if not bool(torch.isfinite(new_sigma).all()):
            bad = int((~torch.isfinite(new_sigma)).nonzero()[0, 0])
            name = "theta" if uniform else "sigma"
            raise ValueError(f"{name} became non-finite for input {bad}; check the model's outputs")
        if callback is not None:
            callback(SigmaStep(t, sigma.cpu(), radius.cpu(), grad.cpu(), new_sigma.cpu(), B * num_samples))
        sigma = new_sigma
        if progress:
            steps.set_postfix(
                mean_sigma=f"{float(sigma.mean()):.4f}", mean_radius=f"{float(radius.mean()):.4f}"
            )
    if not return_radius:
        return sigma.cpu()
    if B == 0:
        radius = torch.zeros(0, dtype=torch.float64)
    elif radius is None:  # no iterations: the surrogate at sigma0, with the noise of a first iteration
        with torch.no_grad(), evaluating(sampler.model):
            mean, _ = sampler.run(sigma, rng.PHASE_SIGMA, num_samples, derivatives=False)
        top2, dtop2, _ = _top_two(mean, torch.zeros_like(mean), surrogate)
        _, radius, _ = ops.sigma_step(sigma, top2, dtop2, bracket, **step_options)
    return sigma.cpu(), radius.cpu()


def _top_two(mean: torch.Tensor, deriv: torch.Tensor, surrogate: str):
    """``(E_A, E_B)`` as the surrogate uses them, their derivatives, and the classes they belong to."""
    top2, which = mean.topk(2, dim=1)
    dtop2 = deriv.gather(1, which)
    # E_B := 1 - E_A makes the kernel's surrogate sigma * Phi^-1(E_A) (theta * (2 E_A - 1) for uniform)
    if surrogate == "certify":
        top2 = torch.stack([top2[:, 0], 1 - top2[:, 0]], dim=1)
        dtop2 = torch.stack([dtop2[:, 0], -dtop2[:, 0]], dim=1)
    return top2, dtop2, which


def surrogate_radius(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    num_samples: int = 1000,
    clip: tuple[float, float] | None = None,
    probabilities: bool = False,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str = "gaussian",
) -> torch.Tensor:
    """Estimates the surrogate certified radius ``R(sigma)`` of every input from ``num_samples`` fresh
    noise samples (independent of :func:`optimize_sigma`'s). Returns (B,) float64 on the CPU.

    Gaussian noise: ``sigma / 2 * (Phi^-1(clip E_A) - Phi^-1(clip E_B))``, ``clip`` default (0.02, 0.98).
    ``noise="uniform"``: ``sigma * (E_A - E_B)`` with ``sigma`` the cube's half-width theta (no clip:
    leave ``clip=None``)."""
    family = resolve_noise(noise)
    num_samples = check_count(num_samples, "num_samples")
    if family is UNIFORM and clip is not None:
        raise ValueError(
            f"clip is Gaussian-only; uniform noise's surrogate needs none: leave clip=None, got {clip!r}"
        )
    clip = (
        _check_range((0.02, 0.98) if clip is None else clip, "clip", 0.0, 1.0) if family is GAUSSIAN else None
    )
    sampler, sigma, _ = _prepare(
        model, x, sigma, batch_size, seed, index, "score", probabilities, "sigma", family
    )
    if sampler.x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad(), evaluating(sampler.model):
        mean, _ = sampler.run(sigma, rng.PHASE_SURROGATE, num_samples, derivatives=False)
    if family is UNIFORM:
        top2 = mean.topk(2, dim=1).values.cpu()
        return sigma.cpu() * (top2[:, 0] - top2[:, 1])
    top2 = mean.topk(2, dim=1).values.clamp(*clip)
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    )
    q = normal.icdf(top2.cpu())
    return sigma.cpu() / 2 * (q[:, 0] - q[:, 1])
