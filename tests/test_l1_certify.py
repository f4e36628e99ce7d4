"""The l1 certificate (uniform noise) against closed-form truth: certify, predict, Smooth, the memory."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import ddrs_ext
from ddrs_ext import ABSTAIN, CertificationMemory, CertifyResult, Smooth, certify, noise, predict
from ddrs_ext.memory import _VERSION

THETA = 0.5
D = 6
AXIS = 2


class AxisLinear(torch.nn.Module):
    """Two classes split by the hyperplane x_k + b = 0, whose normal is a coordinate axis: logits
    (0, x_k + b).

    Under uniform noise on the cube of half-width theta only u_k matters:
    P(class 1) = clip(1/2 + m / (2 theta), 0, 1) with the margin m = x_k + b, piecewise linear in m;
    the l1 distance to the boundary is |m| / ||e_k||_inf = |m|, and theta * (2 P - 1) = |m| while
    |m| <= theta.
    """

    def __init__(self, k: int = AXIS, b: float = 0.1):
        super().__init__()
        self.k, self.b = k, b

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, self.k].double() + self.b

    def forward(self, x):
        score = x.flatten(1)[:, self.k] + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def exact_probability(margin, theta):
    """P(class 1) under uniform noise of half-width theta, for the axis-normal classifier."""
    return np.clip(0.5 + np.asarray(margin, dtype=np.float64) / (2 * theta), 0.0, 1.0)


def inputs_with_margins(model, margins, seed=0):
    """Inputs whose margins are exactly ``margins`` (in float64), the other coordinates random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(margins), D, generator=g, dtype=torch.float64)
    x[:, model.k] = torch.as_tensor(margins, dtype=torch.float64) - model.b
    return x


def test_smoothed_probability_is_piecewise_linear_in_the_margin():
    model = AxisLinear()
    margins = np.linspace(-1.5 * THETA, 1.5 * THETA, 13)
    x = inputs_with_margins(model, margins)
    n = 20_000
    result = certify(model, x, THETA, n0=10, n=n, alpha=0.01, seed=3, noise="uniform", batch_size=50_000)
    p_hat = result.counts[:, 1].double().numpy() / n
    p = exact_probability(margins, THETA)
    sd = np.sqrt(np.maximum(p * (1 - p), 1 / n) / n)
    assert np.all(np.abs(p_hat - p) < 5 * sd + 1e-7)
    # flat at 0 and 1 beyond |m| = theta, a straight line between
    assert p_hat[0] == 0 and p_hat[-1] == 1
    inside = np.abs(margins) < THETA
    slope = np.polyfit(margins[inside], p_hat[inside], 1)[0]
    assert abs(slope - 1 / (2 * THETA)) < 0.02


def test_radius_from_the_exact_probability_is_the_true_l1_distance():
    """Tightness: theta * (2 p - 1) with the exact p is the l1 distance to the boundary while |m| <= theta."""
    margins = np.array([0.0, 1e-3, 0.1, 0.25, 0.4999, 0.5, 0.7, 3.0])
    p = exact_probability(margins, THETA)
    radius = noise.l1_radius(p, np.full_like(margins, THETA))
    np.testing.assert_allclose(radius, np.minimum(margins, THETA), rtol=1e-12, atol=1e-15)
    # ... and, for a general hyperplane w.x + b, the l1 distance is |w.x + b| / ||w||_inf: the axis
    # case is the one where the certificate reaches it
    assert noise.l1_radius(np.array([0.49]), np.array([THETA]))[0] == 0.0  # abstains below 1/2


def test_l1_radius_formula():
    p = np.array([0.0, 0.3, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(noise.l1_radius(p, np.full(5, 2.0)), [0, 0, 0, 1.0, 2.0])


# ---------------------------------------------------------------- soundness, with negative controls


def _violations(model, alpha: float, seed: int = 0):
    """Certify many inputs of known margin; return (violations, inputs): a violation is a certified
    class that is wrong or a radius above the true l1 distance to the boundary."""
    K, n = 300, 1000
    g = np.random.default_rng(seed)
    margins = g.uniform(0.0, 1.3 * THETA, K)  # some beyond theta, where the radius saturates
    x = inputs_with_margins(model, margins, seed=seed)
    result = certify(model, x, THETA, n0=50, n=n, alpha=alpha, seed=seed, noise="uniform", batch_size=100_000)
    certified = result.prediction != ABSTAIN
    wrong = certified & (result.prediction != 1)
    too_big = certified & (result.radius > torch.from_numpy(margins))
    return int((wrong | too_big).sum()), K


def _sound(violations: int, K: int, alpha: float) -> bool:
    """Violations no more frequent than alpha allows (a one-sided binomial test at level 1e-6)."""
    return stats.binomtest(violations, K, alpha, alternative="greater").pvalue > 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_l1_certificate_is_sound(seed):
    alpha = 0.01
    violations, K = _violations(AxisLinear(), alpha, seed)
    assert _sound(violations, K, alpha)


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda p, t: 2 * t * np.maximum(2 * p - 1, 0), id="2x"),
        pytest.param(lambda p, t: noise.stats.certified_radius(p, t), id="gaussian-formula"),
        pytest.param(lambda p, t: t * np.maximum(2 * p - 1, 0) * 1.3, id="1.3x"),
        pytest.param(lambda p, t: t * np.maximum(2 * p - 1, 0) * 1.05, id="1.05x"),
    ],
)
def test_soundness_check_rejects_wrong_radius(monkeypatch, wrong):
    """Negative control: the same check, run on a deliberately wrong l1 radius, fails."""
    alpha = 0.01
    monkeypatch.setattr(noise, "l1_radius", wrong)
    violations, K = _violations(AxisLinear(), alpha, 0)
    assert not _sound(violations, K, alpha)


def test_l1_certificate_is_tight():
    """With many samples, the certified radius approaches the true l1 distance from below."""
    model = AxisLinear()
    margins = np.linspace(0.1, 0.45, 8)
    x = inputs_with_margins(model, margins)
    result = certify(
        model, x, THETA, n0=50, n=50_000, alpha=0.001, seed=1, noise="uniform", batch_size=100_000
    )
    assert bool((result.prediction == 1).all())
    radius = result.radius.numpy()
    assert np.all(radius <= margins)
    assert np.all(radius >= margins - 0.03)  # Clopper-Pearson slack at n = 50 000: about 0.007 / theta
    # the radius is theta * (2 p_lower - 1) of the reported bound, and the result says it is an l1 radius
    np.testing.assert_allclose(radius, THETA * (2 * result.p_lower.numpy() - 1), rtol=1e-12)
    assert result.norm == "l1"


# ---------------------------------------------------------------- the API around it


def test_result_norm_and_old_constructions():
    model = AxisLinear()
    x = inputs_with_margins(model, [0.2, 0.3])
    assert certify(model, x, 0.25, n0=10, n=100, seed=0).norm == "l2"
    assert certify(model, x, 0.25, n0=10, n=100, seed=0, noise="uniform").norm == "l1"
    old = CertifyResult(
        prediction=torch.zeros(1, dtype=torch.int64),
        radius=torch.zeros(1, dtype=torch.float64),
        p_lower=torch.zeros(1, dtype=torch.float64),
        counts=torch.zeros(1, 2, dtype=torch.int64),
        sigma=torch.ones(1, dtype=torch.float64),
        seed=0,
    )
    assert old.norm == "l2"


def test_uniform_certify_reproducible_across_batch_sizes():
    model = AxisLinear()
    x = inputs_with_margins(model, np.linspace(-0.3, 0.3, 7), seed=2)
    theta = torch.linspace(0.2, 0.8, 7, dtype=torch.float64)
    a = certify(model, x, theta, n0=30, n=500, seed=9, noise="uniform", batch_size=7)
    b = certify(model, x, theta, n0=30, n=500, seed=9, noise="uniform", batch_size=4000)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.radius, b.radius)
    assert torch.equal(a.sigma, theta)
    # different noise from the Gaussian under the same seed
    g = certify(model, x, theta, n0=30, n=500, seed=9, batch_size=4000)
    assert not torch.equal(a.counts, g.counts)


def test_uniform_predict():
    model = AxisLinear()
    margins = np.array([-0.4, -0.2, 0.0, 0.2, 0.4])
    x = inputs_with_margins(model, margins)
    got = predict(model, x, THETA, n=4000, alpha=0.001, seed=0, noise="uniform")
    assert got.tolist()[:2] == [0, 0] and got.tolist()[3:] == [1, 1]
    assert int(got[2]) == ABSTAIN  # p = 1/2 exactly: the top two are not separated


def test_smooth_uniform_matches_certify():
    model = AxisLinear()
    x = inputs_with_margins(model, [0.3])
    smooth = Smooth(model, 2, THETA, seed=4, noise="uniform")
    prediction, radius = smooth.certify(x[0], 50, 2000, 0.001, 500)
    expected = certify(model, x, THETA, n0=50, n=2000, alpha=0.001, seed=4, noise="uniform")
    assert prediction == int(expected.prediction[0]) == 1
    assert radius == float(expected.radius[0]) and 0 < radius <= 0.3
    assert smooth.predict(x[0], 2000, 0.001, 500) == 1


def test_smooth_uniform_hooks_path_uses_the_l1_radius():
    """core.Smooth's step-by-step algorithm through overridden hooks gives theta * (2 pA_lower - 1)."""

    class FixedBound(Smooth):
        def _lower_confidence_bound(self, NA, N, alpha):  # noqa: N803
            return 0.8

    model = AxisLinear()
    x = inputs_with_margins(model, [0.4])[0]
    assert FixedBound(model, 2, 0.5, seed=0, noise="uniform").certify(x, 10, 100, 0.01, 50) == (
        1,
        pytest.approx(0.3),
    )
    assert FixedBound(model, 2, 0.5, seed=0).certify(x, 10, 100, 0.01, 50)[1] == pytest.approx(
        0.5 * stats.norm.ppf(0.8)
    )


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda m, x: certify(m, x, 0.0, noise="uniform"),
            ValueError,
            r"theta, the uniform noise's half-width",
        ),
        (lambda m, x: certify(m, x, -1.0, noise="uniform"), ValueError, "finite number > 0"),
        (lambda m, x: certify(m, x, torch.tensor([0.5, 0.0]), noise="uniform"), ValueError, "input 1"),
        (lambda m, x: predict(m, x, float("nan"), noise="uniform"), ValueError, "theta"),
        (
            lambda m, x: certify(m, x, 0.5, noise="laplace"),
            ValueError,
            r"noise must be one of \('gaussian', 'uniform'\)",
        ),
        (lambda m, x: certify(m, x, 0.5, noise=1), TypeError, "noise must be one of"),
        (lambda m, x: Smooth(m, 2, -0.5, noise="uniform"), ValueError, "theta"),
        (lambda m, x: Smooth(m, 2, 0.5, noise="l1"), ValueError, "noise must be one of"),
        (lambda m, x: CertificationMemory(norm="linf"), ValueError, r"norm must be one of \('l2', 'l1'\)"),
    ],
)
def test_bad_input(call, error, match):
    model = AxisLinear()
    x = inputs_with_margins(model, [0.2, 0.3])
    with pytest.raises(error, match=match):
        call(model, x)


# ---------------------------------------------------------------- the memory in l1


def test_memory_uses_l1_distances():
    """x1 lies at l2 distance sqrt(2) but l1 distance 2 from x0: the two norms adjust differently."""
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    prediction, radius = torch.tensor([0, 1]), torch.tensor([1.2, 1.0], dtype=torch.float64)
    l2 = CertificationMemory()
    assert l2.adjust(x, prediction, radius)[1].tolist() == pytest.approx([1.2, math.sqrt(2) - 1.2])
    l1 = CertificationMemory(norm="l1")
    assert l1.adjust(x, prediction, radius)[1].tolist() == pytest.approx([1.2, 0.8])
    # inside a stored l1 ball: the answer becomes the ball's class, with the depth as radius
    inside = l1.adjust(
        torch.tensor([[0.3, 0.2]], dtype=torch.float64), torch.tensor([1]), torch.tensor([0.5])
    )
    assert inside[0].tolist() == [0] and inside[1].tolist() == pytest.approx([0.7])


def test_memory_l1_invariant_and_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 5, generator=g, dtype=torch.float64)
    prediction = torch.randint(0, 3, (200,), generator=g)
    radius = torch.rand(200, generator=g, dtype=torch.float64) * 0.8
    memory = CertificationMemory(norm="l1")
    classes, radii = memory.adjust(x, prediction, radius)
    d = torch.cdist(x, x, p=1)
    clash = (classes[:, None] != classes[None, :]) & (classes[:, None] >= 0) & (classes[None, :] >= 0)
    assert bool((d[clash] >= (radii[:, None] + radii[None, :])[clash] * (1 - 1e-12)).all())
    one_by_one = CertificationMemory(norm="l1")
    for i in range(200):
        c, r = one_by_one.adjust(x[i : i + 1], prediction[i : i + 1], radius[i : i + 1])
        assert int(c[0]) == int(classes[i]) and float(r[0]) == float(radii[i])


def test_memory_refuses_mixed_norms(tmp_path):
    model = AxisLinear()
    x = inputs_with_margins(model, [0.2, 0.3])
    l1_result = certify(model, x, THETA, n0=10, n=200, seed=0, noise="uniform")
    l2_result = certify(model, x, THETA, n0=10, n=200, seed=0)
    with pytest.raises(ValueError, match=r"holds l2 certificates but the result's radii are l1 .*norm='l1'"):
        CertificationMemory().adjust_result(x, l1_result)
    with pytest.raises(ValueError, match="holds l1 certificates but the result's radii are l2"):
        CertificationMemory(norm="l1").adjust_result(x, l2_result)
    memory = CertificationMemory(norm="l1")
    adjusted = memory.adjust_result(x, l1_result)
    assert adjusted.norm == "l1"
    # saved with its norm; an L2 memory refuses it
    state = memory.state_dict()
    assert state["norm"] == "l1" and state["version"] == _VERSION
    assert CertificationMemory().state_dict()["norm"] == "l2"
    with pytest.raises(ValueError, match="holds l1 certificates but this memory holds l2"):
        CertificationMemory().load_state_dict(state)
    memory.save(tmp_path / "m.pt")
    loaded = CertificationMemory.load(tmp_path / "m.pt")
    assert loaded.norm == "l1" and len(loaded) == len(memory)
    with pytest.raises(ValueError, match="damaged"):
        CertificationMemory().load_state_dict({**state, "norm": "l3"})


def test_exports():
    assert ddrs_ext.noise.NOISES == ("gaussian", "uniform")
