"""certify_dual(sequential=True): both stages stop early by the combined radius min(R_sigma, R_c); the
answers at the radii of interest are those of certify_dual, from fewer evaluations; sound against
closed-form selector and classifier (negative control: the full alpha at every round)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_dual import LEVELS, ThreeWay, _pair, _points, always_two

from ddrs_ext import ABSTAIN, sequential
from ddrs_ext.dual import certify_dual

RADII = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def _decisions(r, radii):
    """(B, R) bool: certified with r's class at each radius."""
    return (r.prediction != ABSTAIN)[:, None] & (r.radius[:, None] >= torch.tensor(radii)[None, :])


def test_sequential_answers_as_certify_dual_at_the_radii_of_interest():
    selector, classifier = _pair()
    x = _points(60, seed=2)
    kw = dict(selector_sigma=0.3, n0=50, n=20_000, alpha=0.01, seed=3)
    plain = certify_dual(classifier, selector, x, LEVELS, **kw)
    seq = certify_dual(classifier, selector, x, LEVELS, sequential=True, radius=RADII, **kw)
    differ = (_decisions(plain, RADII) != _decisions(seq, RADII)).sum(0)
    assert differ.max() <= 2  # inputs of 60, at any radius
    both = (plain.prediction != ABSTAIN) & (seq.prediction != ABSTAIN)
    assert torch.equal(plain.prediction[both], seq.prediction[both])
    assert torch.equal(plain.level[both], seq.level[both])
    assert seq.samples.sum() < 0.25 * plain.samples.sum()
    # the parts add up: each stage's samples, the combined radius the smaller one
    assert torch.equal(seq.samples, seq.selector.samples + seq.classifier.samples)
    ok = seq.prediction != ABSTAIN
    assert torch.equal(seq.radius[ok], torch.minimum(seq.radius_selector, seq.radius_classifier)[ok])
    assert (seq.radius[~ok] == 0).all()
    assert (seq.selector.bound_alpha <= seq.alpha_selector).all()
    assert (seq.classifier.bound_alpha <= seq.alpha_classifier).all()


def test_every_radius_runs_the_deciding_stage_to_n_with_certify_dual_counts():
    """tolerance=0: a stage stops only once no radius at all lies between what it has and what the pair
    can still reach, so the stage that sets the radius runs to n and its votes are certify_dual's."""
    selector, classifier = _pair()
    x = _points(30, seed=7)
    kw = dict(selector_sigma=0.3, n0=40, n=4000, alpha=0.01, seed=5)
    plain = certify_dual(classifier, selector, x, LEVELS, **kw)
    seq = certify_dual(classifier, selector, x, LEVELS, sequential=True, tolerance=0.0, **kw)
    for stage_seq, stage_plain in ((seq.selector, plain.selector), (seq.classifier, plain.classifier)):
        full = stage_seq.samples == 40 + 4000
        assert full.any()
        assert torch.equal(stage_seq.counts[full], stage_plain.counts[full])
    ok = (seq.prediction != ABSTAIN) & (plain.prediction != ABSTAIN)
    assert ok.sum() >= 10
    # where the smaller radius is the classifier's and it ran to n, the radius is certify_dual's at a share
    smaller_c = ok & (seq.radius_classifier <= seq.radius_selector) & (seq.classifier.samples == 4040)
    assert smaller_c.any()
    assert (seq.radius[smaller_c] <= plain.radius[smaller_c] + 1e-12).all()
    assert (seq.radius[smaller_c] >= plain.radius[smaller_c] - 0.01).all()  # a share of alpha costs little


def test_a_selector_that_abstains_costs_no_classifier_samples():
    selector, classifier = _pair()
    x = torch.zeros(3, 6, dtype=torch.float64)
    x[:] = -selector.b * selector.w / selector.w.norm() ** 2  # exactly on the selector's boundary
    calls = []

    def counting(z):
        calls.append(len(z))
        return classifier(z)

    r = certify_dual(
        counting, selector, x, LEVELS, selector_sigma=0.3, n0=20, n=5000, alpha=0.01, seed=0, sequential=True
    )
    assert r.level.tolist() == [ABSTAIN] * 3 and r.prediction.tolist() == [ABSTAIN] * 3
    assert bool(torch.isnan(r.sigma).all()) and r.radius.tolist() == [0.0] * 3
    assert calls == [] and (r.samples <= 20 + 5000).all() and torch.equal(r.samples, r.selector.samples)


def test_one_model_per_level_and_no_dependence_on_batching_or_order():
    selector, classifier = _pair()
    x = _points(16, seed=6)
    kw = dict(selector_sigma=0.3, n0=20, n=3000, alpha=0.01, seed=3, sequential=True, radius=RADII)
    experts = [ThreeWay(classifier), always_two]
    ref = certify_dual(experts, selector, x, LEVELS, **kw)
    ok = ref.level != ABSTAIN
    assert set(ref.level[ok].tolist()) == {0, 1}
    assert (ref.prediction[ok & (ref.level == 1)] == 2).all()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    runs = [
        (certify_dual(experts, selector, x, LEVELS, batch_size=7, **kw), torch.arange(16)),
        (certify_dual(experts, selector, x[perm], LEVELS, index=perm, batch_size=1000, **kw), perm),
    ]
    for run, order in runs:
        for field in ("prediction", "radius", "level", "radius_selector", "radius_classifier", "samples"):
            assert torch.equal(getattr(run, field), getattr(ref, field)[order]), field
        assert torch.equal(run.classifier.counts, ref.classifier.counts[order])


SPREAD = np.linspace(0.1, 0.6, 12)  # sigma levels
TRUE_RADIUS = 0.3


def _level_of_x1(z):
    """Selector: level k where x_1 is near 1000 k, so sure (noise of 0.3 moves x_1 by far less than the
    500 to another level's region) that its smoothed choice is constant within 500 of x."""
    return -(z[:, 1:2] / 1000 - torch.arange(len(SPREAD), dtype=z.dtype)[None, :]).abs() * 100


def _on_each_level(count: int):
    """Copies of a point at distance just below TRUE_RADIUS from the classifier's boundary x_0 = 0, each
    copy on its own sigma level (true P(class 1) = Phi(0.3 / sigma) from 0.69 to 0.999)."""
    x = torch.zeros(count, 3, dtype=torch.float64)
    x[:, 0] = TRUE_RADIUS - 1e-4
    x[:, 1] = 1000.0 * (torch.arange(count) % len(SPREAD))
    classifier = lambda z: torch.stack([torch.zeros_like(z[:, 0]), z[:, 0]], 1)  # noqa: E731
    return classifier, x


def _overreach(alpha: float, trials: int) -> int:
    classifier, x = _on_each_level(trials)
    r = certify_dual(
        classifier,
        _level_of_x1,
        x,
        SPREAD,
        selector_sigma=0.3,
        n0=20,
        n=2000,
        alpha=alpha,
        seed=4,
        batch_size=10**6,
        sequential=True,
        radius=TRUE_RADIUS + 1e-4,
    )
    assert torch.equal(r.level, torch.arange(trials) % len(SPREAD))
    assert (r.prediction == 1).float().mean() > 0.3
    return int(((r.prediction != ABSTAIN) & ((r.prediction != 1) | (r.radius > TRUE_RADIUS - 1e-4))).sum())


@pytest.mark.slow
def test_sound_against_the_true_radius_and_the_check_catches_a_per_round_bound(monkeypatch):
    """Over many inputs whose radius of interest lies just above the truth (an input stops on the first
    bound that passes it), certificates overreach no more often than alpha allows; with the full alpha at
    every round of both stages the same check fails."""
    alpha, trials = 0.2, 1200
    assert _overreach(alpha, trials) <= stats.binom.ppf(1 - 1e-6, trials, alpha)
    monkeypatch.setattr(sequential, "_levels", lambda ends, a, t, share: np.full((len(t), len(ends)), a))
    assert _overreach(alpha, trials) > stats.binom.ppf(1 - 1e-6, trials, alpha)


def test_per_input_levels_of_each_stage():
    """Each stage spends its own share: the selector's levels add up to alpha_selector, the classifier's to
    the rest, and each bound is Clopper-Pearson from its counts at its bound_alpha."""
    selector, classifier = _pair()
    x = _points(20, seed=4)
    r = certify_dual(
        classifier,
        selector,
        x,
        LEVELS,
        selector_sigma=0.3,
        n0=20,
        n=2000,
        alpha=0.01,
        alpha_selector=0.004,
        seed=2,
        sequential=True,
        radius=[0.1, 0.3],
    )
    for res in (r.selector, r.classifier):
        for b in range(20):
            if res.prediction[b] == ABSTAIN:
                continue
            votes, n = int(res.counts[b, res.prediction[b]]), int(res.counts[b].sum())
            a = float(res.bound_alpha[b])
            assert float(res.p_lower[b]) == stats.beta.ppf(a, votes, n - votes + 1)
    assert (r.selector.bound_alpha <= 0.004).all() and (r.classifier.bound_alpha <= 0.006 + 1e-15).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(radius=0.5), ValueError, "pass sequential=True"),
        (dict(tolerance=0.1), ValueError, "pass sequential=True"),
        (dict(sequential=1), TypeError, "sequential must be True or False"),
        (dict(sequential=True, radius=-1.0), ValueError, "radius must be a finite number >= 0"),
        (dict(sequential=True, radius=0.5, tolerance=0.1), ValueError, "pass one of radius and tolerance"),
        (dict(sequential=True, sigma_levels=[0.1, 0.25, 0.5]), ValueError, r"one logit per sigma level \(3"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    selector, classifier = _pair()
    args = dict(sigma_levels=LEVELS, selector_sigma=0.3, n0=5, n=20, alpha=0.01, seed=0)
    args.update(kwargs)
    levels = args.pop("sigma_levels")
    with pytest.raises(error, match=match):
        certify_dual(classifier, selector, _points(3), levels, **args)


def test_empty_batch():
    selector, classifier = _pair()
    r = certify_dual(
        classifier,
        selector,
        torch.zeros(0, 6, dtype=torch.float64),
        LEVELS,
        selector_sigma=0.3,
        sequential=True,
    )
    assert r.prediction.shape == (0,) and r.samples.shape == (0,) and math.isfinite(r.alpha_selector)
