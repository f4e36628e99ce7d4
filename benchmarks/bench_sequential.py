"""certify_sequential against certify(n = 100 000): model evaluations, wall time, and the certificates.

Models (``MODELS``):

- ``digits``: ``ddrs_ext.models.digits_cnn`` trained as ``ddrs demo`` trains its fixed-sigma model
  (Gaussian augmentation at sigma 0.25, Adam 3e-3, batches of 64, 15 epochs, seed 0; the loop of
  ``ddrs/train_digits.py``, written out here, run with one thread: its weights equal
  ``python -m ddrs.train_digits --scheme gaussian`` run with one thread, bit for bit), certified at
  sigma 0.25 on the first ``inputs`` test images of the demo's split;
- ``cnn``: the CIFAR-shaped small CNN of the other benchmarks (``baselines.small_cnn``, untrained)
  on uniform random 3x32x32 inputs, each with its own sigma in [0.12, 0.5] (``baselines.sigmas``).

Per model, every run with n0 = 100, alpha = 0.001, seed 0, the same batch size:
``certify(n=100 000)`` (the baseline, group ``sequential_<model>``), ``certify_sequential`` with
``radius=r`` and in curve mode at the tolerances ``TOLERANCES`` (the cnn: the default only), and, on
the digits, ``certify(n=100 000)`` with seed 1 (how far certify disagrees with itself). Each is timed
once (a run takes minutes on a CPU). ``extra_info`` holds the model evaluations (rows through the
model, counted by a wrapper and checked against ``samples``), their ratio to certify's, how the
certificates compare with certify's, and the per-input predictions, radii and samples:

- radius mode: the share of inputs with the same decision at r (certified at r with the same class,
  or not certified at r); targets: >= 10x fewer evaluations, >= 99 % the same decisions;
- curve mode: the largest difference of certified accuracy (digits; certified share for the
  untrained cnn, which has no labels) at radii from 0 to 90 % of the largest radius n_max can
  certify; targets: <= 1/3 of the evaluations, <= 0.01.

``test_sequential_bounds`` (group ``sequential_bounds``) compares candidate time-uniform bounds
without the model: Bernoulli streams with the digits model's top-class rates measured by the
certify run (its counts / n), simulated over ``SIM_SEEDS`` seeds, through the same stopping rules
(for the betting sequence, the reachable bound of the stop rule is Clopper-Pearson at alpha).

With ``--quick`` or ``--benchmark-disable`` (CI) the quick ``SETTINGS`` apply (n_max 2 000, a
1-epoch model); the numbers then only show that the code runs. The printed table (``-s``) is what
the README's section on sequential certification shows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from baselines import sigmas, small_cnn
from conftest import is_quick
from scipy.stats import norm
from torch import nn

import ddrs_ext
from ddrs_ext import ABSTAIN, certify, certify_sequential, stats, training
from ddrs_ext.data import load_digits_split
from ddrs_ext.models import digits_cnn
from ddrs_ext.sequential import DEFAULT_TOLERANCE, round_schedule, stop_now

DEVICES = ("cpu", "cuda")
ALPHA, N0, SEED = 0.001, 100, 0
TOLERANCES = (0.02, 0.05, 0.1)  # the cnn runs DEFAULT_TOLERANCE only
SIM_SEEDS = 8


@dataclass(frozen=True)
class Setting:
    inputs: int
    n_max: int
    radius: float  # r of radius mode
    batch_size: int
    epochs: int  # training epochs (digits)


SETTINGS = {
    False: {"digits": Setting(100, 100_000, 0.5, 2000, 15), "cnn": Setting(8, 100_000, 0.1, 500, 0)},
    True: {"digits": Setting(8, 2_000, 0.5, 2000, 1), "cnn": Setting(2, 1_000, 0.1, 500, 0)},
}
MODELS = {
    "digits": "digits CNN (Gaussian augmentation, sigma 0.25, as ddrs demo trains it)",
    "cnn": "CIFAR-shaped small CNN, untrained, per-input sigma",
}


def train_digits_cnn(epochs: int, sigma: float = 0.25, seed: int = 0) -> nn.Module:
    """The demo's fixed-sigma model: ddrs/train_digits.py with --scheme gaussian, written out."""
    torch.manual_seed(seed)
    (x, y), _ = load_digits_split(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y)).split(64):
            loss = training.gaussian_augmentation_loss(model, x[index], y[index], sigma, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


class Counted(nn.Module):
    """The model, counting the rows passed through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


def largest_radius(sigma: torch.Tensor, n: int, alpha: float) -> float:
    """The largest radius CERTIFY with n samples can give: every vote for the class."""
    return float(sigma.max()) * float(norm.ppf(alpha ** (1 / n)))


def curve_gap(a: ddrs_ext.CertifyResult, b: ddrs_ext.CertifyResult, labels, top: float) -> float:
    """Largest difference of certified accuracy (certified share without labels) at radii 0 .. top."""
    radii = torch.linspace(0, top, 400, dtype=torch.float64)

    def curve(r: ddrs_ext.CertifyResult) -> torch.Tensor:
        good = r.prediction != ABSTAIN if labels is None else r.prediction == labels
        return ((r.radius[None, :] >= radii[:, None]) & good[None, :]).double().mean(1)

    return float((curve(a) - curve(b)).abs().max())


def same_decisions(a: ddrs_ext.CertifyResult, b: ddrs_ext.CertifyResult, r: float) -> float:
    """Share of inputs that both certify at radius r with the same class, or that neither does."""
    ca = (a.prediction != ABSTAIN) & (a.radius >= r)
    cb = (b.prediction != ABSTAIN) & (b.radius >= r)
    same = (ca == cb) & (~ca | (a.prediction == b.prediction))
    return float(same.double().mean())


class SequentialCase:
    def __init__(self, name: str, setting: Setting, device: torch.device) -> None:
        self.name, self.setting, self.device = name, setting, device
        B = setting.inputs
        if name == "digits":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the same weights on every machine (float sums depend on threads)
            model = train_digits_cnn(setting.epochs)
            torch.set_num_threads(threads)
            _, (x, y) = load_digits_split(0)
            self.x, self.labels = x[:B], y[:B]
            self.sigma = torch.full((B,), 0.25, dtype=torch.float64)
        else:
            model = small_cnn()
            self.x = torch.rand((B, 3, 32, 32), generator=torch.Generator().manual_seed(3))
            self.labels = None
            self.sigma = sigmas(B)
        self.model = Counted(model.to(device))
        self.x, self.sigma = self.x.to(device), self.sigma.to(device)
        self.top = 0.9 * largest_radius(self.sigma, setting.n_max, ALPHA)
        self._certify: tuple[ddrs_ext.CertifyResult, int, float] | None = None
        self.info = dict(
            model=MODELS[name],
            inputs=B,
            n0=N0,
            n_max=setting.n_max,
            alpha=ALPHA,
            batch_size=setting.batch_size,
            device=str(device),
        )

    def run(self, fn, seed: int = SEED, **kwargs) -> tuple[ddrs_ext.CertifyResult, int, float]:
        self.model.rows = 0
        start = time.perf_counter()
        result = fn(
            self.model,
            self.x,
            self.sigma,
            n0=N0,
            alpha=ALPHA,
            batch_size=self.setting.batch_size,
            seed=seed,
            **kwargs,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        assert int(result.samples.sum()) == self.model.rows  # samples counts every evaluation
        return result, self.model.rows, seconds

    def certify(self) -> tuple[ddrs_ext.CertifyResult, int, float]:
        if self._certify is None:
            self._certify = self.run(certify, n=self.setting.n_max)
        return self._certify

    def sequential(self, **kwargs) -> tuple[ddrs_ext.CertifyResult, int, float]:
        return self.run(certify_sequential, n_max=self.setting.n_max, **kwargs)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, device) -> SequentialCase:
    torch.manual_seed(0)
    return SequentialCase(request.param, SETTINGS[is_quick(request.config)][request.param], device)


ROWS: list[str] = []


def _row(case: SequentialCase, label: str, rows: int, seconds: float, compare: str) -> None:
    _, base_rows, base_seconds = case.certify()
    line = (
        f"| {case.name} | {label} | {rows / case.setting.inputs:,.0f} | {base_rows / rows:.1f}x | "
        f"{seconds:.1f} s | {base_seconds / seconds:.1f}x | {compare} |"
    )
    ROWS.append(line)
    print("\n" + line)


def _timed(benchmark, fn):
    """One timed run of ``fn`` (certify or certify_sequential through ``case.run``); its per-input
    predictions, radii and samples go into ``extra_info["per_input"]`` (e.g. to draw the curves)."""
    box = []
    benchmark.pedantic(lambda: box.append(fn()), rounds=1, iterations=1, warmup_rounds=0)
    result = box[0][0]
    benchmark.extra_info["per_input"] = {
        "prediction": result.prediction.tolist(),
        "radius": result.radius.tolist(),
        "samples": result.samples.tolist(),
    }
    return box[0]


def test_sequential_certify(benchmark, case):
    benchmark.group = f"sequential_{case.name}"
    benchmark.extra_info.update(case.info, label=f"certify(n={case.setting.n_max})")
    result, rows, seconds = _timed(benchmark, case.certify)
    assert (result.counts.sum(1) == case.setting.n_max).all()
    benchmark.extra_info.update(evaluations=rows, seconds=seconds)
    if case.labels is not None:
        good = result.prediction == case.labels
        benchmark.extra_info["certified_accuracy_at_r"] = float(
            (good & (result.radius >= case.setting.radius)).double().mean()
        )
    _row(case, f"certify(n={case.setting.n_max})", rows, seconds, "")


def test_sequential_certify_other_noise(benchmark, case):
    """certify(n = n_max) again with another seed: how far two runs of certify itself disagree."""
    if case.name != "digits":
        pytest.skip("measured on the digits model")
    r = case.setting.radius
    benchmark.group = f"sequential_{case.name}"
    benchmark.extra_info.update(case.info, label=f"certify(n={case.setting.n_max}), seed {SEED + 1}")
    base = case.certify()[0]
    result, rows, seconds = _timed(benchmark, lambda: case.run(certify, seed=SEED + 1, n=case.setting.n_max))
    gap, agree = curve_gap(result, base, case.labels, case.top), same_decisions(result, base, r)
    benchmark.extra_info.update(evaluations=rows, seconds=seconds, curve_gap=gap, same_decisions=agree)
    what = "certified accuracy" if case.labels is not None else "certified share"
    _row(
        case,
        f"certify(n={case.setting.n_max}), other noise",
        rows,
        seconds,
        f"same decision at r: {agree:.3f}; {what} gap: {gap:.3f}",
    )


def test_sequential_radius(benchmark, case):
    r = case.setting.radius
    benchmark.group = f"sequential_{case.name}"
    benchmark.extra_info.update(case.info, label=f"certify_sequential(radius={r})", radius=r)
    base = case.certify()[0]
    result, rows, seconds = _timed(benchmark, lambda: case.sequential(radius=r))
    assert (result.samples <= N0 + case.setting.n_max).all()
    agree = same_decisions(result, base, r)
    ratio = case.certify()[1] / rows
    benchmark.extra_info.update(
        evaluations=rows,
        seconds=seconds,
        evaluation_ratio=ratio,
        same_decisions=agree,
        targets={"evaluation_ratio >=": 10.0, "same_decisions >=": 0.99},
    )
    _row(case, f"sequential, radius={r}", rows, seconds, f"same decision at r: {agree:.3f}")


@pytest.mark.parametrize("tolerance", TOLERANCES)
def test_sequential_curve(benchmark, case, tolerance):
    if case.name == "cnn" and tolerance != DEFAULT_TOLERANCE:
        pytest.skip("the cnn runs the default tolerance only")
    benchmark.group = f"sequential_{case.name}"
    benchmark.extra_info.update(
        case.info, label=f"certify_sequential(tolerance={tolerance})", tolerance=tolerance
    )
    base, base_rows, _ = case.certify()
    result, rows, seconds = _timed(benchmark, lambda: case.sequential(tolerance=tolerance))
    assert (result.samples <= N0 + case.setting.n_max).all()
    gap = curve_gap(result, base, case.labels, case.top)
    benchmark.extra_info.update(
        evaluations=rows,
        seconds=seconds,
        evaluation_share=rows / base_rows,
        curve_gap=gap,
        curve_top_radius=case.top,
        targets={"evaluation_share <=": 1 / 3, "curve_gap <=": 0.01},
    )
    what = "certified accuracy" if case.labels is not None else "certified share"
    _row(case, f"sequential, tolerance={tolerance}", rows, seconds, f"{what} gap: {gap:.3f}")


# ------------------------------------------------------------------ bound choice, on simulated streams


class CPSplit:
    """Clopper-Pearson at the rounds of ``round_schedule``; levels from ``weights(ends)`` (certify_sequential
    uses sqrt)."""

    def __init__(self, n_max: int, alpha: float, weights) -> None:
        ends = round_schedule(n_max, alpha).ends
        w = np.asarray(weights(np.asarray(ends, dtype=np.float64)))
        self.schedule = ddrs_ext.sequential.RoundSchedule(ends, tuple(alpha * w / w.sum()))

    def bounds(self, votes, k, _history):
        return self.schedule.lower(votes, k), self.schedule.upper(votes, k)


class Betting:
    """A betting confidence sequence (Waudby-Smith & Ramdas 2023, hedged capital, one side per bound),
    with a constant bet per round, so that it needs only the round's counts: in round k,
    ``lambda = min(sqrt(2 log(1/alpha) / (v N_k)), c / m)`` with v the Bernoulli variance at the rate
    seen before the round (selection samples only for the first: they do not enter the capital).
    The lower bound is the smallest m whose capital has not reached 1/alpha (bisection; the capital
    is monotone in m because the bet does not depend on m below the cap)."""

    def __init__(self, n_max: int, alpha: float, c: float) -> None:
        ends = round_schedule(n_max, alpha).ends
        # only the stop rule reads these levels (its reachable bound: Clopper-Pearson at alpha)
        self.schedule = ddrs_ext.sequential.RoundSchedule(ends, (alpha,) * len(ends))
        self.alpha, self.c = alpha, c
        self.sizes = np.diff([0, *self.schedule.ends])

    def _lower(self, incs: np.ndarray, lams: np.ndarray) -> np.ndarray:
        lo, hi = np.zeros(len(incs)), np.ones(len(incs))
        n = self.sizes[: incs.shape[1]][None, :]
        for _ in range(50):
            m = (lo + hi) / 2
            lam = np.minimum(lams, self.c / m[:, None])
            gain = incs * np.log1p(lam * (1 - m[:, None])) + (n - incs) * np.log1p(-lam * m[:, None])
            reject = np.cumsum(gain, axis=1).max(axis=1) >= math.log(1 / self.alpha)
            lo, hi = np.where(reject, m, lo), np.where(reject, hi, m)
        return lo

    def bounds(self, votes, k, history):
        incs, lams = history["incs"][:, : k + 1], history["lams"][:, : k + 1]
        lower = self._lower(incs, lams)
        upper = 1 - self._lower(self.sizes[None, : k + 1] - incs, lams)
        return lower, upper

    def bet(self, rate: np.ndarray, k: int) -> np.ndarray:
        v = np.clip(rate * (1 - rate), 1e-6, 0.25)
        return np.sqrt(2 * math.log(1 / self.alpha) / (v * self.schedule.ends[k]))


def simulate(p: np.ndarray, method, n_max, alpha, sigma, seed, *, radius=None, tolerance=0.0):
    """One run over Bernoulli(p) streams: (estimation samples per input, radius at the stop, certify's
    radius at n_max on the same stream)."""
    g = np.random.default_rng(seed)
    schedule = method.schedule
    sizes = np.diff([0, *schedule.ends])
    incs = g.binomial(sizes[None, :], p[:, None])
    A = np.cumsum(incs, axis=1)
    select = g.binomial(N0, p)
    cert = sigma * _z(stats.clopper_pearson_lower(A[:, -1], n_max, alpha))
    B = len(p)
    history = {"incs": incs, "lams": np.zeros_like(incs, dtype=np.float64)}
    lower, upper = np.zeros(B), np.ones(B)
    used, rad, active = np.full(B, n_max), np.zeros(B), np.arange(B)
    target = None if radius is None else norm.cdf(radius / sigma) * np.ones(B)
    for k, n in enumerate(schedule.ends):
        if isinstance(method, Betting):
            seen = select + (A[:, k - 1] if k else 0)
            history["lams"][:, k] = method.bet(
                (seen + 0.5) / (N0 + (schedule.ends[k - 1] if k else 0) + 1), k
            )
        lo, up = method.bounds(A[:, k], k, history)
        lower, upper = np.maximum(lower, lo), np.minimum(upper, up)
        stop = stop_now(  # certify_sequential's rule
            schedule,
            k,
            A[active, k],
            lower[active],
            upper[active],
            None if target is None else target[active],
            tolerance,
        )
        used[active[stop]] = n
        rad[active[stop]] = sigma * _z(lower[active[stop]])
        active = active[~stop]
    return used, rad, cert


def _z(p):
    return np.where(p >= 0.5, norm.ppf(np.maximum(p, 0.5)), 0.0)


def test_sequential_bounds(benchmark, case):
    if case.name != "digits":
        pytest.skip("simulated on the digits model's rates")
    benchmark.group = "sequential_bounds"
    base = case.certify()[0]
    guess = base.counts.argmax(1)
    p = (base.counts.gather(1, guess[:, None])[:, 0].double() / case.setting.n_max).numpy()
    n_max, sigma, r = case.setting.n_max, 0.25, case.setting.radius
    top = 0.9 * sigma * float(norm.ppf(ALPHA ** (1 / n_max)))
    grid = np.linspace(0, top, 400)
    methods = {
        "Clopper-Pearson, alpha_k ~ sqrt(N_k) (certify_sequential)": CPSplit(n_max, ALPHA, np.sqrt),
        "Clopper-Pearson, alpha_k = alpha / K": CPSplit(n_max, ALPHA, np.ones_like),
        "Clopper-Pearson, alpha_k ~ N_k": CPSplit(n_max, ALPHA, lambda e: e),
        "betting CS, c = 0.5": Betting(n_max, ALPHA, 0.5),
        "betting CS, c = 0.9": Betting(n_max, ALPHA, 0.9),
    }

    def measure():
        table = {}
        for name, method in methods.items():
            row = {}
            for label, kwargs in [("radius", {"radius": r})] + [
                (f"tol {t}", {"tolerance": t}) for t in (0.0, *TOLERANCES)
            ]:
                used, gaps, agree, ratio = [], [], [], []
                for s in range(SIM_SEEDS):
                    u, rad, cert = simulate(p, method, n_max, ALPHA, sigma, s, **kwargs)
                    used.append((u.mean() + N0) / (n_max + N0))
                    gaps.append(
                        np.abs(
                            (rad[None] >= grid[:, None]).mean(1) - (cert[None] >= grid[:, None]).mean(1)
                        ).max()
                    )
                    agree.append(((rad >= r) == (cert >= r)).mean())
                    ok = cert > 0
                    ratio.append((rad[ok] / cert[ok]).mean())
                row[label] = {
                    "evaluation_share": float(np.mean(used)),
                    "curve_gap": float(np.mean(gaps)),
                    "same_decisions_min": float(np.min(agree)),
                    "radius_over_certify": float(np.mean(ratio)),
                }
            table[name] = row
        return table

    table = benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(inputs=len(p), n_max=n_max, seeds=SIM_SEEDS, bounds=table)
    print()
    print(
        "| bound | radius r: evaluations, same decisions | tol 0: radius / certify's | "
        + " | ".join(f"tol {t}: evaluations, curve gap" for t in TOLERANCES)
        + " |"
    )
    for name, row in table.items():
        cells = [
            f"1/{1 / row['radius']['evaluation_share']:.0f}, {row['radius']['same_decisions_min']:.3f}",
            f"{row['tol 0.0']['radius_over_certify']:.3f}",
            *(
                f"{row[f'tol {t}']['evaluation_share']:.2f}, {row[f'tol {t}']['curve_gap']:.3f}"
                for t in TOLERANCES
            ),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    # Two references for the curve gap, on the same simulated streams: certify with fewer samples
    # (a third of the evaluations, the same prefix) and certify with other noise.
    refs = {}
    for label, n in (
        ("certify(n = n_max / 3), same noise prefix", n_max // 3),
        ("certify(n = n_max), other noise", None),
    ):
        gaps = []
        for s in range(SIM_SEEDS):
            g = np.random.default_rng(1000 + s)
            if n is None:
                a, b = g.binomial(n_max, p), g.binomial(n_max, p)
                ra = sigma * _z(stats.clopper_pearson_lower(a, n_max, ALPHA))
            else:
                a = g.binomial(n, p)
                b = a + g.binomial(n_max - n, p)
                ra = sigma * _z(stats.clopper_pearson_lower(a, n, ALPHA))
            rb = sigma * _z(stats.clopper_pearson_lower(b, n_max, ALPHA))
            gaps.append(
                np.abs((ra[None] >= grid[:, None]).mean(1) - (rb[None] >= grid[:, None]).mean(1)).max()
            )
        refs[label] = float(np.mean(gaps))
        print(f"reference: {label}: curve gap {refs[label]:.3f}")
    benchmark.extra_info["curve_gap_references"] = refs


def test_sequential_table():
    """Prints the rows of the runs above as one markdown table (run with -s)."""
    if not ROWS:
        pytest.skip("no runs")
    print(
        "\n| model | method | evaluations / input | fewer | wall time | faster | certificates vs certify's |"
    )
    print("|---|---|---|---|---|---|---|")
    for line in ROWS:
        print(line)
