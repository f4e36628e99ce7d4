"""Cheaper forward passes on the CPU (issue 23): certify, optimize_sigma and a training step with the
model evaluated through each ``ddrs_ext.Evaluated`` option, beside eager float32.

Variants (``VARIANTS``): eager float32 (the model itself), channels-last (weights and inputs),
``torch.compile`` (inductor, default mode), compile + channels-last (what ``ddrs certify --compile
auto`` does on long runs), bfloat16 autocast, bfloat16 autocast + compile + channels-last.

Tasks:

- ``certify`` on the digits CNN (``ddrs_ext.models.digits_cnn`` trained here with Gaussian
  augmentation at sigma 0.25, fixed seed, a few seconds) at sigma 0.25, and on the CIFAR-shaped CNN
  (``baselines.small_cnn``, random weights, per-input sigma in [0.12, 0.5]); the digits rounds also
  time Cohen et al.'s plain per-input loop (``baselines.plain_certify``, eager: what ``core.Smooth``
  does) and ``ddrs_ext.Smooth(model, 10, 0.25, compile=True)`` (channels-last weights) input by
  input (Cohen's route with ddrs_ext);
- ``optimize_sigma`` on the digits CNN with the score estimator (every variant) and the
  reparameterisation estimator (eager and channels-last: forward-mode autograd runs neither under
  autocast nor through a compiled model; ``Evaluated`` runs it uncompiled);
- a training step of ``ddrs train`` (digits CNN, minibatches of 64, Adam): Gaussian augmentation at
  a fixed sigma (every variant), and with a data-dependent sigma (``update_sigma``, reparam, 3 steps
  of 16 samples; the variants without autocast).

Every variant is called once first, after ``torch._dynamo.reset()``: that call's time is reported
apart (``first``; for the compiled variants it holds the compilation; the session uses a fresh
``TORCHINDUCTOR_CACHE_DIR``, so the first compilation of each graph is a cold one, unless
``DDRS_BENCH_WARM_CACHE=1``: rerun with it to see a warm cache's), then timed in interleaved rounds
(timing.py), so that drift hits every variant alike. Reported per variant: the speed-up over eager
float32 (the median of the per-round ratios), the compile overhead (first call less a steady
round) and the forward rows after which compiling has paid for itself (``break-even rows``), and how
far the answers move from eager float32's, with the same noise: inputs whose prediction changed, the
largest radius difference, the certified accuracy at radii 0, 0.25, 0.5, 0.75 and 1 (digits), and
the votes that flipped, counted exactly on ``FLIP_COPIES`` noisy copies per input (the argmax of the
variant's logits against eager float32's on the same copy); for optimize_sigma the largest relative
sigma difference. The tables are printed at the end of the run (and kept in the json's
``extra_info``).

Sizes: ``--quick`` / ``--benchmark-disable`` (CI): tiny, one round, ``torch.compile`` with the
"eager" backend (no C++ compilation); the default: the digits at 32 inputs, n = 10 000;
``DDRS_BENCH_FULL=1``: 64 inputs (the issue's setting), 5 rounds. Rerun on a quiet machine with

    OMP_NUM_THREADS=1 DDRS_BENCH_THREADS=1 pytest benchmarks/bench_evaluated.py --benchmark-json=ev.json

(``DDRS_BENCH_THREADS`` sets torch's threads; leave it unset for one per core).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from baselines import plain_certify, sigmas, small_cnn, train_noisy
from conftest import SUMMARY, is_quick
from timing import pedantic_interleaved

import ddrs_ext
from ddrs_ext.data import load_digits_splits
from ddrs_ext.models import digits_cnn
from ddrs_ext.precision import EvaluationWarning
from ddrs_ext.training import SigmaBank, gaussian_augmentation_loss, update_sigma

DEVICES = ("cpu",)
ALPHA, NUM_CLASSES, SIGMA = 0.001, 10, 0.25
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
FLIP_COPIES = 2000  # noisy copies per input on which vote flips are counted exactly
EAGER = "eager float32"
RECOMMENDED = "compile + channels-last"  # what ddrs certify's --compile auto does on long runs
VARIANTS: dict[str, dict] = {
    EAGER: {},
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    RECOMMENDED: {"compile": True, "channels_last": True},
    "bf16": {"autocast": torch.bfloat16},
    "bf16 + compile + channels-last": {"autocast": torch.bfloat16, "compile": True, "channels_last": True},
}
AUTOCAST = ("bf16", "bf16 + compile + channels-last")
# reparam: autocast refuses forward-mode autograd, and Evaluated runs it uncompiled
NO_FORWARD_AD = (*AUTOCAST, "compile", RECOMMENDED)

if os.environ.get("DDRS_BENCH_WARM_CACHE") != "1" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddrs-bench-inductor-")
# Every compiled variant is a model of the same classes: their compiled code hangs on the same code
# objects, whose default limit of 8 versions would send later variants back to eager evaluation.
torch._dynamo.config.recompile_limit = 64


@dataclass(frozen=True)
class Size:
    digits_inputs: int
    n0: int
    n: int
    batch_size: int
    cifar_inputs: int
    cifar_n: int
    sigma_inputs: int
    sigma_iterations: int
    sigma_samples: int
    train_epochs: int  # of the digits CNN certified
    steps: int  # training steps per round
    rounds: int


def size(config) -> Size:
    if is_quick(config):
        return Size(4, 20, 200, 250, 2, 100, 2, 2, 32, 1, 1, 1)
    if os.environ.get("DDRS_BENCH_FULL") == "1":
        return Size(64, 100, 10_000, 1000, 8, 2_000, 32, 16, 512, 15, 18, 5)
    return Size(32, 100, 10_000, 1000, 4, 2_000, 16, 16, 512, 15, 18, 3)


def compile_options(quick: bool) -> dict:
    return {"backend": "eager"} if quick else {}


def evaluated(model: torch.nn.Module, variant: str, quick: bool) -> Callable:
    options = dict(VARIANTS[variant])
    if not options:
        return model
    if options.get("compile"):
        options["compile"] = compile_options(quick)
    if options.get("channels_last"):
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return ddrs_ext.Evaluated(model, **options)


# ----------------------------------------------------------------------------- running the variants


def run_interleaved(benchmark, fns: dict[str, Callable], rounds: int, rows: int) -> tuple[dict, dict]:
    """Each of ``fns`` once (the first call, timed apart, after ``torch._dynamo.reset()``: the
    compilation it needs), once more untimed, then ``rounds`` interleaved rounds of all; returns
    (first results, rows of the timing table), the latter also in extra_info."""
    first, results = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # the table says what runs how
        for name, fn in fns.items():
            torch._dynamo.reset()  # each first call compiles anew (the inductor cache may still hit)
            began = time.perf_counter()
            results[name] = fn()
            first[name] = time.perf_counter() - began
        torch._dynamo.reset()
        for fn in fns.values():  # compiled again (from the inductor cache) before the timed rounds
            fn()
        target, *_ = fns
        others = {name: fn for name, fn in fns.items() if name != target}
        pedantic_interleaved(benchmark, fns[target], others, rounds=rounds, warmup_rounds=0)
    times = dict(benchmark.extra_info.pop("interleaved"))
    times[target] = times.pop(benchmark.name)
    table = {}
    for name in fns:
        own = times[name]
        steady = min(own)
        ratios = [e / t for e, t in zip(times[EAGER], own)] if EAGER in times else []
        row = {"first_s": first[name], "steady_s": steady, "rounds_s": own}
        if ratios:
            row["speedup"] = statistics.median(ratios)
        overhead = first[name] - statistics.median(own)
        saved_per_row = (
            (statistics.median(times[EAGER]) - statistics.median(own)) / rows if EAGER in times else 0
        )
        if "compile" in name and overhead > 0:
            row["compile_overhead_s"] = overhead
            row["break_even_rows"] = overhead / saved_per_row if saved_per_row > 0 else None
        table[name] = row
    benchmark.extra_info["timing"] = table
    benchmark.extra_info["rows_per_round"] = rows
    return results, table


def vote_flips(reference: Callable, variant: Callable, x: torch.Tensor, sigma, copies: int) -> int:
    """Noisy copies (copies per input, ddrs_ext's noise) whose argmax differs between the two."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).contiguous()
    stream = torch.arange(x.shape[0])
    flips = 0
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        for b in range(x.shape[0]):
            rows = ddrs_ext.ops.perturb_gaussian(
                x[b : b + 1], sigma[b : b + 1], stream[b : b + 1], 99, 0, copies
            )
            rows = rows[0] if isinstance(rows, tuple) else rows
            flips += int((reference(rows).argmax(1) != variant(rows).argmax(1)).sum())
    return flips


def certify_movement(results: dict, labels: torch.Tensor | None, n: int) -> dict[str, dict]:
    """Per variant, how its certificates differ from eager float32's (same noise); for a loop with
    other noise (Cohen's) its certified accuracy only."""
    base = results[EAGER]
    out = {}
    for name, r in results.items():
        if not hasattr(r, "prediction"):
            continue
        row: dict = {}
        if isinstance(r, ddrs_ext.CertifyResult):
            row = {
                "predictions_changed": int((r.prediction != base.prediction).sum()),
                "max_radius_diff": float((r.radius - base.radius).abs().max()),
                "mean_radius_diff": float((r.radius - base.radius).abs().mean()),
                "votes_moved": int((r.counts - base.counts).abs().sum()) // 2,
                "votes": int(r.counts.sum()),
            }
        if labels is not None:
            correct = r.prediction == labels
            row["certified_accuracy"] = {
                f"{radius:g}": float((correct & (r.radius >= radius)).float().mean()) for radius in RADII
            }
        out[name] = row
    return out


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def summarise(title: str, table: dict, movement: dict | None = None, flips: dict | None = None) -> None:
    columns = ["variant", "first call (s)", "steady round (s)", "speed-up vs eager", "compile overhead (s)"]
    columns.append("break-even rows")
    accuracy = bool(movement) and any("certified_accuracy" in m for m in movement.values())
    if movement:
        columns += ["predictions changed", "max radius diff", "votes moved"]
        if flips:
            columns.append("vote flips (exact)")
        if accuracy:
            columns.append("certified accuracy at r = " + " / ".join(f"{r:g}" for r in RADII))
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, row in table.items():
        speedup = row.get("speedup")
        cells = [
            name,
            _fmt(row["first_s"]),
            _fmt(row["steady_s"]),
            f"{speedup:.2f}×" if speedup else "",
            _fmt(row.get("compile_overhead_s")) if "compile" in name else "",
            _fmt(row.get("break_even_rows")) if "compile" in name else "",
        ]
        if movement:
            m = movement.get(name) or {}
            if "votes" in m:
                cells += [
                    str(m["predictions_changed"]),
                    f"{m['max_radius_diff']:.4f}",
                    f"{m['votes_moved']} of {m['votes']}",
                ]
            else:
                cells += ["other noise", "", ""]
            if flips:
                f = flips.get(name)
                cells.append("" if f is None else f"{f[0]} of {f[1]}")
            if accuracy:
                acc = m.get("certified_accuracy")
                cells.append(" / ".join(f"{v:.3f}" for v in acc.values()) if acc else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    SUMMARY.extend(lines)


@dataclass
class SmoothAnswers:
    prediction: torch.Tensor
    radius: torch.Tensor


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sizes(request) -> Size:
    return size(request.config)


@pytest.fixture(scope="module")
def digits(sizes):
    """The digits CNN trained with Gaussian augmentation (sigma 0.25, fixed seed), frozen, eval mode;
    and the test split."""
    splits = load_digits_splits(seed=0)
    torch.manual_seed(0)
    model = train_noisy(digits_cnn(), *splits.train, SIGMA, epochs=sizes.train_epochs, seed=0)
    return model, splits.test


# ----------------------------------------------------------------------------- certify


def test_certify_digits(benchmark, digits, sizes, quick):
    model, (x_all, y_all) = digits
    x, y = x_all[: sizes.digits_inputs], y_all[: sizes.digits_inputs]
    kw = dict(n0=sizes.n0, n=sizes.n, alpha=ALPHA, batch_size=sizes.batch_size, num_classes=NUM_CLASSES)
    models = {name: evaluated(model, name, quick) for name in VARIANTS}
    fns: dict[str, Callable] = {
        name: (lambda m=m: ddrs_ext.certify(m, x, SIGMA, seed=0, **kw)) for name, m in models.items()
    }
    sigma_each = torch.full((len(x),), SIGMA, dtype=torch.float64)
    fns["Cohen's per-input loop (core.Smooth), eager"] = lambda: plain_certify(
        model, x, sigma_each, sizes.n0, sizes.n, ALPHA, sizes.batch_size, NUM_CLASSES
    )
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    smooth = ddrs_ext.Smooth(nhwc, NUM_CLASSES, SIGMA, seed=0, compile=compile_options(quick))

    def smooth_loop() -> SmoothAnswers:
        answers = [smooth.certify(x[b], sizes.n0, sizes.n, ALPHA, sizes.batch_size) for b in range(len(x))]
        return SmoothAnswers(
            torch.tensor([c for c, _ in answers]), torch.tensor([r for _, r in answers], dtype=torch.float64)
        )

    fns["ddrs_ext.Smooth(compile=True), channels-last weights, per input"] = smooth_loop
    benchmark.group = "evaluated_certify_digits"
    rows = len(x) * (sizes.n0 + sizes.n)
    benchmark.extra_info.update(
        inputs=len(x), n0=sizes.n0, n=sizes.n, batch_size=sizes.batch_size, model="digits CNN, trained"
    )
    results, table = run_interleaved(benchmark, fns, sizes.rounds, rows)
    movement = certify_movement(results, y, sizes.n)
    copies = min(FLIP_COPIES, sizes.n)
    flips = {
        name: (vote_flips(model, m, x, SIGMA, copies), len(x) * copies)
        for name, m in models.items()
        if name != EAGER
    }
    flips[EAGER] = (0, len(x) * copies)
    benchmark.extra_info.update(movement=movement, flips=flips)
    summarise(
        f"certify, digits CNN: {len(x)} inputs, n0 = {sizes.n0}, n = {sizes.n}, batch {sizes.batch_size}, "
        f"sigma {SIGMA}",
        table,
        movement,
        flips,
    )
    # the same noise and a sound bound: where eager and a same-function variant both certify, they agree
    for name in ("channels-last", "compile", RECOMMENDED):
        r, e = results[name], results[EAGER]
        both = (r.prediction != ddrs_ext.ABSTAIN) & (e.prediction != ddrs_ext.ABSTAIN)
        assert torch.equal(r.prediction[both], e.prediction[both])


def test_certify_cifar_cnn(benchmark, sizes, quick):
    model = small_cnn()
    B = sizes.cifar_inputs
    x = torch.rand((B, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    sigma = sigmas(B)
    n0 = min(100, sizes.n0)
    kw = dict(n0=n0, n=sizes.cifar_n, alpha=ALPHA, batch_size=500, num_classes=NUM_CLASSES)
    models = {name: evaluated(model, name, quick) for name in VARIANTS}
    fns = {name: (lambda m=m: ddrs_ext.certify(m, x, sigma, seed=0, **kw)) for name, m in models.items()}
    benchmark.group = "evaluated_certify_cifar_cnn"
    benchmark.extra_info.update(inputs=B, n0=n0, n=sizes.cifar_n, batch_size=500, model="small CNN, random")
    results, table = run_interleaved(benchmark, fns, sizes.rounds, B * (n0 + sizes.cifar_n))
    movement = certify_movement(results, None, sizes.cifar_n)
    copies = min(FLIP_COPIES, sizes.cifar_n)
    flips = {name: (vote_flips(model, m, x, sigma, copies), B * copies) for name, m in models.items()}
    benchmark.extra_info.update(movement=movement, flips=flips)
    summarise(
        f"certify, CIFAR-shaped CNN (random weights): {B} inputs 3x32x32, n = {sizes.cifar_n}, batch 500, "
        "sigma in [0.12, 0.5]",
        table,
        movement,
        flips,
    )


# ----------------------------------------------------------------------------- optimize_sigma


@pytest.mark.parametrize("estimator", ["score", "reparam"])
def test_optimize_sigma_digits(benchmark, digits, sizes, quick, estimator):
    model, (x_all, _) = digits
    x = x_all[: sizes.sigma_inputs]
    kw = dict(
        iterations=sizes.sigma_iterations,
        num_samples=sizes.sigma_samples,
        estimator=estimator,
        surrogate="certify",
        batch_size=1000,
        seed=0,
    )
    names = [n for n in VARIANTS if estimator == "score" or n not in NO_FORWARD_AD]
    models = {name: evaluated(model, name, quick) for name in names}
    fns = {name: (lambda m=m: ddrs_ext.optimize_sigma(m, x, SIGMA, **kw)) for name, m in models.items()}
    benchmark.group = f"evaluated_sigma_{estimator}"
    benchmark.extra_info.update(inputs=len(x), **kw)
    rows = len(x) * sizes.sigma_iterations * sizes.sigma_samples
    results, table = run_interleaved(benchmark, fns, sizes.rounds, rows)
    base = results[EAGER]
    movement = {name: float(((s - base).abs() / base).max()) for name, s in results.items()}
    benchmark.extra_info["max_relative_sigma_diff"] = movement
    summarise(
        f"optimize_sigma ({estimator}), digits CNN: {len(x)} inputs, {sizes.sigma_iterations} iterations x "
        f"{sizes.sigma_samples} samples; largest relative sigma difference to eager: "
        + ", ".join(f"{k} {v:.2g}" for k, v in movement.items() if k != EAGER),
        table,
    )
    for s in results.values():
        assert bool(torch.isfinite(s).all())


# ----------------------------------------------------------------------------- training


class TrainingRun:
    """``ddrs train``'s step (Adam, lr 3e-3, minibatches of 64) on a fresh digits CNN evaluated as
    ``variant``; each call runs ``steps`` steps on the next minibatches."""

    def __init__(self, variant: str, data_dependent: bool, steps: int, quick: bool) -> None:
        self.x, self.y = load_digits_splits(seed=0).train
        torch.manual_seed(0)
        self.model = digits_cnn()
        self.net = evaluated(self.model, variant, quick)
        if variant == "channels-last":  # evaluated() converted a copy: train that one
            self.model = self.net.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        self.bank = SigmaBank(len(self.y), SIGMA, sigma_range=(1e-3, 2.0)) if data_dependent else None
        self.batches = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(0)).split(64)
        self.steps, self.done = steps, 0

    def __call__(self) -> float:
        self.model.train()
        for _ in range(self.steps):
            index = self.batches[self.done % len(self.batches)]
            x, y = self.x[index], self.y[index]
            sigma = SIGMA
            if self.bank is not None:
                sigma = update_sigma(
                    self.net, self.bank, x, index, steps=3, num_samples=16, surrogate="certify"
                )
            loss = gaussian_augmentation_loss(self.net, x, y, sigma, index=index, seed=self.done)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.done += 1
        return float(loss.detach())


@pytest.mark.parametrize("sigma_kind", ["fixed", "data-dependent"])
def test_training_step_digits(benchmark, sizes, quick, sigma_kind):
    dd = sigma_kind == "data-dependent"
    names = [n for n in VARIANTS if not dd or n not in AUTOCAST]
    fns = {name: TrainingRun(name, dd, sizes.steps, quick) for name in names}
    benchmark.group = f"evaluated_training_{sigma_kind}"
    benchmark.extra_info.update(steps_per_round=sizes.steps, batch=64, scheme="gaussian", sigma=sigma_kind)
    rows = sizes.steps * 64 * (1 + (3 * 16 if dd else 0))
    results, table = run_interleaved(benchmark, fns, sizes.rounds, rows)
    benchmark.extra_info["first_round_loss"] = results
    summarise(
        f"training step, digits CNN, Gaussian augmentation, {sigma_kind} sigma"
        + (" (update_sigma: reparam, 3 steps x 16 samples, runs uncompiled)" if dd else "")
        + f": {sizes.steps} steps of 64 per round; loss after the first round: "
        + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
        table,
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
