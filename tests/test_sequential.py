"""certify_sequential: sound at whatever round it stops, CERTIFY's noise, results independent of packing."""

import numpy as np
import pytest
import torch
from conftest import LinearBinary
from scipy import stats

import ddrs_ext
from ddrs_ext import ABSTAIN, certify, certify_sequential, sequential
from ddrs_ext.sequential import RoundSchedule, round_schedule


def _allowed(trials: int, alpha: float) -> float:
    """The most failures a procedure whose failure probability is <= alpha shows in ``trials``
    independent trials, except with probability 1e-6."""
    return stats.binom.ppf(1 - 1e-6, trials, alpha)


def test_round_schedule():
    s = round_schedule(100_000, 0.001)
    assert s.ends == (196, 391, 782, 1563, 3125, 6250, 12500, 25000, 50000, 100_000)
    assert sum(s.alphas) == pytest.approx(0.001, rel=1e-12)
    assert np.all(np.diff(s.alphas) > 0)  # later rounds get more of alpha
    np.testing.assert_allclose(np.array(s.alphas) / np.sqrt(s.ends), s.alphas[0] / np.sqrt(196))
    assert round_schedule(1, 0.1) == RoundSchedule((1,), (0.1,))
    assert round_schedule(199, 0.1).ends == (100, 199)
    assert round_schedule(198, 0.1).ends == (198,)


def _paths(p: float, ends, trials: int, seed: int) -> np.ndarray:
    """Cumulative successes at every round end of ``trials`` Bernoulli(p) streams, (trials, K)."""
    g = np.random.default_rng(seed)
    sizes = np.diff([0, *ends])
    return np.cumsum(g.binomial(sizes[None, :], p, size=(trials, len(ends))), axis=1)


@pytest.mark.parametrize("p", [0.55, 0.8, 0.97, 0.999])
def test_bound_holds_at_every_round_at_once(p):
    """Peeking at every round: the share of streams whose lower bound exceeds p at ANY round stays
    within alpha, while Clopper-Pearson at the full alpha in every round fails that check (so the
    check can tell a time-uniform bound from a per-round one)."""
    alpha, trials = 0.1, 4000
    schedule = round_schedule(100_000, alpha)
    A = _paths(p, schedule.ends, trials, seed=int(p * 1000))
    uniform = np.stack([schedule.lower(A[:, k], k) for k in range(len(schedule.ends))], axis=1)
    full = np.stack(
        [ddrs_ext.stats.clopper_pearson_lower(A[:, k], n, alpha) for k, n in enumerate(schedule.ends)], axis=1
    )
    assert (uniform > p).any(axis=1).sum() <= _allowed(trials, alpha)
    assert (full > p).any(axis=1).sum() > _allowed(trials, alpha)
    # the upper bound too (it steers stopping)
    upper = np.stack([schedule.upper(A[:, k], k) for k in range(len(schedule.ends))], axis=1)
    assert (upper < p).any(axis=1).sum() <= _allowed(trials, alpha)


def test_stop_rules_in_closed_form():
    """An input whose every vote goes to its class: L_k = alpha_k^(1/N_k) and, the upper bound being 1,
    the best final bound alpha_K^(1/n_max); curve mode stops once z(best) <= (1 + tol) z(L_k)."""
    s = round_schedule(100_000, 0.001)
    K = len(s.ends)
    z_best = stats.norm.ppf(s.alphas[-1] ** (1 / 100_000))
    for k, n in enumerate(s.ends[:-1]):
        votes, lower = np.array([n]), np.array([s.alphas[k] ** (1 / n)])
        assert s.lower(votes, k)[0] == pytest.approx(lower[0], rel=1e-12)
        assert s.upper(votes, k)[0] == 1.0
        for tol in (0.0, 0.05, 0.2):
            stop = sequential.stop_now(s, k, votes, lower, np.ones(1), None, tol)[0]
            assert stop == (z_best <= (1 + tol) * stats.norm.ppf(lower[0]))
        # radius mode: stops once the bound passes the target, never while the target is reachable
        target = np.array([0.5 * (lower[0] + 1)])
        assert sequential.stop_now(s, k, votes, lower, np.ones(1), lower - 1e-9, 0.0)[0]
        assert not sequential.stop_now(s, k, votes, lower, np.ones(1), target, 0.0)[0]
    # half the votes in the first round: either side of 1/2 may still come, so nothing stops; a tenth:
    # the input will abstain, so it stops in both modes
    for votes, stops in ((98, False), (20, True)):
        a = np.array([votes])
        lo, up = s.lower(a, 0), s.upper(a, 0)
        assert sequential.stop_now(s, 0, a, lo, up, np.array([0.5]), 0.0)[0] == stops
        assert sequential.stop_now(s, 0, a, lo, up, None, 0.0)[0] == stops
    half = np.array([98])
    lo, up = s.lower(half, 0), s.upper(half, 0)
    assert sequential.stop_now(s, K - 1, half, lo, up, None, 0.0)[0]  # the last round stops everything


# A 2-d linear classifier: cheap to sample, so that one call certifies 1000 independent copies.
W, TRUTH = torch.tensor([0.6, -0.8]), 0.6  # input (1, 0) lies at distance 0.6 from w.x = 0, class 1
TRIALS, N_MAX, ALPHA, BATCH = 1000, 2000, 0.2, 100_000


def _copies(trials: int = TRIALS):
    x = torch.tensor([[1.0, 0.0]]).expand(trials, 2).contiguous()
    # per-input sigma: P(class 1) = Phi(0.6 / sigma) from 0.6 to 0.9999
    sigma = TRUTH / torch.from_numpy(stats.norm.ppf(np.linspace(0.6, 0.9999, trials)))
    return LinearBinary(W, 0.0), x, sigma


def _violations(res) -> int:
    """Inputs certified with the wrong class or a radius beyond the true distance to the hyperplane."""
    wrong = (res.prediction != ABSTAIN) & ((res.prediction != 1) | (res.radius > TRUTH))
    return int(wrong.sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        {"tolerance": 0.0},
        {"tolerance": 0.05},
        {"tolerance": 0.5},
        {"radius": TRUTH * 1.0001},  # stops at the first round whose bound (wrongly) passes the truth
        {"radius": TRUTH * 0.5},
        {"radius": 0.0},
    ],
    ids=lambda m: "-".join(f"{k}={v:g}" for k, v in m.items()),
)
def test_sound_against_the_true_radius(mode):
    model, x, sigma = _copies()
    res = certify_sequential(
        model, x, sigma, n0=20, n_max=N_MAX, alpha=ALPHA, batch_size=BATCH, seed=11, **mode
    )
    assert _violations(res) <= _allowed(TRIALS, ALPHA)
    assert (res.samples <= 20 + N_MAX).all()
    assert set(res.samples.tolist()) <= {20 + n for n in round_schedule(N_MAX, ALPHA).ends}
    assert (res.prediction == 1).float().mean() > 0.5  # the runs certify something


@pytest.mark.slow
def test_the_soundness_check_catches_a_per_round_bound(monkeypatch):
    """The end-to-end check above, run with full-alpha Clopper-Pearson at every round, fails."""

    def per_round(n_max, alpha):
        ends = round_schedule(n_max, alpha).ends
        return RoundSchedule(ends, (alpha,) * len(ends))

    monkeypatch.setattr(sequential, "round_schedule", per_round)
    model, x, sigma = _copies()
    res = certify_sequential(
        model, x, sigma, n0=20, n_max=N_MAX, alpha=ALPHA, batch_size=BATCH, seed=11, radius=TRUTH * 1.0001
    )
    assert _violations(res) > _allowed(TRIALS, ALPHA)


def _uniform_votes(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1)[:, :10]  # at x = 0 every class is equally likely


@pytest.mark.parametrize("mode", [{}, {"radius": 0.1}, {"radius": 0.0}, {"tolerance": 0.0}])
def test_noise_abstains_after_the_first_round(mode):
    x = torch.zeros(5, 10)
    res = certify_sequential(_uniform_votes, x, 1.0, n0=100, n_max=100_000, seed=3, **mode)
    assert (res.prediction == ABSTAIN).all() and (res.radius == 0).all()
    assert res.samples.tolist() == [100 + 196] * 5
    assert res.counts.sum(1).tolist() == [196] * 5


def _mixed_inputs():
    """Inputs of a linear classifier from abstaining to far from the boundary, each with its own sigma."""
    model = LinearBinary(W, 0.0)
    x = torch.tensor([[d / 0.6, 0.0] for d in (-0.9, -0.3, -0.05, 0.0, 0.02, 0.1, 0.4, 1.2)])
    sigma = torch.tensor([0.5, 0.3, 0.25, 0.4, 0.1, 0.5, 0.2, 0.3], dtype=torch.float64)
    return model, x, sigma


def test_runs_to_n_max_with_certify_counts():
    """With tolerance 0 an input that may still certify runs to n_max, and its votes are certify's."""
    model, x, sigma = _mixed_inputs()
    res = certify_sequential(model, x, sigma, n0=30, n_max=3000, alpha=0.01, tolerance=0.0, seed=5)
    ref = certify(model, x, sigma, n0=30, n=3000, alpha=0.01, seed=5)
    full = res.samples == 30 + 3000
    assert full.sum() >= 6
    assert torch.equal(res.counts[full], ref.counts[full])
    schedule = round_schedule(3000, 0.01)
    for b in full.nonzero()[:, 0].tolist():
        n_a = int(res.counts[b].max())
        assert float(res.p_lower[b]) >= schedule.lower(np.array([n_a]), len(schedule.ends) - 1)[0]
        assert float(res.p_lower[b]) <= float(ref.p_lower[b]) + 0.05
    both = (res.prediction != ABSTAIN) & (ref.prediction != ABSTAIN)
    assert torch.equal(res.prediction[both], ref.prediction[both])
    # the inputs that stopped early are those that will abstain
    assert (res.prediction[~full] == ABSTAIN).all()


def test_radius_mode_stops_at_the_decision():
    model, x, sigma = _mixed_inputs()
    res = certify_sequential(model, x, sigma, n0=30, n_max=20_000, alpha=0.01, radius=0.2, seed=5)
    certified = res.radius >= 0.2
    assert (res.prediction[certified] != ABSTAIN).all()
    # far from the boundary: certified after the first rounds; on it: given up early
    assert certified[-1] and res.samples[-1] <= 30 + 1250
    assert not certified[3] and res.samples[3] <= 30 + 1250
    assert (res.samples <= 30 + 20_000).all()
    truth = (model.margin(x) / W.norm()).abs()
    assert (res.radius <= truth).all()


def test_same_results_whatever_the_batching():
    model, x, sigma = _mixed_inputs()
    kwargs = dict(n0=30, n_max=5000, alpha=0.01, tolerance=0.2, seed=9)
    ref = certify_sequential(model, x, sigma, batch_size=1000, **kwargs)
    runs = [certify_sequential(model, x, sigma, batch_size=bs, **kwargs) for bs in (7, 333, 10**6)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs.append(certify_sequential(model, x, sigma, batch_size=1000, **kwargs))
    torch.set_num_threads(threads)
    # the inputs in two calls, and one at a time with its own scalar sigma: the same results
    halves = [
        certify_sequential(model, x[s], sigma[s], index=range(8)[s], **kwargs)
        for s in (slice(0, 3), slice(3, 8))
    ]
    singles = [
        certify_sequential(model, x[b : b + 1], float(sigma[b]), index=[b], **kwargs) for b in range(8)
    ]
    for part in (halves, singles):
        runs.append(
            ddrs_ext.CertifyResult(
                *(
                    torch.cat([getattr(r, f) for r in part])
                    for f in ("prediction", "radius", "p_lower", "counts", "sigma")
                ),
                seed=9,
                samples=torch.cat([r.samples for r in part]),
            )
        )
    assert len(set(ref.samples.tolist())) > 2  # the inputs stopped at different rounds
    for run in runs:
        for field in ("prediction", "radius", "p_lower", "counts", "sigma", "samples"):
            assert torch.equal(getattr(run, field), getattr(ref, field)), field


def test_training_mode_model_is_sampled_in_eval_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    )
    net.eval()
    x = torch.randn(4, 4)
    ref = certify_sequential(net, x, 0.3, n0=20, n_max=1000, seed=1)
    net.train()
    res = certify_sequential(net, x, 0.3, n0=20, n_max=1000, seed=1)
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(res.counts, ref.counts) and torch.equal(res.samples, ref.samples)


def test_empty_batch():
    res = certify_sequential(LinearBinary(W, 0.0), torch.zeros(0, 2), 0.5, seed=0)
    assert res.prediction.shape == (0,) and res.samples.shape == (0,) and res.counts.shape[0] == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_max": 0}, ValueError, "n_max must be >= 1"),
        ({"n0": 0}, ValueError, "n0 must be >= 1"),
        ({"alpha": 1.5}, ValueError, "alpha must lie strictly between 0 and 1"),
        ({"radius": -0.1}, ValueError, "radius must be a finite number >= 0"),
        ({"radius": float("nan")}, ValueError, "radius must be a finite number >= 0"),
        ({"radius": "0.5"}, TypeError, "radius must be a number"),
        ({"radius": True}, TypeError, "radius must be a number"),
        ({"tolerance": -1.0}, ValueError, "tolerance must be a finite number >= 0"),
        ({"tolerance": float("inf")}, ValueError, "tolerance must be a finite number >= 0"),
        ({"tolerance": "a"}, TypeError, "tolerance must be a number"),
        ({"radius": 0.5, "tolerance": 0.1}, ValueError, "pass one of radius and tolerance"),
        ({"sigma": -1.0}, ValueError, "sigma must be a finite number > 0"),
        ({"sigma": torch.ones(3)}, ValueError, r"sigma must be a float or have shape \(2,\)"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"num_classes": 5}, ValueError, "num_classes is 5 but the model returned 2 classes"),
        ({"index": [0]}, ValueError, "index must have one entry per input"),
        ({"model": "net"}, TypeError, "model must be callable"),
        ({"x": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])}, ValueError, "x contains NaN or Inf"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"model": LinearBinary(W, 0.0), "x": torch.zeros(2, 2), "sigma": 0.5}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(error, match=match):
        certify_sequential(args["model"], args["x"], args["sigma"], **{"n_max": 500, "seed": 0, **kwargs})
