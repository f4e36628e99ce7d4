"""The two kernels next to the plain PyTorch that does the same work.

extra_info carries what report.py needs: ``label``; ``baseline``, the plain
benchmark this one's speedup is measured against; ``reference``, a bound
(memcpy) its time is divided by; ``work``, amounts per call by the unit of
their rate (``{"GB/s written": 0.0123}``); ``interleaved``, see timing.py.

The kernel and its plain version run in interleaved rounds: the host's speed
changes within a second (a single-threaded randn here swings between 12 and
22 ms). The memcpy reference does not: it is bound by memory, and the other
buffers passing through the cache between its rounds would change its time.
"""

from __future__ import annotations

import pytest
import torch
from baselines import PlainNoise, PlainVotes, sigmas
from timing import pedantic_interleaved

from ddrs_ext import ops

# Noise: 10 CIFAR-shaped inputs x 100 samples = 1000 rows, 12.3 MB of float32 written per call.
NOISE_B, NOISE_M, NOISE_SHAPE = 10, 100, (3, 32, 32)
# Votes: 100 inputs x 100 samples = 10 000 rows of 10 logits.
VOTES_B, VOTES_M, VOTES_C = 100, 100, 10
VOTES_ROUNDS = 500
SEED = 20240101


class NoiseCase:
    """The inputs, and one reused output buffer per way of filling it."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand((NOISE_B, *NOISE_SHAPE), generator=g)
        self.sigma = sigmas(NOISE_B)
        self.stream = torch.arange(NOISE_B, dtype=torch.int64)
        self.out = torch.empty((NOISE_B * NOISE_M, *NOISE_SHAPE))
        self.plain = PlainNoise(self.x, self.sigma, NOISE_M)
        self.copy_out = torch.empty_like(self.out)
        self.copy_src = torch.rand(self.out.shape, generator=g)
        values = self.out.numel()
        self.work = {"G values/s": values / 1e9, "GB/s written": values * self.out.element_size() / 1e9}

    def ddrs(self) -> torch.Tensor:
        ops.perturb_gaussian_out(self.x, self.sigma, self.stream, SEED, 0, NOISE_M, 0, self.out)
        return self.out

    def copy(self) -> torch.Tensor:
        return self.copy_out.copy_(self.copy_src)

    def check(self, out: torch.Tensor) -> None:
        """Cheap sanity: shape, finite, and (out - x) / sigma standard normal to ~3 decimals."""
        assert out.shape == (NOISE_B * NOISE_M, *NOISE_SHAPE)
        diff = out.view(NOISE_B, NOISE_M, -1).double() - self.x.view(NOISE_B, 1, -1)
        eps = diff / self.sigma.view(-1, 1, 1)
        assert torch.isfinite(eps).all()
        assert abs(float(eps.mean())) < 5e-3 and abs(float(eps.std()) - 1) < 5e-3


@pytest.fixture(scope="module")
def noise():
    return NoiseCase()


@pytest.mark.benchmark(group="noise")
def test_noise_ddrs(benchmark, noise):
    benchmark.extra_info.update(
        label="ddrs_ext.ops.perturb_gaussian_out",
        work=noise.work,
        baseline="test_noise_plain",
        reference="test_noise_copy",
    )
    others = {"test_noise_plain": noise.plain, "test_noise_plain_randn_only": noise.plain.randn_only}
    noise.check(pedantic_interleaved(benchmark, noise.ddrs, others, rounds=100, warmup_rounds=2))


@pytest.mark.benchmark(group="noise")
def test_noise_plain(benchmark, noise):
    label = "plain: randn(out=buf), addcmul(x, buf, sigma, out=buf)"
    benchmark.extra_info.update(label=label, work=noise.work)
    noise.check(benchmark.pedantic(noise.plain, rounds=20, warmup_rounds=1, iterations=1))


@pytest.mark.benchmark(group="noise")
def test_noise_plain_randn_only(benchmark, noise):
    benchmark.extra_info.update(
        label="plain: randn(out=buf) alone, a bound on any plain version",
        work=noise.work,
        baseline="test_noise_plain",
    )
    out = benchmark.pedantic(noise.plain.randn_only, rounds=20, warmup_rounds=1, iterations=1)
    assert out.shape == (NOISE_B * NOISE_M, *NOISE_SHAPE)


@pytest.mark.benchmark(group="noise")
def test_noise_copy(benchmark, noise):
    benchmark.extra_info.update(label="memory reference: buf.copy_(src) of the same bytes", work=noise.work)
    out = benchmark.pedantic(noise.copy, rounds=200, warmup_rounds=5, iterations=1)
    assert torch.equal(out, noise.copy_src)


class VotesCase:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.logits = torch.randn((VOTES_B * VOTES_M, VOTES_C), generator=g)
        self.counts = torch.zeros((VOTES_B, VOTES_C), dtype=torch.int64)
        self.plain_counts = torch.zeros_like(self.counts)
        self.vote = PlainVotes(VOTES_B, VOTES_M, VOTES_C)
        rows = self.logits.shape[0]
        nbytes = self.logits.numel() * self.logits.element_size()
        self.work = {"M rows/s": rows / 1e6, "GB/s read": nbytes / 1e9}

    # Both add into running totals, as certify does chunk after chunk.
    def ddrs(self) -> None:
        ops.count_votes_(self.logits, 0, VOTES_M, self.counts)

    def plain(self) -> None:
        self.vote(self.logits, self.plain_counts)

    def check(self, counts: torch.Tensor) -> None:
        """Every row voted once per call, for its argmax, into its own input's row."""
        calls = int(counts.sum()) // self.logits.shape[0]
        assert calls >= 1 and int(counts.sum()) == calls * self.logits.shape[0]
        expected = torch.nn.functional.one_hot(self.logits.argmax(1), VOTES_C)
        assert torch.equal(counts, expected.view(VOTES_B, VOTES_M, VOTES_C).sum(1) * calls)


@pytest.fixture
def votes():
    return VotesCase()


@pytest.mark.benchmark(group="votes")
def test_votes_ddrs(benchmark, votes):
    benchmark.extra_info.update(
        label="ddrs_ext.ops.count_votes_", work=votes.work, baseline="test_votes_plain"
    )
    pedantic_interleaved(
        benchmark, votes.ddrs, {"test_votes_plain": votes.plain}, rounds=VOTES_ROUNDS, warmup_rounds=10
    )
    votes.check(votes.counts)
    assert torch.equal(votes.plain_counts, votes.counts)


@pytest.mark.benchmark(group="votes")
def test_votes_plain(benchmark, votes):
    benchmark.extra_info.update(label="plain: max(1, out=), index_add_ at b*C+cls", work=votes.work)
    benchmark.pedantic(votes.plain, rounds=VOTES_ROUNDS, warmup_rounds=10, iterations=1)
    votes.check(votes.plain_counts)
