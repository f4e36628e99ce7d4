"""The uniform-noise kernel (the l1 certificate's noise): against its reference, its contract and its
distribution."""

import numpy as np
import pytest
import torch
from scipy import stats
from test_ops import raises_for_bad_arguments

from ddrs_ext import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 5, 7), (2, 3, 2050), (4, 1, 8, 8), (2, 4099)]  # odd sizes, rows past one tile


def sample_inputs(device, dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    B = shape[0]
    theta = (torch.rand(B, generator=g, dtype=torch.float64) + 0.1).to(device)
    stream = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64).to(device)
    return x, theta, stream


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_matches_reference(dtype, shape):
    x, theta, stream = sample_inputs("cpu", dtype, shape)
    m = 3
    out = ops.perturb_uniform(x, theta, stream, 2**63 + 5, 17, m)
    ref = reference.perturb_uniform(x, theta, stream, 2**63 + 5, 17, m)
    assert out.dtype == dtype and out.shape == (shape[0] * m, *shape[1:])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_uniform_extreme_keys():
    """Stream ids and sample indices use all their bits; the seed all 64."""
    x, theta, _ = sample_inputs("cpu", torch.float32, (3, 9))
    stream = torch.tensor([0, 2**32 - 1, 2**31])
    for seed, offset in [(0, 0), (2**64 - 1, 2**40 + 1), (2**32, 2**32 - 2)]:
        out = ops.perturb_uniform(x, theta, stream, seed, offset, 4)
        torch.testing.assert_close(
            out, reference.perturb_uniform(x, theta, stream, seed, offset, 4), rtol=0, atol=0
        )


@pytest.mark.parametrize("splits", [[1] * 12, [5, 7], [2, 9, 1], [12]])
def test_uniform_chunks_equal_whole(splits):
    x, theta, stream = sample_inputs("cpu", torch.float32, (3, 2, 1500))
    m = 4
    whole = ops.perturb_uniform(x, theta, stream, 9, 0, m)
    buf = torch.empty(max(splits), 2, 1500)
    start = 0
    for rows in splits:
        ops.perturb_uniform_out(x, theta, stream, 9, 0, m, start, buf[:rows])
        torch.testing.assert_close(buf[:rows], whole[start : start + rows], rtol=0, atol=0)
        start += rows


def test_uniform_independent_of_batch_and_threads():
    """An input's noise depends on (seed, stream, sample, element) only."""
    x, theta, stream = sample_inputs("cpu", torch.float32, (5, 3, 40, 41))
    torch.set_num_threads(1)
    alone = ops.perturb_uniform(x[2:3], theta[2:3], stream[2:3], 4, 100, 6)
    torch.set_num_threads(2)
    together = ops.perturb_uniform(x, theta, stream, 4, 100, 6)
    torch.testing.assert_close(alone, together[12:18], rtol=0, atol=0)
    later = ops.perturb_uniform(x[2:3], theta[2:3], stream[2:3], 4, 102, 4)
    torch.testing.assert_close(later, alone[2:], rtol=0, atol=0)


def test_uniform_reproducible_and_seeded():
    x, theta, stream = sample_inputs("cpu", torch.float32, (2, 50))
    a = ops.perturb_uniform(x, theta, stream, 11, 0, 3)
    torch.testing.assert_close(a, ops.perturb_uniform(x, theta, stream, 11, 0, 3), rtol=0, atol=0)
    assert not torch.equal(a, ops.perturb_uniform(x, theta, stream, 12, 0, 3))


def test_uniform_non_contiguous_input_and_float32_theta():
    x, theta, stream = sample_inputs("cpu", torch.float32, (4, 6, 5))
    xt = x.transpose(1, 2)
    out = ops.perturb_uniform(xt, theta.float(), stream, 1, 0, 2)
    torch.testing.assert_close(
        out, reference.perturb_uniform(xt.contiguous(), theta.float(), stream, 1, 0, 2), rtol=0, atol=0
    )


def test_uniform_generic_path_matches(outside_checkout):
    """The AVX2 and the portable CPU code paths give identical uniforms (fresh processes: the path is
    chosen once)."""
    code = (
        "import sys, torch; from ddrs_ext import ops;"
        "x = torch.zeros(2, 3000); t = torch.tensor([1.0, 2.0]); st = torch.tensor([3, 4]);"
        "a = ops.perturb_uniform(x, t, st, 123, 7, 5);"
        "b = ops.perturb_uniform(torch.zeros(7, 5), torch.ones(7), torch.arange(7), 5, 0, 3);"
        "torch.save((a, b), sys.argv[1])"
    )
    results = []
    for generic in ("0", "1"):
        path = outside_checkout.cwd / f"uniform_generic_{generic}.pt"
        run = outside_checkout.python(code, path, env={"DDRS_EXT_CPU_GENERIC": generic})
        assert run.returncode == 0, run.stderr
        results.append(torch.load(path))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_uniform_empty():
    x, theta, stream = sample_inputs("cpu", torch.float32, (2, 3))
    assert ops.perturb_uniform(x, theta, stream, 1, 0, 4, 3, 0).shape == (0, 3)
    out = ops.perturb_uniform(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long), 1, 0, 4)
    assert out.shape == (0, 3)
    assert ops.perturb_uniform(torch.zeros(2, 0), theta, stream, 1, 0, 4).shape == (8, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(row_start=10, num_rows=3), "perturb_uniform: rows .* outside"),
        (dict(samples_per_input=0), "samples_per_input"),
        (dict(sample_offset=-1), "sample_offset"),
        (dict(theta=torch.ones(3)), "perturb_uniform: theta must have shape"),
        (dict(stream=torch.tensor([0, 2**32])), r"perturb_uniform: stream ids must lie in \[0, 2\^32\)"),
        (dict(stream=torch.tensor([0.0, 1.0])), "int64"),
        (dict(x=torch.zeros(2, 3, dtype=torch.int32)), "floating"),
    ],
)
def test_uniform_bad_arguments(kwargs, match):
    raises_for_bad_arguments(ops.perturb_uniform, "theta", kwargs, match)


def test_uniform_out_bad_buffers():
    x, theta, stream = torch.zeros(2, 3), torch.ones(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="perturb_uniform_out: out must have x's dtype"):
        ops.perturb_uniform_out(x, theta, stream, 0, 0, 4, 0, torch.empty(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        ops.perturb_uniform_out(x, theta, stream, 0, 0, 4, 0, torch.empty(3, 2).t())
    with pytest.raises(ValueError, match="shape"):
        ops.perturb_uniform_out(x, theta, stream, 0, 0, 4, 0, torch.empty(2, 4))


def test_uniform_opcheck_and_compile():
    x, theta, stream = sample_inputs("cpu", torch.float32, (3, 5))
    torch.library.opcheck(torch.ops.ddrs_ext.perturb_uniform.default, (x, theta, stream, 1, 0, 4, 2, 7))
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_uniform_out.default, (x, theta, stream, 1, 0, 4, 2, torch.empty(7, 5))
    )
    w = torch.randn(5, 4)

    def votes(x, theta, stream):
        noisy = torch.ops.ddrs_ext.perturb_uniform(x, theta, stream, 1, 0, 8, 0, 24)
        return torch.ops.ddrs_ext.count_votes(noisy @ w, 0, 8, 3)

    compiled = torch.compile(votes, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, theta, stream), votes(x, theta, stream), rtol=0, atol=0)


def test_uniform_autograd():
    """d out / d x = 1 per copy, d out / d theta = u (regenerated from its key in backward)."""
    x, theta, stream = sample_inputs("cpu", torch.float64, (3, 4))
    x.requires_grad_(True)
    theta.requires_grad_(True)
    out = ops.perturb_uniform(x, theta, stream, 5, 2, 3)
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad((out * g).sum(), (x, theta))
    u = ops.perturb_uniform(torch.zeros_like(x), torch.ones(3, dtype=torch.float64), stream, 5, 2, 3)
    torch.testing.assert_close(gx, g.view(3, 3, 4).sum(1))
    torch.testing.assert_close(gt, (g * u).view(3, 3, 4).sum((1, 2)))
    torch.autograd.gradcheck(lambda a, t: ops.perturb_uniform(a, t, stream, 5, 2, 3), (x, theta))


# ---------------------------------------------------------------- the RNG contract and the distribution


def test_uniform_uses_philox_words_as_documented():
    """Element j of sample i of stream s: word j % 4 of Philox at counter (j // 4, lo(i), hi(i), s)
    under the key uniform_key(seed), scaled to the cell midpoint (2 (w >> 8) + 1) / 2^24 - 1."""
    seed, stream, sample = 77, 5, 2**33 + 9
    out = ops.perturb_uniform(torch.zeros(1, 8), torch.ones(1), torch.tensor([stream]), seed, sample, 1)
    k0, k1 = reference.uniform_key(seed)
    counters = torch.tensor([[q, sample & 0xFFFFFFFF, sample >> 32, stream] for q in range(2)])
    words = ops.philox4x32_10(counters, k0 | (k1 << 32)).flatten()
    expected = torch.tensor([(2 * (int(w) >> 8) + 1) / 2**24 - 1 for w in words], dtype=torch.float32)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)


def test_uniform_values_are_symmetric_cell_midpoints():
    w = torch.tensor([0, 255, 256, 2**31, 2**32 - 256, 2**32 - 1])
    u = reference.uniform_from_words(w)
    assert u.tolist() == [-1 + 2**-24, -1 + 2**-24, -1 + 3 * 2**-24, 2**-24, 1 - 2**-24, 1 - 2**-24]
    # w and its complement give opposite values: the distribution is symmetric, its mean exactly 0
    other = reference.uniform_from_words(0xFFFFFFFF - w)
    assert torch.equal(other, -u)


def _uniforms(seed=2024, stream=11, rows=50, D=4096):
    return ops.perturb_uniform(torch.zeros(1, D), torch.ones(1), torch.tensor([stream]), seed, 0, rows)


def test_uniform_marginal_ks():
    u = _uniforms().flatten().double().numpy()
    assert u.min() > -1 and u.max() < 1
    assert stats.kstest(u, "uniform", args=(-1, 2)).pvalue > 1e-4
    assert abs(u.mean()) < 5 * np.sqrt(1 / 3 / u.size)
    assert abs(u.var() - 1 / 3) < 5 * np.sqrt(4 / 45 / u.size)  # Var(u^2) = 1/5 - 1/9
    # The test has power: a marginal squeezed by 2% (a scale slip) or on [0, 1] is rejected.
    assert stats.kstest(u * 0.98, "uniform", args=(-1, 2)).pvalue < 1e-4
    assert stats.kstest((u + 1) / 2, "uniform", args=(-1, 2)).pvalue < 1e-4


def _independence_pvalue(a: np.ndarray, b: np.ndarray, bins: int = 10) -> float:
    """Chi-square test of independence of two samples in [0, 1] from their joint histogram on a
    bins x bins grid (uniform marginals: every cell expects n / bins^2)."""
    ia = np.minimum((a * bins).astype(int), bins - 1)
    ib = np.minimum((b * bins).astype(int), bins - 1)
    table = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins)
    return stats.chi2_contingency(table).pvalue


def test_uniform_independent_across_coordinates_samples_and_streams():
    zz = _uniforms().double().numpy()  # (50 samples, 4096 elements)
    cells = (zz + 1) / 2
    # neighbouring elements (including the four of one Philox block), neighbouring samples, other streams
    for a, b in ((cells[:, :-1], cells[:, 1:]), (cells[:, 0::4], cells[:, 1::4]), (cells[:-1], cells[1:])):
        assert _independence_pvalue(a.ravel(), b.ravel()) > 1e-4
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)
    other = (_uniforms(stream=12).double().numpy() + 1) / 2
    assert _independence_pvalue(cells.ravel(), other.ravel()) > 1e-4
    # |u_j| against |u_k| too: dependence that correlation alone would miss
    assert _independence_pvalue(np.abs(zz[:, :-1]).ravel(), np.abs(zz[:, 1:]).ravel()) > 1e-4


def test_uniform_independent_of_gaussian_under_one_seed():
    """Uniform and Gaussian noise of the same (seed, stream, sample, element) are independent: the
    uniform family uses another Philox key. Negative control: uniforms from the Gaussian's own key
    (the same Philox words) are plainly dependent on the Gaussians, and the same test says so."""
    seed, stream, rows, D = 99, 3, 40, 4096
    args = (torch.zeros(1, D), torch.ones(1), torch.tensor([stream]), seed, 0, rows)
    u = ops.perturb_uniform(*args).double().numpy().ravel()
    z, _ = ops.perturb_gaussian(*args)
    z_cells = stats.norm.cdf(z.double().numpy().ravel())
    assert _independence_pvalue((u + 1) / 2, z_cells) > 1e-4
    assert _independence_pvalue(np.abs(u), 2 * np.abs(z_cells - 0.5)) > 1e-4

    g = torch.arange(rows)[:, None]
    j = torch.arange(D)[None, :]
    words = reference.philox4x32_10((j >> 2, g, torch.zeros_like(g), torch.full_like(g, stream)), (seed, 0))
    lane = j & 3
    w = torch.where(
        lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3]))
    )
    shared = reference.uniform_from_words(w).double().numpy().ravel()
    assert _independence_pvalue(np.abs(shared), 2 * np.abs(z_cells - 0.5)) < 1e-10
