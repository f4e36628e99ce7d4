"""The two kernels next to the plain PyTorch that does the same work.

extra_info carries what report.py needs: ``label``; ``baseline``, the plain
benchmark this one's speedup is measured against; ``reference``, a bound
(memcpy, forward-only) its time is divided by; ``work``, amounts per call by
the unit of their rate (``{"GB/s written": 0.0123}``).
"""

from __future__ import annotations

import pytest
import torch
from baselines import PlainNoise, PlainVotes, sigmas

from ddrs_ext import ops

# Noise: 10 CIFAR-shaped inputs x 100 samples = 1000 rows, 12.3 MB of float32 written per call.
NOISE_B, NOISE_M, NOISE_SHAPE = 10, 100, (3, 32, 32)
# Votes: 100 inputs x 100 samples = 10 000 rows of 10 logits.
VOTES_B, VOTES_M, VOTES_C = 100, 100, 10
SEED = 20240101


@pytest.fixture(scope="module")
def noise_case():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((NOISE_B, *NOISE_SHAPE), generator=g)
    sigma = sigmas(NOISE_B)
    stream = torch.arange(NOISE_B, dtype=torch.int64)
    values = NOISE_B * NOISE_M * x[0].numel()
    work = {"G values/s": values / 1e9, "GB/s written": values * x.element_size() / 1e9}
    return x, sigma, stream, work


def _check_noise(out, x, sigma):
    """Cheap sanity: shape, finite, and (out - x) / sigma standard normal to ~3 decimals."""
    assert out.shape == (NOISE_B * NOISE_M, *NOISE_SHAPE)
    eps = (out.view(NOISE_B, NOISE_M, -1).double() - x.view(NOISE_B, 1, -1)) / sigma.view(-1, 1, 1)
    assert torch.isfinite(eps).all()
    assert abs(float(eps.mean())) < 5e-3 and abs(float(eps.std()) - 1) < 5e-3


@pytest.mark.benchmark(group="noise")
def test_noise_ddrs(benchmark, noise_case):
    x, sigma, stream, work = noise_case
    out = torch.empty((NOISE_B * NOISE_M, *NOISE_SHAPE))
    benchmark.extra_info.update(
        label="ddrs_ext.ops.perturb_gaussian_out",
        baseline="test_noise_plain",
        work=work,
        reference="test_noise_copy",
    )
    benchmark.pedantic(
        ops.perturb_gaussian_out,
        args=(x, sigma, stream, SEED, 0, NOISE_M, 0, out),
        rounds=60,
        warmup_rounds=2,
        iterations=1,
    )
    _check_noise(out, x, sigma)


@pytest.mark.benchmark(group="noise")
def test_noise_plain(benchmark, noise_case):
    x, sigma, _, work = noise_case
    plain = PlainNoise(x, sigma, NOISE_M)
    benchmark.extra_info.update(label="plain: randn(out=buf) + addcmul(x, buf, sigma, out=buf)", work=work)
    out = benchmark.pedantic(plain, rounds=20, warmup_rounds=1, iterations=1)
    _check_noise(out, x, sigma)


@pytest.mark.benchmark(group="noise")
def test_noise_plain_randn_only(benchmark, noise_case):
    x, sigma, _, work = noise_case
    plain = PlainNoise(x, sigma, NOISE_M)
    benchmark.extra_info.update(
        label="plain: randn(out=buf) alone (no plain version beats it)",
        work=work,
        baseline="test_noise_plain",
    )
    out = benchmark.pedantic(plain.randn_only, rounds=20, warmup_rounds=1, iterations=1)
    assert out.shape == (NOISE_B * NOISE_M, *NOISE_SHAPE)


@pytest.mark.benchmark(group="noise")
def test_noise_copy(benchmark, noise_case):
    x, _, _, work = noise_case
    out = torch.empty((NOISE_B * NOISE_M, *NOISE_SHAPE))
    src = torch.rand(out.shape, generator=torch.Generator().manual_seed(1))
    benchmark.extra_info.update(label="memory reference: buf.copy_(src), same bytes", work=work)
    benchmark.pedantic(out.copy_, args=(src,), rounds=200, warmup_rounds=5, iterations=1)
    assert torch.equal(out, src)


@pytest.fixture(scope="module")
def votes_case():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn((VOTES_B * VOTES_M, VOTES_C), generator=g)
    work = {"M rows/s": logits.shape[0] / 1e6, "GB/s read": logits.numel() * logits.element_size() / 1e9}
    return logits, work


def _check_votes(vote, logits):
    """One fresh call: every row votes once, for its argmax, into its own input's row."""
    counts = torch.zeros((VOTES_B, VOTES_C), dtype=torch.int64)
    vote(logits, counts)
    assert int(counts.sum()) == logits.shape[0]
    assert (counts.sum(1) == VOTES_M).all()
    expected = torch.nn.functional.one_hot(logits.argmax(1), VOTES_C).view(VOTES_B, VOTES_M, VOTES_C).sum(1)
    assert torch.equal(counts, expected)


@pytest.mark.benchmark(group="votes")
def test_votes_ddrs(benchmark, votes_case):
    logits, work = votes_case
    counts = torch.zeros((VOTES_B, VOTES_C), dtype=torch.int64)
    benchmark.extra_info.update(label="ddrs_ext.ops.count_votes_", baseline="test_votes_plain", work=work)
    benchmark.pedantic(
        ops.count_votes_, args=(logits, 0, VOTES_M, counts), rounds=500, warmup_rounds=10, iterations=1
    )
    _check_votes(lambda lg, c: ops.count_votes_(lg, 0, VOTES_M, c), logits)


@pytest.mark.benchmark(group="votes")
def test_votes_plain(benchmark, votes_case):
    logits, work = votes_case
    counts = torch.zeros((VOTES_B, VOTES_C), dtype=torch.int64)
    plain = PlainVotes(VOTES_B, VOTES_M, VOTES_C)
    benchmark.extra_info.update(label="plain: max(1, out=) + index_add_ on b*C+cls", work=work)
    benchmark.pedantic(plain, args=(logits, counts), rounds=500, warmup_rounds=10, iterations=1)
    _check_votes(plain, logits)
