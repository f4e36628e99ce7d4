"""CUDA kernels against the PyTorch references and the CPU kernels: the same bits.

Skipped without a GPU; `.ci/gpu` runs them (and the other CUDA tests) on a machine with one.
Without one, .ci/check_cuda.sh at least compiles the CUDA code.
"""

import re

import pytest
import torch

import ddrs_ext
from ddrs_ext import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Odd sizes, exactly one CUDA tile (1024 elements), one element past a tile, several tiles.
SHAPES = [(1, 1), (3, 5, 7), (1, 1024), (2, 1025), (2, 3, 2050), (4, 1, 8, 8)]
SEED = 2**63 + 5


def sample_inputs(device, dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    B = shape[0]
    sigma = (torch.rand(B, generator=g, dtype=torch.float64) + 0.1).to(device)
    stream = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64).to(device)
    return x, sigma, stream


def _logits(rows, C, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Few distinct values so that ties happen often.
    return torch.randint(0, 4, (rows, C), generator=g).to(dtype=dtype, device=device)


def _assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


def _cpu_error(fn, *args, **kwargs):
    """The ValueError message of ``fn(*args, **kwargs)`` on CPU tensors, or None if it returns."""
    try:
        fn(*args, **kwargs)
    except ValueError as err:
        return str(err)
    return None


# ---------------------------------------------------------------- perturb_gaussian


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_reference(dtype, shape):
    x, sigma, stream = sample_inputs(DEVICE, dtype, shape)
    m = 3
    out, sq = ops.perturb_gaussian(x, sigma, stream, SEED, 17, m, with_sq_norm=True)
    ref_out, ref_sq = reference.perturb_gaussian(x, sigma, stream, SEED, 17, m)
    assert out.device.type == "cuda" and sq.device.type == "cuda"
    assert out.shape == (shape[0] * m, *shape[1:])
    _assert_same_bits(out, ref_out)
    torch.testing.assert_close(sq.cpu(), ref_sq, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_cpu(dtype, shape):
    x, sigma, stream = sample_inputs(DEVICE, dtype, shape, seed=1)
    args = (SEED, 2**32 + 9, 5, 2, shape[0] * 5 - 3, True)  # a sample offset past 32 bits, a row window
    out, sq = ops.perturb_gaussian(x, sigma, stream, *args)
    cpu_out, cpu_sq = ops.perturb_gaussian(x.cpu(), sigma.cpu(), stream.cpu(), *args)
    _assert_same_bits(out, cpu_out)
    torch.testing.assert_close(sq.cpu(), cpu_sq, rtol=1e-12, atol=0)


def test_perturb_extreme_keys():
    """Stream ids and sample indices use all their bits; the seed all 64."""
    x, sigma, _ = sample_inputs(DEVICE, torch.float32, (3, 9))
    stream = torch.tensor([0, 2**32 - 1, 2**31], device=DEVICE)
    for seed, offset in [(0, 0), (2**64 - 1, 2**40 + 1), (2**32, 2**32 - 2)]:
        out, _ = ops.perturb_gaussian(x, sigma, stream, seed, offset, 4)
        ref_out, _ = reference.perturb_gaussian(x, sigma, stream, seed, offset, 4)
        _assert_same_bits(out, ref_out)


@pytest.mark.parametrize("splits", [[1] * 12, [5, 7], [2, 9, 1], [12]])
def test_perturb_chunks_equal_whole(splits):
    """Chunked rows give the same bits, sq_norm included (its sum order is per row)."""
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (3, 2, 1500))
    m = 4
    whole, whole_sq = ops.perturb_gaussian(x, sigma, stream, 9, 0, m, with_sq_norm=True)
    buf = torch.empty(max(splits), 2, 1500, device=DEVICE)
    sq = torch.empty(max(splits), dtype=torch.float64, device=DEVICE)
    start = 0
    for rows in splits:
        ops.perturb_gaussian_out(x, sigma, stream, 9, 0, m, start, buf[:rows], sq[:rows])
        _assert_same_bits(buf[:rows], whole[start : start + rows])
        _assert_same_bits(sq[:rows], whole_sq[start : start + rows])
        start += rows


def test_perturb_sq_norm_deterministic():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (4, 3, 64, 64))
    runs = [ops.perturb_gaussian(x, sigma, stream, 3, 0, 50, with_sq_norm=True)[1] for _ in range(3)]
    for sq in runs[1:]:
        _assert_same_bits(sq, runs[0])
    # ||eps||^2 of D = 12288 standard normals: mean D, sd sqrt(2 D).
    assert (runs[0] - 12288).abs().max() < 6 * (2 * 12288) ** 0.5


def test_perturb_independent_of_batch():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (5, 3, 40, 41))
    alone, _ = ops.perturb_gaussian(x[2:3], sigma[2:3], stream[2:3], 4, 100, 6)
    together, _ = ops.perturb_gaussian(x, sigma, stream, 4, 100, 6)
    _assert_same_bits(alone, together[12:18])


def test_perturb_non_contiguous_and_float32_sigma():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (4, 6, 5))
    xt, s32 = x.transpose(1, 2), sigma.float()
    out, _ = ops.perturb_gaussian(xt, s32, stream, 1, 0, 2)
    ref_out, _ = reference.perturb_gaussian(xt.contiguous(), s32, stream, 1, 0, 2)
    _assert_same_bits(out, ref_out)


def test_perturb_empty():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (2, 3))
    out, sq = ops.perturb_gaussian(x, sigma, stream, 1, 0, 4, 3, 0, True)
    assert out.shape == (0, 3) and sq.shape == (0,) and out.is_cuda
    z = torch.zeros(0, 3, device=DEVICE)
    out, _ = ops.perturb_gaussian(
        z, torch.zeros(0, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE), 1, 0, 4
    )
    assert out.shape == (0, 3)
    sq = torch.full((2,), -1.0, dtype=torch.float64, device=DEVICE)
    ops.perturb_gaussian_out(
        torch.zeros(2, 0, device=DEVICE), sigma, stream, 1, 0, 4, 0, torch.empty(2, 0, device=DEVICE), sq
    )
    assert sq.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [-1, 2**32, 2**62])
def test_perturb_stream_ids_checked(bad):
    x, sigma, _ = sample_inputs(DEVICE, torch.float32, (3, 5))
    stream = torch.tensor([0, 7, bad], device=DEVICE)
    with pytest.raises(ValueError, match=rf"\[0, 2\^32\), got {bad} for input 2"):
        ops.perturb_gaussian(x, sigma, stream, 0, 0, 2)


def test_perturb_mixed_devices_rejected():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (2, 3))
    with pytest.raises(ValueError, match="same device"):
        ops.perturb_gaussian(x, sigma.cpu(), stream, 0, 0, 2)
    with pytest.raises(ValueError, match="device"):
        ops.perturb_gaussian_out(x, sigma, stream, 0, 0, 2, 0, torch.empty(4, 3))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_perturb_second_device():
    x, sigma, stream = sample_inputs("cuda:1", torch.float16, (3, 1100))
    out, sq = ops.perturb_gaussian(x, sigma, stream, 5, 0, 3, with_sq_norm=True)
    assert out.device == torch.device("cuda:1")
    out0, sq0 = ops.perturb_gaussian(
        x.to("cuda:0"), sigma.to("cuda:0"), stream.to("cuda:0"), 5, 0, 3, with_sq_norm=True
    )
    _assert_same_bits(out, out0)
    _assert_same_bits(sq, sq0)


# ---------------------------------------------------------------- perturb_uniform (the l1 noise)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_uniform_matches_reference_and_cpu(dtype, shape):
    x, theta, stream = sample_inputs(DEVICE, dtype, shape, seed=2)
    m = 3
    out = ops.perturb_uniform(x, theta, stream, SEED, 17, m)
    assert out.device.type == "cuda" and out.shape == (shape[0] * m, *shape[1:])
    _assert_same_bits(out, reference.perturb_uniform(x, theta, stream, SEED, 17, m))
    args = (SEED, 2**32 + 9, 5, 2, shape[0] * 5 - 3)  # a sample offset past 32 bits, a row window
    _assert_same_bits(
        ops.perturb_uniform(x, theta, stream, *args),
        ops.perturb_uniform(x.cpu(), theta.cpu(), stream.cpu(), *args),
    )


def test_perturb_uniform_extreme_keys_and_float32_theta():
    x, theta, _ = sample_inputs(DEVICE, torch.float32, (3, 9))
    stream = torch.tensor([0, 2**32 - 1, 2**31], device=DEVICE)
    for seed, offset in [(0, 0), (2**64 - 1, 2**40 + 1), (2**32, 2**32 - 2)]:
        out = ops.perturb_uniform(x, theta.float(), stream, seed, offset, 4)
        _assert_same_bits(out, reference.perturb_uniform(x, theta.float(), stream, seed, offset, 4))


@pytest.mark.parametrize("splits", [[1] * 12, [5, 7], [2, 9, 1], [12]])
def test_perturb_uniform_chunks_and_batch(splits):
    x, theta, stream = sample_inputs(DEVICE, torch.float32, (3, 2, 1500))
    m = 4
    whole = ops.perturb_uniform(x, theta, stream, 9, 0, m)
    buf = torch.empty(max(splits), 2, 1500, device=DEVICE)
    start = 0
    for rows in splits:
        ops.perturb_uniform_out(x, theta, stream, 9, 0, m, start, buf[:rows])
        _assert_same_bits(buf[:rows], whole[start : start + rows])
        start += rows
    _assert_same_bits(ops.perturb_uniform(x[1:2], theta[1:2], stream[1:2], 9, 0, m), whole[4:8])


def test_perturb_uniform_errors_like_cpu():
    x, theta, _ = sample_inputs(DEVICE, torch.float32, (3, 5))
    stream = torch.tensor([0, 7, 2**32], device=DEVICE)
    with pytest.raises(
        ValueError, match=r"perturb_uniform: stream ids must lie in \[0, 2\^32\), got 4294967296 for input 2"
    ):
        ops.perturb_uniform(x, theta, stream, 0, 0, 2)
    with pytest.raises(ValueError, match="same device"):
        ops.perturb_uniform(x, theta.cpu(), stream, 0, 0, 2)
    z = torch.zeros(0, 3, device=DEVICE)
    empty = torch.zeros(0, device=DEVICE)
    assert ops.perturb_uniform(z, empty, empty.long(), 1, 0, 4).shape == (0, 3)


# ---------------------------------------------------------------- count_votes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 10, 37, 1000])
def test_votes_matches_reference_and_cpu(dtype, C):
    m, B = 7, 5
    logits = _logits(B * m, C, dtype)
    counts = ops.count_votes(logits, 0, m, B)
    assert counts.is_cuda and counts.dtype == torch.int64
    _assert_same_bits(counts, reference.count_votes(logits, 0, m, B))
    _assert_same_bits(counts, ops.count_votes(logits.cpu(), 0, m, B))


@pytest.mark.parametrize("dtype", DTYPES)
def test_votes_continuous_logits(dtype):
    logits = torch.randn(3000, 100, device=DEVICE).to(dtype)
    counts = ops.count_votes(logits, 11, 1000, 4)
    _assert_same_bits(counts, reference.count_votes(logits, 11, 1000, 4))


@pytest.mark.parametrize("splits", [[35], [1] * 35, [3, 10, 22], [20, 15]])
def test_votes_chunks_accumulate(splits):
    m, B, C = 7, 5, 4
    logits = _logits(B * m, C, torch.float32, seed=3)
    counts = torch.zeros(B, C, dtype=torch.int64, device=DEVICE)
    start = 0
    for rows in splits:
        ops.count_votes_(logits[start : start + rows], start, m, counts)
        start += rows
    _assert_same_bits(counts, reference.count_votes(logits, 0, m, B))


def test_votes_many_rows_one_class():
    """Heavy contention on one counter per input; counts stay exact."""
    m, B = 100_000, 3
    logits = torch.zeros(B * m, 10, device=DEVICE)
    logits[:, 4] = 1.0
    counts = ops.count_votes(logits, 0, m, B)
    assert counts[:, 4].tolist() == [m] * B and counts.sum().item() == B * m


def test_votes_ties_go_to_lowest_class():
    logits = torch.tensor(
        [[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -2.0], [-0.0, 0.0, -1.0], [0.0, -0.0, -1.0]],
        device=DEVICE,
    )
    assert ops.count_votes(logits, 0, 1, 5).argmax(1).tolist() == [1, 0, 0, 0, 0]
    # The same rule across the segments of a long row (the kernel splits rows over a warp's lanes).
    wide = torch.zeros(2, 1000, device=DEVICE)
    wide[0, [999, 500, 40]] = 5.0
    wide[1, 999] = 1.0
    assert ops.count_votes(wide, 0, 1, 2).argmax(1).tolist() == [40, 999]


@pytest.mark.parametrize("dtype", DTYPES)
def test_votes_nan_names_the_input(dtype):
    logits = torch.zeros(12, 3, dtype=dtype, device=DEVICE)
    logits[7, 1] = float("inf")  # an infinite logit before it is not the error
    logits[8, 2] = float("nan")  # row 8 with row_start 3 is virtual row 11: input 2, noise sample 3
    logits[10, 0] = float("nan")  # a later bad row: the lowest one is named
    with pytest.raises(ValueError, match=r"input 2 \(noise sample 3, logits row 8\)"):
        ops.count_votes(logits, 3, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 40, 1000])  # one class per lane or fewer; several; long rows
def test_votes_infinite_logits_like_cpu(dtype, C):
    """+-Inf logits (log-probabilities give -Inf): the CUDA op does what the CPU op does, error or counts."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(53, C, generator=g).to(dtype)
    pick = torch.rand(53, C, generator=g)
    logits[pick < 0.3] = float("-inf")
    logits[pick > 0.93] = float("inf")
    logits[5] = float("-inf")
    logits[11] = float("inf")
    logits[12, 1:] = float("-inf")
    logits[13, :-1] = float("-inf")  # the one finite logit in the last lane's segment
    error = _cpu_error(ops.count_votes, logits, 2, 5, 11)
    if error is not None:
        counts = torch.zeros(11, C, dtype=torch.int64, device=DEVICE)
        with pytest.raises(ValueError, match=re.escape(error)):
            ops.count_votes_(logits.to(DEVICE), 2, 5, counts)
        assert counts.abs().sum().item() == 0
        return
    counts = ops.count_votes(logits.to(DEVICE), 2, 5, 11)
    _assert_same_bits(counts, ops.count_votes(logits, 2, 5, 11))
    _assert_same_bits(counts, reference.count_votes(logits, 2, 5, 11))


def test_votes_error_leaves_counts_untouched():
    logits = _logits(40, 6, torch.float32)
    logits[33, 1] = float("nan")
    counts = torch.arange(10 * 6, device=DEVICE).reshape(10, 6)
    before = counts.clone()
    with pytest.raises(ValueError, match="logits row 33"):
        ops.count_votes_(logits, 0, 4, counts)
    _assert_same_bits(counts, before)


def test_votes_bad_arguments():
    with pytest.raises(ValueError, match="columns"):
        ops.count_votes_(
            torch.zeros(4, 3, device=DEVICE), 0, 2, torch.zeros(2, 5, dtype=torch.int64, device=DEVICE)
        )
    with pytest.raises(ValueError, match="outside"):
        ops.count_votes(torch.zeros(5, 3, device=DEVICE), 0, 2, 2)
    with pytest.raises(ValueError, match="same device"):
        ops.count_votes_(torch.zeros(4, 3, device=DEVICE), 0, 2, torch.zeros(2, 3, dtype=torch.int64))


# ---------------------------------------------------------------- soft_votes_

# name: (dlogits, sq_norm, deriv_sum, score_total, probabilities)
SOFT_MODES = {
    "plain": (False, False, False, False, False),
    "tangent": (True, False, True, False, False),
    "score": (False, True, True, True, False),
    "probs-tangent": (True, False, True, False, True),
    "probs-score": (False, True, True, True, True),
}
SOFT_DIM = 30


def _soft_inputs(rows, C, dtype, mode, seed=0):
    """CPU tensors: logits (one constant row), float32 tangents (the op reads them in the logits' dtype),
    sq_norm."""
    with_d, with_sq, _, _, probs = SOFT_MODES[mode]
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, C, generator=g, dtype=torch.float64)
    if probs:
        logits = torch.softmax(logits, 1)
    logits = logits.to(dtype)
    if rows > 3:
        logits[1] = logits[1, 0]
    d = torch.randn(rows, C, generator=g) if with_d else None
    sq = torch.rand(rows, generator=g, dtype=torch.float64) * 2 * SOFT_DIM if with_sq else None
    return logits, d, sq


def _soft_sums(B, C, mode, device, seed=1):
    """Non-zero starting sums (the op accumulates)."""
    _, _, with_ds, with_st, _ = SOFT_MODES[mode]
    g = torch.Generator().manual_seed(seed)
    ps = torch.rand(B, C, generator=g, dtype=torch.float64)
    ds = torch.rand(B, C, generator=g, dtype=torch.float64) if with_ds else None
    st = torch.rand(B, generator=g, dtype=torch.float64) if with_st else None
    return [None if t is None else t.to(device) for t in (ps, ds, st)]


def _to(t, device):
    return None if t is None else t.to(device)


def _soft_votes(logits, d, sq, row_start, m, mode, sums, splits=None):
    """ops.soft_votes_ over the rows in chunks of `splits` rows (one call by default)."""
    probs = SOFT_MODES[mode][4]
    ps, ds, st = sums
    start = 0
    for rows in splits or [logits.shape[0]]:
        end = start + rows
        ops.soft_votes_(
            logits[start:end],
            row_start + start,
            m,
            ps,
            dlogits=None if d is None else d[start:end],
            sq_norm=None if sq is None else sq[start:end],
            dim=SOFT_DIM,
            probabilities=probs,
            deriv_sum=ds,
            score_total=st,
        )
        start = end
    return sums


def _assert_sums_close(got, expected, m):
    # float64 sums of m terms each at most a few units: CUDA's exp and the warp's
    # summation order differ from the CPU's by an ulp or so per term.
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-12, atol=1e-13 * m * SOFT_DIM)


@pytest.mark.parametrize("mode", list(SOFT_MODES))
@pytest.mark.parametrize("C", [1, 3, 10, 33, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_votes_matches_reference_and_cpu(dtype, C, mode):
    rows, m, row_start = 23, 5, 2  # partial first and last inputs
    B = (row_start + rows + m - 1) // m
    logits, d, sq = _soft_inputs(rows, C, dtype, mode)
    got = _soft_votes(
        logits.to(DEVICE), _to(d, DEVICE), _to(sq, DEVICE), row_start, m, mode, _soft_sums(B, C, mode, DEVICE)
    )
    assert got[0].is_cuda
    cpu = _soft_votes(logits, d, sq, row_start, m, mode, _soft_sums(B, C, mode, "cpu"))
    _assert_sums_close(got, cpu, m)
    # From zero against the reference (whose tangents are the dtype-rounded ones the op reads).
    zeros = [None if t is None else torch.zeros_like(t) for t in got]
    got = _soft_votes(logits.to(DEVICE), _to(d, DEVICE), _to(sq, DEVICE), row_start, m, mode, zeros)
    expected = reference.soft_votes(
        logits,
        row_start,
        m,
        B,
        dlogits=None if d is None else d.to(dtype),
        sq_norm=sq,
        dim=SOFT_DIM,
        probabilities=SOFT_MODES[mode][4],
    )
    _assert_sums_close(got, expected, m)


@pytest.mark.parametrize("mode", ["tangent", "score"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_votes_deterministic_across_chunkings(dtype, mode):
    """No floating-point atomics: the same bits however the rows are split, and run after run."""
    rows, m, C = 300, 70, 37
    logits, d, sq = _soft_inputs(rows, C, dtype, mode, seed=2)
    logits, d, sq = logits.to(DEVICE), _to(d, DEVICE), _to(sq, DEVICE)
    B = (rows + m - 1) // m
    whole = _soft_votes(logits, d, sq, 0, m, mode, _soft_sums(B, C, mode, DEVICE))
    for splits in [[300], [1] * 300, [69, 2, 229], [150, 150], [7] * 42 + [6]]:
        got = _soft_votes(logits, d, sq, 0, m, mode, _soft_sums(B, C, mode, DEVICE), splits)
        for a, b in zip(got, whole):
            if a is not None:
                _assert_same_bits(a, b)


def test_soft_votes_long_rows_many_inputs():
    """Rows longer than a warp (several classes per lane), more inputs than one grid covers."""
    rows, m, C = 6000, 3, 1500
    logits, d, sq = _soft_inputs(rows, C, torch.float32, "tangent", seed=3)
    B = rows // m
    got = _soft_votes(
        logits.to(DEVICE), d.to(DEVICE), None, 0, m, "tangent", _soft_sums(B, C, "tangent", DEVICE)
    )
    cpu = _soft_votes(logits, d, None, 0, m, "tangent", _soft_sums(B, C, "tangent", "cpu"))
    _assert_sums_close(got, cpu, m)


def test_soft_votes_score_total_without_deriv_sum():
    """score_total collects sq_norm - dim whether or not deriv_sum is given (the schema's contract)."""
    logits, _, sq = _soft_inputs(12, 4, torch.float32, "score")
    st = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    ops.soft_votes_(
        logits.to(DEVICE),
        0,
        4,
        torch.zeros(3, 4, dtype=torch.float64, device=DEVICE),
        sq_norm=sq.to(DEVICE),
        dim=SOFT_DIM,
        score_total=st,
    )
    _, _, expected = reference.soft_votes(logits, 0, 4, 3, sq_norm=sq, dim=SOFT_DIM)
    torch.testing.assert_close(st.cpu(), expected, rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("mode", ["tangent", "probs-tangent"])
@pytest.mark.parametrize("in_tangents", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_votes_nan_names_the_input(dtype, in_tangents, mode):
    logits, d, _ = _soft_inputs(12, 3, dtype, mode)
    target = d if in_tangents else logits
    target[8, 2] = float("nan")  # row 8 with row_start 3 is virtual row 11: input 2, noise sample 3
    target[10, 0] = float("nan")  # a later bad row: the lowest one is named
    sums = _soft_sums(4, 3, mode, DEVICE)
    before = [t.clone() for t in sums if t is not None]
    with pytest.raises(ValueError, match=r"soft_votes: .*input 2 \(noise sample 3, logits row 8\)"):
        _soft_votes(logits.to(DEVICE), d.to(DEVICE), None, 3, 4, mode, sums)
    # Unlike the CPU kernel, the CUDA one adds nothing when a row is bad.
    for a, b in zip([t for t in sums if t is not None], before):
        _assert_same_bits(a, b)


# Rows with infinite values: (where, what). Which of them the op refuses is the CPU op's rule
# (csrc/sigma.h); the CUDA op must refuse the same rows with the same message.
INFINITE_CASES = {
    "+inf logit": [("logits", 8, [2], float("inf"))],
    "-inf logit": [("logits", 8, [2], float("-inf"))],
    "some -inf logits": [("logits", r, [0, 2], float("-inf")) for r in (1, 8, 9)],
    "only -inf logits": [("logits", 8, [0, 1, 2], float("-inf"))],
    "inf tangent": [("d", 8, [1], float("inf"))],
    "inf tangent of a -inf logit": [("logits", 8, [1], float("-inf")), ("d", 8, [1], float("inf"))],
}


@pytest.mark.parametrize("case", list(INFINITE_CASES))
@pytest.mark.parametrize("mode", ["tangent", "probs-tangent"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_votes_infinite_values_like_cpu(dtype, mode, case):
    logits, d, _ = _soft_inputs(12, 3, dtype, mode, seed=4)
    tensors = {"logits": logits, "d": d}
    for where, row, cols, value in INFINITE_CASES[case]:
        tensors[where][row, cols] = value
    cpu_sums = _soft_sums(4, 3, mode, "cpu")
    error = _cpu_error(_soft_votes, logits, d, None, 3, 4, mode, cpu_sums)
    sums = _soft_sums(4, 3, mode, DEVICE)
    if error is not None:
        before = [t.clone() for t in sums if t is not None]
        with pytest.raises(ValueError, match=re.escape(error)):
            _soft_votes(logits.to(DEVICE), d.to(DEVICE), None, 3, 4, mode, sums)
        for a, b in zip([t for t in sums if t is not None], before):
            _assert_same_bits(a, b)
        return
    got = _soft_votes(logits.to(DEVICE), d.to(DEVICE), None, 3, 4, mode, sums)
    _assert_sums_close(got, cpu_sums, 4)
    assert all(torch.isfinite(t).all() for t in got if t is not None)


def test_soft_votes_empty_and_bad_arguments():
    ps = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    ops.soft_votes_(torch.zeros(0, 3, device=DEVICE), 4, 2, ps)
    assert ps.abs().sum().item() == 0
    with pytest.raises(ValueError, match="outside"):
        ops.soft_votes_(torch.zeros(5, 3, device=DEVICE), 0, 2, ps)
    with pytest.raises(ValueError, match="device"):
        ops.soft_votes_(torch.zeros(4, 3, device=DEVICE), 0, 2, ps.cpu())
    with pytest.raises(ValueError, match="deriv_sum"):
        ops.soft_votes_(torch.zeros(4, 3, device=DEVICE), 0, 2, ps, dlogits=torch.zeros(4, 3, device=DEVICE))


# ---------------------------------------------------------------- sigma_step


def _sigma_inputs(B, seed=0, with_nan=True):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.05
    top = torch.rand(B, 2, generator=g, dtype=torch.float64)
    top2 = torch.stack([top.max(1).values, top.min(1).values], 1)
    top2[: B // 8, 0] = 1.0  # clipped above
    top2[B // 8 : B // 4, 1] = 0.0  # clipped below
    top2[B // 4 : B // 4 + 3] = 0.5
    if with_nan:
        top2[B // 2, 0] = float("nan")
    dtop2 = torch.randn(B, 2, generator=g, dtype=torch.float64)
    bracket = torch.zeros(B, 2, dtype=torch.float64)
    bracket[::3, 0] = sigma[::3] / 2
    bracket[::5, 1] = sigma[::5] * 2
    return sigma, top2, dtop2, bracket


@pytest.mark.parametrize("rule", [0, 1])
@pytest.mark.parametrize("B", [1, 37, 5000])
def test_sigma_step_matches_cpu(B, rule):
    sigma, top2, dtop2, bracket = _sigma_inputs(B)
    kwargs = {"lr": 0.1, "clip": (0.02, 0.98), "sigma_range": (0.01, 3.0), "rule": rule, "growth": 1.7}
    cuda_bracket = bracket.to(DEVICE)
    got = ops.sigma_step(sigma.to(DEVICE), top2.to(DEVICE), dtop2.to(DEVICE), cuda_bracket, **kwargs)
    cpu_bracket = bracket.clone()
    expected = ops.sigma_step(sigma, top2, dtop2, cpu_bracket, **kwargs)
    # The same double maths on both sides (csrc/sigma.h); erfc, exp and log may differ by an ulp.
    for a, b in zip(got, expected):
        assert a.is_cuda and a.dtype == torch.float64
        torch.testing.assert_close(a.cpu(), b, rtol=1e-13, atol=1e-13, equal_nan=True)
    _assert_same_bits(cuda_bracket, cpu_bracket)  # only ever set to an input sigma


@pytest.mark.parametrize("clip", [(0.0, 1.0), (0.02, 0.98)])
@pytest.mark.parametrize("rule", [0, 1])
def test_sigma_step_linear_gap_matches_cpu(rule, clip):
    """Uniform noise's surrogate theta * (E_A - E_B) (gap 1): the same bits as the CPU (no libm involved)."""
    sigma, top2, dtop2, bracket = _sigma_inputs(777, seed=3)
    kwargs = {"lr": 0.1, "clip": clip, "sigma_range": (0.01, 3.0), "rule": rule, "growth": 1.7, "gap": 1}
    cuda_bracket = bracket.to(DEVICE)
    got = ops.sigma_step(sigma.to(DEVICE), top2.to(DEVICE), dtop2.to(DEVICE), cuda_bracket, **kwargs)
    cpu_bracket = bracket.clone()
    expected = ops.sigma_step(sigma, top2, dtop2, cpu_bracket, **kwargs)
    for a, b in zip(got, expected):
        _assert_same_bits(a, b)
    _assert_same_bits(cuda_bracket, cpu_bracket)


def test_sigma_step_non_contiguous_and_empty():
    sigma, top2, dtop2, bracket = _sigma_inputs(10)
    kwargs = {"lr": 0.1, "clip": (0.02, 0.98), "sigma_range": (0.01, 3.0), "rule": 1, "growth": 1.7}
    top2_t = top2.t().contiguous().to(DEVICE).t()  # (B, 2) with strides (1, B)
    got = ops.sigma_step(sigma.to(DEVICE), top2_t, dtop2.to(DEVICE), bracket.to(DEVICE), **kwargs)
    expected = ops.sigma_step(sigma, top2, dtop2, bracket.clone(), **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-13, atol=1e-13, equal_nan=True)
    empty = torch.zeros(0, 2, dtype=torch.float64, device=DEVICE)
    out = ops.sigma_step(
        torch.zeros(0, dtype=torch.float64, device=DEVICE), empty, empty, empty.clone(), **kwargs
    )
    assert all(t.shape == (0,) and t.is_cuda for t in out)


# ---------------------------------------------------------------- opcheck


def test_opcheck_cuda():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (3, 5))
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_gaussian.default, (x, sigma, stream, 1, 0, 4, 2, 7, True)
    )
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_gaussian_out.default,
        (
            x,
            sigma,
            stream,
            1,
            0,
            4,
            2,
            torch.empty(7, 5, device=DEVICE),
            torch.empty(7, dtype=torch.float64, device=DEVICE),
        ),
    )
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_gaussian_out.default,
        (x, sigma, stream, 1, 0, 4, 0, torch.empty(5, 5, device=DEVICE), None),
    )
    torch.library.opcheck(torch.ops.ddrs_ext.perturb_uniform.default, (x, sigma, stream, 1, 0, 4, 2, 7))
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_uniform_out.default,
        (x, sigma, stream, 1, 0, 4, 2, torch.empty(7, 5, device=DEVICE)),
    )
    logits = _logits(12, 4, torch.float32)
    torch.library.opcheck(torch.ops.ddrs_ext.count_votes.default, (logits, 0, 4, 3))
    torch.library.opcheck(
        torch.ops.ddrs_ext.count_votes_.default,
        (logits, 0, 4, torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)),
    )
    soft, d, _ = _soft_inputs(12, 4, torch.float32, "tangent")
    soft, d = soft.to(DEVICE), d.to(DEVICE)
    sq = torch.rand(12, dtype=torch.float64, device=DEVICE) * 60

    def f64(*shape):
        return torch.zeros(*shape, dtype=torch.float64, device=DEVICE)

    for args in [
        (soft, d, None, 2, 5, 0, False, f64(3, 4), f64(3, 4), None),
        (soft, None, sq, 2, 5, 7, False, f64(3, 4), f64(3, 4), f64(3)),
        (soft, None, None, 0, 4, 0, False, f64(3, 4), None, None),
    ]:
        torch.library.opcheck(torch.ops.ddrs_ext.soft_votes_.default, args)
    # No NaN: opcheck compares NaN outputs as unequal.
    sigma, top2, dtop2, bracket = (t.to(DEVICE) for t in _sigma_inputs(9, with_nan=False))
    beyond = torch.tensor([True, False, False] * 3, device=DEVICE)
    for rule in (0, 1):
        for past in (None, beyond):
            torch.library.opcheck(
                torch.ops.ddrs_ext.sigma_step.default,
                (sigma, top2, dtop2, bracket.clone(), past, 0.1, 0.02, 0.98, 0.01, 3.0, rule, 1.5),
            )


def _ops_with_kernel(key):
    """Names of the ddrs_ext ops with a kernel registered for dispatch key ``key`` (None: every op)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddrs_ext::")]
    return {
        n.removeprefix("ddrs_ext::")
        for n in names
        if key is None or torch._C._dispatch_has_kernel_for_dispatch_key(n, key)
    }


def test_cuda_kernels_registered():
    """Every op with a CPU kernel has a CUDA kernel; the others are composites (functional wrappers
    such as perturb_gaussian and count_votes, which call an in-place op through the dispatcher)."""
    cpu, cuda = _ops_with_kernel("CPU"), _ops_with_kernel("CUDA")
    composite = _ops_with_kernel("CompositeExplicitAutograd")
    assert (
        cuda == cpu
        and {"perturb_gaussian_out", "perturb_uniform_out", "count_votes_", "soft_votes_", "sigma_step"}
        <= cuda
    )
    assert {"perturb_gaussian", "perturb_uniform", "count_votes"} <= composite
    assert cuda | composite == _ops_with_kernel(None)


def test_compile_fullgraph_cuda():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (2, 3, 5))

    def noisy_votes(x, sigma, stream):
        noisy, _ = ops.perturb_gaussian(x, sigma, stream, 7, 0, 8)
        return ops.count_votes(noisy.flatten(1), 0, 8, 2)

    compiled = torch.compile(noisy_votes, fullgraph=True, backend="aot_eager")
    _assert_same_bits(compiled(x, sigma, stream), noisy_votes(x, sigma, stream))


# ---------------------------------------------------------------- the l1 certificate end to end


class _AxisLinear(torch.nn.Module):
    """logits (0, x_2 + 0.1): the same bits on any device (no reduction), so votes match exactly."""

    def forward(self, x):
        score = x.flatten(1)[:, 2] + 0.1
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_uniform_certify_and_l1_memory_match_cpu():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(9, 6, generator=g, dtype=torch.float64) - 0.5
    theta = torch.rand(9, generator=g, dtype=torch.float64) * 0.5 + 0.2
    kw = dict(n0=50, n=3000, alpha=0.001, seed=11, noise="uniform", batch_size=1000)
    cpu = ddrs_ext.certify(_AxisLinear(), x, theta, **kw)
    gpu = ddrs_ext.certify(_AxisLinear(), x.to(DEVICE), theta.to(DEVICE), **kw)
    assert gpu.norm == cpu.norm == "l1"
    for name in ("prediction", "radius", "p_lower", "counts"):
        _assert_same_bits(getattr(gpu, name), getattr(cpu, name))
    on_cpu = ddrs_ext.CertificationMemory(norm="l1").adjust_result(x, cpu)
    on_gpu = ddrs_ext.CertificationMemory(DEVICE, norm="l1").adjust_result(x.to(DEVICE), gpu)
    _assert_same_bits(on_gpu.prediction, on_cpu.prediction)
    torch.testing.assert_close(on_gpu.radius, on_cpu.radius, rtol=1e-12, atol=0)
