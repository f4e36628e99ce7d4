"""Sequential certification: CERTIFY's certificates at the radii you read, from fewer model evaluations.

A certified-accuracy table or curve is read at radii ``r_1 < ... < r_m`` (the *radii of interest*).
For one input, CERTIFY with ``n_max`` samples answers, at each ``r_j``, "certified at ``r_j`` or
not"; most inputs settle every one of those answers long before ``n_max``. Sequential certification
draws an input's estimation samples in rounds that end at ``N_1 < ... < N_K = n_max`` (the same for
every input: ``n_max / sqrt(2)^j`` rounded up, down to ``FIRST_ROUND``) and stops the input as soon
as no radius of interest lies between what it has certified and the most it could still certify at
``n_max``.

**The bound.** After round ``k`` an input has ``A_k`` votes for its class among its first ``N_k``
estimation samples, and its lower bound is the one-sided Clopper-Pearson bound at that round's level,

    L_k = CP_lower(A_k, N_k, alpha_k),   alpha_1 + ... + alpha_K = alpha.

The levels are fixed per input before any estimation sample is drawn (they depend on ``alpha``,
``n_max``, the input's sigma and the radii of interest only), so by the union bound over the ``K``
rounds, ``P(p < L_k for some k) <= alpha``: the bound holds at every round at once, whatever rule
decides when to stop (the rule here looks at the votes), and the radius ``sigma * Phi^-1(L_k)`` at
the stopping round (``theta * (2 L_k - 1)``, an L1 radius, for uniform noise) is a certificate of the
same strength as CERTIFY's. Selection samples never
enter the bound. ``p_lower`` is ``L_k`` of the stopping round, ``counts`` are exactly the votes it was
computed from, and ``bound_alpha`` is ``alpha_k``: Clopper-Pearson recomputed from ``counts`` at
``bound_alpha`` gives ``p_lower`` back; recomputed at ``alpha`` it is NOT a valid bound.

**The levels** (where ``alpha`` is spent): nothing on the rounds before the first one at which an
input whose every vote is for its class could certify the smallest radius of interest (those rounds
only stop inputs that cannot); from there, a share ``1/m`` (``m``: how many radii of interest
``n_max`` can certify at all) spread in proportion to ``N_k^-1/2`` (the early rounds, where an input far
above a single radius settles it) and the rest in proportion to ``N_k^2`` (the late rounds, where a
dense grid of radii is resolved; the last round gets about half of it).

**The stopping rule.** The most an input can still reach is the last round's bound if its remaining
samples voted for its class at the rate of a Clopper-Pearson upper bound at ``STEER_ALPHA`` (1 %):
``CP_lower(A_k + U (n_max - N_k), n_max, alpha_K)``. Stopping never affects soundness (stopping or
abstaining early is always allowed), only how often a stopped input's answer at some radius of
interest differs from what it would have been at ``n_max``.

Estimation sample ``i`` of an input is sample ``i`` of :func:`ddrs_ext.certify`'s estimation phase,
so with the same seed both see the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ddrs_ext import rng, stats
from ddrs_ext._validate import check_alpha, check_count, check_num_classes
from ddrs_ext.certification import (
    ABSTAIN,
    CertifyResult,
    VoteSampler,
    _Phase,
    check_labels,
    check_sampling_args,
)
from ddrs_ext.noise import GAUSSIAN, Noise, resolve_noise, scale_name

#: Samples in the first estimation round (the smallest round end).
FIRST_ROUND = 3
#: Each round end is this many times the one before (rounded up from ``n_max`` downwards).
ROUND_RATIO = math.sqrt(2.0)
#: Level of the upper confidence bound that estimates how far an input can still get (steering only).
STEER_ALPHA = 0.01
#: Exponents of the two parts of the levels: ``N_k^EARLY_EXPONENT`` (share 1/m) and ``N_k^LATE_EXPONENT``.
EARLY_EXPONENT, LATE_EXPONENT = -0.5, 2.0
#: Open-ended mode (``radius=None``): the radii of interest are the multiples of ``tolerance * sigma``.
DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class RoundSchedule:
    """Where the estimation rounds end, and the Clopper-Pearson level of each round's bound for one input
    (levels of 0 mark rounds that only stop inputs that cannot certify any radius of interest)."""

    ends: tuple[int, ...]  # cumulative estimation samples per input at the end of each round
    alphas: tuple[float, ...]  # Clopper-Pearson level of each round's bound; they add up to alpha

    def lower(self, successes: np.ndarray, k: int) -> np.ndarray:
        """Round ``k``'s lower bound on the class's probability from its cumulative votes."""
        return stats.clopper_pearson_lower(successes, self.ends[k], self.alphas[k])


def round_ends(n_max: int, first: int = FIRST_ROUND, ratio: float = ROUND_RATIO) -> tuple[int, ...]:
    """The round ends for ``n_max`` estimation samples: ``ceil(n_max / ratio^j)`` for ``j = 0, 1, ...`` while
    at least ``first``, in increasing order (``(n_max,)`` when ``n_max / ratio < first``). With the
    defaults and ``n_max = 100 000``: 32 rounds, 3, 4, 5, 7, 9, ..., 50 000, 70 711, 100 000."""
    ends = {n_max}
    j = 1
    while True:
        end = math.ceil(n_max / ratio**j)
        if end < first or end >= n_max:
            break
        ends.add(end)
        j += 1
    return tuple(sorted(ends))


def _levels(ends: Sequence[int], alpha: float, t_min: np.ndarray, early_share: np.ndarray) -> np.ndarray:
    """Per input (rows of ``t_min``, ``early_share``), the level of every round: see the module's docstring.

    ``t_min``: the probability that certifies the smallest radius of interest; ``early_share``: ``1/m``.
    """
    n = np.asarray(ends, dtype=np.float64)
    K, B = len(n), len(t_min)
    levels = np.zeros((B, K))
    todo = np.ones(B, dtype=bool)
    for k0 in range(K):
        early, late = n[k0:] ** EARLY_EXPONENT, n[k0:] ** LATE_EXPONENT
        share = early_share[todo, None]
        a = alpha * (share * early / early.sum() + (1 - share) * late / late.sum())
        # k0 is the first round that spends alpha once an all-votes input can certify t_min there
        ok = (a[:, 0] ** (1 / n[k0]) >= t_min[todo]) | (k0 == K - 1)
        rows = np.flatnonzero(todo)[ok]
        levels[rows, k0:] = a[ok]
        todo[rows] = False
        if not todo.any():
            break
    return levels


def round_schedule(
    n_max: int,
    alpha: float,
    radius: float | Sequence[float] | None = None,
    sigma: float = 1.0,
    tolerance: float | None = None,
    noise: str | Noise = "gaussian",
) -> RoundSchedule:
    """The rounds and levels of one input with noise level ``sigma`` and these radii of interest (as
    :func:`certify_sequential` takes them; default: the open-ended mode's)."""
    radii = _check_radius(radius)
    tolerance = _check_tolerance(tolerance, radii)
    family = resolve_noise(noise)
    sig = np.array([float(sigma)])
    interest = Interest.make(radii, tolerance, sig, top_radius(family, n_max, alpha))
    stage = SequentialStage([], sig, n_max, alpha, interest, n0=0, noise=family)
    return RoundSchedule(stage.ends, tuple(float(a) for a in stage.levels[0]))


def _check_radius(radius) -> np.ndarray | None:
    """None, or the radii of interest as a sorted float64 array (one or more finite numbers >= 0)."""
    if radius is None:
        return None
    if isinstance(radius, bool) or isinstance(radius, (str, bytes)):
        raise TypeError(f"radius must be a number >= 0, a sequence of them, or None, got {radius!r}")
    if isinstance(radius, torch.Tensor):
        radius = radius.detach().cpu().numpy()
    try:
        r = np.asarray(radius, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"radius must be a number >= 0, a sequence of them, or None, got {radius!r}"
        ) from None
    if r.dtype == object or r.ndim > 1:
        raise TypeError(f"radius must be a number >= 0 or a 1-d sequence of them, got {radius!r}")
    r = r.reshape(-1)
    if r.size == 0:
        raise ValueError("radius must hold at least one radius of interest (or be None: open-ended mode)")
    if not (np.isfinite(r).all() and (r >= 0).all()):
        raise ValueError(f"radius must be a finite number >= 0 (or a sequence of them), got {radius!r}")
    return np.unique(r)


def _check_tolerance(tolerance, radius: np.ndarray | None) -> float:
    if tolerance is None:
        return DEFAULT_TOLERANCE
    if radius is not None:
        raise ValueError(
            "tolerance sets the radii of interest of the open-ended mode (radius=None: every multiple "
            "of tolerance * sigma); with radius given they are those radii, so pass one of radius and "
            "tolerance"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating, np.integer)):
        raise TypeError(f"tolerance must be a number >= 0, got {tolerance!r}")
    t = float(tolerance)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (e.g. 0.1), got {t}")
    return t


@dataclass
class Interest:
    """The radii of interest of each input, absolute, (B, M) float64 sorted along each row; ``every``:
    all radii are of interest (the open-ended mode with tolerance 0)."""

    radii: np.ndarray
    every: bool = False

    @staticmethod
    def make(radius: np.ndarray | None, tolerance: float, scale: np.ndarray, z_max: float) -> Interest:
        """Given radii (the same for every input), or the multiples of ``tolerance * scale[b]`` up to
        ``z_max * scale[b]`` (the open-ended mode; ``scale`` is each input's sigma, or theta for uniform
        noise, and ``z_max`` the largest radius a unit scale can certify: :func:`top_radius`)."""
        B = len(scale)
        if radius is not None:
            return Interest(np.broadcast_to(radius, (B, len(radius))).copy())
        if tolerance == 0:
            return Interest(np.zeros((B, 1)), every=True)
        steps = np.arange(int(math.floor(z_max / tolerance)) + 1, dtype=np.float64) * tolerance
        return Interest(steps[None, :] * np.asarray(scale, dtype=np.float64)[:, None])


def top_radius(noise: Noise, n_max: int, alpha: float) -> float:
    """The largest radius ``n_max`` estimation samples can certify at noise scale 1 (every vote for the
    class, bound ``alpha^(1/n_max)`` at the full ``alpha``); radii are proportional to the scale."""
    return float(noise.radius(np.array([alpha ** (1 / n_max)]), np.ones(1))[0])


def _radius_of(noise: Noise, p: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The radius a bound p certifies (``noise.radius``: sigma * Phi^-1(p), or theta * (2p - 1) for
    uniform noise), and -inf below 1/2 (it abstains)."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(p >= 0.5, noise.radius(p, scale), -np.inf)


def _threshold(noise: Noise, radius: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The smallest bound that certifies ``radius``: Phi(r / sigma), or (1 + r / theta) / 2 for uniform
    noise (above 1 where no bound can)."""
    r = np.asarray(radius, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
    if noise.name == "uniform":
        return (1.0 + r) / 2.0
    return norm.cdf(r)


def unsettled(have: np.ndarray, reach: np.ndarray, radii: np.ndarray, every: bool = False) -> np.ndarray:
    """Which rows still have a radius of interest ``r`` with ``have < r <= reach`` (radii certified now,
    and the most still reachable, -inf for abstaining); with ``every``, any radius (``have < reach``)."""
    if every:
        return (reach > have) & (reach >= 0)
    return ((radii > have[:, None]) & (radii <= reach[:, None])).any(axis=1)


class SequentialStage:
    """One CERTIFY with rounds over a sampler: selection (or given classes), then estimation rounds,
    each input's bound at its own levels. The caller decides, after each round, which inputs go on.

    ``groups``: ``[(sampler, rows)]``, the sampler of each group of inputs (rows: their positions in
    this stage's arrays; each sampler covers exactly its rows, in that order). ``classes``: None to
    select each input's class from ``n0`` selection samples; or the classes, given (true labels, with
    ``n0 = 0``; or a selection made outside, whose ``n0`` samples still count in ``samples``).
    ``noise``: the samplers' noise family, whose radius formula turns bounds into radii.
    """

    def __init__(
        self,
        groups: list[tuple[VoteSampler, np.ndarray]],
        sigma: np.ndarray,
        n_max: int,
        alpha: float,
        interest: Interest,
        *,
        n0: int,
        classes: np.ndarray | None = None,
        num_classes: int | None = None,
        noise: Noise = GAUSSIAN,
    ) -> None:
        B = len(sigma)
        self.noise = noise
        for sampler, _ in groups:
            if sampler.noise is not noise:
                raise ValueError(f"the samplers draw {sampler.noise.name} noise, the stage is {noise.name}")
        self.groups, self.sigma, self.n0, self.n_max = groups, np.asarray(sigma, np.float64), n0, n_max
        self.interest = interest
        self.ends = round_ends(n_max)
        self.num_classes = num_classes
        top = top_radius(noise, n_max, alpha) * self.sigma
        reachable = interest.radii <= top[:, None]
        m = np.inf if interest.every else reachable.sum(axis=1)
        smallest = 0.0 if interest.every else interest.radii[:, 0]
        t_min = _threshold(noise, smallest, self.sigma) * np.ones(B)
        self.levels = _levels(self.ends, alpha, t_min, np.ones(B) / np.maximum(m, 1))
        self.classes = classes  # None until selection (or given labels)
        self.given = classes is not None
        self.counts: np.ndarray | None = None
        self.round = np.full(B, -1)  # the last round each input has drawn
        self.lower = np.zeros(B)
        self.bound_alpha = np.zeros(B)
        self.reach = np.full(B, np.inf)  # most reachable radius (-inf: will abstain)
        self.active = np.ones(B, dtype=bool)  # still drawing

    def _draw(self, phases_of, rows: np.ndarray) -> list[np.ndarray]:
        """Counts of the phases ``phases_of`` for ``rows`` (sorted), by group; returns one (len(rows), C)
        array per phase."""
        out: list[np.ndarray | None] = [None, None]
        for sampler, members in self.groups:
            take = np.isin(members, rows)
            if not take.any():
                continue
            local = np.flatnonzero(take)
            parts = sampler.counts(phases_of, inputs=torch.from_numpy(local))
            C = parts[0].shape[1]
            if self.num_classes is None:
                self.num_classes = C
            elif C != self.num_classes:
                raise ValueError(
                    f"num_classes is {self.num_classes} but the model returned {C} classes; "
                    "pass the model's number of outputs as num_classes (every model must have the same)"
                )
            at = np.searchsorted(rows, members[take])
            for i, part in enumerate(parts):
                if out[i] is None:
                    out[i] = np.zeros((len(rows), C), dtype=np.int64)
                out[i][at] = part.numpy()
        return [o for o in out if o is not None]

    def start(self, rows: np.ndarray) -> None:
        """Selection (unless the classes are given) and the first round for ``rows`` (sorted)."""
        if rows.size == 0:
            return
        first = _Phase(rng.PHASE_ESTIMATION, self.ends[0])
        if self.given:
            (est,) = self._draw([first], rows)
        else:
            select, est = self._draw([_Phase(rng.PHASE_SELECTION, self.n0), first], rows)
            if self.classes is None:
                self.classes = np.zeros(len(self.sigma), dtype=np.int64)
            self.classes[rows] = select.argmax(axis=1)
        if self.given and int(self.classes[rows].max()) >= est.shape[1]:
            raise ValueError(
                f"labels must lie in [0, {est.shape[1]}) (the model returned {est.shape[1]} classes), got "
                f"{int(self.classes[rows].max())}"
            )
        if self.counts is None:
            self.counts = np.zeros((len(self.sigma), est.shape[1]), dtype=np.int64)
        self.counts[rows] = est
        self._update(rows, 0)

    def advance(self, rows: np.ndarray) -> None:
        """The next round for ``rows`` (sorted, started, none at its last round); rows at the same round
        share the forward batches."""
        for k in np.unique(self.round[rows]) + 1:
            at = rows[self.round[rows] == k - 1]
            gap = self.ends[k] - self.ends[k - 1]
            (more,) = self._draw([_Phase(rng.PHASE_ESTIMATION + self.ends[k - 1], gap)], at)
            self.counts[at] += more
            self._update(at, int(k))

    def _update(self, rows: np.ndarray, k: int) -> None:
        n = self.ends[k]
        votes = self.counts[rows, self.classes[rows]]
        level = self.levels[rows, k]
        self.round[rows] = k
        self.lower[rows] = stats.clopper_pearson_lower(votes, n, level)
        self.bound_alpha[rows] = level
        if k == len(self.ends) - 1:
            self.reach[rows] = _radius_of(self.noise, self.lower[rows], self.sigma[rows])
            self.active[rows] = False
            return
        upper = stats.clopper_pearson_upper(votes, n, STEER_ALPHA)
        hoped = np.minimum(votes + upper * (self.n_max - n), self.n_max)
        best = stats.clopper_pearson_lower(hoped, self.n_max, self.levels[rows, -1])
        self.reach[rows] = np.maximum(
            _radius_of(self.noise, best, self.sigma[rows]),
            _radius_of(self.noise, self.lower[rows], self.sigma[rows]),
        )

    def have(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The radius certified now (-inf: abstains)."""
        rows = slice(None) if rows is None else rows
        return _radius_of(self.noise, self.lower[rows], self.sigma[rows])

    def stop(self, rows: np.ndarray) -> None:
        """Stops ``rows``: what they have is final."""
        self.active[rows] = False
        self.reach[rows] = self.have(rows)

    def samples(self) -> np.ndarray:
        """Model evaluations per input (0 for inputs never started)."""
        started = self.round >= 0
        drawn = np.where(started, np.asarray(self.ends)[np.maximum(self.round, 0)], 0)
        return drawn + np.where(started, self.n0, 0)

    def result(self, seed: int, labels: torch.Tensor | None = None) -> CertifyResult:
        B = len(self.sigma)
        classes = np.zeros(B, dtype=np.int64) if self.classes is None else self.classes
        certified = self.lower >= 0.5
        prediction = np.where(certified, classes, ABSTAIN).astype(np.int64)
        counts = self.counts if self.counts is not None else np.zeros((B, self.num_classes or 0), np.int64)
        return CertifyResult(
            prediction=torch.from_numpy(prediction),
            radius=torch.from_numpy(self.noise.radius(self.lower, self.sigma)),
            p_lower=torch.from_numpy(self.lower.copy()),
            counts=torch.from_numpy(counts.copy()),
            sigma=torch.from_numpy(self.sigma.copy()),
            seed=seed,
            samples=torch.from_numpy(self.samples().astype(np.int64)),
            norm=self.noise.norm,
            bound_alpha=torch.from_numpy(self.bound_alpha.copy()),
            labels=labels,
        )


def run_alone(stage: SequentialStage) -> None:
    """Runs one stage to the end: every input stops once no radius of interest lies between what it
    has certified and the most it can still reach (or at the last round)."""
    rows = np.arange(len(stage.sigma))
    stage.start(rows)
    while True:
        rows = np.flatnonzero(stage.active)
        if rows.size == 0:
            return
        done = ~unsettled(
            stage.have(rows), stage.reach[rows], stage.interest.radii[rows], stage.interest.every
        )
        stage.stop(rows[done])
        stage.advance(rows[~done])


def certify_sequential(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    n0: int = 100,
    n_max: int = 100_000,
    alpha: float = 0.001,
    radius: float | Sequence[float] | torch.Tensor | None = None,
    tolerance: float | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str = "gaussian",
) -> CertifyResult:
    """CERTIFY with early stopping per input: the same kind of certificate, with the same answer at the
    radii you read, from fewer model evaluations.

    ``radius``: the radii of interest, one number (e.g. 0.5: is 0.5 certified?) or several (the radii
    of a certified-accuracy table, or a dense grid for a curve). Each input stops as soon as no radius
    of interest lies between the radius it has certified and the most it could still certify with
    ``n_max`` estimation samples (or at ``n_max``): its answer "certified at r or not" at every
    radius of interest is then, up to a small steering error, the one ``n_max`` samples would give;
    between the radii of interest nothing is promised. ``radius=None`` (open-ended mode): the radii of
    interest are the multiples of ``tolerance * sigma`` (default ``DEFAULT_TOLERANCE`` = 0.1, i.e. 0,
    0.025, 0.05, ... for sigma = 0.25) up to the largest radius ``n_max`` can certify; ``tolerance=0``
    makes every radius one of interest (an input that can still certify more runs to ``n_max``).

    The bound holds at every round at once with probability at least ``1 - alpha`` (Clopper-Pearson,
    ``alpha`` split over the rounds; module docstring), so each radius is a certificate as
    :func:`ddrs_ext.certify`'s is. The result is that of each input's stopping round: ``p_lower``
    its bound, computed from exactly ``counts`` (the estimation votes drawn) at level
    ``bound_alpha`` (a share of ``alpha``: recomputing Clopper-Pearson from ``counts`` at ``alpha``
    is not valid); ``radius = sigma * Phi^-1(p_lower)`` (abstain below 1/2; an input that stops
    because no radius of interest is within its reach may abstain though it would certify a smaller
    radius); ``samples`` the model evaluations spent (``n0`` plus the estimation samples).

    ``labels`` (evaluation mode): one true label per input. Certified accuracy only asks whether the
    smoothed classifier returns the label within r, so selection is skipped (``n0`` is not used)
    and the bound is on the label's probability: ``prediction`` is then the LABEL or ``ABSTAIN``
    (never another class; the result's ``labels`` field is set), a sound certificate that the
    smoothed classifier returns the label within ``radius``. Not a prediction: use it to evaluate a
    labelled test set.

    ``noise="uniform"``: uniform noise of half-width ``sigma`` (theta) and L1 radii
    ``sigma * (2 p_lower - 1)``, as for :func:`ddrs_ext.certify` (``result.norm`` is ``"l1"``); the
    radii of interest are then L1 radii (none above ``sigma`` can be certified), and the open-ended
    mode's are the multiples of ``tolerance * sigma`` up to the largest certifiable one.

    ``seed`` and ``index`` determine all noise exactly as for :func:`ddrs_ext.certify` (estimation
    sample ``i`` is certify's sample ``i``); the results do not depend on ``batch_size``, on threads or
    on the other inputs of the batch.
    """
    n0 = check_count(n0, "n0")
    n_max = check_count(n_max, "n_max")
    alpha = check_alpha(alpha)
    radii = _check_radius(radius)
    tolerance = _check_tolerance(tolerance, radii)
    family = resolve_noise(noise)
    x, sigma, batch_size, seed, stream = check_sampling_args(
        model, x, sigma, batch_size, seed, index, scale_name(family)
    )
    num_classes = check_num_classes(num_classes)
    label_tensor = None if labels is None else check_labels(labels, x.shape[0], num_classes)
    sig = sigma.cpu().numpy()
    B = x.shape[0]
    sampler = VoteSampler(model, x, sigma, stream, seed, batch_size, num_classes, family)
    interest = Interest.make(radii, tolerance, sig, top_radius(family, n_max, alpha))
    classes = None if label_tensor is None else label_tensor.numpy().copy()
    stage = SequentialStage(
        [(sampler, np.arange(B))],
        sig,
        n_max,
        alpha,
        interest,
        n0=n0 if classes is None else 0,
        classes=classes,
        num_classes=num_classes,
        noise=family,
    )
    if B:
        run_alone(stage)
    return stage.result(seed, labels=label_tensor)
