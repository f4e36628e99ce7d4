"""Training-free routes (ddrs_ext.routing): the cascade certificate and confidence routing through
certify_dual, held to closed-form experts whose smoothed decisions are known exactly, each with a negative
control (a deliberately unsound variant that the same check rejects)."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from scipy.special import logit

from ddrs_ext import ABSTAIN, certify, certify_dual
from ddrs_ext.routing import ConfidenceSelector, cascade_alphas, certify_cascade

DIM = 4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _direction(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, generator=g, dtype=torch.float64)
    return w / w.norm()


class Step(torch.nn.Module):
    """Two classes split at t = w.x = offset (class 1 above, or below when ``flip``), optionally a third,
    impossible class. Smoothed at sigma: P(class above) = Phi((t - offset) / sigma) exactly, since w.eps
    is standard normal for a unit w."""

    def __init__(self, w, offset, flip=False, scale=50.0, classes=2):
        super().__init__()
        self.w, self.offset, self.flip, self.scale, self.classes = (
            w,
            float(offset),
            bool(flip),
            scale,
            classes,
        )

    def forward(self, x):
        s = (x.flatten(1).double() @ self.w - self.offset) * self.scale
        if self.flip:
            s = -s
        out = [torch.zeros_like(s), s]
        if self.classes == 3:
            out.append(torch.full_like(s, -math.inf))
        return torch.stack(out, 1).to(x.dtype)

    def smoothed(self, t, sigma, z0):
        """g at projection t: the class whose probability is >= Phi(z0), or ABSTAIN."""
        d = t - self.offset
        if abs(d) < sigma * z0 or (z0 == 0 and d == 0):
            return ABSTAIN
        return int(d > 0) ^ int(self.flip)


def _points(w, ts):
    """Inputs whose projection on w is ts (plus an orthogonal part that changes nothing)."""
    g = torch.Generator().manual_seed(5)
    other = torch.randn(len(ts), DIM, generator=g, dtype=torch.float64)
    other -= (other @ w)[:, None] * w
    return torch.as_tensor(ts, dtype=torch.float64)[:, None] * w + other


def _radius_of(h, t, c, breakpoints):
    """Exact L2 radius around a point with projection t within which the 1-d decision h(t') stays c:
    h is constant between consecutive breakpoints, so look at every interval and breakpoint."""
    if h(t) != c:
        return -math.inf
    bps = sorted(set(breakpoints))
    candidates = [(b, b) for b in bps]  # isolated points
    edges = [-math.inf, *bps, math.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if math.isfinite(lo) and math.isfinite(hi):
            mid = (lo + hi) / 2
        else:
            mid = hi - 1 if math.isfinite(hi) else lo + 1
        if h(mid) != c:
            candidates.append((lo, hi))
    best = math.inf
    for lo, hi in candidates:
        if lo == hi and h(lo) == c:
            continue
        best = min(best, 0.0 if lo <= t <= hi else min(abs(t - lo), abs(t - hi)))
    return best


# ---------------------------------------------------------------- cascade


def _cascade_truth(experts, levels, p0):
    return cascade_truth_at(experts, levels, float(stats.norm.ppf(p0)))


def cascade_truth_at(experts, levels, z0):
    """The cascade's exact decision along the axis, with ``Step.smoothed``'s threshold ``z0`` (in units
    of each level's scale), and the points where it can change."""

    def h(t):
        for k in reversed(range(len(levels))):
            answer = experts[k].smoothed(t, levels[k], z0)
            if answer != ABSTAIN:
                return answer
        return ABSTAIN

    breakpoints = []
    for e, s in zip(experts, levels):
        breakpoints += [e.offset, e.offset - s * z0, e.offset + s * z0]
    return h, breakpoints


# Two configurations. "danger": near t = 0 the top level (sigma 1) abstains, the lower level answers
# class 1 with a large radius, and just below t = -Phi^-1(0.6) the top level answers class 0, so a radius
# that ignores the top level's abstention region overreaches. "three": three levels, mixed mappings.
CONFIGS = {
    "danger": dict(levels=[0.5, 1.0], offsets=[-1.5, 0.0], flips=[False, False], p0=0.6, spread=(-1.2, 1.2)),
    "three": dict(
        levels=[0.25, 0.5, 1.0], offsets=[0.3, -0.4, 0.1], flips=[True, False, False], p0=0.7, spread=(-2, 2)
    ),
}


def _cascade_runs(config, seeds=12, count=60, n=200, alpha=0.2):
    w = _direction()
    experts = [Step(w, o, f) for o, f in zip(config["offsets"], config["flips"])]
    h, breakpoints = _cascade_truth(experts, config["levels"], config["p0"])
    g = np.random.default_rng(3)
    ts = g.uniform(*config["spread"], size=count)
    if config is CONFIGS["danger"]:
        ts[: count // 2] = g.uniform(-0.12, 0.12, size=count // 2)  # where the top level abstains
    x = _points(w, ts)
    runs = []
    for seed in range(seeds):
        r = certify_cascade(
            experts,
            x,
            config["levels"],
            threshold=config["p0"],
            n0=20,
            n=n,
            alpha=alpha,
            seed=seed,
            batch_size=5000,
        )
        runs.append(r)
    truth_class = [h(t) for t in ts]
    return runs, ts, truth_class, lambda t, c: _radius_of(h, t, c, breakpoints)


def _violations(runs, ts, truth_class, radius_of, radius_field="radius"):
    bad = certified = 0
    for r in runs:
        radius = getattr(r, radius_field)
        for b, t in enumerate(ts):
            c = int(r.prediction[b])
            if c == ABSTAIN:
                continue
            certified += 1
            if c != truth_class[b] or float(radius[b]) > radius_of(t, c) + 1e-9:
                bad += 1
    return bad, certified


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cascade_is_sound_against_the_true_radii(name):
    """Over many inputs and seeds, certified answers are wrong or overreach no more often than alpha allows;
    a variant that drops the abstention radii of the levels above (negative control) is rejected by the
    same check in the configuration built to expose it."""
    alpha = 0.2
    runs, ts, truth_class, radius_of = _cascade_runs(CONFIGS[name], alpha=alpha)
    trials = len(runs) * len(ts)
    bound = stats.binom.ppf(1 - 1e-4, trials, alpha)
    bad, certified = _violations(runs, ts, truth_class, radius_of)
    assert bad <= bound
    assert certified > trials // 3  # not sound by abstaining
    levels_used = {int(v) for r in runs for v in r.level.tolist() if v != ABSTAIN}
    assert len(levels_used) >= 2  # answers come from the top and from below it
    if name == "danger":
        unsound, _ = _violations(runs, ts, truth_class, radius_of, radius_field="radius_level")
        assert unsound > bound


def test_one_level_is_certify():
    w = _direction(1)
    x = _points(w, np.linspace(-1, 1, 15))
    expert = Step(w, 0.1)
    r = certify_cascade([expert], x, [0.5], n0=30, n=500, alpha=0.01, seed=4)
    plain = certify(expert, x, 0.5, n0=30, n=500, alpha=0.01, seed=4)
    assert torch.equal(r.prediction, plain.prediction)
    torch.testing.assert_close(r.radius, plain.radius, rtol=1e-12, atol=1e-12)
    assert r.samples.tolist() == [530] * 15 and r.alpha_levels == (0.01,)


def test_radius_is_the_min_and_the_bounds_use_their_levels():
    """The radius is min(own radius, abstention radii above); the answering level's radius is
    sigma (Phi^-1(L) - Phi^-1(p0)) with L at alpha_k / 2 (alpha_k at the lowest level), and the levels
    are visited from the top only while they abstain."""
    config = CONFIGS["danger"]
    w = _direction()
    experts = [Step(w, o, f) for o, f in zip(config["offsets"], config["flips"])]
    x = _points(w, [0.0, 0.02, 1.1, -1.1, 0.3])
    r = certify_cascade(experts, x, config["levels"], threshold=0.6, n0=20, n=2000, alpha=0.02, seed=1)
    z0 = stats.norm.ppf(0.6)
    ok = r.prediction != ABSTAIN
    torch.testing.assert_close(r.radius[ok], torch.minimum(r.radius_level, r.radius_above)[ok])
    assert r.level.tolist()[:4] == [0, 0, 1, 1]
    assert r.prediction.tolist()[:4] == [1, 1, 1, 0]
    assert math.isinf(r.radius_above[2]) and r.radius_above[0] < 0.26  # top level abstains near t = 0
    assert r.samples.tolist()[:4] == [4040, 4040, 2020, 2020]
    # level k's counts are certify(expert_k)'s; its lower bound is at alpha_k (lowest) or alpha_k / 2
    low = certify(experts[0], x[:2], 0.5, n0=20, n=2000, alpha=0.01, seed=1)
    expected = 0.5 * (stats.norm.ppf(low.p_lower.numpy()) - z0)
    np.testing.assert_allclose(r.radius_level[:2].numpy(), expected, rtol=1e-12)
    top = certify(experts[1], x[2:4], 1.0, n0=20, n=2000, alpha=0.005, seed=1, index=[2, 3])
    np.testing.assert_allclose(r.radius_level[2:4].numpy(), 1.0 * (stats.norm.ppf(top.p_lower.numpy()) - z0))
    # near the top level's boundary neither bound decides: abstain at that level
    assert r.prediction[4] == ABSTAIN and r.stopped[4] == 1 and r.samples[4] == 2020


def test_order_batch_size_and_index_do_not_matter():
    config = CONFIGS["three"]
    w = _direction()
    experts = [Step(w, o, f) for o, f in zip(config["offsets"], config["flips"])]
    x = _points(w, np.linspace(-2, 2, 17))
    index = torch.arange(40, 57)
    kw = dict(threshold=0.7, n0=20, n=300, alpha=0.05, seed=7)
    r = certify_cascade(experts, x, config["levels"], index=index, batch_size=64, **kw)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(0))
    s = certify_cascade(experts, x[perm], config["levels"], index=index[perm], batch_size=999, **kw)
    for field in ("prediction", "radius", "level", "radius_level", "stopped", "samples"):
        assert torch.equal(getattr(s, field), getattr(r, field)[perm]), field
    one = certify_cascade(experts, x[5:6], config["levels"], index=index[5:6], **kw)
    assert torch.equal(one.radius, r.radius[5:6])


def test_one_model_for_every_level():
    w = _direction(2)
    expert = Step(w, 0.0)
    x = _points(w, [-2.0, 0.05, 2.0])
    a = certify_cascade(expert, x, [0.25, 1.0], n0=20, n=400, alpha=0.01, seed=0)
    b = certify_cascade([expert, expert], x, [0.25, 1.0], n0=20, n=400, alpha=0.01, seed=0)
    assert torch.equal(a.radius, b.radius) and torch.equal(a.prediction, b.prediction)
    assert a.level.tolist()[0] == 1 and a.level.tolist()[2] == 1  # far from the boundary: the top answers


def test_cascade_alphas():
    assert cascade_alphas(0.01, 2) == (0.005, 0.005)
    assert cascade_alphas(0.01, 2, [0.002, 0.008]) == (0.002, 0.008)
    with pytest.raises(ValueError, match="one entry per level"):
        cascade_alphas(0.01, 3, [0.002, 0.008])
    with pytest.raises(ValueError, match="more than alpha"):
        cascade_alphas(0.01, 2, [0.006, 0.006])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(threshold=0.4), ValueError, r"threshold must lie in \[0.5, 1\)"),
        (dict(threshold=1.0), ValueError, r"threshold must lie in \[0.5, 1\)"),
        (dict(threshold="high"), TypeError, "threshold must be a number"),
        (dict(alpha=0.0), ValueError, "alpha must lie strictly between 0 and 1"),
        (dict(alpha_levels=[0.001]), ValueError, "one entry per level"),
        (dict(sigma_levels=[1.0, 0.5]), ValueError, "strictly increasing"),
        (dict(model="three"), ValueError, "list of 3 models but there are 2 sigma levels"),
        (dict(n=0), ValueError, "n must be >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(index=[0]), ValueError, "one entry per input"),
    ],
)
def test_cascade_bad_arguments(kwargs, error, match):
    w = _direction()
    x = _points(w, [0.0, 1.0])
    args = dict(model=Step(w, 0.0), sigma_levels=[0.5, 1.0], n0=5, n=20, alpha=0.01, seed=0)
    args.update(kwargs)
    if args["model"] == "three":
        args["model"] = [Step(w, 0.0)] * 3
    model, levels = args.pop("model"), args.pop("sigma_levels")
    with pytest.raises(error, match=match):
        certify_cascade(model, x, levels, **args)


# ---------------------------------------------------------------- confidence routing (ACES-style)


def test_confidence_selector_routes_from_the_top():
    def constant(confidence, classes=3):
        # logits whose softmax puts `confidence` on class 0
        rest = (1 - confidence) / (classes - 1)
        logits = torch.log(torch.tensor([confidence] + [rest] * (classes - 1)))
        return lambda z: logits.to(z.dtype).expand(len(z), classes)

    z = torch.zeros(4, DIM)
    sel = ConfidenceSelector([constant(0.9), constant(0.6), constant(0.8)], [0.5, 0.85])
    assert sel(z).argmax(1).tolist() == [1] * 4  # level 2 not confident enough, level 1 is
    sel = ConfidenceSelector([constant(0.9), constant(0.6), constant(0.8)], [0.7, 0.75])
    assert sel(z).argmax(1).tolist() == [2] * 4
    sel = ConfidenceSelector([constant(0.9), constant(0.6), constant(0.8)], [0.7, 0.95])
    assert sel(z).argmax(1).tolist() == [0] * 4
    assert torch.equal(sel(z), torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.int64), 3).float())
    with pytest.raises(ValueError, match="one entry per level above the lowest"):
        ConfidenceSelector([constant(0.9), constant(0.6)], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"thresholds must lie in \(0, 1\]"):
        ConfidenceSelector([constant(0.9), constant(0.6)], [0.0])
    with pytest.raises(ValueError, match="at least 2 experts"):
        ConfidenceSelector([constant(0.9)], [])


def test_confidence_selector_puts_its_experts_in_eval_mode():
    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    expert.train()
    sel = ConfidenceSelector([lambda z: torch.zeros(len(z), 3), expert], [0.4])
    w = _direction()
    certify(sel, _points(w, [0.0, 1.0]).float(), 0.5, n0=5, n=50, seed=0)
    assert expert.training  # restored afterwards
    sel.eval()
    assert not expert.training  # the selector's mode reaches the experts


@pytest.mark.slow
def test_confidence_routing_is_sound_through_certify_dual():
    """Level 0: a constant expert (class 2); level 1: a step expert of slope s, whose top softmax is >= theta
    where |t| >= logit(theta) / s. The base selector picks level 1 there; smoothed at sigma_e it picks level 1
    where |t| > m*, with P(|m* + sigma_e Z| >= logit(theta) / s) = 1/2. The combined classifier is 2 for
    |t| < m* and the step's class beyond, so its exact radius is known. The negative control, the
    classifier's radius alone, overreaches near m*."""
    w = _direction(3)
    scale = 4.0
    step = Step(w, 0.0, scale=scale, classes=3)

    def always_two(z):
        return torch.tensor([0.0, 0.0, 1.0], dtype=z.dtype).expand(len(z), 3)

    theta = 0.9
    selector = ConfidenceSelector([always_two, step], [theta])
    sigma_e = 0.5
    c1 = float(logit(theta)) / scale

    def vote_level1(m):
        return stats.norm.cdf((m - c1) / sigma_e) + stats.norm.cdf((-m - c1) / sigma_e) - 0.5

    m_star = optimize.brentq(vote_level1, 0.0, 5.0)

    def h(t):
        return 2 if abs(t) < m_star else (ABSTAIN if t == 0 else int(t > 0))

    breakpoints = [-m_star, 0.0, m_star]
    g = np.random.default_rng(4)
    ts = np.concatenate([g.uniform(-1.5 * m_star, 1.5 * m_star, 40), g.uniform(-3, 3, 20)])
    x = _points(w, ts)
    alpha = 0.2
    bad = bad_control = certified = trials = 0
    for seed in range(15):
        r = certify_dual(
            [always_two, step],
            selector,
            x,
            [0.25, 0.5],
            selector_sigma=sigma_e,
            n0=20,
            n=300,
            alpha=alpha,
            seed=seed,
            batch_size=5000,
        )
        trials += len(ts)
        for b, t in enumerate(ts):
            c = int(r.prediction[b])
            if c == ABSTAIN:
                continue
            certified += 1
            truth = _radius_of(h, t, c, breakpoints)
            bad += float(r.radius[b]) > truth + 1e-9
            bad_control += float(r.radius_classifier[b]) > truth + 1e-9
    bound = stats.binom.ppf(1 - 1e-4, trials, alpha)
    assert bad <= bound
    assert certified > trials // 3
    assert bad_control > bound
