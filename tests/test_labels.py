"""Evaluation mode (``labels=``) of certify and certify_sequential: the bound is on the true label's
probability, predictions are the label or ABSTAIN, and the certificate "correct within r" is sound
(negative controls: a bound at three times alpha, and the full alpha at every round)."""

import numpy as np
import pytest
import torch
from conftest import LinearBinary
from scipy import stats

from ddrs_ext import ABSTAIN, certify, certify_sequential, sequential


def _allowed(trials: int, alpha: float) -> float:
    return stats.binom.ppf(1 - 1e-6, trials, alpha)


W = torch.tensor([0.6, -0.8])


def _points(count: int, seed: int = 0):
    """Inputs of a linear classifier at signed distances from -0.3 to 1.2 (class 1 above 0), sigma 0.5:
    the true probability of class 1 is Phi(distance / 0.5) and the true radius of class 1 is the distance."""
    g = torch.Generator().manual_seed(seed)
    distance = torch.rand(count, generator=g, dtype=torch.float64) * 1.5 - 0.3
    x = torch.stack([distance / 0.6, torch.zeros(count, dtype=torch.float64)], 1).float()
    return LinearBinary(W, 0.0), x, distance


def test_certify_with_labels_bounds_the_label():
    model, x, distance = _points(40)
    labels = torch.where(torch.arange(40) % 3 == 0, 0, 1)  # a third labelled wrongly (for the far side)
    res = certify(model, x, 0.5, n=2000, alpha=0.01, seed=4, labels=labels)
    ref = certify(model, x, 0.5, n0=100, n=2000, alpha=0.01, seed=4)
    assert torch.equal(res.counts, ref.counts)  # the same estimation noise, no selection
    assert torch.equal(res.labels, labels) and ref.labels is None
    assert ((res.prediction == labels) | (res.prediction == ABSTAIN)).all()
    votes = res.counts.gather(1, labels[:, None])[:, 0].numpy()
    assert np.array_equal(res.p_lower.numpy(), stats.beta.ppf(0.01, votes, 2000 - votes + 1))
    assert (res.samples == 2000).all() and (res.bound_alpha == 0.01).all()
    # where the label is the class certify certifies, both give the same certificate
    same = (ref.prediction == labels).numpy()
    assert same.sum() > 10
    assert torch.equal(res.radius[same], ref.radius[same])
    # a label the smoothed classifier does not return abstains
    wrong = ((distance > 0.2) & (labels == 0)) | ((distance < -0.2) & (labels == 1))
    assert wrong.any() and (res.prediction[wrong] == ABSTAIN).all()


def _sequential_labels(model, x, sigma, **kwargs):
    return certify_sequential(model, x, sigma, labels=torch.ones(len(x), dtype=torch.int64), **kwargs)


@pytest.mark.parametrize("mode", [{"radius": 0.5}, {"radius": [0.0, 0.25, 0.5, 0.75]}, {}])
def test_sequential_labels_match_certify_labels_where_they_run_to_n_max(mode):
    model, x, _ = _points(30)
    y = torch.ones(30, dtype=torch.int64)
    res = certify_sequential(model, x, 0.5, n_max=3000, alpha=0.01, seed=2, labels=y, **mode)
    ref = certify(model, x, 0.5, n=3000, alpha=0.01, seed=2, labels=y)
    assert ((res.prediction == 1) | (res.prediction == ABSTAIN)).all() and torch.equal(res.labels, y)
    assert torch.equal(res.samples, res.counts.sum(1))  # no selection samples
    full = res.samples == 3000
    assert torch.equal(res.counts[full], ref.counts[full])
    assert full.any() or mode  # the open-ended mode runs some inputs to n_max
    assert (res.p_lower[full] <= ref.p_lower[full]).all()  # a share of alpha at n_max
    assert res.samples.sum() < ref.samples.sum()


def _truth_violations(res, distance) -> int:
    """Claims of "class 1 within r" where class 1 is not the smoothed class or r exceeds the distance."""
    claim = res.prediction == 1
    return int((claim & ((distance <= 0) | (res.radius > distance))).sum())


TRIALS, ALPHA = 2000, 0.2


def _near_the_truth():
    """Copies of one input at distance 0.3 from the boundary, each with its own sigma (P(class 1) from
    0.55 to 0.999), and radius of interest just above the truth: peeking stops on a lucky bound."""
    x = torch.tensor([[0.5, 0.0]]).expand(TRIALS, 2).contiguous()
    sigma = 0.3 / torch.from_numpy(stats.norm.ppf(np.linspace(0.55, 0.999, TRIALS)))
    return LinearBinary(W, 0.0), x, sigma, torch.full((TRIALS,), 0.3, dtype=torch.float64)


@pytest.mark.slow
def test_labels_mode_is_sound_and_the_check_catches_a_loose_bound(monkeypatch):
    """certify(labels=): certificates of the label wrong no more often than alpha allows; the same
    check run with the bound at 3 alpha fails."""
    model, x, sigma, distance = _near_the_truth()
    y = torch.ones(TRIALS, dtype=torch.int64)
    res = certify(model, x, sigma, n=500, alpha=ALPHA, seed=8, batch_size=10**6, labels=y)
    assert _truth_violations(res, distance) <= _allowed(TRIALS, ALPHA)
    assert (res.prediction == 1).float().mean() > 0.5
    from ddrs_ext import certification

    loose = lambda k, n, a: stats.beta.ppf(3 * a, k, n - k + 1) * (np.asarray(k) > 0)  # noqa: E731
    monkeypatch.setattr(certification.stats, "clopper_pearson_lower", loose)
    res = certify(model, x, sigma, n=500, alpha=ALPHA, seed=8, batch_size=10**6, labels=y)
    assert _truth_violations(res, distance) > _allowed(TRIALS, ALPHA)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{"radius": 0.3001}, {"radius": np.linspace(0, 0.6, 25) + 1e-4}])
def test_sequential_labels_mode_is_sound_and_the_check_catches_a_per_round_bound(monkeypatch, mode):
    model, x, sigma, distance = _near_the_truth()
    res = _sequential_labels(model, x, sigma, n_max=2000, alpha=ALPHA, seed=8, batch_size=10**6, **mode)
    assert _truth_violations(res, distance) <= _allowed(TRIALS, ALPHA)
    assert (res.prediction == 1).float().mean() > 0.4
    monkeypatch.setattr(
        sequential, "_levels", lambda ends, alpha, t, share: np.full((len(t), len(ends)), alpha)
    )
    res = _sequential_labels(model, x, sigma, n_max=2000, alpha=ALPHA, seed=8, batch_size=10**6, **mode)
    assert _truth_violations(res, distance) > _allowed(TRIALS, ALPHA)


def test_labels_results_do_not_depend_on_the_batching():
    model, x, _ = _points(12, seed=3)
    y = torch.ones(12, dtype=torch.int64)
    kwargs = dict(n_max=4000, alpha=0.01, seed=6, labels=y, radius=[0.0, 0.2, 0.4])
    ref = certify_sequential(model, x, 0.5, batch_size=1000, **kwargs)
    for bs in (5, 777):
        run = certify_sequential(model, x, 0.5, batch_size=bs, **kwargs)
        for f in ("prediction", "radius", "p_lower", "counts", "samples", "bound_alpha"):
            assert torch.equal(getattr(run, f), getattr(ref, f)), f


@pytest.mark.parametrize(
    "labels, error, match",
    [
        ([1], ValueError, "one entry per input"),
        ([[1, 1]], ValueError, "one entry per input"),
        ([1.0, 0.0], TypeError, "integer class indices"),
        ("ab", TypeError, "labels must be a sequence of class indices"),
        (True, TypeError, "got a bool"),
        ([0, 5], ValueError, r"labels must lie in \[0, 2\)"),
        ([-2, 0], ValueError, "labels must be class indices >= 0"),
    ],
)
def test_bad_labels(labels, error, match):
    model, x, _ = _points(2)
    with pytest.raises(error, match=match):
        certify(model, x, 0.5, n=100, seed=0, labels=labels)


def test_empty_batch():
    model, _, _ = _points(1)
    for fn in (certify, certify_sequential):
        res = fn(model, torch.zeros(0, 2), 0.5, seed=0, labels=torch.zeros(0, dtype=torch.int64))
        assert res.prediction.shape == (0,) and res.labels.shape == (0,) and res.samples.shape == (0,)
