"""CUDA kernels against the PyTorch references and the CPU kernels: the same bits.

Skipped without a GPU. Without one, .ci/check_cuda.sh at least compiles the CUDA code.
"""

import pytest
import torch

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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_votes_non_finite_names_the_input(bad, dtype):
    logits = torch.zeros(12, 3, dtype=dtype, device=DEVICE)
    logits[8, 2] = bad  # row 8 with row_start 3 is virtual row 11: input 2, noise sample 3
    logits[10, 0] = bad  # a later bad row: the lowest one is named
    with pytest.raises(ValueError, match=r"input 2 \(noise sample 3, logits row 8\)"):
        ops.count_votes(logits, 3, 4, 4)


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
    logits = _logits(12, 4, torch.float32)
    torch.library.opcheck(torch.ops.ddrs_ext.count_votes.default, (logits, 0, 4, 3))
    torch.library.opcheck(
        torch.ops.ddrs_ext.count_votes_.default,
        (logits, 0, 4, torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)),
    )


def test_cuda_kernels_registered():
    for op in ("perturb_gaussian", "perturb_gaussian_out", "count_votes", "count_votes_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddrs_ext::{op}", "CUDA"), op


def test_compile_fullgraph_cuda():
    x, sigma, stream = sample_inputs(DEVICE, torch.float32, (2, 3, 5))

    def noisy_votes(x, sigma, stream):
        noisy, _ = ops.perturb_gaussian(x, sigma, stream, 7, 0, 8)
        return ops.count_votes(noisy.flatten(1), 0, 8, 2)

    compiled = torch.compile(noisy_votes, fullgraph=True, backend="aot_eager")
    _assert_same_bits(compiled(x, sigma, stream), noisy_votes(x, sigma, stream))
