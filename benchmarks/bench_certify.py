"""certify end to end next to the plain per-input Cohen loop, and the model's forward-only floor.

All runs use inference mode, per-input sigma in [0.12, 0.5], alpha = 0.001,
and the same batch size for ddrs_ext, the plain loop and the floor. Rounds
take seconds, so the ratios come from interleaved rounds (timing.py); the plain
loop and the floor also run as benchmarks of their own for pytest-benchmark's
table.
"""

from __future__ import annotations

import pytest
import torch
from baselines import forward_floor, plain_certify, sigmas, small_cnn, tiny_linear
from timing import pedantic_interleaved

import ddrs_ext

ALPHA, NUM_CLASSES = 0.001, 10
CASES = {
    # name: (model factory, input shape, inputs, n0, n, batch_size, rounds interleaved, rounds alone)
    "linear": (tiny_linear, (1, 8, 8), 250, 100, 10_000, 1000, 6, 3),
    "cnn": (small_cnn, (3, 32, 32), 4, 100, 2_000, 500, 12, 3),
}


class CertifyCase:
    def __init__(self, name: str) -> None:
        factory, shape, B, self.n0, self.n, self.batch_size, self.rounds, self.rounds_alone = CASES[name]
        self.name = name
        self.model = factory()
        self.x = torch.rand((B, *shape), generator=torch.Generator().manual_seed(3))
        self.sigma = sigmas(B)
        self.rows = B * (self.n0 + self.n)
        # One batch of real noisy copies of all inputs, filled once, for the forward-only
        # floor: its activations (hence e.g. the zeros after ReLU) look like certify's.
        per_input = -(-self.batch_size // B)
        stream = torch.arange(B)
        self.floor_buf = ddrs_ext.ops.perturb_gaussian(
            self.x, self.sigma, stream, 4, 0, per_input, 0, self.batch_size
        )[0]
        self.last_plain = None
        self.info = dict(
            inputs=B, n0=self.n0, n=self.n, batch_size=self.batch_size, work={"k rows/s": self.rows / 1e3}
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


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    return CertifyCase(request.param)


def test_certify_ddrs(benchmark, case):
    benchmark.group = f"certify_{case.name}"
    plain, floor = f"test_certify_plain[{case.name}]", f"test_forward_floor[{case.name}]"
    benchmark.extra_info.update(case.info, label="ddrs_ext.certify", baseline=plain, reference=floor)
    others = {plain: case.plain, floor: case.floor}
    result = pedantic_interleaved(benchmark, case.ddrs, others, rounds=case.rounds)
    case.check(result)
    # Sound bounds at alpha = 0.001 cannot both certify two different classes
    # for one input: the plain loop must agree wherever both certify.
    other = case.last_plain.prediction
    both = (result.prediction != ddrs_ext.ABSTAIN) & (other != ddrs_ext.ABSTAIN)
    assert torch.equal(result.prediction[both], other[both])


def test_certify_plain(benchmark, case):
    benchmark.group = f"certify_{case.name}"
    benchmark.extra_info.update(case.info, label="plain per-input Cohen loop")
    case.check(benchmark.pedantic(case.plain, rounds=case.rounds_alone, warmup_rounds=1, iterations=1))


def test_forward_floor(benchmark, case):
    benchmark.group = f"certify_{case.name}"
    benchmark.extra_info.update(case.info, label="model forward passes alone, same rows and batches")
    batches = benchmark.pedantic(case.floor, rounds=case.rounds_alone, warmup_rounds=1, iterations=1)
    assert batches == -(-case.rows // case.batch_size)
