"""sigma optimisation: what reaching a surrogate radius costs, the paper's procedure against ddrs_ext.

Model: a small CNN (``baselines.digits_cnn``) trained for a few seconds on scikit-learn's digits
(8x8, [0, 1]) with Gaussian noise augmentation at sigma 0.25, in eval mode with frozen
parameters. Inputs: the first ``inputs`` test images. Every method starts from
sigma0 = 0.12 (the paper's CIFAR-10 starting point) and passes all ``inputs x samples`` rows of
an iteration through the model in one batch.

Methods (group ``sigma``):

- ``test_sigma_plain_paper``: the published procedure in plain PyTorch (``baselines.plain_paper_sigma``:
  900 iterations x 100 samples, lr 0.04, reverse-mode autograd, plain ascent);
- ``test_sigma_ddrs[paper]``: ``optimize_sigma(**PAPER_SETTINGS)``, the same algorithm on the
  kernels, with the derivative from a forward-mode JVP;
- ``test_sigma_ddrs[defaults]``: ``optimize_sigma``'s defaults (reparam, bisect, 16 x 128);
- ``test_sigma_ddrs[score]``: ``estimator="score"`` with the default rule (forward passes only);
- ``test_sigma_ddrs[score_ascent]``: ``estimator="score"`` with the paper's rule, lr, iterations, samples.

Model evaluations, per input, in forward-pass equivalents: a row forward counts 1 and backward 2
(an autograd step: 3); a JVP (primal and tangent) 2, and 3 as a conservative count; the score
estimator 1. Rows are counted by a wrapper around the model and checked against the algorithm's
own count.

Surrogate radius: ``surrogate_radius(model, x, sigma, num_samples=eval_samples, seed=EVAL_SEED)``
for every method and checkpoint: the same noise each time (common random numbers), so that two
methods' sigmas are compared on equal terms; its cost is charged to no method. Besides the final
sigma, it is evaluated at checkpoints of each run's trajectory (sigma after 1, 2, 4, ... iterations
and after the last), with the evaluations spent and the wall time elapsed up to there, from which
report.py reads the cost of first reaching 95% and 100% of the paper procedure's final mean.

Group ``sigma_iteration``: one iteration of the paper's settings (``inputs x 100`` rows), ddrs_ext
(reparam, score) in rounds interleaved with the plain autograd iteration and with the model's
forward passes alone over the same rows (``test_sigma_forward_floor``, the reference: an
iteration's time in forward passes, to set against the evaluations charged).

With ``--benchmark-disable`` (CI: every benchmark runs once, untimed) the ``QUICK`` settings apply:
4 inputs, 10 iterations for the paper's settings, 2000 evaluation samples; the numbers then
prove only that the code runs.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import pytest
import torch
from baselines import digits, digits_cnn, plain_paper_sigma, train_noisy
from timing import pedantic_interleaved
from torch import nn

import ddrs_ext
from ddrs_ext import PAPER_SETTINGS, optimize_sigma, surrogate_radius

SIGMA0 = 0.12
TRAIN_SIGMA, TRAIN_EPOCHS = 0.25, 15
OPT_SEED, PLAIN_SEED, EVAL_SEED = 1, 1, 20240601
EVAL_BATCH = 4000
CLASS_SAMPLES, CLASS_SEED = 2000, 11  # for the top class and E_A at the final sigma
PLAIN = "test_sigma_plain_paper"

# torch's forward-mode autograd loads its decompositions with torch.jit.script on first use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@dataclass(frozen=True)
class Settings:
    inputs: int
    paper_iterations: int  # for the settings taken from the paper (900 iterations)
    eval_samples: int
    fast_rounds: int  # rounds of the methods that take well under a second
    iteration_rounds: int  # rounds of the one-iteration group


FULL = Settings(inputs=16, paper_iterations=900, eval_samples=20_000, fast_rounds=5, iteration_rounds=30)
QUICK = Settings(inputs=4, paper_iterations=10, eval_samples=2_000, fast_rounds=1, iteration_rounds=1)

# name: (optimize_sigma arguments, label, forward equivalents charged per row (counted, conservative))
METHODS = {
    "paper": (dict(PAPER_SETTINGS), "ddrs_ext.optimize_sigma(**PAPER_SETTINGS), reparam by JVP", (2, 3)),
    "defaults": ({}, "ddrs_ext.optimize_sigma defaults: reparam by JVP, bisect", (2, 3)),
    "score": ({"estimator": "score"}, "ddrs_ext.optimize_sigma, score estimator, bisect", (1, 1)),
    "score_ascent": (
        {**PAPER_SETTINGS, "estimator": "score"},
        "ddrs_ext.optimize_sigma, score estimator, paper's ascent",
        (1, 1),
    ),
}
SLOW = {"paper", "score_ascent"}


class Counted(nn.Module):
    """The model, counting the rows passed through it (dual tensors count once)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


class Recorder:
    """sigma after every iteration and when it was reached."""

    def __init__(self) -> None:
        self.sigmas: list[torch.Tensor] = []
        self.times: list[float] = []
        self.start = time.perf_counter()

    def __call__(self, sigma: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.sigmas.append(sigma.clone())


class SigmaCase:
    def __init__(self, settings: Settings, quick: bool) -> None:
        self.settings, self.quick = settings, quick
        # Training is setup, not timed: one thread is fastest for its batches of 64 and is not
        # stalled by other load the way a 2-thread OpenMP region is.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            (x_train, y_train), (x_test, y_test) = digits(seed=0)
            self.model = train_noisy(digits_cnn(), x_train, y_train, TRAIN_SIGMA, TRAIN_EPOCHS, seed=0)
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            noisy = x_test + TRAIN_SIGMA * torch.randn(
                x_test.shape, generator=torch.Generator().manual_seed(5)
            )
            self.accuracy = float((self.model(x_test).argmax(1) == y_test).float().mean())
            self.noisy_accuracy = float((self.model(noisy).argmax(1) == y_test).float().mean())
        self.counted = Counted(self.model)
        self.x = x_test[: settings.inputs].contiguous()
        self._surrogates: dict[bytes, torch.Tensor] = {}
        # One-time costs out of the timed runs: the first forward-mode call loads torch's JVP
        # decompositions (a few tenths of a second), the first autograd call its engine.
        for estimator in ("reparam", "score"):
            optimize_sigma(
                self.model, self.x, SIGMA0, iterations=1, num_samples=2, estimator=estimator, seed=0
            )
        plain_paper_sigma(self.model, self.x, SIGMA0, iterations=1, num_samples=2)

    def surrogate(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-input surrogate radius at sigma, from the fixed evaluation noise (memoised)."""
        sigma = sigma.to(torch.float64).clamp_min(1e-6)  # the plain procedure leaves sigma unbounded
        key = sigma.numpy().tobytes()
        if key not in self._surrogates:
            self._surrogates[key] = surrogate_radius(
                self.model,
                self.x,
                sigma,
                num_samples=self.settings.eval_samples,
                seed=EVAL_SEED,
                batch_size=EVAL_BATCH,
            )
        return self._surrogates[key]

    def top_class(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per input: the class with the largest mean softmax at sigma, and that mean (E_A), from
        ``CLASS_SAMPLES`` torch.randn draws of a fixed generator (the same for every method)."""
        g = torch.Generator().manual_seed(CLASS_SEED)
        top, mean = [], []
        with torch.inference_mode():
            for b in range(self.x.shape[0]):
                eps = torch.randn((CLASS_SAMPLES, *self.x.shape[1:]), generator=g)
                psi = self.model(self.x[b] + float(sigma[b]) * eps).softmax(1).mean(0)
                top.append(int(psi.argmax()))
                mean.append(float(psi.max()))
        return torch.tensor(top), torch.tensor(mean, dtype=torch.float64)

    def summary(
        self, sigma: torch.Tensor, record: Recorder, samples: int, charge: tuple[int, int], **about
    ) -> dict:
        """extra_info["sigma"]: evaluations per input, the final sigma and surrogate, the trajectory."""
        B, iterations = self.x.shape[0], len(record.sigmas)
        assert torch.equal(record.sigmas[-1].to(torch.float64), sigma.to(torch.float64))
        assert bool(torch.isfinite(sigma).all())
        checkpoints = sorted({0, iterations, *(2**k for k in range(int(math.log2(iterations)) + 1))})
        trajectory = []
        for k in checkpoints:
            at = torch.full((B,), SIGMA0) if k == 0 else record.sigmas[k - 1]
            seconds = 0.0 if k == 0 else record.times[k - 1] - record.start
            mean = float(self.surrogate(at).mean())
            trajectory.append([k, k * samples * charge[0], k * samples * charge[1], seconds, mean])
        surrogate = self.surrogate(sigma)
        assert bool(torch.isfinite(surrogate).all())
        # Where the surrogate stops meaning a certificate: the top class is no longer the one at
        # sigma0 (noise swamps the input) or E_A < 1/2 (CERTIFY abstains there).
        start, _ = self.top_class(torch.full((B,), SIGMA0))
        top, e_a = self.top_class(sigma.double().clamp_min(1e-6))
        past = (top != start) | (e_a < 0.5)
        return dict(
            about,
            inputs=B,
            iterations=iterations,
            num_samples=samples,
            sigma0=SIGMA0,
            charge=list(charge),
            evaluations=iterations * samples * charge[0],
            evaluations_conservative=iterations * samples * charge[1],
            mean_sigma=float(sigma.double().mean()),
            mean_surrogate=float(surrogate.mean()),
            sigma=sigma.double().tolist(),
            surrogate=surrogate.tolist(),
            nonpositive_sigma=int((sigma <= 0).sum()),
            past_prediction=past.tolist(),
            trajectory_columns=[
                "iterations",
                "evaluations",
                "evaluations_conservative",
                "seconds",
                "mean_surrogate",
            ],
            trajectory=trajectory,
            eval_samples=self.settings.eval_samples,
            eval_seed=EVAL_SEED,
            model=f"digits CNN, clean accuracy {self.accuracy:.3f}, {self.noisy_accuracy:.3f} at sigma 0.25",
            quick=self.quick,
        )


@pytest.fixture(scope="session")
def sigma_case(request) -> SigmaCase:
    quick = bool(request.config.getoption("benchmark_disable"))
    return SigmaCase(QUICK if quick else FULL, quick)


@pytest.mark.benchmark(group="sigma")
def test_sigma_plain_paper(benchmark, sigma_case):
    case = sigma_case
    iterations, m = case.settings.paper_iterations, 100

    def run():
        record = Recorder()
        case.counted.rows = 0
        torch.manual_seed(PLAIN_SEED)
        result = plain_paper_sigma(
            case.counted,
            case.x,
            SIGMA0,
            iterations=iterations,
            lr=0.04,
            num_samples=m,
            callback=lambda _t, sigma: record(sigma),
        )
        return result, record, case.counted.rows

    result, record, rows = benchmark.pedantic(run, rounds=1, iterations=1)
    B = case.x.shape[0]
    assert rows == result.rows_forward == result.rows_backward == iterations * B * m
    benchmark.extra_info.update(
        label=f"paper procedure, plain PyTorch autograd: {iterations} it x {m} samples, lr 0.04; {B} inputs",
        work={"k rows/s": rows / 1e3},
        sigma=case.summary(
            result.sigma,
            record,
            m,
            (3, 3),
            method="paper procedure, plain PyTorch (forward + backward)",
            estimator="reparam (reverse-mode autograd)",
            rule="ascent",
            lr=0.04,
        ),
    )


@pytest.mark.benchmark(group="sigma")
@pytest.mark.parametrize("method", list(METHODS))
def test_sigma_ddrs(benchmark, sigma_case, method):
    case = sigma_case
    kwargs, label, charge = METHODS[method]
    kwargs = dict(kwargs)
    if method in SLOW:
        kwargs["iterations"] = case.settings.paper_iterations
    settings = {**_defaults(), **kwargs}
    B, m = case.x.shape[0], settings["num_samples"]

    def run():
        record, steps = Recorder(), []
        case.counted.rows = 0

        def callback(step: ddrs_ext.SigmaStep) -> None:
            steps.append(step.model_rows)
            record(step.next_sigma)

        sigma = optimize_sigma(
            case.counted, case.x, SIGMA0, **kwargs, batch_size=B * m, seed=OPT_SEED, callback=callback
        )
        return sigma, record, case.counted.rows, sum(steps)

    if method in SLOW:
        sigma, record, rows, reported = benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        rounds = case.settings.fast_rounds
        sigma, record, rows, reported = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    assert rows == reported == settings["iterations"] * B * m
    lo, hi = settings["sigma_range"]
    assert bool(((sigma >= lo) & (sigma <= hi)).all())
    benchmark.extra_info.update(
        label=f"{label}: {settings['iterations']} it x {m} samples; {B} inputs",
        work={"k rows/s": rows / 1e3},
        baseline=PLAIN,
        sigma=case.summary(
            sigma,
            record,
            m,
            charge,
            method=label,
            estimator=settings["estimator"],
            rule=settings["rule"],
            lr=settings["lr"],
        ),
    )


def _defaults() -> dict:
    """optimize_sigma's keyword defaults, read from its signature."""
    params = inspect.signature(optimize_sigma).parameters
    return {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


# ------------------------------------------------------------------------ one iteration


class IterationCase:
    """One iteration of the paper's settings (100 samples per input) on the case's inputs."""

    def __init__(self, case: SigmaCase) -> None:
        self.case = case
        B, self.m = case.x.shape[0], 100
        self.rows = B * self.m
        # The forward floor's batch: real noisy copies of the inputs at sigma0, filled once.
        g = torch.Generator().manual_seed(4)
        base = case.x.repeat_interleave(self.m, 0)
        self.floor_buf = base + SIGMA0 * torch.randn(base.shape, generator=g)

    def ddrs(self, estimator: str) -> torch.Tensor:
        return optimize_sigma(
            self.case.model,
            self.case.x,
            SIGMA0,
            **{**PAPER_SETTINGS, "iterations": 1, "estimator": estimator},
            batch_size=self.rows,
            seed=OPT_SEED,
        )

    def plain(self):
        return plain_paper_sigma(self.case.model, self.case.x, SIGMA0, iterations=1, num_samples=self.m)

    def forward(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.case.model(self.floor_buf)


@pytest.fixture(scope="module")
def iteration(sigma_case) -> IterationCase:
    return IterationCase(sigma_case)


ITERATION_PLAIN, ITERATION_FLOOR = "test_sigma_iteration_plain", "test_sigma_forward_floor"


@pytest.mark.benchmark(group="sigma_iteration")
@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_sigma_iteration_ddrs(benchmark, iteration, estimator):
    how = "derivative by JVP" if estimator == "reparam" else "score estimator, forward only"
    benchmark.extra_info.update(
        label=f"one optimize_sigma iteration, paper settings, {how}; {iteration.rows} rows",
        work={"k rows/s": iteration.rows / 1e3},
        baseline=ITERATION_PLAIN,
        reference=ITERATION_FLOOR,
    )
    others = {ITERATION_PLAIN: iteration.plain, ITERATION_FLOOR: iteration.forward}
    sigma = pedantic_interleaved(
        benchmark, lambda: iteration.ddrs(estimator), others, rounds=iteration.case.settings.iteration_rounds
    )
    assert bool(torch.isfinite(sigma).all())


@pytest.mark.benchmark(group="sigma_iteration")
def test_sigma_iteration_plain(benchmark, iteration):
    benchmark.extra_info.update(
        label=f"one iteration of the plain autograd procedure; {iteration.rows} rows",
        work={"k rows/s": iteration.rows / 1e3},
        reference=ITERATION_FLOOR,
    )
    rounds = iteration.case.settings.iteration_rounds
    result = benchmark.pedantic(iteration.plain, rounds=rounds, warmup_rounds=1, iterations=1)
    assert bool(torch.isfinite(result.sigma).all())


@pytest.mark.benchmark(group="sigma_iteration")
def test_sigma_forward_floor(benchmark, iteration):
    benchmark.extra_info.update(
        label=f"model forward passes alone, same rows; {iteration.rows} rows",
        work={"k rows/s": iteration.rows / 1e3},
    )
    rounds = iteration.case.settings.iteration_rounds
    out = benchmark.pedantic(iteration.forward, rounds=rounds, warmup_rounds=1, iterations=1)
    assert out.shape == (iteration.rows, 10)
