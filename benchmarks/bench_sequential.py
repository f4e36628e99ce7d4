"""Sequential certification against certify(n = n_max): model evaluations, and the certificates at the
radii of interest.

Full study (hours on a 2-core CPU; run it once)::

    cd benchmarks && DDRS_BENCH_THREADS=1 python -m pytest bench_sequential.py -s --benchmark-json=run.json

CI (``--benchmark-disable``) and ``--quick`` run the same code at toy sizes (``SETTINGS[True]``): the
numbers then only show that it runs.

Models and inputs (``SETTINGS``):

- ``digits``: ``ddrs_ext.models.digits_cnn`` trained as ``ddrs demo`` trains its fixed-sigma model
  (Gaussian augmentation at sigma 0.25, Adam 3e-3, batches of 64, 15 epochs, seed 0, one thread) on
  the TRAINING split of ``ddrs_ext.data.load_digits_splits`` (1100 images), certified at sigma 0.25 on
  all 497 test images; the rule's settings were chosen on the 200 validation images
  (``test_sequential_designs`` shows that comparison);
- ``cnn``: the CIFAR-shaped small CNN of the other benchmarks (``baselines.small_cnn``, untrained, so
  several inputs sit near a tie) on uniform random 3x32x32 inputs, each with its own sigma in
  [0.12, 0.5] (``baselines.sigmas``), no labels (certified share instead of certified accuracy).

A shorter run: ``DDRS_BENCH_DIGITS_INPUTS=100`` certifies the first 100 test digits only (the
digits rows and ``test_labels_against_kt``), and ``-k`` picks the rows, e.g.
``-k "test_certify and digits or digits-paper or digits-radius or labels"``.

Every run: n0 = 100, alpha = 0.001, seed 0, the same batch size. The baseline is certify(n = n_max)
with the same seed, so both see the same noise and a difference is the method's own; certify with
seed 1 shows how far certify differs from itself. Radii of interest: ``GRID`` (40 radii from 0 to
90 % of the largest radius n_max can certify), ``PAPER`` (0, 0.25, 0.5, 0.75, 1), one radius (radius
mode), and the open-ended default (multiples of 0.1 sigma). "Gap": the largest difference of certified
accuracy (certified share for the cnn) from certify's over a set of radii; "evaluations": rows through
the model (counted by a wrapper and checked against ``samples``). Also:

- ``test_labels_against_kt``: evaluation mode (``labels=``) at r = 0.5 against the
  Krichevsky-Trofimov confidence sequence of Voracek's RS_conf_seq (its mathematics reimplemented in
  ``kt_first_decision``, checked after every sample, on the same noise) per band of the true label's
  probability;
- ``test_dual`` and ``test_per_input_sigma``: certify_dual and per-input sigma (optimize_sigma, then
  CertificationMemory) against their sequential versions, on the digits at n = ``DualSetting.n``;
- ``test_sequential_designs``: the designs compared before choosing (the pilot design, other level
  splits and round ratios), simulated on Bernoulli streams at the rates certify measures on the
  VALIDATION split.

The printed tables (``-s``) are what the docs show.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from baselines import sigmas, small_cnn
from conftest import is_quick
from scipy.special import betaln
from scipy.stats import norm
from torch import nn

import ddrs_ext
from ddrs_ext import (
    ABSTAIN,
    CertificationMemory,
    certify,
    certify_dual,
    certify_sequential,
    ops,
    rng,
    stats,
    training,
)
from ddrs_ext import sequential as seq
from ddrs_ext.data import load_digits_splits
from ddrs_ext.dual import best_level, train_selector
from ddrs_ext.models import digits_cnn

DEVICES = ("cpu", "cuda")
ALPHA, N0, SEED = 0.001, 100, 0
PAPER = (0.0, 0.25, 0.5, 0.75, 1.0)
BANDS = ((0.0, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 1.0))  # of the true label's probability
SIM_SEEDS = 4


@dataclass(frozen=True)
class Setting:
    inputs: int
    n_max: int
    radius: float  # r of radius mode
    batch_size: int
    epochs: int  # training epochs (digits)


@dataclass(frozen=True)
class DualSetting:
    inputs: int  # digits test inputs
    n: int  # n (certify, certify_dual) and n_max (sequential)
    levels: tuple[float, ...]
    selector_sigma: float
    selector_epochs: int


def _digits_inputs() -> int:
    """The digits test images of a full run: all 497, or the first ``DDRS_BENCH_DIGITS_INPUTS`` of them
    (a shorter run, e.g. 100 on a busy machine; the printed tables then cover those inputs only)."""
    text = os.environ.get("DDRS_BENCH_DIGITS_INPUTS", "497")
    if not text.isdigit() or not 1 <= int(text) <= 497:
        raise pytest.UsageError(f"DDRS_BENCH_DIGITS_INPUTS must be an integer in [1, 497], got {text!r}")
    return int(text)


SETTINGS = {
    False: {
        "digits": Setting(_digits_inputs(), 100_000, 0.5, 2000, 15),
        "cnn": Setting(8, 100_000, 0.1, 500, 0),
    },
    True: {"digits": Setting(8, 2_000, 0.5, 2000, 1), "cnn": Setting(2, 1_000, 0.1, 500, 0)},
}
DUAL_SETTINGS = {
    False: DualSetting(497, 10_000, (0.25, 0.5, 1.0), 0.5, 15),
    True: DualSetting(8, 500, (0.25, 0.5), 0.5, 1),
}
MODELS = {
    "digits": "digits CNN (Gaussian augmentation, sigma 0.25, trained on the training split)",
    "cnn": "CIFAR-shaped small CNN, untrained, per-input sigma",
}


def train_digits_cnn(epochs: int, sigma: float = 0.25, seed: int = 0) -> nn.Module:
    """The demo's fixed-sigma model: ddrs/train_digits.py with --scheme gaussian, written out, on the
    training split (the validation and test images are not seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine (float sums depend on threads)
    torch.manual_seed(seed)
    x, y = load_digits_splits(seed).train
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y)).split(64):
            loss = training.gaussian_augmentation_loss(model, x[index], y[index], sigma, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
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


def curve(r, labels, radii) -> np.ndarray:
    """Certified accuracy (certified share without labels) at each radius."""
    good = r.prediction != ABSTAIN if labels is None else r.prediction == labels
    at = torch.as_tensor(np.asarray(radii, dtype=np.float64))
    return ((r.radius[None, :] >= at[:, None]) & good[None, :]).double().mean(1).numpy()


def curve_gap(a, b, labels, radii) -> float:
    """Largest difference of the two curves over ``radii``."""
    return float(np.abs(curve(a, labels, radii) - curve(b, labels, radii)).max())


def same_decisions(a, b, r: float) -> float:
    """Share of inputs that both certify at radius r with the same class, or that neither does."""
    ca = (a.prediction != ABSTAIN) & (a.radius >= r)
    cb = (b.prediction != ABSTAIN) & (b.radius >= r)
    same = (ca == cb) & (~ca | (a.prediction == b.prediction))
    return float(same.double().mean())


ROWS: list[str] = []


def _row(name: str, label: str, per_input: float, share: float, compare: str, seconds: float) -> None:
    fewer = f"{share:.3f} ({1 / share:.1f}x fewer)"
    line = f"| {name} | {label} | {per_input:,.0f} | {fewer} | {compare} | {seconds:.0f} s |"
    ROWS.append(line)
    print("\n" + line)


class SequentialCase:
    def __init__(self, name: str, setting: Setting, device: torch.device) -> None:
        self.name, self.setting, self.device = name, setting, device
        B = setting.inputs
        if name == "digits":
            model = train_digits_cnn(setting.epochs)
            x, y = load_digits_splits(0).test
            self.x, self.labels = x[:B], y[:B]
            self.sigma = torch.full((B,), 0.25, dtype=torch.float64)
        else:
            model = small_cnn()
            self.x = torch.rand((B, 3, 32, 32), generator=torch.Generator().manual_seed(3))
            self.labels = None
            self.sigma = sigmas(B)
        self.base = model.to(device)
        self.model = Counted(self.base)
        self.x, self.sigma = self.x.to(device), self.sigma.to(device)
        self.top = 0.9 * largest_radius(self.sigma, setting.n_max, ALPHA)
        self.grid = np.linspace(0, self.top, 40)
        self._certify = None
        self.info = dict(
            model=MODELS[name],
            inputs=B,
            n0=N0,
            n_max=setting.n_max,
            alpha=ALPHA,
            batch_size=setting.batch_size,
            device=str(device),
            grid=self.grid.tolist(),
        )

    def run(self, fn, seed: int = SEED, **kwargs):
        self.model.rows = 0
        start = time.perf_counter()
        result = fn(
            self.model,
            self.x,
            self.sigma,
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

    def certify(self):
        if self._certify is None:
            self._certify = self.run(certify, n0=N0, n=self.setting.n_max)
        return self._certify

    def sequential(self, **kwargs):
        return self.run(certify_sequential, n0=N0, n_max=self.setting.n_max, **kwargs)


_CASES: dict[tuple, SequentialCase] = {}


def _case(name: str, config, device: torch.device) -> SequentialCase:
    """One SequentialCase per model for the whole session (so certify(n = n_max) runs once per model)."""
    key = (name, is_quick(config), str(device))
    if key not in _CASES:
        torch.manual_seed(0)
        _CASES[key] = SequentialCase(name, SETTINGS[is_quick(config)][name], device)
    return _CASES[key]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, device) -> SequentialCase:
    return _case(request.param, request.config, device)


@pytest.fixture(scope="module")
def digits_case(request, device) -> SequentialCase:
    return _case("digits", request.config, device)


def _timed(benchmark, fn):
    """One timed run of ``fn``; the per-input predictions, radii and samples go into ``extra_info``."""
    box = []
    benchmark.pedantic(lambda: box.append(fn()), rounds=1, iterations=1, warmup_rounds=0)
    result = box[0][0]
    benchmark.extra_info["per_input"] = {
        "prediction": result.prediction.tolist(),
        "radius": result.radius.tolist(),
        "samples": result.samples.tolist(),
    }
    return box[0]


def _what(case: SequentialCase) -> str:
    return "certified accuracy" if case.labels is not None else "certified share"


def test_certify(benchmark, case):
    benchmark.group = f"sequential_{case.name}"
    benchmark.extra_info.update(case.info, label=f"certify(n={case.setting.n_max})")
    result, rows, seconds = _timed(benchmark, case.certify)
    assert (result.counts.sum(1) == case.setting.n_max).all()
    benchmark.extra_info.update(
        evaluations=rows, seconds=seconds, curve_grid=curve(result, case.labels, case.grid).tolist()
    )
    _row(case.name, f"certify(n={case.setting.n_max})", rows / case.setting.inputs, 1.0, "", seconds)


def test_certify_other_noise(benchmark, request, case):
    """certify(n = n_max) with seed 1: how far two runs of certify itself differ (a full certify run, so
    only with ``DDRS_BENCH_OTHER_NOISE=1``; the design study simulates the same reference)."""
    if case.name != "digits":
        pytest.skip("measured on the digits model")
    if not is_quick(request.config) and os.environ.get("DDRS_BENCH_OTHER_NOISE") != "1":
        pytest.skip("set DDRS_BENCH_OTHER_NOISE=1 to run certify a second time with other noise")
    benchmark.group = f"sequential_{case.name}"
    benchmark.extra_info.update(case.info, label=f"certify(n={case.setting.n_max}), seed {SEED + 1}")
    base, base_rows, _ = case.certify()
    result, rows, seconds = _timed(
        benchmark, lambda: case.run(certify, seed=SEED + 1, n0=N0, n=case.setting.n_max)
    )
    gaps = {
        "grid": curve_gap(result, base, case.labels, case.grid),
        "paper": curve_gap(result, base, case.labels, PAPER),
    }
    agree = same_decisions(result, base, case.setting.radius)
    benchmark.extra_info.update(evaluations=rows, seconds=seconds, gaps=gaps, same_decisions=agree)
    _row(
        case.name,
        "certify, other noise (seed 1)",
        rows / case.setting.inputs,
        rows / base_rows,
        f"gap: grid {gaps['grid']:.3f}, paper radii {gaps['paper']:.3f}; same decision at r = "
        f"{case.setting.radius}: {agree:.3f}",
        seconds,
    )


MODES = {
    "grid": "radius=GRID (40 radii)",
    "paper": "radius=(0, 0.25, 0.5, 0.75, 1)",
    "open": "open-ended (tolerance 0.1)",
    "radius": "radius=r",
}


@pytest.mark.parametrize("mode", list(MODES))
def test_sequential(benchmark, case, mode):
    r = case.setting.radius
    kwargs = {
        "grid": {"radius": case.grid},
        "paper": {"radius": PAPER},
        "open": {},
        "radius": {"radius": r},
    }[mode]
    benchmark.group = f"sequential_{case.name}"
    label = MODES[mode].replace("=r", f"={r}")
    benchmark.extra_info.update(case.info, label=f"certify_sequential({label})")
    base, base_rows, _ = case.certify()
    result, rows, seconds = _timed(benchmark, lambda: case.sequential(**kwargs))
    assert (result.samples <= N0 + case.setting.n_max).all()
    share = rows / base_rows
    gaps = {
        "grid": curve_gap(result, base, case.labels, case.grid),
        "paper": curve_gap(result, base, case.labels, PAPER),
        "fine (400 radii)": curve_gap(result, base, case.labels, np.linspace(0, case.top, 400)),
    }
    if mode == "open" and bool((case.sigma == case.sigma[0]).all()):  # its own radii: multiples of 0.1 sigma
        own = np.arange(0, case.top, seq.DEFAULT_TOLERANCE * float(case.sigma[0]))
        gaps["own radii"] = curve_gap(result, base, case.labels, own)
    agree = same_decisions(result, base, r)
    benchmark.extra_info.update(
        evaluations=rows, seconds=seconds, evaluation_share=share, gaps=gaps, same_decisions=agree
    )
    if mode == "radius":
        compare = f"same decision at r = {r}: {agree:.3f}"
        benchmark.extra_info["targets"] = {"evaluation_ratio >=": 25.0, "same_decisions >=": 0.99}
    elif mode == "paper":
        compare = f"{_what(case)} gap at the paper radii: {gaps['paper']:.3f}"
        benchmark.extra_info["targets"] = {"evaluation_share <=": 0.2, "gap paper <=": 0.01}
    else:
        compare = f"{_what(case)} gap: grid {gaps['grid']:.3f}, 400 radii {gaps['fine (400 radii)']:.3f}"
        if "own radii" in gaps:
            compare += f", its own radii {gaps['own radii']:.3f}"
        benchmark.extra_info["targets"] = {"evaluation_share <=": 1 / 3, "gap grid <=": 0.01}
    _row(case.name, f"sequential, {label}", rows / case.setting.inputs, share, compare, seconds)


# ------------------------------------------------------------------------------- labels against KT


def kt_run(successes_of, B: int, p0: float, alpha: float, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The Krichevsky-Trofimov sequential test of RS_conf_seq (Voracek), in its mathematics: after N
    samples with A successes, the Beta(1/2, 1/2) mixture likelihood ratio against p0,
    ``log B(A + 1/2, N - A + 1/2) - log B(1/2, 1/2) - A log p0 - (N - A) log(1 - p0)``, is compared with
    ``log(2 / alpha)`` (alpha/2 per side) after every sample: above it with ``A >= p0 N`` decides
    "certified" (p > p0), with ``A <= p0 N`` "not certified".

    Runs it on every input until it decides or reaches ``n_max`` samples; ``successes_of(rows, start,
    m)`` gives the 0/1 outcomes (len(rows), m) of samples ``start .. start + m - 1`` (drawn in blocks;
    only the samples up to the deciding one are counted). Returns the samples the test needs per
    input and its decision (1 certified, 0 not, -1 undecided at n_max)."""
    threshold = math.log(2 / alpha)
    base = betaln(0.5, 0.5)
    used = np.full(B, n_max, dtype=np.int64)
    decision = np.full(B, -1)
    A = np.zeros(B, dtype=np.int64)
    active = np.arange(B)
    start, block = 0, 256
    while active.size and start < n_max:
        m = min(block, n_max - start)
        outcomes = successes_of(active, start, m).astype(np.int64)
        cum = A[active, None] + np.cumsum(outcomes, axis=1)
        N = start + np.arange(1, m + 1, dtype=np.float64)[None, :]
        stat = betaln(cum + 0.5, N - cum + 0.5) - base - cum * math.log(p0) - (N - cum) * math.log1p(-p0)
        hit = stat > threshold
        up, down = hit & (cum >= p0 * N), hit & (cum <= p0 * N)
        first = np.where(hit.any(1), hit.argmax(1), -1)
        done = first >= 0
        rows = active[done]
        used[rows] = start + first[done] + 1
        decision[rows] = np.where(up[done, first[done]], 1, np.where(down[done, first[done]], 0, -1))
        A[active] = cum[:, -1]
        active = active[~done]
        start += m
        block = min(2 * block, 16_384)
    return used, decision


def test_labels_against_kt(benchmark, digits_case):
    """Evaluation mode at r = 0.5: evaluations per band of the true label's probability, against the KT
    confidence sequence on the same noise; decisions against certify(labels, n = n_max)."""
    case = digits_case
    r, n_max, sigma = case.setting.radius, case.setting.n_max, 0.25
    p0 = float(norm.cdf(r / sigma))
    benchmark.group = "sequential_labels"
    base = case.certify()[0]
    y = case.labels.to(base.counts.device)
    votes = base.counts.gather(1, y[:, None])[:, 0].numpy()
    p_label = votes / n_max
    certified = stats.clopper_pearson_lower(votes, n_max, ALPHA) >= p0  # certify(labels)'s decision at r

    result, rows, seconds = _timed(benchmark, lambda: case.sequential(labels=case.labels, radius=r))
    ours = result.samples.numpy()
    our_decision = ((result.prediction == case.labels) & (result.radius >= r)).numpy()

    model, x, s, stream = case.base, case.x, case.sigma, torch.arange(len(y))

    def successes_of(active, start, m):
        where = torch.from_numpy(active).to(x.device)
        out, _ = ops.perturb_gaussian(
            x[where], s[where], stream[active], SEED, rng.PHASE_ESTIMATION + start, m
        )
        with torch.inference_mode():
            cls = model(out).argmax(1).view(len(active), m).cpu()
        return (cls == case.labels[torch.from_numpy(active)][:, None]).numpy()

    kt_used, kt_decision = kt_run(successes_of, len(y), p0, ALPHA, n_max)
    table = {}
    for lo, hi in BANDS:
        inside = (p_label >= lo) & ((p_label < hi) if hi < 1 else (p_label <= hi))
        table[f"[{lo}, {hi})"] = {
            "inputs": int(inside.sum()),
            "ours": float(ours[inside].mean()) if inside.any() else None,
            "kt": float(kt_used[inside].mean()) if inside.any() else None,
        }
    agree_ours = float((our_decision == certified).mean())
    agree_kt = float(((kt_decision == 1) == certified).mean())
    benchmark.extra_info.update(
        case.info,
        radius=r,
        bands=table,
        evaluations=rows,
        kt_evaluations=int(kt_used.sum()),
        same_decisions=agree_ours,
        kt_same_decisions=agree_kt,
        targets={"fewer than KT in every band": True},
    )
    print("\n| band of P(true label) | inputs | sequential, labels= | KT confidence sequence |")
    print("|---|---:|---:|---:|")
    for band, v in table.items():
        if v["inputs"]:
            print(f"| {band} | {v['inputs']} | {v['ours']:,.0f} | {v['kt']:,.0f} |")
    print(
        f"| all | {len(y)} | {ours.mean():,.0f} (same decision as certify(labels): {agree_ours:.3f}) | "
        f"{kt_used.mean():,.0f} ({agree_kt:.3f}) |"
    )


# ------------------------------------------------------------------------------- dual, per-input sigma


@pytest.fixture(scope="module")
def dual_case(request, digits_case):
    s = DUAL_SETTINGS[is_quick(request.config)]
    x_train, y_train = load_digits_splits(0).train
    if is_quick(request.config):
        x_train, y_train = x_train[:100], y_train[:100]
    dev = digits_case.device
    labels = best_level(
        digits_case.base, x_train.to(dev), y_train, list(s.levels), n0=64, n=512, alpha=0.01, seed=7
    )
    torch.manual_seed(0)
    selector = digits_cnn(len(s.levels)).to(dev)
    train_selector(
        selector, x_train.to(dev), labels, selector_sigma=s.selector_sigma, epochs=s.selector_epochs, seed=0
    )
    return s, Counted(selector.eval().requires_grad_(False))


def _compare_rows(name, plain, plain_rows, runs, labels, top, inputs) -> None:
    grid = np.linspace(0, top, 40)
    for label, (result, rows, seconds) in runs.items():
        gaps = (curve_gap(result, plain, labels, grid), curve_gap(result, plain, labels, PAPER))
        _row(
            name,
            label,
            rows / inputs,
            rows / plain_rows,
            f"certified accuracy gap: grid {gaps[0]:.3f}, paper radii {gaps[1]:.3f}",
            seconds,
        )


def test_dual(benchmark, digits_case, dual_case):
    s, selector = dual_case
    case = digits_case
    x, y = case.x[: s.inputs], case.labels[: s.inputs]
    model = case.model
    top = 0.9 * max(s.levels) * float(norm.ppf((ALPHA / 2) ** (1 / s.n)))

    def run(**kwargs):
        model.rows = selector.rows = 0
        start = time.perf_counter()
        r = certify_dual(
            model,
            selector,
            x,
            list(s.levels),
            selector_sigma=s.selector_sigma,
            n0=N0,
            n=s.n,
            alpha=ALPHA,
            seed=SEED,
            batch_size=case.setting.batch_size,
            **kwargs,
        )
        rows = model.rows + selector.rows
        assert int(r.samples.sum()) == rows
        return r, rows, time.perf_counter() - start

    benchmark.group = "sequential_dual"
    plain, plain_rows, plain_seconds = _timed(benchmark, run)
    grid = np.linspace(0, top, 40)
    runs = {
        "certify_dual, sequential, radius=GRID": run(sequential=True, radius=grid),
        "certify_dual, sequential, radius=(0, 0.25, 0.5, 0.75, 1)": run(sequential=True, radius=PAPER),
    }
    _row("digits, dual", f"certify_dual(n={s.n})", plain_rows / len(y), 1.0, "", plain_seconds)
    _compare_rows("digits, dual", plain, plain_rows, runs, y, top, len(y))
    benchmark.extra_info.update(
        settings=s.__dict__, evaluations=plain_rows, sequential={k: v[1] for k, v in runs.items()}
    )


def test_per_input_sigma(benchmark, request, digits_case):
    s = DUAL_SETTINGS[is_quick(request.config)]
    case = digits_case
    x, y = case.x[: s.inputs], case.labels[: s.inputs]
    sigma = ddrs_ext.optimize_sigma(case.base, x, 0.25, seed=SEED, batch_size=case.setting.batch_size)
    top = 0.9 * largest_radius(sigma, s.n, ALPHA)
    model = case.model

    def run(fn, **kwargs):
        model.rows = 0
        start = time.perf_counter()
        r = fn(model, x, sigma, n0=N0, alpha=ALPHA, seed=SEED, batch_size=case.setting.batch_size, **kwargs)
        assert int(r.samples.sum()) == model.rows
        r = CertificationMemory().adjust_result(x, r)
        return r, model.rows, time.perf_counter() - start

    benchmark.group = "sequential_per_input_sigma"
    plain, plain_rows, plain_seconds = _timed(benchmark, lambda: run(certify, n=s.n))
    grid = np.linspace(0, top, 40)
    runs = {
        "sequential + memory, radius=GRID": run(certify_sequential, n_max=s.n, radius=grid),
        "sequential + memory, radius=(0, 0.25, 0.5, 0.75, 1)": run(
            certify_sequential, n_max=s.n, radius=PAPER
        ),
    }
    _row("digits, per-input sigma", f"certify(n={s.n}) + memory", plain_rows / len(y), 1.0, "", plain_seconds)
    _compare_rows("digits, per-input sigma", plain, plain_rows, runs, y, top, len(y))
    benchmark.extra_info.update(
        n=s.n,
        inputs=len(y),
        sigma=sigma.tolist(),
        evaluations=plain_rows,
        sequential={k: v[1] for k, v in runs.items()},
    )


# ------------------------------------------------------------------------------- designs, simulated


class BernoulliPaths:
    """A stand-in for VoteSampler: class 0 is each input's class, its votes Bernoulli(p) streams fixed
    in advance at every sample count in ``points`` (the round ends and the pilot/menu sizes)."""

    def __init__(self, p: np.ndarray, points, seed: int) -> None:
        g = np.random.default_rng(seed)
        self.points = sorted(set(points))
        sizes = np.diff([0, *self.points])
        self.A = np.cumsum(g.binomial(sizes[None, :], p[:, None]), axis=1)
        self.col = {n: i for i, n in enumerate(self.points)}

    def at(self, n: int, rows=slice(None)) -> np.ndarray:
        return self.A[rows, self.col[n]] if n else np.zeros(self.A[rows, 0].shape, dtype=np.int64)

    def counts(self, phases, inputs=None):
        rows = slice(None) if inputs is None else inputs.numpy()
        out = []
        for ph in phases:
            if ph.sample_offset < rng.PHASE_ESTIMATION:  # selection: picks class 0
                m = len(self.A[rows, 0])
                out.append(torch.from_numpy(np.stack([np.full(m, ph.samples), np.zeros(m, np.int64)], 1)))
                continue
            o = ph.sample_offset - rng.PHASE_ESTIMATION
            a = self.at(o + ph.samples, rows) - self.at(o, rows)
            out.append(torch.from_numpy(np.stack([a, ph.samples - a], 1).astype(np.int64)))
        return out


def _radius(p, sigma):
    return np.where(np.asarray(p) >= 0.5, sigma * norm.ppf(np.maximum(p, 0.5)), -1.0)


def simulate_sequential(p, radii, n_max, sigma, seed, ends=None, levels=None, steer=None):
    """(estimation samples per input, radius at the stop, certify's radius at n_max on the same stream)
    for the library's rule, optionally with other round ends, levels or steering level (the level of
    the upper bound that guesses how far an input can still get: ``ddrs_ext.sequential.STEER_ALPHA``)."""
    if steer is not None:
        chosen = seq.STEER_ALPHA
        seq.STEER_ALPHA = steer
        try:
            return simulate_sequential(p, radii, n_max, sigma, seed, ends, levels)
        finally:
            seq.STEER_ALPHA = chosen
    B = len(p)
    interest = seq.Interest.make(np.asarray(radii, dtype=np.float64), 0.0, np.full(B, sigma), 0.0)
    stage = seq.SequentialStage(
        [], np.full(B, sigma), n_max, ALPHA, interest, n0=0, classes=np.zeros(B, np.int64)
    )
    if ends is not None:
        stage.ends = tuple(ends)
        t_min = norm.cdf(np.min(radii) / sigma) * np.ones(B)
        m = (np.asarray(radii) <= sigma * norm.ppf(ALPHA ** (1 / n_max))).sum()
        stage.levels = seq._levels(stage.ends, ALPHA, t_min, np.full(B, 1 / max(m, 1)))
    if levels is not None:
        stage.levels = np.broadcast_to(
            levels(np.asarray(stage.ends, dtype=np.float64)), (B, len(stage.ends))
        ).copy()
    paths = BernoulliPaths(p, stage.ends, seed)
    stage.groups = [(paths, np.arange(B))]
    seq.run_alone(stage)
    res = stage.result(0)
    rc = _radius(stats.clopper_pearson_lower(paths.at(n_max), n_max, ALPHA), sigma)
    r = np.where(res.prediction.numpy() >= 0, res.radius.numpy(), -1.0)
    return res.samples.numpy(), r, rc


def simulate_pilot(p, radii, n_max, sigma, seed, pilot: int, rule: str):
    """The pilot design: ``pilot`` samples choose each input's n from the menu ``round_ends(n_max)`` (0:
    abstain), then n FRESH samples go into one Clopper-Pearson bound at the full alpha. ``rule``:
    "range" picks the smallest n at which an input at the pilot's lower rate (1 % bound) certifies every
    radius of interest that its upper rate could certify at n_max; "point" uses the pilot's estimate for
    both."""
    menu = np.asarray(seq.round_ends(n_max))
    g = np.random.default_rng(10_000 + seed)
    a = g.binomial(pilot, p)
    paths = BernoulliPaths(p, list(menu), seed)
    if rule == "range":
        lo, hi = stats.clopper_pearson_lower(a, pilot, 0.01), stats.clopper_pearson_upper(a, pilot, 0.01)
    else:
        lo = hi = a / pilot
    radii = np.asarray(radii)
    best = _radius(stats.clopper_pearson_lower(hi * n_max, n_max, ALPHA), sigma)
    want = radii[None, :] <= best[:, None]
    n = np.full(len(p), n_max)
    for m in menu[::-1]:
        got = _radius(stats.clopper_pearson_lower(lo * m, m, ALPHA), sigma)
        ok = ~(want & (radii[None, :] > got[:, None])).any(1)
        n = np.where(ok, m, n)
    n = np.where(best < 0, 0, n)
    drawn = paths.A[np.arange(len(p)), np.searchsorted(paths.points, np.maximum(n, menu[0]))]
    r = np.where(n > 0, _radius(stats.clopper_pearson_lower(drawn, np.maximum(n, 1), ALPHA), sigma), -1.0)
    rc = _radius(stats.clopper_pearson_lower(paths.at(n_max), n_max, ALPHA), sigma)
    return n + pilot - N0, r, rc  # the pilot replaces n0: count what it adds beyond CERTIFY's n0


def test_sequential_designs(benchmark, request, digits_case):
    """The designs compared before choosing the rule, on Bernoulli streams at the rates certify(n_max)
    measures on the 200 VALIDATION digits (the same seeds for every design): evaluations as a share of
    certify's, and the gap of the certified share (the class taken as correct) over the radii of interest."""
    setting = digits_case.setting
    x, _ = load_digits_splits(0).validation
    x = x[: setting.inputs if is_quick(request.config) else None].to(digits_case.device)
    n_max, sigma = setting.n_max, 0.25
    base = certify(
        digits_case.base, x, sigma, n0=N0, n=n_max, alpha=ALPHA, batch_size=setting.batch_size, seed=SEED
    )
    p = (base.counts.max(1).values.double() / n_max).numpy()
    top = 0.9 * sigma * float(norm.ppf(ALPHA ** (1 / n_max)))
    grids = {"grid": np.linspace(0, top, 40), "paper": np.array(PAPER)}
    ends2 = seq.round_ends(n_max, first=100, ratio=2.0)
    designs = {
        "sequential (chosen): rounds x sqrt(2) from 3, levels 1/m early + late": {},
        "sequential, rounds x 2 from 100, same levels": {"ends": ends2},
        "sequential, rounds x 2 from 100, levels ~ sqrt(N) (previous split)": {
            "ends": ends2,
            "levels": lambda e: ALPHA * np.sqrt(e) / np.sqrt(e).sum(),
        },
        "sequential, chosen rounds, levels alpha / K": {"levels": lambda e: np.full(len(e), ALPHA / len(e))},
        "sequential (chosen), steering at 5 %": {"steer": 0.05},
        "sequential (chosen), steering at 20 %": {"steer": 0.2},
        "sequential (chosen), steering at 50 % (the point estimate)": {"steer": 0.5},
        "pilot 100 (= n0), menu, range rule": ("pilot", 100, "range"),
        "pilot 1000, menu, range rule": ("pilot", 1000, "range"),
        "pilot 100 (= n0), menu, point rule": ("pilot", 100, "point"),
    }

    def measure():
        table = {}
        for name, design in designs.items():
            row = {}
            for gname, radii in grids.items():
                share, gap = [], []
                for s in range(SIM_SEEDS):
                    if isinstance(design, tuple):
                        used, r, rc = simulate_pilot(p, radii, n_max, sigma, s, design[1], design[2])
                    else:
                        used, r, rc = simulate_sequential(p, radii, n_max, sigma, s, **design)
                    share.append((used.mean() + N0) / (n_max + N0))
                    c1 = (r[None, :] >= radii[:, None]).mean(1)
                    c2 = (rc[None, :] >= radii[:, None]).mean(1)
                    gap.append(np.abs(c1 - c2).max())
                row[gname] = {
                    "share": float(np.mean(share)),
                    "gap": float(np.mean(gap)),
                    "gap_max": float(np.max(gap)),
                }
            table[name] = row
        references = (
            ("reference: certify(n = n_max / 3), same noise", n_max // 3),
            ("reference: certify, other noise", 0),
        )
        for name, n in references:
            row = {}
            for gname, radii in grids.items():
                gap = []
                for s in range(SIM_SEEDS):
                    paths = BernoulliPaths(p, [n_max // 3, n_max], s)
                    a, m = (
                        (paths.at(n), n)
                        if n
                        else (np.random.default_rng(20_000 + s).binomial(n_max, p), n_max)
                    )
                    r = _radius(stats.clopper_pearson_lower(a, m, ALPHA), sigma)
                    rc = _radius(stats.clopper_pearson_lower(paths.at(n_max), n_max, ALPHA), sigma)
                    gap.append(
                        np.abs(
                            (r[None] >= radii[:, None]).mean(1) - (rc[None] >= radii[:, None]).mean(1)
                        ).max()
                    )
                share = ((n or n_max) + N0) / (n_max + N0)
                row[gname] = {"share": share, "gap": float(np.mean(gap)), "gap_max": float(np.max(gap))}
            table[name] = row
        return table

    benchmark.group = "sequential_designs"
    table = benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(inputs=len(p), n_max=n_max, seeds=SIM_SEEDS, designs=table)
    head = f"design ({len(p)} validation rates, {SIM_SEEDS} seeds)"
    print(f"\n| {head} | GRID: evaluations, gap (max) | paper radii: evaluations, gap (max) |")
    print("|---|---|---|")
    for name, row in table.items():
        cells = [f"{row[g]['share']:.3f}, {row[g]['gap']:.3f} ({row[g]['gap_max']:.3f})" for g in grids]
        print(f"| {name} | " + " | ".join(cells) + " |")


def test_sequential_table():
    """Prints the rows of the runs above as one markdown table (run with -s)."""
    if not ROWS:
        pytest.skip("no runs")
    print("\n| model | method | evaluations / input | share of certify's | vs certify's | wall time |")
    print("|---|---|---:|---:|---|---:|")
    for line in ROWS:
        print(line)
