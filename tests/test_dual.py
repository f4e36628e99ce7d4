"""Dual certification (certify_dual): soundness against closed-form linear selector and classifier,
the alpha split, order independence, experts, abstention and bad arguments (issue 11)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddrs_ext import ABSTAIN, certify
from ddrs_ext.dual import (
    best_level,
    certify_dual,
    check_sigma_levels,
    nearest_level,
    selector_seed,
    train_selector,
)


class Halfspace(torch.nn.Module):
    """Two outputs split by the hyperplane w.x + b = 0: logits (0, w.x + b). Smoothed at any sigma its
    decision is the same half-space, so the true radius within which it is constant at x is the
    distance |w.x + b| / ||w||."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w.flatten().double(), float(b)

    def margin(self, x):
        return x.flatten(1).double() @ self.w + self.b

    def distance(self, x):
        return self.margin(x).abs() / self.w.norm()

    def forward(self, x):
        s = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def _pair(dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    selector = Halfspace(torch.randn(dim, generator=g, dtype=torch.float64), 0.2)
    classifier = Halfspace(torch.randn(dim, generator=g, dtype=torch.float64), -0.1)
    return selector, classifier


def _points(count, dim=6, seed=1, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, generator=g, dtype=torch.float64) * scale


LEVELS = [0.25, 0.5]


class ThreeWay(torch.nn.Module):
    """Expert for level 0: the half-space classifier's two classes, class 2 impossible (-inf)."""

    def __init__(self, halfspace):
        super().__init__()
        self.halfspace = halfspace

    def forward(self, x):
        out = self.halfspace(x)
        return torch.cat([out, torch.full_like(out[:, :1], -math.inf)], 1)


def always_two(x):
    """Expert for level 1: class 2 everywhere."""
    return torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype).expand(len(x), 3)


@pytest.mark.slow
@pytest.mark.parametrize("alpha_selector", [None, 0.05])
def test_sound_against_the_true_radii(alpha_selector):
    """Over many inputs and seeds, certified answers are wrong or their radii exceed the truth no more
    often than alpha allows. With experts (half-space at level 0, constant class 2 at level 1) the
    combined classifier h is the half-space's class where the smoothed selector picks level 0 and
    class 2 elsewhere, so its true radius at x is min(selector distance, half-space distance) on the
    level-0 side and the selector distance on the other: the selector's radius matters."""
    selector, classifier = _pair()
    x = _points(60)
    alpha = 0.2
    d_sel, d_cls = selector.distance(x), classifier.distance(x)
    side = (selector.margin(x) > 0).long()  # the smoothed selector's true level
    truth_class = torch.where(side == 0, (classifier.margin(x) > 0).long(), torch.tensor(2))
    truth_radius = torch.where(side == 0, torch.minimum(d_sel, d_cls), d_sel)
    trials = bad = bad_sel = bad_cls = certified = ignoring_selector = 0
    for seed in range(25):
        r = certify_dual(
            [ThreeWay(classifier), always_two],
            selector,
            x,
            LEVELS,
            selector_sigma=0.3,
            n0=20,
            n=300,
            alpha=alpha,
            alpha_selector=alpha_selector,
            seed=seed,
            batch_size=4096,
        )
        ok = r.prediction != ABSTAIN
        trials += x.shape[0]
        certified += int(ok.sum())
        bad += int((ok & ((r.prediction != truth_class) | (r.radius > truth_radius))).sum())
        ignoring_selector += int((ok & (r.radius_classifier > truth_radius)).sum())
        chose = r.level != ABSTAIN
        bad_sel += int((chose & ((r.level != side) | (r.radius_selector > d_sel))).sum())
        on_a = (r.classifier.prediction != ABSTAIN) & (r.level == 0)
        bad_cls += int((on_a & (r.radius_classifier > d_cls)).sum())
    # one-sided binomial bounds at level 1e-4: what a sound certificate passes
    assert bad_sel <= stats.binom.ppf(1 - 1e-4, trials, r.alpha_selector)
    assert bad_cls <= stats.binom.ppf(1 - 1e-4, trials, r.alpha_classifier)
    assert bad <= stats.binom.ppf(1 - 1e-4, trials, alpha)
    assert certified > trials // 3  # and it is not sound by abstaining
    # the test has teeth: without the selector's radius, the answers would often overreach
    assert ignoring_selector > stats.binom.ppf(1 - 1e-4, trials, alpha)


def test_radius_is_the_smaller_of_the_two_and_tight():
    selector, classifier = _pair()
    x = _points(40, seed=3)
    r = certify_dual(classifier, selector, x, LEVELS, selector_sigma=0.3, n0=50, n=4000, alpha=0.002, seed=1)
    ok = r.prediction != ABSTAIN
    assert ok.sum() > 20
    torch.testing.assert_close(r.radius[ok], torch.minimum(r.radius_selector, r.radius_classifier)[ok])
    assert bool((r.radius[~ok] == 0).all())
    truth = torch.minimum(selector.distance(x), classifier.distance(x))
    # with n = 4000 the certified radius is a large share of what the two balls allow
    assert float((r.radius[ok] / truth[ok]).median()) > 0.5


def test_the_alpha_split_is_explicit_and_used():
    selector, classifier = _pair()
    x = _points(8, seed=4)
    r = certify_dual(
        classifier,
        selector,
        x,
        LEVELS,
        selector_sigma=0.3,
        n0=20,
        n=500,
        alpha=0.01,
        alpha_selector=0.004,
        seed=2,
    )
    assert (r.alpha_selector, r.alpha_classifier) == (0.004, pytest.approx(0.006))
    # each CERTIFY used its own share: the lower bounds are Clopper-Pearson at that level
    for res, a in ((r.selector, 0.004), (r.classifier, r.alpha_classifier)):
        for b in range(8):
            if res.prediction[b] == ABSTAIN or res.samples[b] == 0:
                continue
            n_a = int(res.counts[b, res.prediction[b]])
            assert float(res.p_lower[b]) == pytest.approx(stats.beta.ppf(a, n_a, 500 - n_a + 1), rel=1e-12)
    default = certify_dual(
        classifier, selector, x, LEVELS, selector_sigma=0.3, n0=20, n=500, alpha=0.01, seed=2
    )
    assert default.alpha_selector == default.alpha_classifier == 0.005


def test_classifier_noise_is_certify_noise_and_order_does_not_matter():
    selector, classifier = _pair()
    x = _points(12, seed=5)
    index = torch.arange(100, 112)
    kw = dict(selector_sigma=0.3, n0=20, n=400, alpha=0.01, seed=9)
    r = certify_dual(classifier, selector, x, LEVELS, index=index, batch_size=37, **kw)
    ok = r.level != ABSTAIN
    plain = certify(classifier, x[ok], r.sigma[ok], n0=20, n=400, alpha=0.005, seed=9, index=index[ok])
    assert torch.equal(r.classifier.counts[ok], plain.counts)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = certify_dual(classifier, selector, x[perm], LEVELS, index=index[perm], batch_size=5, **kw)
    for field in ("prediction", "radius", "level", "radius_selector", "radius_classifier", "samples"):
        assert torch.equal(getattr(shuffled, field), getattr(r, field)[perm]), field
    alone = certify_dual(classifier, selector, x[3:4], LEVELS, index=index[3:4], **kw)
    assert torch.equal(alone.radius, r.radius[3:4]) and torch.equal(alone.prediction, r.prediction[3:4])


def test_one_model_per_level():
    selector, classifier = _pair()
    x = _points(16, seed=6)

    def constant(c):
        return lambda z: torch.nn.functional.one_hot(torch.full((len(z),), c), 3).to(z.dtype) * 5

    kw = dict(selector_sigma=0.3, n0=20, n=300, alpha=0.01, seed=3)
    r = certify_dual([constant(0), constant(2)], selector, x, LEVELS, **kw)
    ok = r.level != ABSTAIN
    assert bool(ok.any()) and set(r.level[ok].tolist()) == {0, 1}
    assert torch.equal(r.prediction[ok], torch.tensor([0, 2])[r.level[ok]])
    same = certify_dual([classifier, classifier], selector, x, LEVELS, **kw)
    single = certify_dual(classifier, selector, x, LEVELS, **kw)
    assert torch.equal(same.radius, single.radius) and torch.equal(same.prediction, single.prediction)


def test_selector_abstention_abstains_without_running_the_classifier():
    selector, classifier = _pair()
    x = torch.zeros(3, 6, dtype=torch.float64)
    x[:] = -selector.b * selector.w / selector.w.norm() ** 2  # exactly on the selector's boundary
    calls = []

    def counting(z):
        calls.append(len(z))
        return classifier(z)

    r = certify_dual(counting, selector, x, LEVELS, selector_sigma=0.3, n0=20, n=200, alpha=0.01, seed=0)
    assert r.level.tolist() == [ABSTAIN] * 3 and r.prediction.tolist() == [ABSTAIN] * 3
    assert bool(torch.isnan(r.sigma).all()) and r.radius.tolist() == [0.0] * 3
    assert calls == [] and r.samples.tolist() == [220] * 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sigma_levels=[0.5, 0.25]), ValueError, "strictly increasing"),
        (dict(sigma_levels=[0.25, 0.25]), ValueError, "strictly increasing"),
        (dict(sigma_levels=[0.0, 0.5]), ValueError, "finite and > 0"),
        (dict(sigma_levels=[0.25, math.inf]), ValueError, "finite and > 0"),
        (dict(sigma_levels=[]), ValueError, "non-empty"),
        (dict(sigma_levels=[[0.25, 0.5]]), ValueError, "1-d"),
        (dict(sigma_levels="abc"), TypeError, "sequence of numbers"),
        (dict(sigma_levels=[0.1, 0.25, 0.5]), ValueError, "one logit per sigma level \\(3 levels\\)"),
        (dict(selector_sigma=0.0), ValueError, "selector_sigma must be a finite number > 0"),
        (dict(alpha_selector=0.01), ValueError, "alpha_selector must be smaller than alpha"),
        (dict(alpha=1.5), ValueError, "alpha must lie strictly between 0 and 1"),
        (dict(model=[None]), ValueError, "list of 1 models but there are 2 sigma levels"),
        (dict(selector_n=0), ValueError, "selector_n must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    selector, classifier = _pair()
    args = dict(model=classifier, sigma_levels=LEVELS, selector_sigma=0.3, n0=5, n=20, alpha=0.01, seed=0)
    args.update(kwargs)
    model, levels = args.pop("model"), args.pop("sigma_levels")
    with pytest.raises(error, match=match):
        certify_dual(model, selector, _points(3), levels, **args)


def test_nearest_level_and_seeds():
    assert nearest_level([0.1, 0.2, 0.36, 0.9, 5.0], [0.12, 0.25, 0.5]).tolist() == [0, 1, 2, 2, 2]
    assert nearest_level([math.sqrt(0.12 * 0.25)], [0.12, 0.25]).tolist() == [0]  # a tie: the lower
    with pytest.raises(ValueError, match="finite and > 0"):
        nearest_level([0.0], [0.12])
    assert check_sigma_levels((1, 2)).dtype == torch.float64
    seeds = {selector_seed(s) for s in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**64 for s in seeds) and selector_seed(7) != 7


def test_train_selector_learns_the_levels():
    selector_truth, _ = _pair()
    x = _points(400, seed=8).float()
    labels = (selector_truth.margin(x) > 0).long()
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    net.eval()
    losses = train_selector(net, x, labels, selector_sigma=0.1, epochs=30, batch_size=64, lr=1e-2, seed=0)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert not net.training  # its mode is restored
    accuracy = float((net(x).argmax(1) == labels).float().mean())
    assert accuracy > 0.9
    again = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    again.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="one entry per input"):
        train_selector(again, x, labels[:3], selector_sigma=0.1, epochs=1)
    np.testing.assert_array_equal(
        train_selector(torch.nn.Linear(6, 2).requires_grad_(True), x, labels, selector_sigma=0.1, epochs=0),
        [],
    )


def test_best_level_takes_the_largest_correct_certificate():
    _, classifier = _pair()
    w = classifier.w / classifier.w.norm()
    offset = -classifier.b / classifier.w.norm() * w  # a point on the boundary
    x = torch.stack([offset + 3.0 * w, offset + 0.02 * w, offset - 3.0 * w])  # far, near, far (class 0)
    y = torch.tensor([1, 1, 1])  # the third input's label is wrong at every level
    labels = best_level(classifier, x, y, [0.1, 0.5, 1.0], n0=32, n=400, alpha=0.01, seed=0)
    assert labels[0] == 2  # far from the boundary the largest sigma certifies the largest radius
    assert labels[2] == 0  # wrong everywhere: all -1, the lowest level
    with pytest.raises(ValueError, match="one label per input"):
        best_level(classifier, x, y[:2], [0.1, 0.5])


# ---------------------------------------------------------------- noise independence (issue 17)


class Spy(torch.nn.Module):
    """A half-space model on 64-d inputs that records every batch it is given."""

    def __init__(self, w, b):
        super().__init__()
        self.halfspace = Halfspace(w, b)
        self.batches = []

    def forward(self, z):
        self.batches.append(z.clone())
        return self.halfspace(z)


def dual_noise(seed=5):
    """The Gaussian draws of the selector (smoothed at 0.3) and of the classifier (certified at level
    0.5) on four inputs at 0, where the selector certifies level 1: two (4 * (64 + 64), 64) matrices,
    row r of each being the same phase, input and sample."""
    dim = 64
    w = torch.zeros(dim, dtype=torch.float64)
    w[0] = 1.0
    selector = Spy(w, 1.0)  # margin 1 = 3.3 selector sigmas: level 1 is certified
    classifier = Spy(torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0.1)
    x = torch.zeros(4, dim, dtype=torch.float64)
    r = certify_dual(
        classifier,
        selector,
        x,
        LEVELS,
        selector_sigma=0.3,
        n0=64,
        n=64,
        alpha=0.01,
        seed=seed,
        batch_size=512,
    )
    assert r.level.tolist() == [1] * 4 and len(selector.batches) == len(classifier.batches) == 1
    return selector.batches[0] / 0.3, classifier.batches[0] / LEVELS[1]


def assert_independent(selector_noise, classifier_noise):
    """The selector's draws are uncorrelated with the classifier's at the same positions, and no
    selector draw (a 64-d row) is, up to scale, any classifier draw."""
    a, b = selector_noise.flatten(), classifier_noise.flatten()
    matched = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    # 32768 pairs: under independence r has sd 0.0055; the limit is 6 sd.
    assert abs(matched) < 6 / math.sqrt(a.numel()), f"selector and classifier noise correlate: r = {matched}"
    rows_a = selector_noise / selector_noise.norm(dim=1, keepdim=True)
    rows_b = classifier_noise / classifier_noise.norm(dim=1, keepdim=True)
    # independent 64-d Gaussian rows: |cos| has sd 1/8, and 0.9 is 7 sd beyond it
    cosine = float((rows_a @ rows_b.T).abs().max())
    assert cosine < 0.9, f"a selector draw repeats a classifier draw: |cos| = {cosine}"


def test_selector_and_classifier_noise_are_independent():
    assert_independent(*dual_noise())


def test_negative_control_shared_noise_is_caught(monkeypatch):
    """The selector keyed with the classifier's seed draws the classifier's noise: caught."""
    import ddrs_ext.dual as dual

    monkeypatch.setattr(dual, "selector_seed", lambda seed: seed)
    with pytest.raises(AssertionError, match="noise correlate"):
        assert_independent(*dual_noise())


def test_negative_control_shared_noise_at_other_positions_is_caught(monkeypatch):
    """The classifier's seed with the streams shifted by one input: no position matches, but the
    selector's draws for input b are the classifier's for input b - 1, which the row check catches."""
    import ddrs_ext.dual as dual

    plain = dual.certify

    def shifted(model, x, sigma, **kw):
        if kw["num_classes"] == len(LEVELS) and kw["seed"] == selector_seed(5):  # the selector's call
            kw.update(seed=5, index=kw["index"].roll(1))
        return plain(model, x, sigma, **kw)

    monkeypatch.setattr(dual, "certify", shifted)
    selector_noise, classifier_noise = dual_noise(seed=5)
    with pytest.raises(AssertionError, match="repeats a classifier draw"):
        assert_independent(selector_noise, classifier_noise)
