"""Training steps: examples per second of each scheme with fixed and data-dependent sigma, ddrs_ext vs plain.

A step is what one minibatch costs in a training loop: forward, backward and ``optimizer.step()``
(SGD, lr 0.01, momentum 0.9) on 64 digits images (scikit-learn's, 1x8x8 in [0, 1]) through
``baselines.digits_bn_cnn`` (conv16-BN-ReLU-pool, conv32-ReLU, linear 64, linear 10), briefly
pretrained with Gaussian augmentation so that MACER's robustness term has correct examples to act
on. Every round is one step on the next of the training set's minibatches, in turn; each
version trains its own copy of the model (and keeps its own sigma bank).

Schemes (``SCHEMES``), with sigma 0.25:

- ``gaussian``: Gaussian augmentation, one noisy copy per example;
- ``macer``: MACER's loss, 16 copies, lam 12, gamma 8, beta 16;
- ``smoothadv``: SmoothAdv, PGD-L2 (epsilon 0.5, 2 steps) on the soft smoothed classifier with 4
  noise draws, the model frozen, then cross-entropy on the 4 noisy adversarial copies.

Sigma: ``fixed`` (0.25 for all examples) or ``dd`` (data-dependent: a bank of one sigma per training
example, from 0.25; per minibatch 3 surrogate-ascent steps of 16 samples each, lr 0.04, with the
model frozen, written back, then the loss with those sigmas); ``dd-score`` is ``dd`` with
``update_sigma(estimator="score")`` (forward passes only), against the same plain step as ``dd``.

Versions: ``test_training_ddrs`` (``update_sigma`` and the scheme's ddrs_ext loss) in rounds
interleaved with ``test_training_plain`` of the same scheme and sigma (``baselines.PlainTrainingStep``:
``torch.randn`` noise into buffers allocated once; the sigma ascent by reverse-mode autograd, as the
published code does) and, for ``dd``, with ddrs_ext's fixed-sigma step (``extra_info["fixed_sigma"]``:
what the data-dependent sigma adds). The plain steps also run as benchmarks of their own.

Before any timing, every scheme's ddrs_ext loss and its plain version, fed the same noise (ddrs_ext's,
recovered from ``noisy_copies``), must agree, in value and in the parameters' gradients, for a fixed
and a per-example sigma; every timed step's loss must be finite.

With ``--benchmark-disable`` (CI) each benchmark runs one step, after a shorter pretraining.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from baselines import PLAIN_LOSSES, PlainTrainingStep, digits, digits_bn_cnn, train_noisy
from timing import pedantic_interleaved

from ddrs_ext.training import (
    SigmaBank,
    gaussian_augmentation_loss,
    macer_loss,
    noisy_copies,
    smoothadv_loss,
    update_sigma,
)

BATCH, SIGMA, LR, MOMENTUM = 64, 0.25, 0.01, 0.9
SIGMA_STEPS, SIGMA_SAMPLES = 3, 16  # the data-dependent update per minibatch
CHECK_SEED = 20240701

# name: (ddrs_ext loss, its keyword for the copies, copies, the scheme's settings, description)
SCHEMES = {
    "gaussian": (gaussian_augmentation_loss, "copies", 1, {}, "Gaussian augmentation, 1 copy"),
    "macer": (
        macer_loss,
        "num_samples",
        16,
        dict(lam=12.0, gamma=8.0, beta=16.0),
        "MACER, 16 copies, lam 12, gamma 8, beta 16",
    ),
    "smoothadv": (
        smoothadv_loss,
        "num_samples",
        4,
        dict(epsilon=0.5, steps=2),
        "SmoothAdv, PGD-L2 eps 0.5, 2 steps, 4 noise draws",
    ),
}
MODES = {
    "fixed": f"σ {SIGMA:g}",
    "dd": f"data-dependent σ ({SIGMA_STEPS} ascent steps × {SIGMA_SAMPLES} samples)",
    "dd-score": f"data-dependent σ, score-function gradient ({SIGMA_STEPS} steps × {SIGMA_SAMPLES} samples)",
}
# update_sigma's gradient estimator per mode (None: no sigma update); plain PyTorch has one
# data-dependent step (reverse-mode autograd), the baseline of both "dd" modes.
ESTIMATOR = {"fixed": None, "dd": "reparam", "dd-score": "score"}
PLAIN_MODE = {"fixed": "fixed", "dd": "dd", "dd-score": "dd"}
CASES = [(scheme, mode) for scheme in SCHEMES for mode in MODES]
PLAIN_CASES = [(scheme, mode) for scheme in SCHEMES for mode in MODES if PLAIN_MODE[mode] == mode]


@dataclass(frozen=True)
class Settings:
    pretrain_epochs: int
    rounds: dict[str, int]  # interleaved rounds (one step each) by case id; the plain steps alone run a third


# About 40 s in all on an idle 2-core machine; each case's rounds take 1.5 to 8 s.
FULL = Settings(
    pretrain_epochs=3,
    rounds={
        "gaussian-fixed": 300,
        "gaussian-dd": 50,
        "gaussian-dd-score": 50,
        "macer-fixed": 60,
        "macer-dd": 50,
        "macer-dd-score": 50,
        "smoothadv-fixed": 100,
        "smoothadv-dd": 50,
        "smoothadv-dd-score": 50,
    },
)
QUICK = Settings(pretrain_epochs=1, rounds={f"{scheme}-{mode}": 1 for scheme in SCHEMES for mode in MODES})


def case_id(scheme: str, mode: str) -> str:
    return f"{scheme}-{mode}"


class DdrsTrainingStep:
    """The step with ddrs_ext: ``update_sigma`` (if a bank is given, with ``estimator``), the scheme's
    loss, backward, step."""

    def __init__(
        self, model, optimizer, scheme: str, bank: SigmaBank | None, estimator: str = "reparam"
    ) -> None:
        self.model, self.optimizer, self.bank, self.estimator = model, optimizer, bank, estimator
        loss, copies_name, copies, settings, _ = SCHEMES[scheme]
        self.loss, self.kwargs = loss, {copies_name: copies, **settings}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sigma = SIGMA
        if self.bank is not None:
            sigma = update_sigma(
                self.model,
                self.bank,
                x,
                index,
                steps=SIGMA_STEPS,
                num_samples=SIGMA_SAMPLES,
                lr=0.04,
                estimator=self.estimator,
            )
        loss = self.loss(self.model, x, y, sigma, index=index, **self.kwargs)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class Runner:
    """One step per call on the next minibatch, in turn; keeps every loss for the finiteness check."""

    def __init__(self, step, batches) -> None:
        self.step, self.batches, self.calls, self.losses = step, batches, 0, []

    def __call__(self) -> torch.Tensor:
        x, y, index = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        loss = self.step(x, y, index)
        self.losses.append(loss)
        return loss

    def check(self) -> None:
        assert self.losses and bool(torch.isfinite(torch.stack(self.losses)).all())


class TrainingCase:
    def __init__(self, settings: Settings, quick: bool) -> None:
        self.settings, self.quick = settings, quick
        (x, y), _ = digits(seed=0)
        self.num_examples = len(y)
        index = torch.arange(len(y))
        self.batches = [
            (x[i : i + BATCH].contiguous(), y[i : i + BATCH], index[i : i + BATCH])
            for i in range(0, len(y) - BATCH + 1, BATCH)
        ]
        # Pretraining is setup, not timed (one thread is fastest for its batches of 64).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(0)
            self.model = train_noisy(digits_bn_cnn(), x, y, SIGMA, settings.pretrain_epochs, seed=0)
        finally:
            torch.set_num_threads(threads)
        self.agreement = {scheme: self.agree(scheme) for scheme in SCHEMES}
        self.runners: dict[str, Runner] = {}
        # One-time costs out of the timed rounds: the first forward-mode call loads torch's JVP
        # decompositions, the first reverse-mode call its engine.
        for scheme, mode in CASES:
            self.make_runner("ddrs", scheme, mode)()
        for scheme, mode in PLAIN_CASES:
            self.make_runner("plain", scheme, mode)()

    def fresh_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.model).train().requires_grad_(True)

    def make_runner(self, version: str, scheme: str, mode: str) -> Runner:
        model = self.fresh_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        if version == "ddrs":
            estimator = ESTIMATOR[mode]
            bank = SigmaBank(self.num_examples, SIGMA) if estimator is not None else None
            step = DdrsTrainingStep(model, optimizer, scheme, bank, estimator or "reparam")
        else:
            _, _, copies, settings, _ = SCHEMES[scheme]
            bank = torch.full((self.num_examples,), SIGMA) if PLAIN_MODE[mode] == "dd" else None
            shape = self.batches[0][0].shape
            step = PlainTrainingStep(
                model, optimizer, scheme, shape, copies, SIGMA, bank, SIGMA_STEPS, SIGMA_SAMPLES, **settings
            )
        return Runner(step, self.batches)

    def runner(self, version: str, scheme: str, mode: str) -> Runner:
        key = f"{version}[{case_id(scheme, mode)}]"
        if key not in self.runners:
            self.runners[key] = self.make_runner(version, scheme, mode)
        return self.runners[key]

    def agree(self, scheme: str) -> float:
        """Largest relative difference between the ddrs_ext loss and the plain one on the same noise, over
        the loss and the parameters' gradients, for a fixed and a per-example sigma (asserted small)."""
        loss, copies_name, copies, settings, _ = SCHEMES[scheme]
        x, y, index = self.batches[0]
        B = x.shape[0]
        worst = 0.0
        for sigma in (SIGMA, torch.linspace(0.12, 0.5, B)):
            s = sigma.view(B, 1, 1, 1, 1) if isinstance(sigma, torch.Tensor) else sigma
            noisy = noisy_copies(x, sigma, copies=copies, seed=CHECK_SEED, index=index)
            eps = (noisy.view(B, copies, *x.shape[1:]) - x.unsqueeze(1)) / s
            results = []
            for which in ("ddrs", "plain"):
                model = self.fresh_model()
                if which == "ddrs":
                    value = loss(
                        model, x, y, sigma, seed=CHECK_SEED, index=index, **{copies_name: copies}, **settings
                    )
                else:
                    value = PLAIN_LOSSES[scheme](model, x, y, sigma, eps, **settings)
                grads = torch.autograd.grad(value, list(model.parameters()))
                results.append(torch.cat([value.detach().view(1), *(g.flatten() for g in grads)]))
            ddrs, plain = results
            assert bool(torch.isfinite(ddrs).all()) and bool(torch.isfinite(plain).all())
            worst = max(worst, float((ddrs - plain).abs().max() / plain.abs().max()))
        assert worst < 1e-3, f"{scheme}: ddrs_ext and plain losses differ by {worst:.2e} on the same noise"
        return worst


@pytest.fixture(scope="module")
def training(request) -> TrainingCase:
    quick = bool(request.config.getoption("benchmark_disable"))
    return TrainingCase(QUICK if quick else FULL, quick)


def _info(training: TrainingCase, scheme: str, mode: str, label: str) -> dict:
    return dict(
        label=f"{label}: {SCHEMES[scheme][4]}, {MODES[mode]}; minibatch {BATCH}",
        work={"examples/s": BATCH},
        training=dict(
            scheme=scheme,
            mode=mode,
            batch=BATCH,
            sigma=SIGMA,
            sigma_steps=SIGMA_STEPS,
            sigma_samples=SIGMA_SAMPLES,
            agreement=training.agreement[scheme],
            quick=training.quick,
        ),
    )


@pytest.mark.parametrize("scheme, mode", CASES, ids=[case_id(*c) for c in CASES])
def test_training_ddrs(benchmark, training, scheme, mode):
    benchmark.group = f"training_{scheme}"
    cid = case_id(scheme, mode)
    plain = f"test_training_plain[{case_id(scheme, PLAIN_MODE[mode])}]"
    fixed = f"test_training_ddrs[{case_id(scheme, 'fixed')}]"
    label = "ddrs_ext loss" if mode == "fixed" else f"ddrs_ext update_sigma ({ESTIMATOR[mode]}) + loss"
    benchmark.extra_info.update(_info(training, scheme, mode, label), baseline=plain)
    others = {plain: training.runner("plain", scheme, PLAIN_MODE[mode])}
    if mode != "fixed":
        benchmark.extra_info["fixed_sigma"] = fixed  # report.py's training section divides by it
        others[fixed] = training.runner("ddrs", scheme, "fixed")
    runner = training.runner("ddrs", scheme, mode)
    pedantic_interleaved(benchmark, runner, others, rounds=training.settings.rounds[cid])
    runner.check()
    for other in others.values():
        other.check()


@pytest.mark.parametrize("scheme, mode", PLAIN_CASES, ids=[case_id(*c) for c in PLAIN_CASES])
def test_training_plain(benchmark, training, scheme, mode):
    benchmark.group = f"training_{scheme}"
    label = "plain PyTorch, σ ascent by autograd + loss" if mode == "dd" else "plain PyTorch loss"
    benchmark.extra_info.update(_info(training, scheme, mode, label))
    runner = training.make_runner("plain", scheme, mode)
    rounds = max(1, training.settings.rounds[case_id(scheme, mode)] // 3)
    benchmark.pedantic(runner, rounds=rounds, warmup_rounds=1, iterations=1)
    runner.check()
