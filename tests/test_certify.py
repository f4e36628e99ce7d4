"""certify / predict / Smooth against models whose smoothed classifier is known in closed form."""

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import ddrs_ext
from ddrs_ext import ABSTAIN, Smooth, certify, predict


def _points(model, margins):
    """Inputs at the given signed distances from the model's hyperplane."""
    w = model.w.double()
    base = torch.zeros(w.numel(), dtype=torch.float64)
    unit = w / w.norm()
    shift = (torch.as_tensor(margins, dtype=torch.float64)[:, None] - model.b / w.norm()) * unit
    return (base + shift).reshape(len(margins), 3, 4, 5).float()


def test_radius_formula_is_exact(linear_binary):
    """p_lower is the Clopper-Pearson bound of the counts and radius = sigma * Phi^-1(p_lower)."""
    x = _points(linear_binary, np.linspace(-1.0, 1.0, 9))
    sigma = torch.linspace(0.2, 1.0, 9)
    res = certify(linear_binary, x, sigma, n0=50, n=500, alpha=0.01, seed=1)
    guess = torch.where(res.prediction >= 0, res.prediction, 0)
    for b in range(9):
        n_a = int(res.counts[b].max()) if res.prediction[b] >= 0 else None
        if n_a is None:
            assert res.radius[b] == 0 and res.p_lower[b] < 0.5
            continue
        assert int(res.counts[b, guess[b]]) == n_a
        # Independent solution of P(Bin(n, p) >= n_a) = alpha for p.
        p = optimize.brentq(
            lambda q, k=n_a: stats.binom.sf(k - 1, 500, q) - 0.01, 1e-12, 1 - 1e-12, xtol=1e-15
        )
        assert res.p_lower[b].item() == pytest.approx(p, rel=1e-9)
        assert res.radius[b].item() == pytest.approx(float(sigma[b]) * stats.norm.ppf(p), rel=1e-9)
    assert res.counts.sum(1).tolist() == [500] * 9
    torch.testing.assert_close(res.sigma, sigma.double())


def test_counts_are_binomial(linear_binary):
    """Votes for class 1 at one point, over 300 independent streams, follow Binomial(n, p_A)."""
    sigma, n, margin = 0.5, 400, 0.2
    x = _points(linear_binary, [margin]).expand(300, 3, 4, 5)
    p_a = stats.norm.cdf(margin / sigma)
    res = certify(linear_binary, x, sigma, n0=1, n=n, alpha=0.01, seed=5)
    c = res.counts[:, 1].numpy()
    # Randomised probability integral transform: exactly uniform under the null.
    v = np.random.default_rng(0).uniform(size=c.size)
    u = stats.binom.cdf(c - 1, n, p_a) + v * stats.binom.pmf(c, n, p_a)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(c.mean() - n * p_a) < 4 * np.sqrt(n * p_a * (1 - p_a) / c.size)


# ---------------------------------------------------------------- soundness, with power (issue 17)

# CERTIFY at alpha = 0.05 with n = 100 estimation samples fails (certifies a wrong class or a radius
# beyond the true one) with probability at most alpha. The Monte Carlo tests below use inputs where
# that bound is nearly attained, so a procedure that fails more often is caught:
# - "tight": class 1 with probability just below the alpha-level Clopper-Pearson bound of 93 votes
#   of 100: the radius overshoots exactly when 93 or more of the 100 copies vote for class 1,
#   probability 0.0497;
# - "boundary": on the decision boundary (true radius 0), where certifying anything is a failure:
#   probability 0.0443 (59 or more of 100 votes for the selected class).
ALPHA, N0, N, TRIALS = 0.05, 20, 100, 3000
TIGHT_VOTES = 93
# A sound procedure fails at most ALPHA per input: more failures than this has probability <= 1e-6.
LIMIT = stats.binom.ppf(1 - 1e-6, TRIALS, ALPHA)


def _tight_probability():
    return float(ddrs_ext.stats.clopper_pearson_lower(np.array([TIGHT_VOTES]), N, ALPHA)[0]) - 1e-4


def _exact_failure_rate(alpha, p, boundary, reuse=False):
    """P(CERTIFY fails) on an input whose class 1 has probability p, computed over the binomial
    distributions of the selection and estimation counts, with the bound at level ``alpha``;
    ``reuse``: the class is selected from the estimation counts themselves."""
    k = np.arange(N + 1)
    certifies = ddrs_ext.stats.clopper_pearson_lower(k, N, alpha) >= 0.5
    overshoots = ddrs_ext.stats.clopper_pearson_lower(k, N, alpha) > p
    ones = stats.binom.pmf(k, N, p)  # estimation votes for class 1 (class 0 gets N - k)
    select_one = stats.binom.sf(N0 // 2, N0, p)  # more than half the selection votes (ties: class 0)
    if boundary:  # any certificate fails
        if reuse:
            return float(ones @ (certifies | certifies[::-1]))
        return float(select_one * (ones @ certifies) + (1 - select_one) * (ones @ certifies[::-1]))
    # class 1 is the true class: a class-1 certificate fails when it overshoots, a class-0 one always
    return float(select_one * (ones @ overshoots) + (1 - select_one) * (ones @ certifies[::-1]))


def certify_failures(model):
    """(failures among TRIALS "tight" inputs, failures among TRIALS "boundary" inputs) of certify."""
    p = _tight_probability()
    sigma = 0.5
    margins = [sigma * stats.norm.ppf(p)] * TRIALS + [0.0] * TRIALS
    x = _points(model, margins)
    res = certify(model, x, sigma, n0=N0, n=N, alpha=ALPHA, seed=21, batch_size=20_000)
    prediction, radius = res.prediction.numpy(), res.radius.numpy()
    tight, boundary = slice(0, TRIALS), slice(TRIALS, None)
    wrong = (prediction[tight] == 0) | ((prediction[tight] == 1) & (radius[tight] > margins[0]))
    return int(wrong.sum()), int((prediction[boundary] != ABSTAIN).sum())


def assert_sound(failures):
    tight, boundary = failures
    assert tight <= LIMIT, f"{tight} of {TRIALS} tight inputs failed; a sound certify fails at most {LIMIT}"
    assert boundary <= LIMIT, (
        f"{boundary} of {TRIALS} boundary inputs certified; a sound certify certifies at most {LIMIT}"
    )


def test_the_soundness_test_has_power():
    """Computed exactly: certify fails nearly alpha of the time on the test's inputs (so the test is
    tight), and the wrong variants fail about twice as often, which the limit rejects almost surely."""
    p = _tight_probability()
    assert 0.048 < _exact_failure_rate(ALPHA, p, boundary=False) <= ALPHA
    assert 0.044 < _exact_failure_rate(ALPHA, 0.5, boundary=True) <= ALPHA
    for rate in (
        _exact_failure_rate(2 * ALPHA, p, boundary=False),  # the bound at 2 alpha
        _exact_failure_rate(ALPHA, 0.5, boundary=True, reuse=True),  # selection from the same votes
    ):
        assert rate > 0.088
        assert stats.binom.cdf(LIMIT, TRIALS, rate) < 1e-3  # the chance of missing it


def test_certificates_are_sound(linear_binary):
    assert_sound(certify_failures(linear_binary))


def test_negative_control_a_bound_at_twice_alpha_is_caught(linear_binary, monkeypatch):
    exact = ddrs_ext.stats.clopper_pearson_lower
    monkeypatch.setattr(ddrs_ext.stats, "clopper_pearson_lower", lambda k, n, alpha: exact(k, n, 2 * alpha))
    with pytest.raises(AssertionError, match="tight inputs failed"):
        assert_sound(certify_failures(linear_binary))


def test_negative_control_a_class_selected_from_the_estimation_votes_is_caught(linear_binary, monkeypatch):
    counts = ddrs_ext.certification.VoteSampler.counts

    def reused(self, phases, inputs=None):
        out = counts(self, phases, inputs)
        return [out[1], out[1]] if len(phases) == 2 else out  # selection := estimation

    monkeypatch.setattr(ddrs_ext.certification.VoteSampler, "counts", reused)
    with pytest.raises(AssertionError, match="boundary inputs certified"):
        assert_sound(certify_failures(linear_binary))


def assert_lower_bound_covers(bound, n, alpha):
    """Exactly, over Binomial(n, p): P(bound(N) > p) <= alpha for every p, checked just below each
    value the bound takes (where the failure probability peaks) and on a grid."""
    k = np.arange(n + 1)
    values = bound(k, n, alpha)
    assert np.all(np.diff(values) >= 0), "the bound must not decrease with the count"
    p = np.concatenate([values[values > 0] * (1 - 1e-12), np.linspace(1e-6, 1 - 1e-6, 2001)])
    first = np.searchsorted(values, p, side="right")  # first count whose bound exceeds p
    failure = stats.binom.sf(first - 1, n, p)
    worst = float(failure.max())
    assert worst <= alpha * (1 + 1e-9), f"n = {n}: the bound exceeds p with probability {worst} > {alpha}"
    return worst


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_clopper_pearson_coverage_is_exact(n, alpha):
    worst = assert_lower_bound_covers(ddrs_ext.stats.clopper_pearson_lower, n, alpha)
    assert worst > alpha * 0.999  # and it is not needlessly conservative: the level is attained


@pytest.mark.parametrize("n", [10, 1000])
def test_negative_control_coverage_of_a_bound_at_twice_alpha_fails(n):
    def doubled(k, n, alpha):
        return ddrs_ext.stats.clopper_pearson_lower(k, n, 2 * alpha)

    with pytest.raises(AssertionError, match="exceeds p with probability"):
        assert_lower_bound_covers(doubled, n, 0.05)


def test_certificates_are_tight(linear_binary):
    """On inputs far from the boundary the certified radius is close to the true one."""
    rng = np.random.default_rng(2)
    margins = rng.uniform(-1.5, 1.5, 400)
    x = _points(linear_binary, margins)
    sigma = torch.from_numpy(rng.uniform(0.25, 1.0, 400))
    res = certify(linear_binary, x, sigma, n0=64, n=2000, alpha=0.05, seed=7, batch_size=4096)
    certified = res.prediction.numpy() != ABSTAIN
    far = certified & (np.abs(margins) / sigma.numpy() > 0.5) & (np.abs(margins) / sigma.numpy() < 2.5)
    ratio = res.radius.numpy()[far] / np.abs(margins[far])
    assert far.sum() > 100 and np.median(ratio) > 0.85


def test_abstains_at_the_boundary(linear_binary):
    x = _points(linear_binary, [0.0] * 20)
    res = certify(linear_binary, x, 0.5, n0=100, n=1000, alpha=0.001, seed=3)
    assert (res.prediction == ABSTAIN).all() and (res.radius == 0).all()
    assert (predict(linear_binary, x, 0.5, n=1000, alpha=0.001, seed=3) == ABSTAIN).sum() >= 19


def test_predict(linear_binary):
    margins = [-1.0, -0.5, 0.5, 1.0]
    x = _points(linear_binary, margins)
    assert predict(linear_binary, x, 0.5, n=2000, seed=1).tolist() == [0, 0, 1, 1]


def test_predict_decision_is_binomtest(linear_binary):
    """predict returns the top class exactly when binomtest(c1, c1 + c2, 1/2) rejects at level alpha."""
    alpha, n, sigma = 0.05, 400, 0.5
    outcomes = set()
    for b, margin in enumerate(np.linspace(-0.12, 0.12, 13)):
        x = _points(linear_binary, [margin])
        counts = Smooth(linear_binary, 2, sigma, seed=b)._sample_noise(x[0], n, 128)
        decision = int(predict(linear_binary, x, sigma, n=n, alpha=alpha, seed=b)[0])
        c1, c2 = int(counts.max()), int(counts.min())
        expected = int(counts.argmax()) if stats.binomtest(c1, c1 + c2, 0.5).pvalue <= alpha else ABSTAIN
        assert decision == expected
        outcomes.add(decision)
    assert outcomes == {0, 1, ABSTAIN}


def test_top_two_pvalue():
    top, pv = ddrs_ext.stats.top_two_pvalue(np.array([[60, 40, 3], [5, 5, 0], [0, 0, 9]]))
    assert top.tolist() == [0, 0, 2]
    assert pv.tolist() == [stats.binomtest(60, 100, 0.5).pvalue, 1.0, stats.binomtest(9, 9, 0.5).pvalue]


@pytest.mark.parametrize("batch_size", [1, 7, 100, 5000])
def test_reproducible_whatever_the_batch_size(linear_binary, batch_size):
    x = _points(linear_binary, [-0.3, 0.1, 0.4])
    ref = certify(linear_binary, x, 0.4, n0=20, n=300, seed=99, batch_size=64)
    res = certify(linear_binary, x, 0.4, n0=20, n=300, seed=99, batch_size=batch_size)
    torch.testing.assert_close(res.counts, ref.counts, rtol=0, atol=0)
    torch.testing.assert_close(res.radius, ref.radius, rtol=0, atol=0)


def test_reproducible_whatever_the_threads(linear_binary):
    x = _points(linear_binary, [-0.3, 0.1, 0.4])
    torch.set_num_threads(1)
    one = certify(linear_binary, x, 0.4, n0=20, n=3000, seed=4)
    torch.set_num_threads(2)
    two = certify(linear_binary, x, 0.4, n0=20, n=3000, seed=4)
    torch.testing.assert_close(one.counts, two.counts, rtol=0, atol=0)


def test_index_gives_the_same_noise_alone_or_in_a_batch(linear_binary):
    x = _points(linear_binary, [-0.3, 0.1, 0.4, 0.05])
    idx = torch.tensor([10, 11, 12, 13])
    batch = certify(linear_binary, x, 0.4, n0=20, n=500, seed=8, index=idx)
    alone = certify(linear_binary, x[1:2], 0.4, n0=20, n=500, seed=8, index=[11])
    torch.testing.assert_close(alone.counts[0], batch.counts[1], rtol=0, atol=0)


def test_seed_none_follows_torch_manual_seed(linear_binary):
    x = _points(linear_binary, [0.1, 0.2])
    torch.manual_seed(123)
    a = certify(linear_binary, x, 0.4, n0=10, n=200)
    torch.manual_seed(123)
    b = certify(linear_binary, x, 0.4, n0=10, n=200)
    assert a.seed == b.seed
    torch.testing.assert_close(a.counts, b.counts, rtol=0, atol=0)
    c = certify(linear_binary, x, 0.4, n0=10, n=200)
    assert c.seed != a.seed


def test_selection_and_estimation_noise_are_disjoint(linear_binary):
    """With n0 == n the two phases still see different noise."""
    x = _points(linear_binary, [0.05])
    seen = []

    def spy(batch):
        seen.append(batch.clone())
        return linear_binary(batch)

    certify(spy, x, 0.5, n0=50, n=50, seed=1, batch_size=50)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(linear_binary, dtype):
    x = _points(linear_binary, [-1.0, 1.0]).to(dtype)
    res = certify(linear_binary, x, 0.25, n0=20, n=200, seed=2)
    assert res.prediction.tolist() == [0, 1]


def test_multiclass_and_result_types():
    w = torch.randn(10, 16)

    def model(z):
        return z.flatten(1) @ w.T

    x = torch.randn(5, 16)
    res = certify(model, x, 0.1, n0=10, n=100, seed=0)
    assert res.prediction.dtype == torch.int64 and res.prediction.shape == (5,)
    assert res.radius.dtype == torch.float64 and res.p_lower.dtype == torch.float64
    assert res.counts.shape == (5, 10) and res.counts.dtype == torch.int64
    clean = model(x).argmax(1)
    assert (res.prediction == clean).all()  # tiny sigma: every copy votes for the clean class


def test_empty_batch(linear_binary):
    res = certify(linear_binary, torch.zeros(0, 3, 4, 5), 0.5, n=10, num_classes=2)
    assert res.prediction.shape == (0,) and res.counts.shape == (0, 2)
    assert predict(linear_binary, torch.zeros(0, 3, 4, 5), 0.5, n=10).shape == (0,)


def test_smooth_is_a_drop_in(linear_binary):
    x = _points(linear_binary, [0.6, -0.05])
    smooth = Smooth(linear_binary, 2, 0.5)
    assert Smooth.ABSTAIN == -1
    torch.manual_seed(0)
    c, r = smooth.certify(x[0], 100, 1000, 0.001, 256)
    assert isinstance(c, int) and isinstance(r, float)
    torch.manual_seed(0)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    ref = certify(linear_binary, x[:1], 0.5, n0=100, n=1000, alpha=0.001, batch_size=256, seed=seed)
    assert (c, r) == (int(ref.prediction[0]), float(ref.radius[0]))
    assert c == 1 and 0 < r < 0.6
    assert smooth.certify(x[1], 100, 1000, 0.001, 256) == (Smooth.ABSTAIN, 0.0)
    assert smooth.predict(x[0], 1000, 0.001, 300) == 1
    counts = smooth._sample_noise(x[0], 500, 128)
    assert counts.shape == (2,) and counts.sum() == 500
