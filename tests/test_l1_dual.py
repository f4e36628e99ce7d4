"""Dual certification, the cascade and confidence routing in L1 (uniform noise, issue 20), held to
closed-form classifiers whose normal is a coordinate axis: under uniform noise of half-width theta their
smoothed probability is ``clip(1/2 + m / (2 theta), 0, 1)`` in the margin m, and the true L1 distance to
their boundary is |m|. Each soundness check has a negative control that the same check rejects."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from scipy.special import logit
from test_routing import Step, _points, _radius_of, cascade_truth_at

from ddrs_ext import ABSTAIN, certify, certify_dual, noise, routing
from ddrs_ext.dual import best_level, cross_fit_radii, level_radii, train_selector
from ddrs_ext.routing import ConfidenceSelector, certify_cascade

DIM = 4  # test_routing's inputs
SEL_AXIS, CLS_AXIS = 1, 3
LEVELS = [0.25, 0.5]  # half-widths theta_k
THETA_E = 0.4  # the selector's half-width


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def axis(k: int) -> torch.Tensor:
    e = torch.zeros(DIM, dtype=torch.float64)
    e[k] = 1.0
    return e


class AxisHalfspace(torch.nn.Module):
    """Logits (0, x_k + b): class 1 where the margin x_k + b > 0. Its smoothed probability of class 1
    under uniform noise of half-width theta is clip(1/2 + m / (2 theta), 0, 1), so every smoothed version
    has the same decision, and the L1 distance to the boundary is |m| (the normal is a coordinate axis)."""

    def __init__(self, k: int, b: float, classes: int = 2):
        super().__init__()
        self.k, self.b, self.classes = k, float(b), classes

    def margin(self, x):
        return x.flatten(1)[:, self.k].double() + self.b

    def forward(self, x):
        s = x.flatten(1)[:, self.k] + self.b
        out = [torch.zeros_like(s), s]
        if self.classes == 3:
            out.append(torch.full_like(s, -math.inf))
        return torch.stack(out, 1)


def always_two(x):
    return torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype).expand(len(x), 3)


def inputs(count, seed=1, spread=0.6):
    """Inputs with selector margins in [-spread, spread] and classifier margins likewise."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, DIM, generator=g, dtype=torch.float64) * 2 - 1) * spread


SELECTOR, CLASSIFIER = AxisHalfspace(SEL_AXIS, 0.05), AxisHalfspace(CLS_AXIS, -0.1, classes=3)


def dual_truth(x):
    """The combined classifier (level 0: the axis classifier; level 1: class 2) and its exact L1 radius."""
    m_s, m_c = SELECTOR.margin(x), CLASSIFIER.margin(x)
    side = (m_s > 0).long()
    truth_class = torch.where(side == 0, (m_c > 0).long(), torch.tensor(2))
    truth_radius = torch.where(side == 0, torch.minimum(m_s.abs(), m_c.abs()), m_s.abs())
    return side, truth_class, truth_radius


def dual_violations(seeds=10, count=80, n=300, alpha=0.2, sequential=False):
    """(violations of the certificate, violations of the classifier's radius alone, certified, trials)."""
    x = inputs(count)
    _, truth_class, truth_radius = dual_truth(x)
    bad = ignoring_selector = certified = 0
    for seed in range(seeds):
        r = certify_dual(
            [CLASSIFIER, always_two],
            SELECTOR,
            x,
            LEVELS,
            selector_sigma=THETA_E,
            n0=20,
            n=n,
            alpha=alpha,
            seed=seed,
            batch_size=8192,
            noise="uniform",
            **({"sequential": True, "tolerance": 0.05} if sequential else {}),
        )
        assert r.norm == "l1" and r.selector.norm == "l1" and r.classifier.norm == "l1"
        ok = r.prediction != ABSTAIN
        certified += int(ok.sum())
        bad += int((ok & ((r.prediction != truth_class) | (r.radius > truth_radius))).sum())
        ignoring_selector += int((ok & (r.radius_classifier > truth_radius)).sum())
    return bad, ignoring_selector, certified, seeds * count


def bound(trials, alpha):
    """What a sound certificate passes: a one-sided binomial bound at level 1e-4."""
    return stats.binom.ppf(1 - 1e-4, trials, alpha)


# ---------------------------------------------------------------- certify_dual in L1


def test_dual_l1_is_sound_and_forgetting_the_selector_is_caught():
    alpha = 0.2
    bad, ignoring_selector, certified, trials = dual_violations(alpha=alpha)
    assert bad <= bound(trials, alpha)
    assert certified > trials // 3  # not sound by abstaining
    # negative control: the classifier's radius alone (no min with the selector's) overreaches
    assert ignoring_selector > bound(trials, alpha)


def test_dual_l1_with_the_l2_formula_is_caught(monkeypatch):
    """Negative control: the same check, with the Gaussian radius sigma * Phi^-1(p_lower) in place of
    theta * (2 p_lower - 1) for both stages, fails."""
    monkeypatch.setattr(noise, "l1_radius", lambda p, t: noise.stats.certified_radius(p, t))
    alpha = 0.2
    bad, _, _, trials = dual_violations(alpha=alpha)
    assert bad > bound(trials, alpha)


def test_sequential_dual_l1_is_sound():
    alpha = 0.2
    bad, _, certified, trials = dual_violations(seeds=6, alpha=alpha, sequential=True)
    assert bad <= bound(trials, alpha) and certified > trials // 3


def test_dual_l1_radius_is_the_min_and_tight():
    """With many samples the certificate approaches the exact L1 distance min(|m_s|, |m_c|) from below."""
    x = inputs(30, seed=3, spread=0.22)  # margins inside both cubes: the radius is not capped by theta
    r = certify_dual(
        CLASSIFIER, SELECTOR, x, LEVELS, selector_sigma=THETA_E, n0=50, n=20_000, alpha=0.002, seed=1,
        noise="uniform", batch_size=100_000,
    )  # fmt: skip
    ok = r.prediction != ABSTAIN
    assert int(ok.sum()) >= 25
    torch.testing.assert_close(r.radius[ok], torch.minimum(r.radius_selector, r.radius_classifier)[ok])
    assert bool((r.radius[~ok] == 0).all())
    # the two radii are CERTIFY's L1 radii theta (2 p_lower - 1) at their own half-widths
    torch.testing.assert_close(r.radius_selector[ok], THETA_E * (2 * r.selector.p_lower[ok] - 1))
    torch.testing.assert_close(r.radius_classifier[ok], r.sigma[ok] * (2 * r.classifier.p_lower[ok] - 1))
    truth = torch.minimum(SELECTOR.margin(x).abs(), CLASSIFIER.margin(x).abs())
    gap = (truth - r.radius)[ok]
    assert float(gap.min()) >= 0 and float(gap.max()) < 0.03  # n = 20 000: within 0.03 of the truth


def test_dual_l1_noise_is_certify_noise_and_batching_does_not_matter():
    x = inputs(12, seed=5)
    index = torch.arange(100, 112)
    kw = dict(selector_sigma=THETA_E, n0=20, n=400, alpha=0.01, seed=9, noise="uniform")
    r = certify_dual(CLASSIFIER, SELECTOR, x, LEVELS, index=index, batch_size=37, **kw)
    ok = r.level != ABSTAIN
    plain = certify(
        CLASSIFIER, x[ok], r.sigma[ok], n0=20, n=400, alpha=0.005, seed=9, index=index[ok], noise="uniform"
    )
    assert torch.equal(r.classifier.counts[ok], plain.counts) and torch.equal(
        r.radius_classifier[ok], plain.radius
    )
    gaussian = certify_dual(CLASSIFIER, SELECTOR, x, LEVELS, index=index, **{**kw, "noise": "gaussian"})
    assert gaussian.norm == "l2" and not torch.equal(gaussian.selector.counts, r.selector.counts)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    for batch_size, sequential in ((5, False), (999, False), (7, True), (4096, True)):
        extra = {"sequential": True} if sequential else {}
        base = certify_dual(CLASSIFIER, SELECTOR, x, LEVELS, index=index, batch_size=64, **kw, **extra)
        other = certify_dual(
            CLASSIFIER, SELECTOR, x[perm], LEVELS, index=index[perm], batch_size=batch_size, **kw, **extra
        )
        for field in ("prediction", "radius", "level", "radius_selector", "radius_classifier", "samples"):
            assert torch.equal(getattr(other, field), getattr(base, field)[perm]), field
        assert other.norm == "l1"


# ---------------------------------------------------------------- the cascade in L1


def cascade_truth(experts, levels, p0):
    """The cascade's exact decision along the axis: level k (theta_k) answers where
    |t - offset| >= theta_k (2 p0 - 1), i.e. where the class's probability 1/2 + |d| / (2 theta_k) >= p0."""
    return cascade_truth_at(experts, levels, 2 * p0 - 1)  # Step.smoothed's threshold, in theta units


# Near t = 0 the top level (theta 1) abstains (|t| < 0.2), the lower one answers class 1 with a radius up
# to 2 * 0.5 * (1 - 0.6) = 0.4, but at t = -0.2 the top level answers class 0: a radius that ignores the
# top level's abstention region overreaches.
DANGER = dict(levels=[0.5, 1.0], offsets=[-1.5, 0.0], p0=0.6)


def cascade_violations(seeds=12, count=60, n=400, alpha=0.05):
    w = axis(2)
    experts = [Step(w, o) for o in DANGER["offsets"]]
    h, breakpoints = cascade_truth(experts, DANGER["levels"], DANGER["p0"])
    g = np.random.default_rng(3)
    ts = g.uniform(-1.2, 1.2, size=count)
    ts[: count // 2] = g.uniform(-0.05, 0.05, size=count // 2)  # where the top level abstains
    x = _points(w, ts)
    bad = {"radius": 0, "radius_level": 0}
    certified = 0
    levels_used = set()
    for seed in range(seeds):
        r = certify_cascade(
            experts, x, DANGER["levels"], threshold=DANGER["p0"], n0=20, n=n, alpha=alpha, seed=seed,
            batch_size=8192, noise="uniform",
        )  # fmt: skip
        assert r.norm == "l1"
        for b, t in enumerate(ts):
            c = int(r.prediction[b])
            if c == ABSTAIN:
                continue
            certified += 1
            levels_used.add(int(r.level[b]))
            for field in bad:
                if c != h(t) or float(getattr(r, field)[b]) > _radius_of(h, t, c, breakpoints) + 1e-9:
                    bad[field] += 1
    return bad, certified, seeds * count, levels_used


def test_cascade_l1_is_sound_and_dropping_the_levels_above_is_caught():
    alpha = 0.05
    bad, certified, trials, levels_used = cascade_violations(alpha=alpha)
    assert bad["radius"] <= bound(trials, alpha)
    assert certified > trials // 3 and levels_used == {0, 1}
    # negative control: the answering level's radius alone, without the abstention radii above
    assert bad["radius_level"] > bound(trials, alpha)


def test_cascade_l1_with_the_l2_formula_is_caught(monkeypatch):
    """Negative control: sigma (Phi^-1(L) - Phi^-1(p0)) with uniform noise overreaches."""
    real = routing._gap
    monkeypatch.setattr(routing, "_gap", lambda family, *args: real(noise.GAUSSIAN, *args))
    alpha = 0.05
    bad, _, trials, _ = cascade_violations(alpha=alpha)
    assert bad["radius"] > bound(trials, alpha)


def test_cascade_l1_radii_are_the_lipschitz_ones():
    """Level k's radius is 2 theta_k (L - p0) with L at its share of alpha, the abstention radius
    2 theta_k (p0 - U); at p0 = 1/2 one level is CERTIFY's L1 radius theta (2 L - 1)."""
    w = axis(0)
    experts = [Step(w, o) for o in DANGER["offsets"]]
    x = _points(w, [0.0, 0.01, 1.1, -1.1])
    r = certify_cascade(
        experts, x, DANGER["levels"], threshold=0.6, n0=20, n=2000, alpha=0.02, seed=1, noise="uniform"
    )
    assert r.level.tolist() == [0, 0, 1, 1] and r.prediction.tolist() == [1, 1, 1, 0]
    low = certify(experts[0], x[:2], 0.5, n0=20, n=2000, alpha=0.01, seed=1, noise="uniform")
    np.testing.assert_allclose(r.radius_level[:2].numpy(), 2 * 0.5 * (low.p_lower.numpy() - 0.6), rtol=1e-12)
    top = certify(experts[1], x[2:], 1.0, n0=20, n=2000, alpha=0.005, seed=1, index=[2, 3], noise="uniform")
    np.testing.assert_allclose(r.radius_level[2:].numpy(), 2 * 1.0 * (top.p_lower.numpy() - 0.6), rtol=1e-12)
    # the top level's abstention radius near t = 0: 2 * 1 * (0.6 - U), U the upper bound at alpha / 4
    counts = certify(experts[1], x[:2], 1.0, n0=20, n=2000, alpha=0.01, seed=1, noise="uniform").counts
    upper = stats.beta.ppf(1 - 0.005, counts.max(1).values.numpy() + 1, 2000 - counts.max(1).values.numpy())
    np.testing.assert_allclose(r.radius_above[:2].numpy(), 2 * (0.6 - upper), rtol=1e-9)
    torch.testing.assert_close(r.radius, torch.minimum(r.radius_level, r.radius_above))
    one = certify_cascade([experts[0]], x, [0.5], n0=30, n=500, alpha=0.01, seed=4, noise="uniform")
    plain = certify(experts[0], x, 0.5, n0=30, n=500, alpha=0.01, seed=4, noise="uniform")
    assert torch.equal(one.prediction, plain.prediction)
    torch.testing.assert_close(one.radius, plain.radius, rtol=1e-12, atol=1e-12)


def test_cascade_l1_batching_and_order_do_not_matter():
    w = axis(1)
    experts = [Step(w, 0.3, True), Step(w, -0.4), Step(w, 0.1)]
    x = _points(w, np.linspace(-2, 2, 17))
    index = torch.arange(40, 57)
    kw = dict(threshold=0.7, n0=20, n=300, alpha=0.05, seed=7, noise="uniform")
    r = certify_cascade(experts, x, [0.25, 0.5, 1.0], index=index, batch_size=64, **kw)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(0))
    s = certify_cascade(experts, x[perm], [0.25, 0.5, 1.0], index=index[perm], batch_size=999, **kw)
    for field in ("prediction", "radius", "level", "radius_level", "radius_above", "stopped", "samples"):
        assert torch.equal(getattr(s, field), getattr(r, field)[perm]), field
    assert len(set(r.level.tolist()) - {ABSTAIN}) >= 2


# ---------------------------------------------------------------- confidence routing in L1


def test_confidence_routing_l1_is_sound_through_certify_dual():
    """Level 0: class 2 everywhere; level 1: a step of slope s along an axis, whose top softmax is >= tau
    where |t| >= c = logit(tau) / s. Smoothed with uniform noise of half-width theta_e, the selector's vote
    for level 1 is P(|t + theta_e u| >= c), which crosses 1/2 at m* (here m* = c, as c >= theta_e / 2). The
    combined classifier is 2 for |t| < m* and the step's class beyond; the classifier's radius alone
    (negative control) overreaches near m*."""
    w = axis(2)
    scale, tau, theta_e = 4.0, 0.9, 0.5
    step = Step(w, 0.0, scale=scale, classes=3)
    selector = ConfidenceSelector([always_two, step], [tau])
    c = float(logit(tau)) / scale

    def vote(m):  # P(t + theta_e u >= c) + P(t + theta_e u <= -c), u uniform on [-1, 1]
        def above(z):
            return float(np.clip((theta_e - z) / (2 * theta_e), 0, 1))

        return above(c - m) + above(c + m) - 0.5

    m_star = optimize.brentq(vote, 0.0, 5.0)
    assert m_star == pytest.approx(c)

    def h(t):
        return 2 if abs(t) < m_star else (ABSTAIN if t == 0 else int(t > 0))

    g = np.random.default_rng(4)
    ts = np.concatenate([g.uniform(-1.5 * m_star, 1.5 * m_star, 40), g.uniform(-2, 2, 20)])
    x = _points(w, ts)
    alpha = 0.2
    bad = bad_control = certified = trials = 0
    for seed in range(10):
        r = certify_dual(
            [always_two, step], selector, x, [0.25, 0.5], selector_sigma=theta_e, n0=20, n=300, alpha=alpha,
            seed=seed, batch_size=8192, noise="uniform",
        )  # fmt: skip
        assert r.norm == "l1"
        for b, t in enumerate(ts):
            trials += 1
            cls = int(r.prediction[b])
            if cls == ABSTAIN:
                continue
            certified += 1
            truth = _radius_of(h, t, cls, [-m_star, 0.0, m_star])
            bad += cls != h(t) or float(r.radius[b]) > truth + 1e-9
            bad_control += cls != h(t) or float(r.radius_classifier[b]) > truth + 1e-9
    assert bad <= bound(trials, alpha) and certified > trials // 3
    assert bad_control > bound(trials, alpha)


# ---------------------------------------------------------------- selector labels and training in L1


def test_level_radii_and_labels_are_l1_certificates():
    x = inputs(10, seed=7, spread=0.4)
    y = (CLASSIFIER.margin(x) > 0).long()
    radii = level_radii(CLASSIFIER, x, y, LEVELS, n0=16, n=256, alpha=0.01, seed=3, noise="uniform")
    for k, theta in enumerate(LEVELS):
        r = certify(CLASSIFIER, x, theta, n0=16, n=256, alpha=0.01, seed=3, noise="uniform")
        want = torch.where(r.prediction == y, r.radius, torch.full_like(r.radius, -1.0))
        assert torch.equal(radii[:, k], want)
        assert bool((radii[:, k] <= theta).all())  # an L1 radius never exceeds theta
    labels = best_level(CLASSIFIER, x, y, LEVELS, n0=16, n=256, alpha=0.01, seed=3, noise="uniform")
    assert torch.equal(labels, radii.argmax(1))
    gaussian = level_radii(CLASSIFIER, x, y, LEVELS, n0=16, n=256, alpha=0.01, seed=3)
    assert not torch.equal(gaussian, radii)

    def fit(x_rest, y_rest, fold):
        return CLASSIFIER

    crossed = cross_fit_radii(fit, x, y, LEVELS, folds=2, n0=16, n=256, alpha=0.01, seed=3, noise="uniform")
    torch.testing.assert_close(crossed, radii)  # the same model: the same radii (input i is stream i)


class Recorder(torch.nn.Module):
    """A trainable selector that records the inputs it is trained on."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(DIM, 2)
        self.seen = []

    def forward(self, z):
        self.seen.append(z.detach().clone())
        return self.linear(z)


def test_train_selector_augments_with_uniform_noise():
    x = torch.zeros(256, DIM)
    labels = torch.zeros(256, dtype=torch.int64)
    net = Recorder()
    train_selector(net, x, labels, selector_sigma=0.3, epochs=1, batch_size=256, seed=0, noise="uniform")
    z = torch.cat(net.seen)
    assert float(z.abs().max()) <= 0.3 and float(z.abs().max()) > 0.29  # on the cube [-theta, theta]^D
    assert float(z.var()) == pytest.approx(0.3**2 / 3, rel=0.1)  # uniform: variance theta^2 / 3
    net = Recorder()
    train_selector(net, x, labels, selector_sigma=0.3, epochs=1, batch_size=256, seed=0)
    assert float(torch.cat(net.seen).abs().max()) > 0.6  # Gaussian augmentation is unbounded


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: certify_dual(CLASSIFIER, SELECTOR, inputs(2), LEVELS, selector_sigma=0.3, noise="laplace"),
         ValueError, "noise must be one of"),
        (lambda: certify_dual(CLASSIFIER, SELECTOR, inputs(2), LEVELS, selector_sigma=0.0, noise="uniform"),
         ValueError, "selector_sigma \\(theta, the uniform noise's half-width\\)"),
        (lambda: certify_dual(CLASSIFIER, SELECTOR, inputs(2), LEVELS, selector_sigma=0.3, noise=1),
         TypeError, "noise must be one of"),
        (lambda: certify_cascade(CLASSIFIER, inputs(2), LEVELS, noise="laplace"), ValueError,
         "noise must be one of"),
        (lambda: certify_cascade(CLASSIFIER, inputs(2), [0.5, 0.25], noise="uniform"), ValueError,
         "strictly increasing"),
        (lambda: level_radii(CLASSIFIER, inputs(2), [0, 1], LEVELS, noise="l1"), ValueError,
         "noise must be one of"),
        (lambda: train_selector(Recorder(), inputs(2).float(), [0, 1], selector_sigma=0.3, noise="l1"),
         ValueError, "noise must be one of"),
    ],
)  # fmt: skip
def test_bad_input_says_what_to_change(call, error, match):
    with pytest.raises(error, match=match):
        call()
