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
    """CertificationMemory's rule, transcribed with Python floats; ``stored`` is a list of (x, label,
    radius). Labels are classes or ABSTAIN (a label of its own, radius 0); every answer is stored."""
    out_class, out_radius = [], []
    for xi, c, r in zip(x.double().numpy(), prediction.tolist(), radius.double().tolist()):
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


def _overlaps(x, c, r, y, e, q):
    """(len(x), len(y)) mask of pairs of entries of different labels whose balls overlap (d < r + q),
    up to INVARIANT_RTOL."""
    d = np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    need = r[:, None] + q[None, :]
    return (c[:, None] != e[None, :]) & (d < need - INVARIANT_RTOL * np.maximum(need, d))


def _stored(memory):
    state = memory.state_dict()
    if state["x"] is None:
        return np.zeros((0, 1)), np.zeros(0, dtype=np.int64), np.zeros(0)
    x = state["x"].double().flatten(1).cpu().numpy()
    return x, state["prediction"].cpu().numpy(), state["radius"].cpu().numpy()


def assert_no_overlap(memory):
    """The invariant: no two stored entries of different labels overlap, ||x_i - x_j|| >= R_i + R_j
    (abstentions are entries of radius 0, so no stored ball of a class contains an abstained input)."""
    x, c, r = _stored(memory)
    bad = _overlaps(x, c, r, x, c, r)
    assert not bad.any(), f"overlapping balls of different labels: {np.argwhere(bad)[:5].tolist()}"


def assert_answers_inside_balls_take_their_class(memory, x, prediction):
    """Every answer given (abstentions included) whose input lies inside a stored ball has that
    ball's class: no answered input lies in the open ball of an entry of another label."""
    sx, sc, sr = _stored(memory)
    q = x.double().flatten(1).numpy()
    bad = _overlaps(q, prediction.numpy(), np.zeros(len(q)), sx, sc, sr)
    assert not bad.any(), f"answers inside a ball of another label: {np.argwhere(bad)[:5].tolist()}"


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
                "version": memory_module._VERSION,
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


def test_an_abstention_inside_a_ball_takes_its_class_and_is_stored():
    memory = CertificationMemory()
    answers(memory, pts([0.0, 0.0]), [1], [1.0])
    # At the centre of a class-1 ball of radius 1 an abstaining query gets the whole radius ...
    assert answers(memory, pts([0.0, 0.0]), [ABSTAIN], [0.0]) == ([1], [1.0])
    # ... and 0.25 from the centre the remaining depth; the deepest ball wins (ties: the earliest).
    answers(memory, pts([3.0, 0.0]), [2], [1.5])
    assert answers(memory, pts([0.25, 0.0], [2.0, 0.0]), [ABSTAIN, ABSTAIN], [0.0, 0.0]) == (
        [1, 2],
        [0.75, 0.5],
    )
    assert len(memory) == 5  # the adopted answers are stored
    assert_no_overlap(memory)


def test_an_abstention_near_a_ball_stays_an_abstention_and_is_stored():
    memory = CertificationMemory()
    answers(memory, pts([0.0, 0.0]), [1], [1.0])
    # Outside the ball, and exactly on its boundary (the ball is open): (ABSTAIN, 0).
    assert answers(memory, pts([1.5, 0.0], [0.0, 1.0]), [ABSTAIN, ABSTAIN], [0.0, 0.0]) == (
        [ABSTAIN, ABSTAIN],
        [0.0, 0.0],
    )
    assert len(memory) == 3
    # A later ball of a class stops at the abstained inputs, as at any answer of another label ...
    assert answers(memory, pts([1.5, 0.5]), [2], [3.0]) == ([2], [0.5])
    # ... whatever its own class; an abstention sees no other abstention (same label).
    assert answers(memory, pts([0.0, 1.75]), [1], [3.0]) == ([1], [0.75])
    assert answers(memory, pts([1.5, 0.0]), [ABSTAIN], [0.0]) == ([ABSTAIN], [0.0])
    # A certified query exactly at an abstained input gets radius 0.
    assert answers(memory, pts([0.0, 1.0]), [0], [2.0]) == ([0], [0.0])
    assert len(memory) == 7
    assert_no_overlap(memory)


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
    assert len(memory) == len(x)  # every answer is stored
    assert_no_overlap(memory)
    assert_answers_inside_balls_take_their_class(memory, x, c)
    assert int((c != p).sum()) > 0  # the streams do exercise the inside-the-ball case


def test_abstentions_in_the_streams_take_the_class_of_the_ball_they_lie_in():
    """Over the random streams, abstaining queries land inside balls and take their class; those that
    do not stay (ABSTAIN, 0). Every one of them is stored."""
    adopted = kept = 0
    for seed in range(10):
        x, p, r = random_stream(seed, dim=2)
        memory = CertificationMemory()
        c, radius = memory.adjust(x, p, r)
        abstained = p == ABSTAIN
        adopted += int((abstained & (c != ABSTAIN)).sum())
        kept += int((abstained & (c == ABSTAIN)).sum())
        assert bool((radius[abstained & (c == ABSTAIN)] == 0).all())
        assert bool((radius[abstained & (c != ABSTAIN)] > 0).all())
        assert_answers_inside_balls_take_their_class(memory, x, c)
    assert adopted > 10 and kept > 10


# ----------------------------------------------------------------------------- negative controls


def _passes_abstentions_through(memory_class):
    """adjust as ddrs_ext's earlier rule had it: abstentions returned unchanged and not stored."""
    adjust = memory_class.adjust

    def patched(self, x, prediction, radius):
        prediction, radius = torch.as_tensor(prediction).clone(), torch.as_tensor(radius).double().clone()
        rows = (prediction != ABSTAIN).nonzero().flatten()
        if rows.numel():
            prediction[rows], radius[rows] = adjust(self, x[rows], prediction[rows], radius[rows])
        else:
            self._check_queries(x, prediction, radius)
        return prediction, radius

    return patched


def _skips_the_shrink(adjust_block):
    """_adjust_block that stores and returns the radius a query came with unless it changed class."""

    def patched(self, x, prediction, radius):
        classes, radii = adjust_block(self, x, prediction, radius)
        radii = torch.where(classes == prediction, radius, radii)
        self._radius[self._size - radii.shape[0] : self._size] = radii.to(self._radius.device)
        return classes, radii

    return patched


@pytest.mark.parametrize("seed", range(3))
def test_negative_control_abstentions_passed_through_break_the_inside_a_ball_check(seed, monkeypatch):
    x, p, r = random_stream(seed, dim=2)
    monkeypatch.setattr(CertificationMemory, "adjust", _passes_abstentions_through(CertificationMemory))
    memory = CertificationMemory()
    c, _ = memory.adjust(x, p, r)
    assert len(memory) == int((p != ABSTAIN).sum())  # the patch is the old rule
    assert_no_overlap(memory)  # which kept this invariant ...
    with pytest.raises(AssertionError, match="answers inside a ball of another label"):
        assert_answers_inside_balls_take_their_class(memory, x, c)  # ... but not this one


@pytest.mark.parametrize("seed", range(3))
def test_negative_control_skipping_the_shrink_breaks_the_no_overlap_check(seed, monkeypatch):
    x, p, r = random_stream(seed, dim=2)
    monkeypatch.setattr(
        CertificationMemory, "_adjust_block", _skips_the_shrink(CertificationMemory._adjust_block)
    )
    memory = CertificationMemory()
    memory.adjust(x, p, r)
    with pytest.raises(AssertionError, match="overlapping balls of different labels"):
        assert_no_overlap(memory)


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
    assert len(memory) == len(x)
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
    # (0.5, 0.5) abstains but lies inside the class-0 ball at the origin: it takes its class.
    assert out.prediction.tolist() == [0, 0, 0] and out.radius.tolist() == [2.0, 1.0, 2.0 - math.sqrt(0.5)]
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
    assert len(memory) == len(x)


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

    # Only abstentions so far: they are stored (radius 0), and the input shape survives.
    shaped = CertificationMemory()
    shaped.adjust(torch.zeros(2, 3), torch.tensor([ABSTAIN, ABSTAIN]), torch.zeros(2))
    shaped.save(tmp_path / "shaped.pt")
    loaded = CertificationMemory.load(tmp_path / "shaped.pt", map_location="cpu")
    assert_states_equal(loaded.state_dict(), shaped.state_dict())
    assert len(loaded) == 2 and loaded.state_dict()["prediction"].tolist() == [ABSTAIN, ABSTAIN]
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
    # Version 1 (abstentions neither stored nor adopting a ball's class) is refused, saying why.
    torch.save({**state, "version": 1}, tmp_path / "version1.pt")
    with pytest.raises(ValueError, match="version 1.*abstain.*not loaded.*unadjusted certify results"):
        CertificationMemory.load(tmp_path / "version1.pt")


@pytest.mark.parametrize(
    "change",
    [
        {"x": pts([0.0, 0.0, 0.0])},
        {"x": torch.zeros(2, 2)},
        {"x": torch.zeros(1, 2, dtype=torch.int64)},
        {"x": None},
        {"prediction": torch.tensor([0.0])},
        {"prediction": torch.tensor([-2])},
        {"prediction": torch.tensor([ABSTAIN])},  # a stored abstention with radius 1
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
