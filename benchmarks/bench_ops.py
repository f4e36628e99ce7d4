"""The kernels next to the plain PyTorch that does the same work, on the CPU or a GPU (``--device``).

extra_info carries what report.py (and gpu_report.py) need: ``label``; ``baseline``, the plain
benchmark this one's speedup is measured against; ``reference``, a bound (memcpy on the CPU, a
``fill_`` of the same buffer or a plain read of the same logits on a GPU) its time is divided by;
``work``, amounts per call by the unit of their rate (``{"GB/s written": 0.0123}``);
``interleaved``, see timing.py.

The kernel and its plain version run in interleaved rounds: the host's speed
changes within a second (a single-threaded randn here swings between 12 and
22 ms). The memcpy reference does not: it is bound by memory, and the other
buffers passing through the cache between its rounds would change its time.

The uniform-noise op (``perturb_uniform_out``, the l1 certificate's noise) is measured the same way,
beside ``torch.rand(out=)`` + one fused affine ``addcmul`` and the same memory references.

Sizes (``SIZES``): on the CPU, 10 CIFAR-shaped inputs x 100 noise samples and 100 x 100 rows of
10 logits; on a GPU those of the first GPU run (issue 12): 128 x 1000 CIFAR-shaped noisy copies
(393 M elements, float32 and bfloat16) and 1.28 M rows of 10 float32 logits, the short ops
repeated inside a round (``repeat``) so that launch and synchronisation costs stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from baselines import PlainNoise, PlainSoftVotes, PlainVotes, sigmas
from conftest import bench_device, is_quick
from timing import pedantic_interleaved, synced, synchronizer

from ddrs_ext import ops

DEVICES = ("cpu", "cuda")
SEED = 20240101


@dataclass(frozen=True)
class Sizes:
    noise_inputs: int
    noise_samples: int
    noise_shape: tuple[int, ...]
    noise_rounds: int  # interleaved with the plain ways; those alone, and the references, run fewer or more
    votes_inputs: int
    votes_samples: int
    votes_classes: int
    votes_rounds: int
    votes_repeat: int  # calls per round
    soft_rounds: int


SIZES = {
    ("cpu", False): Sizes(10, 100, (3, 32, 32), 100, 100, 100, 10, 500, 1, 200),
    ("cpu", True): Sizes(4, 20, (3, 16, 16), 3, 20, 50, 10, 5, 1, 5),
    ("cuda", False): Sizes(128, 1000, (3, 32, 32), 30, 1280, 1000, 10, 30, 20, 30),
    ("cuda", True): Sizes(16, 100, (3, 32, 32), 3, 128, 1000, 10, 3, 5, 3),
}
NOISE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pytest_generate_tests(metafunc) -> None:
    # On a GPU (and in quick runs), the noise benchmarks also run in bfloat16; the CPU's full run
    # keeps the names of docs/benchmarks.md's table.
    config = metafunc.config
    if "noise_dtype" in metafunc.fixturenames and (bench_device(config).type == "cuda" or is_quick(config)):
        metafunc.parametrize(
            "noise_dtype", list(NOISE_DTYPES.values()), ids=list(NOISE_DTYPES), scope="module"
        )


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    return SIZES[bench_device(request.config).type, is_quick(request.config)]


@pytest.fixture(scope="module")
def noise_dtype() -> torch.dtype:
    return torch.float32


class NoiseCase:
    """The inputs, and one reused output buffer per way of filling it."""

    def __init__(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(0)
        B, m, shape = sizes.noise_inputs, sizes.noise_samples, sizes.noise_shape
        self.B, self.m, self.shape = B, m, shape
        self.x = torch.rand((B, *shape), generator=g).to(device=device, dtype=dtype)
        self.sigma = sigmas(B).to(device)
        self.stream = torch.arange(B, dtype=torch.int64, device=device)
        self.out = torch.empty((B * m, *shape), dtype=dtype, device=device)
        self.plain = PlainNoise(self.x, self.sigma, m)
        self.copy_out = torch.empty_like(self.out)
        # Drawn where it lives: on a GPU the buffers hold 393 M values.
        self.copy_src = torch.empty_like(self.out).uniform_(generator=torch.Generator(device).manual_seed(1))
        values = self.out.numel()
        self.work = {"G values/s": values / 1e9, "GB/s written": values * self.out.element_size() / 1e9}
        self.sync = synchronizer(device)
        self.device = device

    def ddrs(self) -> torch.Tensor:
        ops.perturb_gaussian_out(self.x, self.sigma, self.stream, SEED, 0, self.m, 0, self.out)
        return self.out

    def copy(self) -> torch.Tensor:
        return self.copy_out.copy_(self.copy_src)

    def fill(self) -> torch.Tensor:
        return self.copy_out.fill_(0.5)

    def check(self, out: torch.Tensor) -> None:
        """Cheap sanity: shape, finite, and (out - x) / sigma standard normal: mean and standard deviation
        within 6 standard errors (one input's copies on a GPU, whose buffers are large)."""
        assert out.shape == (self.B * self.m, *self.shape)
        inputs = 1 if self.device.type == "cuda" else self.B
        noisy = out[: inputs * self.m].view(inputs, self.m, -1).double()
        eps = (noisy - self.x[:inputs].double().view(inputs, 1, -1)) / self.sigma[:inputs].view(-1, 1, 1)
        assert torch.isfinite(eps).all()
        n = eps.numel()
        # bfloat16 rounds x + sigma * eps to 8 bits, which blurs the eps recovered from it a little.
        blur = 0.0 if out.dtype in (torch.float32, torch.float64) else 1e-2
        assert abs(float(eps.mean())) < 6 / n**0.5 + blur
        assert abs(float(eps.std()) - 1) < 6 / (2 * n) ** 0.5 + blur


@pytest.fixture(scope="module")
def noise(sizes, device, noise_dtype):
    return NoiseCase(sizes, device, noise_dtype)


def _name(request, base: str) -> str:
    """A sibling benchmark's name, with this test's parameters (e.g. "[bfloat16]") if it has any."""
    node = request.node.name
    return base + (node[node.index("[") :] if "[" in node else "")


def _dtype_label(noise) -> str:
    return "" if noise.out.dtype == torch.float32 else f" ({str(noise.out.dtype).removeprefix('torch.')})"


@pytest.mark.benchmark(group="noise")
def test_noise_ddrs(benchmark, noise, sizes, request):
    plain, randn = _name(request, "test_noise_plain"), _name(request, "test_noise_plain_randn_only")
    reference = _name(request, "test_noise_fill" if noise.device.type == "cuda" else "test_noise_copy")
    benchmark.extra_info.update(
        label="ddrs_ext.ops.perturb_gaussian_out" + _dtype_label(noise),
        work=noise.work,
        baseline=plain,
        reference=reference,
    )
    others = {plain: noise.plain, randn: noise.plain.randn_only}
    result = pedantic_interleaved(
        benchmark, noise.ddrs, others, rounds=sizes.noise_rounds, warmup_rounds=2, sync=noise.sync
    )
    noise.check(result)


@pytest.mark.benchmark(group="noise")
def test_noise_plain(benchmark, noise, sizes):
    label = "plain: randn(out=buf), addcmul(x, buf, sigma, out=buf)" + _dtype_label(noise)
    benchmark.extra_info.update(label=label, work=noise.work)
    rounds = max(1, sizes.noise_rounds // 5)
    noise.check(
        benchmark.pedantic(synced(noise.plain, noise.sync), rounds=rounds, warmup_rounds=1, iterations=1)
    )


@pytest.mark.benchmark(group="noise")
def test_noise_plain_randn_only(benchmark, noise, sizes, request):
    benchmark.extra_info.update(
        label="plain: randn(out=buf) alone, a bound on any plain version" + _dtype_label(noise),
        work=noise.work,
        baseline=_name(request, "test_noise_plain"),
    )
    rounds = max(1, sizes.noise_rounds // 5)
    fn = synced(noise.plain.randn_only, noise.sync)
    out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    assert out.shape == noise.out.shape


@pytest.mark.benchmark(group="noise")
def test_noise_copy(benchmark, noise, sizes):
    benchmark.extra_info.update(
        label="memory reference: buf.copy_(src) of the same bytes" + _dtype_label(noise), work=noise.work
    )
    fn = synced(noise.copy, noise.sync)
    out = benchmark.pedantic(fn, rounds=2 * sizes.noise_rounds, warmup_rounds=5, iterations=1)
    assert torch.equal(out, noise.copy_src)


@pytest.mark.benchmark(group="noise")
def test_noise_fill(benchmark, noise, sizes):
    benchmark.extra_info.update(
        label="memory reference: buf.fill_(0.5), the same bytes written" + _dtype_label(noise),
        work=noise.work,
    )
    fn = synced(noise.fill, noise.sync)
    out = benchmark.pedantic(fn, rounds=2 * sizes.noise_rounds, warmup_rounds=5, iterations=1)
    assert bool((out[:1] == 0.5).all())


class PlainUniformNoise:
    """``m`` copies ``x_b + theta_b * u``, ``u`` uniform on [-1, 1], the plain way into a reused buffer:
    ``torch.rand(out=buf)`` then one fused ``addcmul`` of the affine map,
    ``(x - theta) + (2 theta) * r``, over broadcast views (``x - theta`` and ``2 theta`` computed once)."""

    def __init__(self, x: torch.Tensor, theta: torch.Tensor, m: int) -> None:
        B = x.shape[0]
        self.buf = torch.empty((B * m, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.view = self.buf.view(B, m, *x.shape[1:])
        t = theta.to(device=x.device, dtype=x.dtype).view(B, *([1] * x.dim()))
        self.low = x.view(B, 1, *x.shape[1:]) - t
        self.width = 2 * t

    def __call__(self) -> torch.Tensor:
        torch.rand(self.buf.shape, out=self.buf)
        torch.addcmul(self.low, self.view, self.width, out=self.view)
        return self.buf

    def rand_only(self) -> torch.Tensor:
        return torch.rand(self.buf.shape, out=self.buf)


class UniformNoiseCase(NoiseCase):
    """The noise benchmark's inputs and buffers, for uniform noise (the l1 certificate's)."""

    def __init__(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(sizes, device, dtype)
        self.plain = PlainUniformNoise(self.x, self.sigma, self.m)

    def ddrs(self) -> torch.Tensor:
        ops.perturb_uniform_out(self.x, self.sigma, self.stream, SEED, 0, self.m, 0, self.out)
        return self.out

    def check(self, out: torch.Tensor) -> None:
        """Shape, and (out - x) / theta uniform on [-1, 1]: inside it, mean 0 and variance 1/3 within 6
        standard errors (one input's copies on a GPU)."""
        assert out.shape == (self.B * self.m, *self.shape)
        inputs = 1 if self.device.type == "cuda" else self.B
        noisy = out[: inputs * self.m].view(inputs, self.m, -1).double()
        u = (noisy - self.x[:inputs].double().view(inputs, 1, -1)) / self.sigma[:inputs].view(-1, 1, 1)
        blur = 0.0 if out.dtype in (torch.float32, torch.float64) else 1e-2
        assert bool((u.abs() <= 1 + 1e-5 + 4 * blur).all())
        n = u.numel()
        assert abs(float(u.mean())) < 6 * (1 / 3 / n) ** 0.5 + blur
        assert abs(float(u.var()) - 1 / 3) < 6 * (4 / 45 / n) ** 0.5 + blur


@pytest.fixture(scope="module")
def uniform_noise(sizes, device, noise_dtype):
    return UniformNoiseCase(sizes, device, noise_dtype)


@pytest.mark.benchmark(group="noise")
def test_noise_uniform_ddrs(benchmark, uniform_noise, sizes, request):
    noise = uniform_noise
    plain, rand = (
        _name(request, "test_noise_uniform_plain"),
        _name(request, "test_noise_uniform_plain_rand_only"),
    )
    reference = _name(request, "test_noise_fill" if noise.device.type == "cuda" else "test_noise_copy")
    benchmark.extra_info.update(
        label="ddrs_ext.ops.perturb_uniform_out (uniform noise, l1)" + _dtype_label(noise),
        work=noise.work,
        baseline=plain,
        reference=reference,
    )
    # the memory reference runs on its own (test_noise_copy / test_noise_fill), as for the Gaussian op
    others = {plain: noise.plain, rand: noise.plain.rand_only}
    result = pedantic_interleaved(
        benchmark, noise.ddrs, others, rounds=sizes.noise_rounds, warmup_rounds=2, sync=noise.sync
    )
    noise.check(result)


@pytest.mark.benchmark(group="noise")
def test_noise_uniform_plain(benchmark, uniform_noise, sizes):
    noise = uniform_noise
    label = "plain: rand(out=buf), addcmul(x - theta, buf, 2 theta, out=buf)" + _dtype_label(noise)
    benchmark.extra_info.update(label=label, work=noise.work)
    rounds = max(1, sizes.noise_rounds // 5)
    noise.check(
        benchmark.pedantic(synced(noise.plain, noise.sync), rounds=rounds, warmup_rounds=1, iterations=1)
    )


@pytest.mark.benchmark(group="noise")
def test_noise_uniform_plain_rand_only(benchmark, uniform_noise, sizes, request):
    noise = uniform_noise
    benchmark.extra_info.update(
        label="plain: rand(out=buf) alone, a bound on any plain version" + _dtype_label(noise),
        work=noise.work,
        baseline=_name(request, "test_noise_uniform_plain"),
    )
    rounds = max(1, sizes.noise_rounds // 5)
    out = benchmark.pedantic(
        synced(noise.plain.rand_only, noise.sync), rounds=rounds, warmup_rounds=1, iterations=1
    )
    assert out.shape == noise.out.shape


class VotesCase:
    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        B, m, C = sizes.votes_inputs, sizes.votes_samples, sizes.votes_classes
        self.B, self.m, self.C, self.repeat = B, m, C, sizes.votes_repeat
        g = torch.Generator().manual_seed(2)
        self.logits = torch.randn((B * m, C), generator=g).to(device)
        self.counts = torch.zeros((B, C), dtype=torch.int64, device=device)
        self.plain_counts = torch.zeros_like(self.counts)
        self.vote = PlainVotes(B, m, C, device=device)
        self.total = torch.zeros((), device=device)
        rows = self.logits.shape[0] * self.repeat
        nbytes = self.logits.numel() * self.logits.element_size() * self.repeat
        self.work = {"M rows/s": rows / 1e6, "GB/s read": nbytes / 1e9}
        self.sync = synchronizer(device)

    # Both add into running totals, as certify does chunk after chunk.
    def ddrs(self) -> None:
        for _ in range(self.repeat):
            ops.count_votes_(self.logits, 0, self.m, self.counts)

    def plain(self) -> None:
        for _ in range(self.repeat):
            self.vote(self.logits, self.plain_counts)

    def read(self) -> None:
        """Every logit read once, nothing else: the bound for a kernel that reads the logits."""
        for _ in range(self.repeat):
            torch.sum(self.logits, dim=(0, 1), out=self.total)

    def check(self, counts: torch.Tensor) -> None:
        """Every row voted once per call, for its argmax, into its own input's row."""
        calls = int(counts.sum()) // self.logits.shape[0]
        assert calls >= 1 and int(counts.sum()) == calls * self.logits.shape[0]
        expected = torch.nn.functional.one_hot(self.logits.argmax(1), self.C)
        assert torch.equal(counts, expected.view(self.B, self.m, self.C).sum(1) * calls)


@pytest.fixture
def votes(sizes, device):
    return VotesCase(sizes, device)


def _repeat_label(case) -> str:
    return f" ({case.repeat} calls per round)" if case.repeat > 1 else ""


@pytest.mark.benchmark(group="votes")
def test_votes_ddrs(benchmark, votes, sizes):
    benchmark.extra_info.update(
        label="ddrs_ext.ops.count_votes_" + _repeat_label(votes),
        work=votes.work,
        baseline="test_votes_plain",
        reference="test_votes_read",
    )
    others = {"test_votes_plain": votes.plain, "test_votes_read": votes.read}
    pedantic_interleaved(
        benchmark, votes.ddrs, others, rounds=sizes.votes_rounds, warmup_rounds=3, sync=votes.sync
    )
    votes.check(votes.counts)
    assert torch.equal(votes.plain_counts, votes.counts)


@pytest.mark.benchmark(group="votes")
def test_votes_plain(benchmark, votes, sizes):
    benchmark.extra_info.update(
        label="plain: max(1, out=), index_add_ at b*C+cls" + _repeat_label(votes), work=votes.work
    )
    benchmark.pedantic(
        synced(votes.plain, votes.sync), rounds=sizes.votes_rounds, warmup_rounds=3, iterations=1
    )
    votes.check(votes.plain_counts)


@pytest.mark.benchmark(group="votes")
def test_votes_read(benchmark, votes, sizes):
    benchmark.extra_info.update(
        label="read reference: logits.sum(), every logit read once" + _repeat_label(votes), work=votes.work
    )
    benchmark.pedantic(
        synced(votes.read, votes.sync), rounds=sizes.votes_rounds, warmup_rounds=3, iterations=1
    )


class SoftVotesCase:
    """Softmax sums in float64 per input (``soft_votes_``'s plain mode) and, for "tangent", the
    forward-mode derivatives along tangents of the logits too, over the votes benchmark's logits."""

    def __init__(self, votes: VotesCase, mode: str) -> None:
        device = votes.logits.device
        self.votes, self.mode, self.repeat = votes, mode, votes.repeat
        self.logits = votes.logits
        g = torch.Generator().manual_seed(5)
        self.d = torch.randn(self.logits.shape, generator=g).to(device) if mode == "tangent" else None
        B, C = votes.B, votes.C
        self.sums = [torch.zeros(B, C, dtype=torch.float64, device=device) for _ in range(2)]
        self.plain_sums = [torch.zeros(B, C, dtype=torch.float64, device=device) for _ in range(2)]
        self.vote = PlainSoftVotes(B, votes.m, device=device)
        tensors = 1 if self.d is None else 2
        rows = self.logits.shape[0] * self.repeat
        nbytes = tensors * self.logits.numel() * self.logits.element_size() * self.repeat
        self.work = {"M rows/s": rows / 1e6, "GB/s read": nbytes / 1e9}

    def ddrs(self) -> None:
        deriv = self.sums[1] if self.d is not None else None
        for _ in range(self.repeat):
            ops.soft_votes_(self.logits, 0, self.votes.m, self.sums[0], dlogits=self.d, deriv_sum=deriv)

    def plain(self) -> None:
        deriv = self.plain_sums[1] if self.d is not None else None
        for _ in range(self.repeat):
            self.vote(self.logits, self.plain_sums[0], self.d, deriv)

    def check(self) -> None:
        """Both ways summed the same numbers (to float64 rounding in a different order)."""
        calls_ddrs = round(float(self.sums[0].sum()) / self.logits.shape[0])
        calls_plain = round(float(self.plain_sums[0].sum()) / self.logits.shape[0])
        assert calls_ddrs >= 1 and calls_plain >= 1
        for a, b in zip(self.sums, self.plain_sums):
            torch.testing.assert_close(a / calls_ddrs, b / calls_plain, rtol=1e-9, atol=1e-9)


@pytest.mark.benchmark(group="soft_votes")
@pytest.mark.parametrize("mode", ["probabilities", "tangent"])
def test_soft_votes_ddrs(benchmark, votes, sizes, mode):
    case = SoftVotesCase(votes, mode)
    what = "softmax sums" if mode == "probabilities" else "softmax sums and their derivatives along tangents"
    plain = f"test_soft_votes_plain[{mode}]"
    benchmark.extra_info.update(
        label=f"ddrs_ext.ops.soft_votes_, {what}" + _repeat_label(votes), work=case.work, baseline=plain
    )
    others = {plain: case.plain}
    if mode == "probabilities":  # the same logits, read once
        benchmark.extra_info["reference"] = "test_votes_read"
        others["test_votes_read"] = votes.read
    pedantic_interleaved(
        benchmark, case.ddrs, others, rounds=sizes.soft_rounds, warmup_rounds=3, sync=votes.sync
    )
    case.check()


@pytest.mark.benchmark(group="soft_votes")
@pytest.mark.parametrize("mode", ["probabilities", "tangent"])
def test_soft_votes_plain(benchmark, votes, sizes, mode):
    case = SoftVotesCase(votes, mode)
    benchmark.extra_info.update(
        label="plain: softmax(dtype=float64), index_add_"
        + (", p * (d - <p, d>)" if mode == "tangent" else "")
        + _repeat_label(votes),
        work=case.work,
    )
    rounds = max(1, sizes.soft_rounds // 3)
    benchmark.pedantic(synced(case.plain, votes.sync), rounds=rounds, warmup_rounds=1, iterations=1)
