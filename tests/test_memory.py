"""CertificationMemory against hand-built cases, a pure-Python transcription of the spec, its invariant."""

import math

import numpy as np
import pytest
import torch

from ddrs_ext import ABSTAIN, CertifyResult, certify
from ddrs_ext import memory as memory_module
from ddrs_ext.memory import CertificationMemory

# The invariant d_ij >= R_i + R_j (c_i != c_j) is checked up to this relative float64 rounding
# slack: distances carry a relative error of a few ulps, and R_j - d_j, d_j - R_j one more.
INVARIANT_RTOL = 1e-12


def reference_adjust(stored, x, prediction, radius):
    """DESIGN.md section 2, transcribed with Python floats; ``stored`` is a list of (x, class, radius)."""
    out_class, out_radius = [], []
    for xi, c, r in zip(x.double().numpy(), prediction.tolist(), radius.double().tolist()):
        if c != ABSTAIN:
            inside, gaps = [], []
            for j, (xj, cj, rj) in enumerate(stored):
                if cj == c:
                    continue
                d = math.sqrt(float(np.sum((xi - xj) ** 2)))
                if d < rj:
                    inside.append((rj - d, -j, cj))  # deepest first, then earliest
                else:
                    gaps.append(d - rj)
            if inside:
                r, _, c = max(inside)
            elif gaps:
                r = min(r, min(gaps))
            stored.append((xi, c, r))
        out_class.append(c)
        out_radius.append(r)
    return torch.tensor(out_class, dtype=torch.int64), torch.tensor(out_radius, dtype=torch.float64)


def random_stream(seed, n=150, dim=2, num_classes=3, scale=3.0, offset=0.0, dtype=torch.float64):
    """Queries in a small box so that balls collide often; ~30% land inside an earlier query's ball."""
    rng = np.random.default_rng(seed)
    x = offset + rng.uniform(0, scale, (n, dim))
    radius = rng.exponential(0.2 * scale, n)
    prediction = rng.integers(0, num_classes, n)
    for i in range(1, n):
        if rng.random() < 0.3:
            j = rng.integers(0, i)
            u = rng.normal(size=dim)
            x[i] = x[j] + rng.uniform(0, 0.95) * radius[j] * u / np.linalg.norm(u)
    radius[rng.random(n) < 0.05] = 0.0  # certified, but with radius 0
    abstain = rng.random(n) < 0.15
    prediction[abstain] = ABSTAIN
    radius[abstain] = 0.0
    return torch.from_numpy(x).to(dtype), torch.from_numpy(prediction), torch.from_numpy(radius)


def assert_no_overlap(memory):
    state = memory.state_dict()
    if state["x"] is None:
        return
    x = state["x"].double().flatten(1).cpu().numpy()
    c, r = state["prediction"].cpu().numpy(), state["radius"].cpu().numpy()
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    need = r[:, None] + r[None, :]
    bad = (c[:, None] != c[None, :]) & (d < need - INVARIANT_RTOL * np.maximum(need, d))
    assert not bad.any(), f"overlapping balls of different classes: {np.argwhere(bad)[:5].tolist()}"


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def pts(*xy):
    return torch.tensor(xy, dtype=torch.float64)


def answers(memory, x, prediction, radius):
    c, r = memory.adjust(x, torch.tensor(prediction), torch.tensor(radius, dtype=torch.float64))
    return c.tolist(), r.tolist()


# ----------------------------------------------------------------------------- hand-built cases


def test_inside_another_class_takes_its_class_and_remaining_depth():
    memory = CertificationMemory()
    assert answers(memory, pts([0.0, 0.0]), [0], [2.0]) == ([0], [2.0])
    # (1, 0) lies 1 inside the class-0 ball of radius 2 at the origin.
    assert answers(memory, pts([1.0, 0.0]), [1], [5.0]) == ([0], [1.0])
    # The same inside one call, and a point exactly at a stored centre takes its whole radius.
    memory = CertificationMemory()
    assert answers(memory, pts([0.0, 0.0], [0.0, 1.5], [0.0, 0.0]), [0, 3, 2], [2.0, 0.1, 9.0]) == (
        [0, 0, 0],
        [2.0, 0.5, 2.0],
    )
    assert len(memory) == 3


def test_outside_shrinks_to_the_nearest_gap():
    memory = CertificationMemory()
    answers(memory, pts([0.0, 0.0], [0.0, 10.0]), [0, 2], [1.0, 3.0])
    # 3-4-5 triangle: 5 - 1 = 4 to the first ball, sqrt(9 + 36) - 3 ~ 3.708 to the second.
    c, r = answers(memory, pts([3.0, 4.0]), [1], [10.0])
    assert c == [1] and r == pytest.approx([math.sqrt(45.0) - 3.0], rel=1e-15)
    # A radius already below every gap is kept.
    assert answers(memory, pts([-30.0, 0.0]), [1], [0.25]) == ([1], [0.25])
    # On the boundary (d == R_j) the query is not inside: its radius becomes 0, and it is stored.
    assert answers(memory, pts([1.0, 0.0]), [5], [2.0]) == ([5], [0.0])
    assert len(memory) == 5


def test_deepest_ball_wins():
    memory = CertificationMemory()
    # Two overlapping balls of class 0 (same class, so both are kept as given).
    assert answers(memory, pts([0.0, 0.0], [3.0, 0.0]), [0, 0], [2.0, 2.5]) == ([0, 0], [2.0, 2.5])
    c, r = answers(memory, pts([1.0, 0.0], [2.5, 0.0], [1.75, 0.0]), [1, 1, 1], [1.0, 1.0, 1.0])
    # Depths: (1, 0.5) -> 1; (-0.5, 2) -> 2; (0.25, 1.25) -> 1.25.
    assert c == [0, 0, 0] and r == [1.0, 2.0, 1.25]


def test_depth_ties_go_to_the_earliest_entry():
    """Under the invariant a point cannot lie inside balls of two different classes, so this
    tie is only observable in a state that breaks it; it pins down the rule nonetheless."""
    for first, second in [(0, 2), (2, 0)]:
        memory = CertificationMemory()
        memory.load_state_dict(
            {
                "format": "ddrs_ext.CertificationMemory",
                "version": 1,
                "input_shape": [2],
                "x": pts([0.0, 0.0], [2.0, 0.0]),
                "prediction": torch.tensor([first, second]),
                "radius": torch.tensor([2.0, 2.0], dtype=torch.float64),
            }
        )
        assert answers(memory, pts([1.0, 0.0]), [1], [3.0]) == ([first], [1.0])


def test_same_class_balls_may_overlap():
    memory = CertificationMemory()
    assert answers(memory, pts([0.0, 0.0], [1.0, 0.0], [0.5, 0.0]), [4, 4, 4], [2.0, 3.0, 7.0]) == (
        [4, 4, 4],
        [2.0, 3.0, 7.0],
    )
    # A query of another class is compared with all of them.
    assert answers(memory, pts([10.0, 0.0]), [1], [9.0]) == ([1], [2.5])  # min(10 - 2, 9 - 3, 9.5 - 7)


def test_abstentions_pass_through_and_are_not_stored():
    memory = CertificationMemory()
    c, r = answers(memory, pts([0.0, 0.0], [5.0, 0.0], [0.5, 0.0]), [ABSTAIN, 1, ABSTAIN], [0.0, 1.0, 0.0])
    assert (c, r) == ([ABSTAIN, 1, ABSTAIN], [0.0, 1.0, 0.0])
    assert len(memory) == 1
    # Nothing was stored at the abstained points, so a query there keeps its answer.
    assert answers(memory, pts([0.0, 0.0]), [2], [3.0]) == ([2], [3.0])
    assert answers(memory, pts([5.0, 0.0]), [ABSTAIN], [0.0]) == ([ABSTAIN], [0.0])
    assert len(memory) == 2


def test_empty_batch_and_radius_zero():
    memory = CertificationMemory()
    c, r = memory.adjust(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert c.shape == (0,) and c.dtype == torch.int64 and r.shape == (0,) and r.dtype == torch.float64
    assert len(memory) == 0
    # A certified answer with radius 0 is stored; a query of another class at the same point gets 0.
    assert answers(memory, pts([1.0, 1.0]), [0], [0.0]) == ([0], [0.0])
    assert answers(memory, pts([1.0, 1.0], [1.0, 3.0]), [1, 1], [2.0, 5.0]) == ([1, 1], [0.0, 2.0])
    assert len(memory) == 3


def test_outputs_are_new_cpu_tensors():
    memory = CertificationMemory()
    prediction, radius = torch.tensor([0, 1]), torch.tensor([2.0, 2.0], dtype=torch.float32)
    c, r = memory.adjust(pts([0.0, 0.0], [1.0, 0.0]), prediction, radius)
    assert c.dtype == torch.int64 and r.dtype == torch.float64 and c.device.type == r.device.type == "cpu"
    assert c.tolist() == [0, 0] and r.tolist() == [2.0, 1.0]
    assert prediction.tolist() == [0, 1] and radius.tolist() == [2.0, 2.0]  # inputs untouched


# ----------------------------------------------------------------------------- streams


@pytest.mark.parametrize("seed", range(25))
def test_matches_reference_and_keeps_invariant(seed):
    dim = 1 + seed % 4
    x, p, r = random_stream(seed, dim=dim, num_classes=2 + seed % 3)
    memory = CertificationMemory()
    c, radius = memory.adjust(x, p, r)
    ref_c, ref_r = reference_adjust([], x, p, r)
    assert torch.equal(c, ref_c)
    torch.testing.assert_close(radius, ref_r, rtol=1e-12, atol=1e-12)
    assert len(memory) == int((p != ABSTAIN).sum())
    assert_no_overlap(memory)
    changed = int((c != p).sum())
    assert changed > 0  # the streams do exercise the inside-the-ball case


@pytest.mark.parametrize("seed", range(6))
def test_batched_equals_one_query_at_a_time(seed, monkeypatch):
    x, p, r = random_stream(100 + seed, n=120, dim=3)
    whole = CertificationMemory()
    expected = whole.adjust(x, p, r)

    single = CertificationMemory()
    got = [single.adjust(x[i : i + 1], p[i : i + 1], r[i : i + 1]) for i in range(len(x))]
    assert torch.equal(torch.cat([g[0] for g in got]), expected[0])
    assert torch.equal(torch.cat([g[1] for g in got]), expected[1])  # bit for bit
    assert_states_equal(single.state_dict(), whole.state_dict())

    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=6, replace=False)).tolist()
    pieces = CertificationMemory()
    got = [pieces.adjust(x[a:b], p[a:b], r[a:b]) for a, b in zip([0, *cuts], [*cuts, len(x)])]
    assert torch.equal(torch.cat([g[1] for g in got]), expected[1])
    assert_states_equal(pieces.state_dict(), whole.state_dict())

    # Tiny query blocks and distance tiles: the chunked paths give the same bits.
    monkeypatch.setattr(memory_module, "_QUERY_BLOCK", 7)
    monkeypatch.setattr(memory_module, "_TILE_ELEMENTS", 20)
    monkeypatch.setattr(memory_module, "_SLICE_ELEMENTS", 2 + seed)
    tiled = CertificationMemory()
    tiled.adjust(x[:50], p[:50], r[:50])
    rest = tiled.adjust(x[50:], p[50:], r[50:])
    assert torch.equal(rest[0], expected[0][50:]) and torch.equal(rest[1], expected[1][50:])
    assert_states_equal(tiled.state_dict(), whole.state_dict())


@pytest.mark.parametrize("seed", range(4))
def test_invariant_far_from_origin_in_float32(seed):
    """Nearby points far from the origin: where ||a||^2 + ||b||^2 - 2ab in float32 would fail."""
    x, p, r = random_stream(200 + seed, n=150, dim=8, scale=1e-2, offset=1e3, dtype=torch.float32)
    memory = CertificationMemory()
    c, radius = memory.adjust(x, p, r)
    ref_c, ref_r = reference_adjust([], x, p, r)
    assert torch.equal(c, ref_c)
    torch.testing.assert_close(radius, ref_r, rtol=1e-9, atol=1e-12)
    assert_no_overlap(memory)


def test_float32_and_float64_inputs_agree():
    x, p, r = random_stream(7, n=100, dim=3, dtype=torch.float32)
    m32, m64 = CertificationMemory(), CertificationMemory()
    out32, out64 = m32.adjust(x, p, r.float()), m64.adjust(x.double(), p, r.float())
    assert torch.equal(out32[0], out64[0]) and torch.equal(out32[1], out64[1])
    assert m32.state_dict()["x"].dtype == torch.float32 and m64.state_dict()["x"].dtype == torch.float64

    # Mixed dtypes: the stored inputs are promoted exactly; results are unchanged.
    mixed = CertificationMemory()
    parts = [(0, 30, torch.float16), (30, 60, torch.float32), (60, 100, torch.float64)]
    x16 = x.half().float()  # values representable in every dtype used
    ref = CertificationMemory().adjust(x16.double(), p, r)
    got = [mixed.adjust(x16[a:b].to(dt), p[a:b], r[a:b]) for a, b, dt in parts]
    assert torch.equal(torch.cat([g[0] for g in got]), ref[0])
    assert torch.equal(torch.cat([g[1] for g in got]), ref[1])
    assert mixed.state_dict()["x"].dtype == torch.float64
    half = CertificationMemory()
    half.adjust(x16[:20].half(), p[:20], r[:20])
    assert half.state_dict()["x"].dtype == torch.float16


def test_multidimensional_inputs_and_grad():
    x, p, r = random_stream(9, n=60, dim=12)
    images = x.reshape(60, 3, 2, 2).requires_grad_()
    a, b = CertificationMemory(), CertificationMemory()
    assert torch.equal(a.adjust(images, p, r)[1], b.adjust(x, p, r)[1])
    assert a.state_dict()["x"].shape[1:] == (3, 2, 2) and not a.state_dict()["x"].requires_grad


def test_large_stream_in_calls_of_100_equals_one_call():
    """2000 queries of dimension 64 with the default query blocks and tiles (throughput:
    benchmarks/bench_memory.py): calls of 100 answer as one call does, bit for bit, and keep the invariant."""
    x, p, r = random_stream(11, n=2000, dim=64, scale=1.0)
    whole = CertificationMemory()
    expected = whole.adjust(x, p, r)
    memory = CertificationMemory()
    got = [memory.adjust(x[i : i + 100], p[i : i + 100], r[i : i + 100]) for i in range(0, 2000, 100)]
    assert torch.equal(torch.cat([g[0] for g in got]), expected[0])
    assert torch.equal(torch.cat([g[1] for g in got]), expected[1])
    assert_states_equal(memory.state_dict(), whole.state_dict())
    assert len(memory) == int((p != ABSTAIN).sum())
    assert int((expected[0] != p).sum()) > 0  # some queries land inside another class's ball
    state = memory.state_dict()
    d = torch.cdist(state["x"], state["x"], compute_mode="donot_use_mm_for_euclid_dist")
    c, radius = state["prediction"], state["radius"]
    need = radius[:, None] + radius[None, :]
    bad = (c[:, None] != c[None, :]) & (d < need - INVARIANT_RTOL * torch.maximum(need, d))
    assert not bad.any(), f"overlapping balls of different classes: {bad.nonzero()[:5].tolist()}"


# ----------------------------------------------------------------------------- CertifyResult


def _result(prediction, radius):
    n = len(prediction)
    return CertifyResult(
        prediction=torch.tensor(prediction),
        radius=torch.tensor(radius, dtype=torch.float64),
        p_lower=torch.linspace(0.6, 0.9, n, dtype=torch.float64),
        counts=torch.arange(3 * n).reshape(n, 3),
        sigma=torch.full((n,), 0.25, dtype=torch.float64),
        seed=1234,
    )


def test_adjust_result_replaces_only_prediction_and_radius():
    memory = CertificationMemory()
    result = _result([0, 1, ABSTAIN], [2.0, 4.0, 0.0])
    out = memory.adjust_result(pts([0.0, 0.0], [1.0, 0.0], [0.5, 0.5]), result)
    assert out is not result
    assert out.prediction.tolist() == [0, 0, ABSTAIN] and out.radius.tolist() == [2.0, 1.0, 0.0]
    assert out.p_lower is result.p_lower and out.counts is result.counts and out.sigma is result.sigma
    assert out.seed == 1234
    assert result.prediction.tolist() == [0, 1, ABSTAIN] and result.radius.tolist() == [2.0, 4.0, 0.0]


def test_adjust_result_of_certify(linear_binary):
    x = torch.randn(6, 3, 4, 5)
    sigma = torch.linspace(0.2, 1.0, 6)
    result = certify(linear_binary, x, sigma, n0=20, n=200, alpha=0.01, seed=3)
    memory = CertificationMemory()
    out = memory.adjust_result(x, result)
    ref_c, ref_r = reference_adjust([], x, result.prediction, result.radius)
    assert torch.equal(out.prediction, ref_c)
    torch.testing.assert_close(out.radius, ref_r, rtol=1e-12, atol=0)
    assert len(memory) == int((result.prediction != ABSTAIN).sum())


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_and_continue(tmp_path, dtype):
    x, p, r = random_stream(21, n=200, dim=4, dtype=dtype)
    memory = CertificationMemory()
    memory.adjust(x[:120], p[:120], r[:120])
    memory.save(tmp_path / "memory.pt")
    loaded = CertificationMemory.load(tmp_path / "memory.pt")
    assert len(loaded) == len(memory)
    assert_states_equal(loaded.state_dict(), memory.state_dict())
    assert loaded.state_dict()["x"].dtype == dtype

    a, b = memory.adjust(x[120:], p[120:], r[120:]), loaded.adjust(x[120:], p[120:], r[120:])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_states_equal(loaded.state_dict(), memory.state_dict())

    copy = CertificationMemory()
    copy.load_state_dict(memory.state_dict())
    assert_states_equal(copy.state_dict(), memory.state_dict())


def test_save_load_empty(tmp_path):
    fresh = CertificationMemory()
    fresh.save(tmp_path / "fresh.pt")
    assert len(CertificationMemory.load(tmp_path / "fresh.pt")) == 0

    # Only abstentions so far: nothing stored, but the input shape is fixed and survives.
    shaped = CertificationMemory()
    shaped.adjust(torch.zeros(2, 3), torch.tensor([ABSTAIN, ABSTAIN]), torch.zeros(2))
    shaped.save(tmp_path / "shaped.pt")
    loaded = CertificationMemory.load(tmp_path / "shaped.pt", map_location="cpu")
    assert_states_equal(loaded.state_dict(), shaped.state_dict())
    with pytest.raises(ValueError, match=r"per-input shape \(3,\)"):
        loaded.adjust(torch.zeros(1, 4), torch.tensor([0]), torch.ones(1))


def test_load_rejects_other_files(tmp_path):
    torch.save({"weights": torch.ones(3)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a CertificationMemory state"):
        CertificationMemory.load(tmp_path / "model.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a saved CertificationMemory"):
        CertificationMemory.load(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        CertificationMemory.load(tmp_path / "missing.pt")

    memory = CertificationMemory()
    memory.adjust(pts([0.0, 0.0]), torch.tensor([0]), torch.ones(1))
    state = memory.state_dict()
    torch.save({**state, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="unknown CertificationMemory state version 99"):
        CertificationMemory.load(tmp_path / "future.pt")


@pytest.mark.parametrize(
    "change",
    [
        {"x": pts([0.0, 0.0, 0.0])},
        {"x": torch.zeros(2, 2)},
        {"x": torch.zeros(1, 2, dtype=torch.int64)},
        {"x": None},
        {"prediction": torch.tensor([0.0])},
        {"prediction": torch.tensor([-1])},
        {"radius": torch.tensor([-1.0], dtype=torch.float64)},
        {"radius": torch.tensor([1.0, 2.0], dtype=torch.float64)},
        {"input_shape": [3]},
        {"input_shape": "2"},
    ],
)
def test_load_state_dict_rejects_damaged_states(change):
    memory = CertificationMemory()
    memory.adjust(pts([0.0, 0.0]), torch.tensor([0]), torch.ones(1))
    target = CertificationMemory()
    with pytest.raises(ValueError, match="damaged"):
        target.load_state_dict({**memory.state_dict(), **change})
    state = memory.state_dict()
    del state["radius"]
    with pytest.raises(ValueError, match="lacks"):
        target.load_state_dict(state)


# ----------------------------------------------------------------------------- bad input

X = pts([0.0, 0.0], [1.0, 0.0], [2.0, 0.0])
P = torch.tensor([0, 1, 2])
R = torch.tensor([0.5, 0.5, 0.5])


@pytest.mark.parametrize(
    "x,prediction,radius,error,match",
    [
        (X.long(), P, R, TypeError, "floating-point"),
        (X.numpy(), P, R, TypeError, "torch.Tensor"),
        (pts([0.0, 0.0], [math.nan, 0.0], [2.0, 0.0]), P, R, ValueError, "NaN or Inf .first at input 1"),
        (pts([0.0, 0.0], [0.0, 0.0], [math.inf, 0.0]), P, R, ValueError, "NaN or Inf .first at input 2"),
        (X, P.double(), R, TypeError, "integer class indices"),
        (X, P > 0, R, TypeError, "integer class indices"),
        (X, P[:2], R, ValueError, r"prediction must have shape \(3,\)"),
        (X, P[None], R, ValueError, r"prediction must have shape \(3,\)"),
        (X, torch.tensor([0, -2, 1]), R, ValueError, "input 1 has -2"),
        (X, "012", R, TypeError, "prediction must be a tensor"),
        (X, P, torch.tensor([0.5, math.nan, 0.5]), ValueError, "input 1 has nan"),
        (X, P, torch.tensor([0.5, 0.5, math.inf]), ValueError, "input 2 has inf"),
        (X, P, torch.tensor([-0.5, 0.5, 0.5]), ValueError, "finite and >= 0"),
        (X, P, R[:2], ValueError, r"radius must have shape \(3,\)"),
        (X, P, R.to(torch.complex64), TypeError, "real numbers"),
        (X, torch.tensor([0, ABSTAIN, 1]), R, ValueError, "input 1 abstains .* radius must be 0"),
    ],
)
def test_bad_inputs(x, prediction, radius, error, match):
    memory = CertificationMemory()
    with pytest.raises(error, match=match):
        memory.adjust(x, prediction, radius)
    # A rejected call leaves the memory as it was, shape not yet fixed.
    assert len(memory) == 0
    assert memory.adjust(torch.zeros(1, 5), torch.tensor([0]), torch.ones(1))[0].tolist() == [0]


def test_shape_must_match_stored_inputs():
    memory = CertificationMemory()
    memory.adjust(torch.zeros(2, 3, 4), torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match=r"per-input shape \(3, 4\).*got \(4, 3\)"):
        memory.adjust(torch.zeros(2, 4, 3), torch.tensor([0, 1]), torch.ones(2))
    assert len(memory) == 2  # the rejected call stored nothing


def test_bad_arguments_to_constructor_and_adjust_result():
    with pytest.raises(TypeError, match="device must be"):
        CertificationMemory(device=0.5)
    with pytest.raises(TypeError, match="CertifyResult"):
        CertificationMemory().adjust_result(X, (P, R))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_matches_cpu():
    x, p, r = random_stream(31, n=200, dim=5)
    cpu, cuda = CertificationMemory(), CertificationMemory(device="cuda")
    a, b = cpu.adjust(x, p, r), cuda.adjust(x, p, r)  # CPU inputs move to the memory's device
    assert torch.equal(a[0], b[0]) and b[1].device.type == "cpu"
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)
    assert cuda.state_dict()["x"].device.type == "cuda"
    assert_no_overlap(cuda)


# ----------------------------------------------------------------------------- on a device

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


@pytest.mark.parametrize("device", DEVICES)
def test_memory_on_device_matches_reference(device, monkeypatch):
    """The same code runs on every device: answers as the spec's, entries kept on the device."""
    x, p, r = random_stream(41, n=300, dim=6)
    memory = CertificationMemory(device=device)
    c, radius = memory.adjust(x[:120], p[:120], r[:120])  # CPU queries move to the memory's device
    rest = memory.adjust(x[120:].to(device), p[120:].to(device), r[120:].to(device))
    c, radius = torch.cat([c, rest[0]]), torch.cat([radius, rest[1]])
    assert c.device.type == radius.device.type == "cpu"
    ref_c, ref_r = reference_adjust([], x, p, r)
    assert torch.equal(c, ref_c) and int((c != p).sum()) > 0
    torch.testing.assert_close(radius, ref_r, rtol=1e-12, atol=1e-12)
    state = memory.state_dict()
    assert all(state[k].device.type == device for k in ("x", "prediction", "radius"))
    assert_no_overlap(memory)
    # Bit for bit whatever the calls, query blocks and distance tiles.
    monkeypatch.setattr(memory_module, "_QUERY_BLOCK", 16)
    monkeypatch.setattr(memory_module, "_TILE_ELEMENTS", 50)
    monkeypatch.setattr(memory_module, "_SLICE_ELEMENTS", 13)
    monkeypatch.setattr(memory_module, "_DEVICE_SLICE_ELEMENTS", 13)
    tiled = CertificationMemory(device=device)
    for i in range(0, 300, 37):
        tiled.adjust(x[i : i + 37], p[i : i + 37], r[i : i + 37])
    assert_states_equal(tiled.state_dict(), state)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_memory_state_on_its_device(device):
    state = CertificationMemory(device=device).state_dict()
    assert state["x"] is None
    assert state["prediction"].device.type == state["radius"].device.type == device


@pytest.mark.parametrize("seed", range(4))
def test_pairs_left_out_never_matter(seed, monkeypatch):
    """Only pairs of queries within reach go to the in-order walk; walking every pair gives the same bits."""
    x, p, r = random_stream(300 + seed, n=250, dim=2 + seed)
    filtered = CertificationMemory()
    expected = filtered.adjust(x[:60], p[:60], r[:60]), filtered.adjust(x[60:], p[60:], r[60:])

    within = memory_module._earlier_pairs_within

    def every_pair(flat, threshold, reach, *norm):
        return within(flat, torch.full_like(threshold, math.inf), reach, *norm)

    monkeypatch.setattr(memory_module, "_earlier_pairs_within", every_pair)
    walked = CertificationMemory()
    got = walked.adjust(x[:60], p[:60], r[:60]), walked.adjust(x[60:], p[60:], r[60:])
    for a, b in zip(got, expected):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_states_equal(walked.state_dict(), filtered.state_dict())


def test_only_small_results_reach_the_host(monkeypatch):
    """Per block of queries, one transfer of O(queries) numbers, not the (Q, Q) distances."""
    moved = []
    to_host = memory_module._to_host

    def counting(*tensors):
        moved.append(sum(t.numel() for t in tensors))
        return to_host(*tensors)

    monkeypatch.setattr(memory_module, "_to_host", counting)
    # Far-apart queries with small balls: no pair of queries can change each other's answer.
    g = torch.Generator().manual_seed(5)
    q = 400
    x = torch.randn(q, 16, generator=g, dtype=torch.float64) * 100
    p, r = torch.randint(0, 3, (q,), generator=g), torch.rand(q, generator=g, dtype=torch.float64)
    memory = CertificationMemory()
    memory.adjust(x[:100], p[:100], r[:100])
    memory.adjust(x[100:], p[100:], r[100:])
    assert moved == [2 * 100, 2 * 300]  # a gap and its class per query
    monkeypatch.setattr(memory_module, "_QUERY_BLOCK", 128)
    moved.clear()
    memory.adjust(x, p, r)
    assert moved == [2 * 128] * 3 + [2 * 16]
