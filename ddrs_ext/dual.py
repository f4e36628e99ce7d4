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

Training the selector (its labels, :func:`train_selector`) lives in :mod:`ddrs_ext.selector_training`;
its names are importable from here as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddrs_ext import rng
from ddrs_ext._validate import (
    Model,
    _check_positive,
    _experts,
    check_alpha,
    check_count,
    check_inputs,
    check_model,
    check_num_classes,
    check_sigma_levels,
)
from ddrs_ext.certification import ABSTAIN, CertifyResult, VoteSampler, _Phase, certify, check_sampling_args
from ddrs_ext.noise import Noise, resolve_noise, scale_name
from ddrs_ext.selector_training import (  # noqa: F401  (re-exported: importable from here as before)
    best_level,
    cross_fit_radii,
    default_selector_sigma,
    fold_assignment,
    level_radii,
    soft_level_labels,
    train_selector,
)

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
