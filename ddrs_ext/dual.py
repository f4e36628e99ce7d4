"""Dual certification: a sound data-dependent sigma without a memory (Sun, Mao, Vechev, ICLR 2026).

A sigma chosen per input is not by itself a certificate: if sigma changes inside the ball, the
smoothed classifier the ball is about changes too. Randomized smoothing stays valid where sigma
is *locally constant*, so let a second smoothed classifier choose it: a *selector* over a few
sigma levels ``sigma_1 < ... < sigma_K``, smoothed at its own fixed ``selector_sigma``.

For an input x, with the failure probability split ``alpha = alpha_selector + alpha_classifier``:

1. CERTIFY on the selector picks level k and certifies radius R_sigma: with probability at least
   ``1 - alpha_selector`` the smoothed selector chooses k everywhere in B(x, R_sigma);
2. CERTIFY on the classifier smoothed at ``sigma_k`` (fresh, independent noise) certifies class c
   with radius R_c: with probability at least ``1 - alpha_classifier`` that smoothed classifier
   returns c everywhere in B(x, R_c);
3. so the combined classifier ``h(x') = g_{sigma_{k(x')}}(x')`` returns c everywhere in
   B(x, min(R_sigma, R_c)), with probability at least ``1 - alpha`` (union bound). If either step
   abstains, so does the answer.

Nothing depends on other inputs or on the order of queries (unlike the memory of
:class:`ddrs_ext.CertificationMemory`).

**L1 (``noise="uniform"``).** Both stages then smooth with uniform noise on a cube: the selector at
half-width ``theta_e`` (``selector_sigma``), the classifier at the chosen level's half-width
``theta_k`` (``sigma_levels`` are half-widths). Each CERTIFY radius is then an L1 radius,
``theta * (2 p_lower - 1)`` (:mod:`ddrs_ext.noise`): the smoothed selector chooses k everywhere in the
L1 ball of radius ``R_sigma = theta_e (2 p_lower_e - 1)``, and ``g_{theta_k}`` returns c in the L1 ball
of radius ``R_c``. Step 3 uses nothing but the two balls being of the same norm around the same x, so
``min(R_sigma, R_c)`` is an L1 radius of the combined classifier, with the same ``1 - alpha``. One
noise family serves both stages (a Gaussian selector's L2 radius with a uniform classifier's L1 radius
would need a conversion between norms, which this module does not make).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddrs_ext import rng
from ddrs_ext._validate import check_alpha, check_count, check_inputs, check_model, check_num_classes
from ddrs_ext.certification import ABSTAIN, CertifyResult, VoteSampler, _Phase, certify, check_sampling_args
from ddrs_ext.noise import Noise, resolve_noise, scale_name

Model = Callable[[torch.Tensor], torch.Tensor]

#: Mixed into the seed of the selector's noise, so that it is independent of the classifier's
#: (Philox under another key), while the classifier's noise stays that of ``certify(seed=seed)``.
SELECTOR_SEED_KEY = 0x9E3779B97F4A7C15


def selector_seed(seed: int) -> int:
    """The key of the selector's noise for a run with ``seed`` (a splitmix64 step of ``seed ^ key``)."""
    z = (seed ^ SELECTOR_SEED_KEY) & 0xFFFFFFFFFFFFFFFF
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


@dataclass
class DualCertifyResult:
    """Per-input results of :func:`certify_dual` (all tensors on the CPU).

    prediction: (B,) int64, the certified class or ``ABSTAIN`` (-1).
    radius: (B,) float64, ``min(radius_selector, radius_classifier)``; 0 when abstaining.
    level: (B,) int64, the sigma level the selector chose (index into ``sigma_levels``), or
        ``ABSTAIN`` where the selector abstained (the classifier was then not run).
    sigma: (B,) float64, the chosen level's sigma (NaN where the selector abstained).
    radius_selector, radius_classifier: (B,) float64, the two certified radii (0 when abstaining).
    alpha_selector, alpha_classifier: the split of alpha (their sum is the failure probability).
    selector, classifier: the two :class:`CertifyResult` (the classifier's rows of inputs whose
        selector abstained hold ABSTAIN, radius 0, no counts and 0 samples).
    seed: the seed (the classifier's noise is that of ``certify(..., seed=seed)``; the selector's
        uses ``selector_seed(seed)``).
    samples: (B,) int64, model evaluations per input, selector's and classifier's together.
    norm: the norm of every radius: ``"l2"`` (Gaussian noise) or ``"l1"`` (``noise="uniform"``; then
        ``sigma`` holds the chosen half-width theta_k).
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    level: torch.Tensor
    sigma: torch.Tensor
    radius_selector: torch.Tensor
    radius_classifier: torch.Tensor
    alpha_selector: float
    alpha_classifier: float
    selector: CertifyResult
    classifier: CertifyResult
    seed: int
    samples: torch.Tensor
    norm: str = "l2"


def check_sigma_levels(sigma_levels) -> torch.Tensor:
    """Levels as a float64 tensor (K,): finite, > 0 and strictly increasing, K >= 1."""
    try:
        levels = torch.as_tensor(sigma_levels, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sigma_levels must be a sequence of numbers, got {sigma_levels!r}") from None
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"sigma_levels must be a non-empty 1-d sequence, got shape {tuple(levels.shape)}")
    if not bool((torch.isfinite(levels) & (levels > 0)).all()):
        raise ValueError(f"sigma_levels must all be finite and > 0, got {levels.tolist()}")
    if levels.numel() > 1 and not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(f"sigma_levels must be strictly increasing, got {levels.tolist()}")
    return levels


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def _experts(model, levels: int) -> list[Model]:
    if isinstance(model, (list, tuple)):
        if len(model) != levels:
            raise ValueError(
                f"model is a list of {len(model)} models but there are {levels} sigma levels; "
                "pass one model per level (or a single model for every level)"
            )
        for m in model:
            check_model(m)
        return list(model)
    check_model(model)
    return [model] * levels


def certify_dual(
    model: Model | Sequence[Model],
    selector: Model,
    x: torch.Tensor,
    sigma_levels: Sequence[float] | torch.Tensor,
    *,
    selector_sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    alpha_selector: float | None = None,
    selector_n0: int | None = None,
    selector_n: int | None = None,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    sequential: bool = False,
    radius: float | Sequence[float] | torch.Tensor | None = None,
    tolerance: float | None = None,
    noise: str | Noise = "gaussian",
) -> DualCertifyResult:
    """Certifies every input of ``x`` with a sigma chosen by a certified, smoothed selector.

    ``selector`` returns one logit per entry of ``sigma_levels`` (strictly increasing); smoothed at
    ``selector_sigma`` and certified with CERTIFY (``selector_n0``, ``selector_n``, default ``n0``,
    ``n``; failure probability ``alpha_selector``, default ``alpha / 2``), it picks level k and a
    radius within which that choice is constant. ``model`` (one model for every level, or a list of
    one model per level, e.g. experts trained at each sigma) is then certified at ``sigma_levels[k]``
    with ``n0``, ``n`` and failure probability ``alpha - alpha_selector``. The result's radius is the
    smaller of the two; it holds for the combined classifier with probability at least
    ``1 - alpha``. Inputs whose selector abstains abstain (their classifier is not run).

    ``seed`` and ``index`` determine all noise, as for :func:`ddrs_ext.certify`: the classifier's
    counts for an input equal ``certify(model_k, x, sigma_k, seed=seed, index=...)``'s, and nothing
    depends on ``batch_size``, on the other inputs or on their order.

    ``sequential=True``: both stages stop early, as :func:`ddrs_ext.certify_sequential` does, with
    ``selector_n`` and ``n`` as their most estimation samples and ``radius`` / ``tolerance`` the radii
    of interest as there (absolute radii; in the open-ended mode, multiples of ``tolerance`` times the
    sigma of the level the selector's selection samples pick). The rounds of the two stages run side
    by side, and a stage stops once more of its samples cannot change the combined answer
    ``min(R_sigma, R_c)`` at any radius of interest: no radius of interest lies between what the stage
    has certified and the smaller of the most it and the other stage can still reach. The classifier
    starts once the selector has certified its level (so a selector that abstains costs no classifier
    samples, as without ``sequential``) and only if a radius of interest is within the selector's
    reach. Each stage spends its own share of ``alpha`` over its rounds, so the guarantee is the same.

    ``noise="uniform"``: both stages smooth with uniform noise on a cube (module docstring):
    ``sigma_levels`` and ``selector_sigma`` are half-widths theta, every radius is an L1 radius
    ``theta * (2 p_lower - 1)``, and ``result.norm`` is ``"l1"``; the certificate is
    ``min(R_selector, R_classifier)`` in L1, with the same ``1 - alpha``.
    """
    family = resolve_noise(noise)
    levels = check_sigma_levels(sigma_levels)
    K = levels.numel()
    experts = _experts(model, K)
    check_model(selector)
    x = check_inputs(x)
    selector_sigma = _check_positive(selector_sigma, scale_name(family, "selector_sigma"))
    alpha = check_alpha(alpha)
    if alpha_selector is None:
        alpha_selector = alpha / 2
    alpha_selector = check_alpha(alpha_selector)
    if not alpha_selector < alpha:
        raise ValueError(
            f"alpha_selector must be smaller than alpha ({alpha}), got {alpha_selector}: the rest, "
            "alpha - alpha_selector, is the classifier's failure probability"
        )
    alpha_classifier = alpha - alpha_selector
    n0, n = check_count(n0, "n0"), check_count(n, "n")
    selector_n0 = n0 if selector_n0 is None else check_count(selector_n0, "selector_n0")
    selector_n = n if selector_n is None else check_count(selector_n, "selector_n")
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be True or False, got {sequential!r}")
    if not sequential and (radius is not None or tolerance is not None):
        raise ValueError(
            "radius and tolerance set the radii of interest of sequential=True; pass sequential=True"
        )
    seed = rng.resolve_seed(seed)
    B = x.shape[0]
    stream = rng.resolve_streams(index, B, torch.device("cpu"))
    if sequential:
        from ddrs_ext import sequential as seq

        radii = seq._check_radius(radius)
        tolerance = seq._check_tolerance(tolerance, radii)
        return _certify_dual_sequential(
            experts,
            selector,
            x,
            levels,
            selector_sigma=selector_sigma,
            n0=n0,
            n=n,
            selector_n0=selector_n0,
            selector_n=selector_n,
            alpha_selector=alpha_selector,
            alpha_classifier=alpha_classifier,
            batch_size=batch_size,
            num_classes=check_num_classes(num_classes),
            seed=seed,
            stream=stream,
            radii=radii,
            tolerance=tolerance,
            noise=family,
        )

    try:
        chosen = certify(
            selector,
            x,
            selector_sigma,
            n0=selector_n0,
            n=selector_n,
            alpha=alpha_selector,
            batch_size=batch_size,
            num_classes=K,
            seed=selector_seed(seed),
            index=stream,
            noise=family,
        )
    except ValueError as exc:
        if "num_classes is" in str(exc):
            raise ValueError(
                f"the selector must return one logit per sigma level ({K} levels); {exc}"
            ) from None
        raise
    level = chosen.prediction.clone()
    active = level != ABSTAIN
    sigma = torch.full((B,), math.nan, dtype=torch.float64)
    sigma[active] = levels[level[active]]

    prediction = torch.full((B,), ABSTAIN, dtype=torch.int64)
    radius_c = torch.zeros(B, dtype=torch.float64)
    p_lower = torch.zeros(B, dtype=torch.float64)
    samples_c = torch.zeros(B, dtype=torch.int64)
    counts = None
    groups = (
        [active.nonzero()[:, 0]]
        if len({id(e) for e in experts}) == 1
        else [(active & (level == k)).nonzero()[:, 0] for k in range(K)]
    )
    for rows in groups:
        if rows.numel() == 0:
            continue
        expert = experts[int(level[rows[0]])]
        part = certify(
            expert,
            x[rows.to(x.device)],
            sigma[rows],
            n0=n0,
            n=n,
            alpha=alpha_classifier,
            batch_size=batch_size,
            num_classes=num_classes,
            seed=seed,
            index=stream[rows],
            noise=family,
        )
        num_classes = part.counts.shape[1]
        if counts is None:
            counts = torch.zeros((B, num_classes), dtype=torch.int64)
        prediction[rows] = part.prediction
        radius_c[rows] = part.radius
        p_lower[rows] = part.p_lower
        counts[rows] = part.counts
        samples_c[rows] = part.samples
    if counts is None:
        counts = torch.zeros((B, num_classes or 0), dtype=torch.int64)
    classifier = CertifyResult(
        prediction=prediction.clone(),
        radius=radius_c,
        p_lower=p_lower,
        counts=counts,
        sigma=sigma.clone(),
        seed=seed,
        samples=samples_c,
        norm=family.norm,
    )
    certified = prediction != ABSTAIN  # the selector abstained -> the classifier did not run
    radius = torch.where(certified, torch.minimum(chosen.radius, radius_c), torch.zeros_like(radius_c))
    return DualCertifyResult(
        prediction=prediction,
        radius=radius,
        level=level,
        sigma=sigma,
        radius_selector=chosen.radius,
        radius_classifier=radius_c,
        alpha_selector=alpha_selector,
        alpha_classifier=alpha_classifier,
        selector=chosen,
        classifier=classifier,
        seed=seed,
        samples=chosen.samples + samples_c,
        norm=family.norm,
    )


def _certify_dual_sequential(
    experts: list[Model],
    selector: Model,
    x: torch.Tensor,
    levels: torch.Tensor,
    *,
    selector_sigma: float,
    n0: int,
    n: int,
    selector_n0: int,
    selector_n: int,
    alpha_selector: float,
    alpha_classifier: float,
    batch_size: int,
    num_classes: int | None,
    seed: int,
    stream: torch.Tensor,
    radii: np.ndarray | None,
    tolerance: float,
    noise: Noise,
) -> DualCertifyResult:
    """certify_dual(sequential=True): the two stages' rounds side by side (see certify_dual); ``noise``
    the family of both stages (their radii, and the stopping rule's, in its norm)."""
    from ddrs_ext.sequential import Interest, SequentialStage, top_radius, unsettled

    K, B = levels.numel(), x.shape[0]
    x, sel_sigma, batch_size, sel_seed, sel_stream = check_sampling_args(
        selector,
        x,
        selector_sigma,
        batch_size,
        selector_seed(seed),
        stream,
        sigma_name=scale_name(noise, "selector_sigma"),
    )
    all_rows = np.arange(B)
    sel_sampler = VoteSampler(selector, x, sel_sigma, sel_stream, sel_seed, batch_size, K, noise)
    try:
        if B:
            (chosen,) = sel_sampler.counts([_Phase(rng.PHASE_SELECTION, selector_n0)])
        guess = chosen.argmax(dim=1).numpy() if B else np.zeros(0, dtype=np.int64)
    except ValueError as exc:
        if "num_classes is" in str(exc):
            raise ValueError(
                f"the selector must return one logit per sigma level ({K} levels); {exc}"
            ) from None
        raise
    sigma_k = levels.numpy()[guess]
    interest = Interest.make(radii, tolerance, sigma_k, top_radius(noise, n, alpha_classifier))
    sel = SequentialStage(
        [(sel_sampler, all_rows)],
        np.full(B, float(selector_sigma)),
        selector_n,
        alpha_selector,
        interest,
        n0=selector_n0,
        classes=guess.astype(np.int64),
        num_classes=K,
        noise=noise,
    )
    single = len({id(e) for e in experts}) == 1
    groups = []
    for k in [0] if single else range(K):
        rows = all_rows if single else np.flatnonzero(guess == k)
        if rows.size:
            where = torch.from_numpy(rows).to(x.device)
            sampler = VoteSampler(
                experts[k],
                x[where],
                torch.from_numpy(sigma_k[rows]).to(x.device),
                sel_stream[where],
                seed,
                batch_size,
                num_classes,
                noise,
            )
            groups.append((sampler, rows))
    cls = SequentialStage(
        groups, sigma_k, n, alpha_classifier, interest, n0=n0, num_classes=num_classes, noise=noise
    )

    sel.start(all_rows)
    while True:
        # the classifier starts once the selector has certified its level (radius >= 0) and some radius of
        # interest is within the selector's reach: a selector that abstains costs no classifier samples
        waiting = (cls.round < 0) & (sel.have() >= 0)
        if interest.every:
            waiting &= sel.reach >= 0
        else:
            waiting &= (interest.radii <= sel.reach[:, None]).any(axis=1)
        cls.start(np.flatnonzero(waiting))
        # the combined radius is min(R_sigma, R_c): a stage needs only the radii the other can still reach
        started = cls.round >= 0
        s_rows, c_rows = np.flatnonzero(sel.active), np.flatnonzero(cls.active & started)
        if s_rows.size == 0 and c_rows.size == 0:
            break
        other = np.where(started, cls.reach, np.inf)[s_rows]
        s_go = unsettled(
            sel.have(s_rows), np.minimum(sel.reach[s_rows], other), interest.radii[s_rows], interest.every
        )
        c_go = unsettled(
            cls.have(c_rows),
            np.minimum(cls.reach[c_rows], sel.reach[c_rows]),
            interest.radii[c_rows],
            interest.every,
        )
        sel.stop(s_rows[~s_go])
        cls.stop(c_rows[~c_go])
        sel.advance(s_rows[s_go])
        cls.advance(c_rows[c_go])

    chosen_result = sel.result(sel_seed)
    classifier = cls.result(seed)
    started = cls.round >= 0
    classifier.sigma = torch.from_numpy(np.where(started, sigma_k, math.nan))
    level = chosen_result.prediction.clone()
    picked = level != ABSTAIN
    certified = picked & (classifier.prediction != ABSTAIN)
    prediction = torch.where(certified, classifier.prediction, torch.full_like(level, ABSTAIN))
    sigma = torch.full((B,), math.nan, dtype=torch.float64)
    sigma[picked] = levels[level[picked]]
    radius = torch.where(
        certified, torch.minimum(chosen_result.radius, classifier.radius), torch.zeros(B, dtype=torch.float64)
    )
    return DualCertifyResult(
        prediction=prediction,
        radius=radius,
        level=level,
        sigma=sigma,
        radius_selector=chosen_result.radius,
        radius_classifier=classifier.radius,
        alpha_selector=alpha_selector,
        alpha_classifier=alpha_classifier,
        selector=chosen_result,
        classifier=classifier,
        seed=seed,
        samples=chosen_result.samples + classifier.samples,
        norm=noise.norm,
    )


def nearest_level(sigma: torch.Tensor | Sequence[float], sigma_levels) -> torch.Tensor:
    """Selector training labels: the index of the level nearest to each sigma, on a log scale
    (levels are usually geometric, e.g. 0.12, 0.25, 0.5); ties go to the lower level."""
    levels = check_sigma_levels(sigma_levels)
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1)
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError("sigma must be finite and > 0 to be matched to a level")
    distance = (s.log()[:, None] - levels.log()[None, :]).abs()
    return distance.argmin(dim=1)


def level_radii(
    model: Model | Sequence[Model],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels,
    *,
    n0: int = 64,
    n: int = 512,
    alpha: float = 0.01,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str | Noise = "gaussian",
) -> torch.Tensor:
    """The CERTIFY radius of the true class ``y`` of every input at every level, shape ``(N, K)``
    float64: column k certifies ``model`` (or ``model[k]``, one expert per level) at
    ``sigma_levels[k]`` with ``n0``, ``n``, ``alpha``, ``seed`` and ``index`` (the noise of
    ``certify(model_k, x, sigma_k, seed=seed, index=index)``). An input certified wrongly or abstaining at
    a level gets -1 there. The raw material of selector labels (:func:`best_level`,
    :func:`soft_level_labels`). ``noise="uniform"``: the levels are half-widths theta and the radii L1
    radii ``theta * (2 p_lower - 1)`` (labels for a selector of L1 dual certification)."""
    family = resolve_noise(noise)
    levels = check_sigma_levels(sigma_levels)
    experts = _experts(model, levels.numel())
    x = check_inputs(x)
    y = torch.as_tensor(y, dtype=torch.int64).cpu().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per input ({x.shape[0]}), got {y.shape[0]}")
    seed = rng.resolve_seed(seed)
    radii = torch.empty((x.shape[0], levels.numel()), dtype=torch.float64)
    for k, (expert, sigma) in enumerate(zip(experts, levels.tolist())):
        r = certify(
            expert,
            x,
            sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            seed=seed,
            index=index,
            noise=family,
        )
        radii[:, k] = torch.where(r.prediction == y, r.radius, torch.full_like(r.radius, -1.0))
    return radii


def best_level(
    model: Model | Sequence[Model],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels,
    *,
    n0: int = 64,
    n: int = 512,
    alpha: float = 0.01,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str | Noise = "gaussian",
) -> torch.Tensor:
    """Selector training labels: per input, the level whose CERTIFY radius for the true class ``y``
    is largest (:func:`level_radii`: certified at every level with ``n0``, ``n``, ``alpha``, by one
    model or by one expert per level; an input certified wrongly or abstaining at a level counts as
    radius -1 there; ties go to the lowest level). ``noise`` as for :func:`level_radii` (``"uniform"``:
    the largest L1 radius)."""
    radii = level_radii(
        model,
        x,
        y,
        sigma_levels,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=batch_size,
        seed=seed,
        index=index,
        noise=noise,
    )
    return radii.argmax(1) if radii.numel() else torch.zeros(radii.shape[0], dtype=torch.int64)


_BALANCE_STEPS = 500


def soft_level_labels(
    radii: torch.Tensor,
    *,
    tau: float = 0.25,
    level_weights: Sequence[float] | torch.Tensor | str | None = None,
) -> torch.Tensor:
    """Soft selector labels from :func:`level_radii`: per input, ``q_k`` proportional to
    ``w_k * exp(R_k / tau)`` (rows sum to 1; float32, shape ``(N, K)``).

    ``tau`` (> 0) sets how sharply the labels prefer the level with the largest radius (towards 0,
    :func:`best_level`'s one-hot labels). ``level_weights``: None (all 1), K positive numbers, or
    ``"balanced"``: the weights (found by iterative proportional fitting) under which every level
    carries the same total label mass, ``mean_x q_k(x) = 1/K`` (levels that win rarely are not drowned
    by the rest).
    """
    radii = torch.as_tensor(radii, dtype=torch.float64).detach().cpu()
    if radii.dim() != 2 or radii.shape[1] == 0:
        raise ValueError(f"radii must have shape (inputs, levels), got {tuple(radii.shape)}")
    if not bool(torch.isfinite(radii).all()):
        raise ValueError("radii must be finite (level_radii gives -1 where a level is wrong or abstains)")
    tau = _check_positive(tau, "tau")
    K = radii.shape[1]
    logits = radii / tau
    if level_weights is None:
        return torch.softmax(logits, 1).float()
    if isinstance(level_weights, str):
        if level_weights != "balanced":
            raise ValueError(
                f"level_weights must be None, 'balanced' or {K} positive numbers, got {level_weights!r}"
            )
        # iterative proportional fitting: rescale each level's weight until the mean labels are all 1/K
        if radii.shape[0] == 0:
            return torch.zeros((0, K), dtype=torch.float32)
        log_w = torch.zeros(K, dtype=torch.float64)
        for _ in range(_BALANCE_STEPS):
            mass = torch.softmax(logits + log_w[None, :], 1).mean(0)
            if not bool((mass > 0).all()):
                raise ValueError(
                    "level_weights='balanced': a level gets no label mass at all at this tau (its labels "
                    "underflow); raise tau or pass explicit weights"
                )
            if float((mass * K - 1).abs().max()) < 1e-6:
                break
            log_w = log_w - (mass * K).log()
        weights = (log_w - log_w.max()).exp()
    else:
        try:
            weights = torch.as_tensor(level_weights, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"level_weights must be None, 'balanced' or {K} positive numbers") from None
        if weights.shape != (K,) or not bool((torch.isfinite(weights) & (weights > 0)).all()):
            raise ValueError(
                f"level_weights must be {K} finite numbers > 0 (one per level), got {weights.tolist()}"
            )
    return torch.softmax(logits + weights.log()[None, :], 1).float()


def fold_assignment(count: int, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. folds-1) of each of ``count`` inputs in :func:`cross_fit_radii` with ``seed``: a
    permutation drawn from ``seed`` dealt round-robin, so the folds differ in size by at most one."""
    count, folds = check_count(count, "count", minimum=0), check_count(folds, "folds", minimum=1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(rng.resolve_seed(seed)))
    part = torch.empty(count, dtype=torch.int64)
    part[order] = torch.arange(count) % folds
    return part


def cross_fit_radii(
    fit: Callable[[torch.Tensor, torch.Tensor, int], Model | Sequence[Model]],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels,
    *,
    folds: int = 5,
    n0: int = 64,
    n: int = 512,
    alpha: float = 0.01,
    batch_size: int = 1000,
    seed: int | None = None,
    noise: str | Noise = "gaussian",
) -> torch.Tensor:
    """:func:`level_radii` of every input by experts that never trained on it (cross-fitting).

    The inputs are dealt into ``folds`` parts (:func:`fold_assignment` with ``seed``); for each part j,
    ``fit(x_rest, y_rest, j)`` trains and returns a model (or one expert per level) on the other parts,
    which then certifies part j. Experts certify the inputs they trained on with larger radii than
    unseen ones, mostly at large sigma, so labels from their own training inputs teach a selector to
    pick large levels too often; held-out radii look like those of test inputs. Input i's noise stream
    is i (``index``), keyed by ``seed``. Returns ``(N, K)`` radii, -1 where wrong or abstaining.
    ``noise`` as for :func:`level_radii` (``"uniform"``: L1 radii at half-widths theta).
    """
    family = resolve_noise(noise)
    x = check_inputs(x)
    y = torch.as_tensor(y, dtype=torch.int64).cpu().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per input ({x.shape[0]}), got {y.shape[0]}")
    folds = check_count(folds, "folds", minimum=2)
    if folds > x.shape[0]:
        raise ValueError(f"folds ({folds}) must not exceed the number of inputs ({x.shape[0]})")
    if not callable(fit):
        raise TypeError("fit must be a callable fit(x, y, fold) returning a model or one model per level")
    levels = check_sigma_levels(sigma_levels)
    seed = rng.resolve_seed(seed)
    part = fold_assignment(x.shape[0], folds, seed)
    radii = torch.empty((x.shape[0], levels.numel()), dtype=torch.float64)
    for j in range(folds):
        held = (part == j).nonzero()[:, 0]
        rest = (part != j).nonzero()[:, 0]
        model = fit(x[rest.to(x.device)], y[rest].to(y.device), j)
        radii[held] = level_radii(
            model,
            x[held.to(x.device)],
            y[held],
            levels,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            seed=seed,
            index=held,
            noise=family,
        )
    return radii


def default_selector_sigma(sigma_levels) -> float:
    """The selector's noise level when none is given: the largest level. A selector smoothed at a smaller
    sigma than the classifier it routes to certifies smaller radii than that classifier can, so its
    radius, not the classifier's, would bound the certificate of the inputs it sends to large levels."""
    return float(check_sigma_levels(sigma_levels).max())


def _selector_targets(labels, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(targets on x's device, soft): int labels (N,) or soft labels (N, K), checked and normalised."""
    labels = torch.as_tensor(labels).detach()
    if labels.dim() == 0 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have one entry per input ({x.shape[0]}; a row of soft labels per input), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dim() == 2 and labels.is_floating_point():
        if not bool((torch.isfinite(labels) & (labels >= 0)).all()) or not bool((labels.sum(1) > 0).all()):
            raise ValueError("soft labels must be finite, >= 0, with a positive sum in every row")
        soft = labels.to(device=x.device, dtype=torch.float32)
        return soft / soft.sum(1, keepdim=True), True
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
        raise TypeError(
            "labels must be level indices (an integer tensor of shape (N,)) or soft labels (a float tensor "
            f"of shape (N, K)), got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    return labels.to(device=x.device, dtype=torch.int64), False


def train_selector(
    selector: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    selector_sigma: float | None = None,
    sigma_levels: Sequence[float] | torch.Tensor | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int | None = None,
    copies: int = 1,
    lam: float = 0.0,
    eta: float = 0.0,
    noise: str | Noise = "gaussian",
) -> list[float]:
    """Trains ``selector`` to predict ``labels`` under Gaussian augmentation at ``selector_sigma``, the
    noise it will be certified with (``noise="uniform"``: uniform augmentation on the cube of half-width
    ``selector_sigma``, for ``certify_dual(..., noise="uniform")``).

    ``labels``: level indices (N,) (:func:`best_level`, or :func:`nearest_level` of
    :func:`ddrs_ext.optimize_sigma`'s result on each training input), trained with cross-entropy, or soft
    labels (N, K) (:func:`soft_level_labels`; rows are normalised), trained with the cross-entropy against
    them. ``selector_sigma`` defaults to :func:`default_selector_sigma` of ``sigma_levels`` (the largest
    level); pass one of the two. Each input is seen as ``copies`` noisy copies per step; ``lam`` and
    ``eta`` add :func:`ddrs_ext.training.consistency_penalty` over those copies (``lam > 0`` needs
    ``copies >= 2``), which makes the smoothed selector's vote, and so its certified radius, larger.
    Adam, shuffled minibatches; ``seed`` (None: drawn from torch's generator) fixes the order and the
    noise (with integer labels, ``copies = 1`` and no penalty, exactly the noise of earlier versions). The
    selector's mode is restored afterwards. Returns the mean loss of every epoch.
    """
    from ddrs_ext.training import consistency_penalty, noisy_copies

    family = resolve_noise(noise)
    x = check_inputs(x)
    targets, soft = _selector_targets(labels, x)
    if selector_sigma is None:
        if sigma_levels is None:
            raise ValueError(
                "pass selector_sigma, or sigma_levels to smooth the selector at the largest level"
            )
        selector_sigma = default_selector_sigma(sigma_levels)
    selector_sigma = _check_positive(selector_sigma, scale_name(family, "selector_sigma"))
    epochs, batch_size = check_count(epochs, "epochs", minimum=0), check_count(batch_size, "batch_size")
    copies = check_count(copies, "copies")
    lr = _check_positive(lr, "lr")
    for name, value in (("lam", lam), ("eta", eta)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if lam > 0 and copies < 2:
        raise ValueError(
            "lam > 0 (the consistency term) compares noisy copies of each input: pass copies >= 2"
        )
    seed = rng.resolve_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(selector.parameters(), lr=lr)
    was_training = selector.training
    selector.train()
    losses = []
    checked = False
    try:
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=order_gen).to(x.device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                rows = order[start : start + batch_size]
                noisy = noisy_copies(
                    x[rows],
                    selector_sigma,
                    copies=copies,
                    seed=(seed + epoch + 1) % 2**64,
                    index=rows.cpu(),
                    noise=family,
                )
                logits = selector(noisy)
                if not checked:
                    _check_selector_output(logits, targets, soft)
                    checked = True
                target = targets[rows].repeat_interleave(copies, 0)
                if soft:
                    loss = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
                else:
                    loss = torch.nn.functional.cross_entropy(logits, target)
                if lam > 0 or eta > 0:
                    loss = loss + consistency_penalty(
                        logits.reshape(rows.numel(), copies, -1), lam=lam, eta=eta
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * rows.numel()
            losses.append(total / max(x.shape[0], 1))
    finally:
        selector.train(was_training)
    return losses


def _check_selector_output(logits, targets: torch.Tensor, soft: bool) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("the selector must return logits of shape (batch, levels)")
    K = logits.shape[1]
    if soft and targets.shape[1] != K:
        raise ValueError(
            f"the soft labels have {targets.shape[1]} levels but the selector returns {K} logits"
        )
    if not soft and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= K):
        raise ValueError(f"labels must be level indices in [0, {K}) (the selector returns {K} logits)")
