"""Kernels against their slow PyTorch references, opcheck and torch.compile."""

import pytest
import torch

from ddrs_ext import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 5, 7), (2, 3, 2050), (4, 1, 8, 8)]  # odd sizes, a row longer than one tile


def sample_inputs(device, dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    B = shape[0]
    sigma = (torch.rand(B, generator=g, dtype=torch.float64) + 0.1).to(device)
    stream = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64).to(device)
    return x, sigma, stream


def _test_perturb_correctness(device):
    for dtype in DTYPES:
        for shape in SHAPES:
            x, sigma, stream = sample_inputs(device, dtype, shape)
            m = 3
            out, sq = ops.perturb_gaussian(x, sigma, stream, 2**63 + 5, 17, m, with_sq_norm=True)
            ref_out, ref_sq = reference.perturb_gaussian(x, sigma, stream, 2**63 + 5, 17, m)
            assert out.dtype == dtype and out.shape == (shape[0] * m, *shape[1:])
            torch.testing.assert_close(out.cpu(), ref_out, rtol=0, atol=0)
            torch.testing.assert_close(sq.cpu(), ref_sq, rtol=1e-12, atol=0)


def test_perturb_correctness_cpu():
    _test_perturb_correctness("cpu")


@pytest.mark.parametrize("splits", [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [5, 7], [2, 9, 1], [12]])
def test_perturb_chunks_equal_whole(splits):
    x, sigma, stream = sample_inputs("cpu", torch.float32, (3, 2, 3))
    m = 4
    whole, whole_sq = ops.perturb_gaussian(x, sigma, stream, 9, 0, m, with_sq_norm=True)
    buf = torch.empty(max(splits), 2, 3)
    sq = torch.empty(max(splits), dtype=torch.float64)
    start = 0
    for rows in splits:
        ops.perturb_gaussian_out(x, sigma, stream, 9, 0, m, start, buf[:rows], sq[:rows])
        torch.testing.assert_close(buf[:rows], whole[start : start + rows], rtol=0, atol=0)
        torch.testing.assert_close(sq[:rows], whole_sq[start : start + rows], rtol=0, atol=0)
        start += rows


def test_perturb_independent_of_batch_and_threads():
    """An input's noise depends on (seed, stream, sample, element) only."""
    x, sigma, stream = sample_inputs("cpu", torch.float32, (5, 3, 40, 41))
    torch.set_num_threads(1)
    alone, _ = ops.perturb_gaussian(x[2:3], sigma[2:3], stream[2:3], 4, 100, 6)
    torch.set_num_threads(2)
    together, _ = ops.perturb_gaussian(x, sigma, stream, 4, 100, 6)
    torch.testing.assert_close(alone, together[12:18], rtol=0, atol=0)
    # Samples are addressed by index: samples 102..105 equal rows 2..5 of samples 100..105.
    later, _ = ops.perturb_gaussian(x[2:3], sigma[2:3], stream[2:3], 4, 102, 4)
    torch.testing.assert_close(later, alone[2:], rtol=0, atol=0)


def test_perturb_non_contiguous_input():
    x, sigma, stream = sample_inputs("cpu", torch.float32, (4, 6, 5))
    xt = x.transpose(1, 2)
    out, _ = ops.perturb_gaussian(xt, sigma, stream, 1, 0, 2)
    ref, _ = reference.perturb_gaussian(xt.contiguous(), sigma, stream, 1, 0, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_perturb_generic_path_matches(outside_checkout):
    """The AVX2 and the portable CPU code paths (noise and votes) give identical results
    (each run in a fresh process, since the path is chosen once)."""
    code = (
        "import sys, torch; from ddrs_ext import ops;"
        "x = torch.zeros(2, 3000); s = torch.tensor([1.0, 2.0]); st = torch.tensor([3, 4]);"
        "o, q = ops.perturb_gaussian(x, s, st, 123, 7, 5, with_sq_norm=True);"
        "v = ops.count_votes(o[:, :7].contiguous(), 0, 5, 2);"
        "torch.save((o, q, v), sys.argv[1])"
    )
    results = []
    for generic in ("0", "1"):
        path = outside_checkout.cwd / f"generic_{generic}.pt"
        run = outside_checkout.python(code, path, env={"DDRS_EXT_CPU_GENERIC": generic})
        assert run.returncode == 0, run.stderr
        results.append(torch.load(path))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_perturb_empty():
    x, sigma, stream = sample_inputs("cpu", torch.float32, (2, 3))
    out, sq = ops.perturb_gaussian(x, sigma, stream, 1, 0, 4, 3, 0, True)
    assert out.shape == (0, 3) and sq.shape == (0,)
    out, _ = ops.perturb_gaussian(
        torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long), 1, 0, 4
    )
    assert out.shape == (0, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(row_start=10, num_rows=3), "outside"),
        (dict(samples_per_input=0), "samples_per_input"),
        (dict(sample_offset=-1), "sample_offset"),
        (dict(sigma=torch.ones(3)), "sigma must have shape"),
        (dict(stream=torch.tensor([0, 2**32])), r"\[0, 2\^32\)"),
        (dict(stream=torch.tensor([0.0, 1.0])), "int64"),
        (dict(x=torch.zeros(2, 3, dtype=torch.int32)), "floating"),
    ],
)
def test_perturb_bad_arguments(kwargs, match):
    raises_for_bad_arguments(ops.perturb_gaussian, "sigma", kwargs, match)


def raises_for_bad_arguments(op, scale: str, kwargs: dict, match: str) -> None:
    """``op`` (a noise op whose scale argument is named ``scale``) called with valid arguments updated
    by ``kwargs`` raises an error matching ``match``."""
    args = {
        "x": torch.zeros(2, 3),
        scale: torch.ones(2),
        "stream": torch.tensor([0, 1]),
        "seed": 0,
        "sample_offset": 0,
        "samples_per_input": 4,
        "row_start": 0,
        "num_rows": 8,
    }
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        op(**args)


def test_perturb_out_bad_buffers():
    x, sigma, stream = torch.zeros(2, 3), torch.ones(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dtype"):
        ops.perturb_gaussian_out(x, sigma, stream, 0, 0, 4, 0, torch.empty(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        ops.perturb_gaussian_out(x, sigma, stream, 0, 0, 4, 0, torch.empty(3, 2).t())
    with pytest.raises(ValueError, match="shape"):
        ops.perturb_gaussian_out(x, sigma, stream, 0, 0, 4, 0, torch.empty(2, 4))
    with pytest.raises(ValueError, match="sq_norm"):
        ops.perturb_gaussian_out(x, sigma, stream, 0, 0, 4, 0, torch.empty(2, 3), torch.empty(2))


def _logits(rows, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Few distinct values so that ties happen often.
    return torch.randint(0, 4, (rows, C), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 10, 37])
def test_votes_correctness(dtype, C):
    m, B = 7, 5
    logits = _logits(B * m, C, dtype)
    counts = ops.count_votes(logits, 0, m, B)
    torch.testing.assert_close(counts, reference.count_votes(logits, 0, m, B), rtol=0, atol=0)
    assert counts.sum() == B * m


@pytest.mark.parametrize("splits", [[35], [1] * 35, [3, 10, 22], [20, 15]])
def test_votes_chunks_accumulate(splits):
    m, B, C = 7, 5, 4
    logits = _logits(B * m, C, torch.float32, seed=3)
    counts = torch.zeros(B, C, dtype=torch.int64)
    start = 0
    for rows in splits:
        ops.count_votes_(logits[start : start + rows], start, m, counts)
        start += rows
    torch.testing.assert_close(counts, reference.count_votes(logits, 0, m, B), rtol=0, atol=0)


def test_votes_ties_go_to_lowest_class():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -2.0]])
    assert ops.count_votes(logits, 0, 1, 3).argmax(1).tolist() == [1, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 70])  # the AVX2 path (C <= 64, float32) and the scalar one
def test_votes_infinite_logits_are_ordered_values(dtype, C):
    # log(softmax(z)) gives -Inf for classes of probability 0; +Inf beats everything; ties as usual
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(53, C, generator=g).to(dtype)
    pick = torch.rand(53, C, generator=g)
    logits[pick < 0.3] = float("-inf")
    logits[pick > 0.93] = float("inf")
    logits[5] = float("-inf")  # a row of only -Inf votes for class 0, like any full tie
    logits[11, :] = float("inf")
    logits[12, 1:] = float("-inf")
    counts = ops.count_votes(logits, 2, 5, 11)
    torch.testing.assert_close(counts, reference.count_votes(logits, 2, 5, 11), rtol=0, atol=0)
    cls = ops.count_votes(logits, 0, 1, 53).argmax(1)
    expected = [max(range(C), key=lambda c, r=r: (float(logits[r, c]), -c)) for r in range(53)]
    assert cls.tolist() == expected
    assert cls[5] == 0 and cls[11] == 0 and cls[12] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", [1, 8, 17])  # inside and after the first groups of eight rows
def test_votes_nan_names_the_input(dtype, row):
    bad = float("nan")
    logits = torch.zeros(20, 3, dtype=dtype)
    logits[row, 2] = bad
    logits[row - 1, 1] = float("inf")  # infinite logits before it are not the error
    logits[19, 0] = bad  # a later bad row must not hide the first one
    g = row + 3  # row_start 3, 4 samples per input
    with pytest.raises(ValueError, match=rf"input {g // 4} \(noise sample {g % 4}, logits row {row}\)"):
        ops.count_votes(logits, 3, 4, 6)
    counts = torch.zeros(6, 3, dtype=torch.int64)
    with pytest.raises(ValueError):
        ops.count_votes_(logits, 3, 4, counts)
    assert counts.sum() == 0  # nothing is counted from a batch with a bad row


def test_votes_bad_arguments():
    with pytest.raises(ValueError, match="columns"):
        ops.count_votes_(torch.zeros(4, 3), 0, 2, torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        ops.count_votes(torch.zeros(5, 3), 0, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        ops.count_votes(torch.zeros(5), 0, 2, 3)
    with pytest.raises(TypeError, match="int64"):
        ops.count_votes_(torch.zeros(4, 3), 0, 2, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating"):
        ops.count_votes(torch.zeros(4, 3, dtype=torch.int64), 0, 2, 2)


def test_opcheck():
    x, sigma, stream = sample_inputs("cpu", torch.float32, (3, 5))
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_gaussian.default, (x, sigma, stream, 1, 0, 4, 2, 7, True)
    )
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_gaussian_out.default,
        (x, sigma, stream, 1, 0, 4, 2, torch.empty(7, 5), torch.empty(7, dtype=torch.float64)),
    )
    torch.library.opcheck(
        torch.ops.ddrs_ext.perturb_gaussian_out.default,
        (x, sigma, stream, 1, 0, 4, 0, torch.empty(5, 5), None),
    )
    logits = _logits(12, 4, torch.float32)
    torch.library.opcheck(torch.ops.ddrs_ext.count_votes.default, (logits, 0, 4, 3))
    torch.library.opcheck(
        torch.ops.ddrs_ext.count_votes_.default, (logits, 0, 4, torch.zeros(3, 4, dtype=torch.int64))
    )
    torch.library.opcheck(torch.ops.ddrs_ext.philox4x32_10.default, (torch.zeros(3, 4, dtype=torch.int64), 5))


def test_torch_compile_fullgraph():
    x, sigma, stream = sample_inputs("cpu", torch.float32, (3, 5))
    w = torch.randn(5, 4)

    def votes(x, sigma, stream):
        noisy, _ = torch.ops.ddrs_ext.perturb_gaussian(x, sigma, stream, 1, 0, 8, 0, 24, False)
        return torch.ops.ddrs_ext.count_votes(noisy @ w, 0, 8, 3)

    compiled = torch.compile(votes, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, sigma, stream), votes(x, sigma, stream), rtol=0, atol=0)
