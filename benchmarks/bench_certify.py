"""certify end to end next to the plain per-input Cohen loop, and the model's forward-only floor.

All runs use inference mode, per-input sigma in [0.12, 0.5], alpha = 0.001,
and the same batch size for ddrs_ext, the plain loop and the floor. Rounds
take seconds, so the ratios come from interleaved rounds (timing.py); on the CPU
the plain loop and the floor also run as benchmarks of their own for
pytest-benchmark's table.

Cases (``CASES``), by device: on the CPU a tiny linear model on 1x8x8 and a small CNN on
3x32x32; on a GPU (issue 12) the small CNN (16 inputs, n = 10 000) and a CIFAR ResNet-110
(8 inputs, n = 5 000), each at batch sizes 256, 1000 and 4000. On a GPU each case also counts
the device-to-host synchronisations of one certify call (``extra_info["syncs"]``; timing.py's
:func:`count_syncs`), with the forward batches it took (``extra_info["chunks"]``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from baselines import cifar_resnet, forward_floor, plain_certify, sigmas, small_cnn, tiny_linear
from conftest import bench_device, is_quick
from timing import count_syncs, pedantic_interleaved, synced, synchronizer
from torch import nn

import ddrs_ext
from ddrs_ext.certification import plan_chunks

DEVICES = ("cpu", "cuda")
ALPHA, NUM_CLASSES = 0.001, 10


@dataclass(frozen=True)
class Case:
    model: str  # a key of MODELS
    shape: tuple[int, ...]
    inputs: int
    n0: int
    n: int
    batch_size: int
    rounds: int  # interleaved
    rounds_alone: int  # the plain loop and the floor on their own; 0: not run


MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    # key: (description, factory)
    "linear": ("tiny linear model", tiny_linear),
    "cnn": ("small CNN", small_cnn),
    "resnet110": ("CIFAR ResNet-110", lambda: cifar_resnet(110)),
    "resnet8": ("CIFAR ResNet-8", lambda: cifar_resnet(8)),
}
GPU_BATCHES = (256, 1000, 4000)
CIFAR = (3, 32, 32)
CASES: dict[tuple[str, bool], dict[str, Case]] = {
    ("cpu", False): {
        "linear": Case("linear", (1, 8, 8), 250, 100, 10_000, 1000, 6, 3),
        "cnn": Case("cnn", CIFAR, 4, 100, 2_000, 500, 12, 3),
    },
    # Quick runs (CI, and .ci/gpu --dry-run) take the GPU's case names, small.
    ("cpu", True): {
        "cnn-b64": Case("cnn", CIFAR, 2, 10, 100, 64, 1, 1),
        "resnet-b64": Case("resnet8", CIFAR, 2, 10, 50, 64, 1, 1),
    },
    ("cuda", False): {
        **{f"cnn-b{b}": Case("cnn", CIFAR, 16, 100, 10_000, b, 3, 0) for b in GPU_BATCHES},
        **{f"resnet-b{b}": Case("resnet110", CIFAR, 8, 100, 5_000, b, 2, 0) for b in GPU_BATCHES},
    },
    ("cuda", True): {
        "cnn-b256": Case("cnn", CIFAR, 4, 100, 1_000, 256, 1, 0),
        "resnet-b256": Case("resnet110", CIFAR, 2, 100, 500, 256, 1, 0),
    },
}


def pytest_generate_tests(metafunc) -> None:
    if "case" in metafunc.fixturenames:
        config = metafunc.config
        cases = CASES[bench_device(config).type, is_quick(config)]
        metafunc.parametrize("case", list(cases), indirect=True, scope="module")


class CertifyCase:
    def __init__(self, name: str, case: Case, device: torch.device) -> None:
        self.name, self.case = name, case
        B, self.n0, self.n, self.batch_size = case.inputs, case.n0, case.n, case.batch_size
        self.rounds, self.rounds_alone = case.rounds, case.rounds_alone
        description, factory = MODELS[case.model]
        self.model = factory().to(device)
        self.x = torch.rand((B, *case.shape), generator=torch.Generator().manual_seed(3)).to(device)
        self.sigma = sigmas(B).to(device)
        self.rows = B * (self.n0 + self.n)
        self.sync = synchronizer(device)
        # One batch of real noisy copies of all inputs, filled once, for the forward-only
        # floor: its activations (hence e.g. the zeros after ReLU) look like certify's.
        per_input = -(-self.batch_size // B)
        stream = torch.arange(B, device=device)
        self.floor_buf = ddrs_ext.ops.perturb_gaussian(
            self.x, self.sigma, stream, 4, 0, per_input, 0, self.batch_size
        )[0]
        self.last_plain = None
        self.info = dict(
            inputs=B,
            n0=self.n0,
            n=self.n,
            batch_size=self.batch_size,
            model=description,
            device=str(device),
            chunks=len(plan_chunks(B, [self.n0, self.n], self.batch_size)),
            work={"k rows/s": self.rows / 1e3},
        )

    def ddrs(self) -> ddrs_ext.CertifyResult:
        return ddrs_ext.certify(
            self.model,
            self.x,
            self.sigma,
            n0=self.n0,
            n=self.n,
            alpha=ALPHA,
            batch_size=self.batch_size,
            num_classes=NUM_CLASSES,
            seed=0,
        )

    def plain(self):
        self.last_plain = plain_certify(
            self.model, self.x, self.sigma, self.n0, self.n, ALPHA, self.batch_size, NUM_CLASSES
        )
        return self.last_plain

    def floor(self) -> int:
        return forward_floor(self.model, self.floor_buf, self.rows)

    def check(self, result) -> None:
        B = self.x.shape[0]
        assert result.prediction.shape == (B,) and result.radius.shape == (B,)
        assert result.counts.shape == (B, NUM_CLASSES)
        assert (result.counts.sum(1) == self.n).all()
        assert (result.radius[result.prediction == ddrs_ext.ABSTAIN] == 0).all()


@pytest.fixture(scope="module")
def case(request, device):
    torch.manual_seed(0)
    quick = is_quick(request.config)
    return CertifyCase(request.param, CASES[device.type, quick][request.param], device)


def test_certify_ddrs(benchmark, case):
    benchmark.group = f"certify_{case.name}"
    plain, floor = f"test_certify_plain[{case.name}]", f"test_forward_floor[{case.name}]"
    benchmark.extra_info.update(case.info, label="ddrs_ext.certify", baseline=plain, reference=floor)
    others = {plain: case.plain, floor: case.floor}
    result = pedantic_interleaved(benchmark, case.ddrs, others, rounds=case.rounds, sync=case.sync)
    case.check(result)
    # Sound bounds at alpha = 0.001 cannot both certify two different classes
    # for one input: the plain loop must agree wherever both certify.
    other = case.last_plain.prediction
    both = (result.prediction != ddrs_ext.ABSTAIN) & (other != ddrs_ext.ABSTAIN)
    assert torch.equal(result.prediction[both], other[both])
    # The profiler's count only where its events stay few (it takes seconds to sort many).
    syncs = count_syncs(case.ddrs, case.x.device, profile=case.info["chunks"] <= 50)
    if syncs is not None:
        benchmark.extra_info["syncs"] = syncs


def test_certify_plain(benchmark, case):
    if not case.rounds_alone:
        pytest.skip("timed only interleaved with test_certify_ddrs here")
    benchmark.group = f"certify_{case.name}"
    benchmark.extra_info.update(case.info, label="plain per-input Cohen loop")
    fn = synced(case.plain, case.sync)
    case.check(benchmark.pedantic(fn, rounds=case.rounds_alone, warmup_rounds=1, iterations=1))


def test_forward_floor(benchmark, case):
    if not case.rounds_alone:
        pytest.skip("timed only interleaved with test_certify_ddrs here")
    benchmark.group = f"certify_{case.name}"
    benchmark.extra_info.update(case.info, label="model forward passes alone, same rows and batches")
    fn = synced(case.floor, case.sync)
    batches = benchmark.pedantic(fn, rounds=case.rounds_alone, warmup_rounds=1, iterations=1)
    assert batches == -(-case.rows // case.batch_size)


# Cheaper forward passes (issue 12, item 5): the same certify through ddrs_ext.Evaluated. Timed on a
# GPU at batch 1000 (bfloat16 autocast, channels-last, and torch.compile's CUDA graphs for the small
# CNN only: compiling ResNet-110 takes longer than the GPU check's budget); once, small, on the CPU.
EVALUATED = {
    "bf16": dict(autocast=torch.bfloat16),
    "channels-last": dict(channels_last=True),
    "cuda-graphs": dict(compile={"mode": "reduce-overhead", "dynamic": False}),
}
EVALUATED_CASES = {"cnn-b1000", "resnet-b1000", "cnn-b64"}


@pytest.mark.parametrize("variant", list(EVALUATED))
def test_certify_evaluated(benchmark, case, variant):
    if case.name not in EVALUATED_CASES:
        pytest.skip("cheaper forwards are timed at batch 1000 only")
    if variant == "cuda-graphs" and (case.x.device.type != "cuda" or case.case.model != "cnn"):
        pytest.skip("CUDA graphs: a GPU, and the small CNN only (compile time)")
    model = case.model
    if variant == "channels-last":
        model = copy.deepcopy(case.model).to(memory_format=torch.channels_last)
    wrapped = ddrs_ext.Evaluated(model, **EVALUATED[variant])
    benchmark.group = f"certify_{case.name}"
    benchmark.extra_info.update(case.info, label=f"ddrs_ext.certify, model evaluated {variant}")

    def run():
        return ddrs_ext.certify(
            wrapped,
            case.x,
            case.sigma,
            n0=case.n0,
            n=case.n,
            alpha=ALPHA,
            batch_size=case.batch_size,
            num_classes=NUM_CLASSES,
            seed=0,
        )

    run()  # warm-up: compilation, autocast caches
    result = benchmark.pedantic(synced(run, case.sync), rounds=max(1, case.rounds - 1), iterations=1)
    case.check(result)
