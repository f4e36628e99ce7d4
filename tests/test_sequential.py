"""certify_sequential: sound at whatever round it stops (negative controls: a bound at the full alpha in
every round, a bound that reuses the selection votes), the certified-accuracy curve of certify at
the radii of interest, CERTIFY's noise, results independent of packing."""

import numpy as np
import pytest
import torch
from conftest import LinearBinary
from scipy import stats

import ddrs_ext
from ddrs_ext import ABSTAIN, CertificationMemory, certify, certify_sequential, sequential
from ddrs_ext.sequential import Interest, SequentialStage, round_ends, unsettled


def _allowed(trials: int, alpha: float) -> float:
    """The most failures a procedure whose failure probability is <= alpha shows in ``trials``
    independent trials, except with probability 1e-6."""
    return stats.binom.ppf(1 - 1e-6, trials, alpha)


def _levels(n_max, alpha, radii, sigma=1.0):
    """One input's round levels for these radii of interest."""
    interest = Interest.make(np.asarray(radii, dtype=np.float64), 0.0, np.array([sigma]), 0.0)
    stage = SequentialStage([], np.array([sigma]), n_max, alpha, interest, n0=1)
    return np.asarray(stage.ends), stage.levels[0]


def test_round_ends():
    ends = round_ends(100_000)
    assert len(ends) == 32 and ends[:6] == (3, 4, 5, 7, 9, 13) and ends[-3:] == (50_000, 70_711, 100_000)
    assert ends == tuple(sorted({int(np.ceil(100_000 / 2 ** (j / 2))) for j in range(32)}))  # ratio sqrt(2)
    assert round_ends(1) == (1,) and round_ends(4) == (3, 4) and round_ends(2) == (2,)
    assert round_ends(1000, first=100, ratio=2.0) == (125, 250, 500, 1000)


@pytest.mark.parametrize("radii", [[0.5], [0.25], [0.0, 0.25, 0.5, 0.75, 1.0], np.linspace(0, 3.4, 40)])
def test_levels_add_up_to_alpha_and_start_where_a_certificate_can(radii):
    ends, levels = _levels(100_000, 0.001, radii)
    assert levels.sum() == pytest.approx(0.001, rel=1e-12) and (levels >= 0).all()
    k0 = int(np.argmax(levels > 0))
    assert (levels[:k0] == 0).all() and (levels[k0:] > 0).all()
    # the first round that spends alpha is the first at which an input whose every vote is for its class
    # can certify the smallest radius of interest at that round's level
    t_min = stats.norm.cdf(min(radii))
    assert levels[k0] ** (1 / ends[k0]) >= t_min
    assert k0 == 0 or (levels[k0] ** (1 / ends[k0 - 1]) < t_min)
    # one radius: the early part (N^-1/2, decreasing) dominates; several: the late part (N^2)
    assert levels[-1] == (levels[k0:].min() if len(radii) == 1 else levels.max())


def test_one_radius_spends_early_many_radii_late():
    _, one = _levels(100_000, 0.001, [0.5])
    _, many = _levels(100_000, 0.001, np.linspace(0, 3.4, 40))
    assert one[:20].sum() > 0.5 * 0.001 and many[-1] > 0.45 * 0.001 and many[:20].sum() < 0.05 * 0.001


def test_unsettled():
    radii = np.array([[0.0, 0.25, 0.5, 0.75]] * 4)
    have = np.array([-np.inf, 0.3, 0.3, 0.8])
    reach = np.array([-np.inf, 0.45, 0.6, 0.9])
    assert unsettled(have, reach, radii).tolist() == [False, False, True, False]
    assert unsettled(have, reach, radii, every=True).tolist() == [False, True, True, True]
    assert not unsettled(np.array([0.5]), np.array([0.5]), radii[:1])  # r = reach = have: certified


def _paths(p: float, ends, trials: int, seed: int) -> np.ndarray:
    """Cumulative successes at every round end of ``trials`` Bernoulli(p) streams, (trials, K)."""
    g = np.random.default_rng(seed)
    sizes = np.diff([0, *ends])
    return np.cumsum(g.binomial(sizes[None, :], p[:, None] if np.ndim(p) else p, size=(trials, len(ends))), 1)


@pytest.mark.parametrize("p", [0.55, 0.8, 0.97, 0.999])
@pytest.mark.parametrize("radii", [[0.0], [1.0, 2.0], np.linspace(0, 3, 30)])
def test_bound_holds_at_every_round_at_once(p, radii):
    """Peeking at every round: the share of streams whose lower bound exceeds p at ANY round stays within
    alpha, while Clopper-Pearson at the full alpha in every round fails that check (so the check can tell
    a time-uniform bound from a per-round one)."""
    alpha, trials = 0.1, 2000
    ends, levels = _levels(20_000, alpha, radii)
    A = _paths(p, ends, trials, seed=int(p * 1000) + len(radii))
    uniform = np.stack(
        [ddrs_ext.stats.clopper_pearson_lower(A[:, k], n, levels[k]) for k, n in enumerate(ends)], 1
    )
    full = np.stack([ddrs_ext.stats.clopper_pearson_lower(A[:, k], n, alpha) for k, n in enumerate(ends)], 1)
    assert (uniform > p).any(axis=1).sum() <= _allowed(trials, alpha)
    assert (full > p).any(axis=1).sum() > _allowed(trials, alpha)


def test_stop_rule_in_closed_form():
    """An input whose every vote goes to its class has L_k = alpha_k^(1/N_k); with one radius of interest
    it stops at the first round whose bound certifies it, and an input at p = 1/2 with a radius above
    its reach stops at once."""
    r = 1.0
    model = lambda z: torch.stack([torch.zeros(len(z)), torch.full((len(z),), 1.0)], 1)  # noqa: E731
    res = certify_sequential(model, torch.zeros(1, 3), 0.5, n0=5, n_max=50_000, alpha=0.001, radius=r, seed=0)
    ends, levels = _levels(50_000, 0.001, [r], sigma=0.5)
    bounds = levels ** (1 / ends)
    k = int(np.argmax(bounds >= stats.norm.cdf(r / 0.5)))
    assert res.samples.item() == 5 + ends[k]
    assert res.p_lower.item() == pytest.approx(bounds[k], rel=1e-12) and res.radius.item() >= r
    tie = lambda z: torch.stack([z[:, 0], -z[:, 0]], 1)  # noqa: E731  (P(class 0) = 1/2 at x = 0)
    res = certify_sequential(tie, torch.zeros(1, 3), 0.5, n0=5, n_max=50_000, radius=r, seed=0)
    assert res.samples.item() <= 5 + 300 and res.prediction.item() == ABSTAIN


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


MODES = [
    {"radius": TRUTH * 1.0001},  # stops at the first round whose bound (wrongly) passes the truth
    {"radius": [0.0, TRUTH * 0.5, TRUTH * 1.0001, TRUTH * 1.5]},
    {"radius": np.linspace(0, 1.5, 31) + 0.0001},
    {"tolerance": 0.05},
    {"tolerance": 0.0},
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={np.size(v)}" for k, v in m.items()))
def test_sound_against_the_true_radius(mode):
    model, x, sigma = _copies()
    res = certify_sequential(
        model, x, sigma, n0=20, n_max=N_MAX, alpha=ALPHA, batch_size=BATCH, seed=11, **mode
    )
    assert _violations(res) <= _allowed(TRIALS, ALPHA)
    assert set(res.samples.tolist()) <= {20 + n for n in round_ends(N_MAX)}
    assert (res.prediction == 1).float().mean() > 0.4  # the runs certify something


def _every_round_at_alpha(ends, alpha, t_min, early_share):
    return np.full((len(t_min), len(ends)), alpha)


@pytest.mark.slow
def test_the_soundness_check_catches_a_per_round_bound(monkeypatch):
    """The end-to-end check above, run with Clopper-Pearson at the full alpha in every round, fails."""
    monkeypatch.setattr(sequential, "_levels", _every_round_at_alpha)
    model, x, sigma = _copies()
    res = certify_sequential(
        model, x, sigma, n0=20, n_max=N_MAX, alpha=ALPHA, batch_size=BATCH, seed=11, radius=TRUTH * 1.0001
    )
    assert _violations(res) > _allowed(TRIALS, ALPHA)


def _uniform_votes(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1)[:, :10]  # at x = 0 every class is equally likely


@pytest.mark.parametrize("mode", [{}, {"radius": 0.1}, {"radius": [0.0, 0.5]}, {"tolerance": 0.0}])
def test_noise_abstains_after_the_first_rounds(mode):
    x = torch.zeros(5, 10)
    res = certify_sequential(_uniform_votes, x, 1.0, n0=100, n_max=100_000, seed=3, **mode)
    assert (res.prediction == ABSTAIN).all() and (res.radius == 0).all()
    assert (res.samples <= 100 + 100).all()
    assert torch.equal(res.counts.sum(1), res.samples - 100)


def _mixed_inputs():
    """Inputs of a linear classifier from abstaining to far from the boundary, each with its own sigma."""
    model = LinearBinary(W, 0.0)
    x = torch.tensor([[d / 0.6, 0.0] for d in (-0.9, -0.3, -0.05, 0.0, 0.02, 0.1, 0.4, 1.2)])
    sigma = torch.tensor([0.5, 0.3, 0.25, 0.4, 0.1, 0.5, 0.2, 0.3], dtype=torch.float64)
    return model, x, sigma


@pytest.mark.parametrize("mode", [{"tolerance": 0.0}, {"radius": [0.0, 0.1, 0.3]}, {"radius": 0.2}, {}])
def test_counts_p_lower_and_bound_alpha_agree(mode):
    """p_lower is Clopper-Pearson from exactly ``counts`` at ``bound_alpha`` (issue: counts and p_lower of
    different rounds); recomputed at alpha it would claim more."""
    model, x, sigma = _mixed_inputs()
    res = certify_sequential(model, x, sigma, n0=30, n_max=3000, alpha=0.01, seed=5, **mode)
    n = res.counts.sum(1).numpy()
    assert np.array_equal(n + 30, res.samples.numpy())
    assert (res.bound_alpha < 0.01).all()
    ok = (res.prediction != ABSTAIN).numpy()
    assert ok.sum() >= 4
    votes = res.counts.gather(1, res.prediction.clamp(min=0)[:, None])[:, 0].numpy()
    level = res.bound_alpha.numpy()
    recomputed = np.array([ddrs_ext.stats.clopper_pearson_lower(v, m, a) for v, m, a in zip(votes, n, level)])
    assert np.array_equal(recomputed[ok], res.p_lower.numpy()[ok])
    at_alpha = ddrs_ext.stats.clopper_pearson_lower(votes, n, 0.01)
    assert (at_alpha[ok] > res.p_lower.numpy()[ok]).all()
    assert (res.p_lower.numpy()[level == 0] == 0).all()  # a round that spends no alpha certifies nothing


def test_runs_to_n_max_with_certify_counts():
    """With every radius of interest (tolerance 0) an input that can still certify more runs to n_max;
    its votes are certify's and its bound, at a share of alpha, lies below certify's (no slack)."""
    model, x, sigma = _mixed_inputs()
    res = certify_sequential(model, x, sigma, n0=30, n_max=3000, alpha=0.01, tolerance=0.0, seed=5)
    ref = certify(model, x, sigma, n0=30, n=3000, alpha=0.01, seed=5)
    full = res.samples == 30 + 3000
    assert full.sum() >= 6
    assert torch.equal(res.counts[full], ref.counts[full])
    assert (res.p_lower[full] <= ref.p_lower[full]).all()
    assert (res.p_lower[full] > 0.99 * ref.p_lower[full]).all()  # a share of alpha costs little here
    both = (res.prediction != ABSTAIN) & (ref.prediction != ABSTAIN)
    assert torch.equal(res.prediction[both], ref.prediction[both])
    assert (res.prediction[~full] == ABSTAIN).all()  # the inputs that stopped early will abstain


def test_radius_mode_stops_at_the_decision():
    model, x, sigma = _mixed_inputs()
    res = certify_sequential(model, x, sigma, n0=30, n_max=20_000, alpha=0.01, radius=0.2, seed=5)
    certified = (res.radius >= 0.2) & (res.prediction != ABSTAIN)
    # far from the boundary: certified after the first rounds; on it: given up early
    assert certified[-1] and res.samples[-1] <= 30 + 200
    assert not certified[3] and res.samples[3] <= 30 + 200
    truth = (model.margin(x) / W.norm()).abs()
    assert (res.radius <= truth).all()


@pytest.mark.slow
def test_curve_matches_certify_on_a_dense_grid():
    """On a model whose truth is known (linear, P(class) = Phi(distance / sigma)), the certified-accuracy
    curve at the radii of interest (a dense grid) matches certify(n = n_max)'s, same seed, within Monte
    Carlo tolerance (certify with another seed differs from it by 0.01 here), from fewer evaluations;
    certify with half the samples fails the same check, so the check can tell."""
    B, sigma, n_max, alpha = 400, 0.5, 20_000, 0.001
    g = torch.Generator().manual_seed(0)
    distance = torch.rand(B, generator=g, dtype=torch.float64) * 2.2 - 0.2  # signed, class 1 if > 0
    model = LinearBinary(W, 0.0)
    x = torch.stack([distance / 0.6, torch.zeros(B, dtype=torch.float64)], 1).float()
    labels = torch.ones(B, dtype=torch.int64)
    grid = np.linspace(0, 0.9 * sigma * stats.norm.ppf(alpha ** (1 / n_max)), 40)

    def curve(r):
        ok = (r.prediction == labels)[:, None] & (r.radius[:, None] >= torch.from_numpy(grid)[None, :])
        return ok.double().mean(0)

    truth = (
        ((distance[:, None] >= torch.from_numpy(grid)[None, :]) & (distance[:, None] > 0)).double().mean(0)
    )
    ref = certify(model, x, sigma, n0=100, n=n_max, alpha=alpha, seed=1)
    res = certify_sequential(model, x, sigma, n0=100, n_max=n_max, alpha=alpha, radius=grid, seed=1)
    gap = (curve(res) - curve(ref)).abs().max().item()
    assert gap <= 0.015
    assert (curve(res) <= truth + 0.01).all()  # never above the truth (up to alpha-rare failures)
    assert res.samples.sum() < 0.8 * ref.samples.sum()
    coarse = certify(model, x, sigma, n0=100, n=n_max // 2, alpha=alpha, seed=1)
    assert (curve(coarse) - curve(ref)).abs().max().item() > 0.015


def test_same_results_whatever_the_batching():
    model, x, sigma = _mixed_inputs()
    kwargs = dict(n0=30, n_max=5000, alpha=0.01, radius=[0.0, 0.05, 0.1, 0.2, 0.4], seed=9)
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
    fields = ("prediction", "radius", "p_lower", "counts", "sigma", "samples", "bound_alpha")
    for part in (halves, singles):
        runs.append(
            ddrs_ext.CertifyResult(**{f: torch.cat([getattr(r, f) for r in part]) for f in fields}, seed=9)
        )
    assert len(set(ref.samples.tolist())) > 2  # the inputs stopped at different rounds
    for run in runs:
        for field in fields:
            assert torch.equal(getattr(run, field), getattr(ref, field)), field


def test_per_input_sigma_with_the_memory_against_certify():
    """Per-input sigma then CertificationMemory: the sequential answers at the radii of interest are
    certify's after the memory too (same seed), from fewer evaluations."""
    g = torch.Generator().manual_seed(4)
    B = 60
    model = LinearBinary(W, 0.0)
    x = torch.randn(B, 2, generator=g) * 0.8
    sigma = 0.15 + 0.35 * torch.rand(B, generator=g, dtype=torch.float64)
    radii = np.linspace(0, 0.8, 17)
    kwargs = dict(n0=50, alpha=0.001, seed=2)
    ref = CertificationMemory().adjust_result(x, certify(model, x, sigma, n=20_000, **kwargs))
    res = CertificationMemory().adjust_result(
        x, certify_sequential(model, x, sigma, n_max=20_000, radius=radii, **kwargs)
    )
    labels = (model.margin(x) > 0).long()
    r = torch.from_numpy(radii)

    def curve(v):
        return ((v.prediction == labels)[:, None] & (v.radius[:, None] >= r[None, :])).double().sum(0)

    assert (curve(res) - curve(ref)).abs().max() <= 2  # inputs, of 60
    assert res.samples.sum() < 0.5 * ref.samples.sum()


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
        ({"radius": [0.1, float("nan")]}, ValueError, "radius must be a finite number >= 0"),
        ({"radius": []}, ValueError, "at least one radius of interest"),
        ({"radius": [[0.1, 0.2]]}, TypeError, "1-d sequence"),
        ({"radius": "0.5"}, TypeError, "radius must be a number"),
        ({"radius": True}, TypeError, "radius must be a number"),
        ({"radius": ["a"]}, TypeError, "radius must be a number"),
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
        ({"labels": [0]}, ValueError, "labels must have one entry per input"),
        ({"labels": [0.0, 1.0]}, TypeError, "labels must hold integer class indices"),
        ({"labels": [0, 2]}, ValueError, r"labels must lie in \[0, 2\)"),
        ({"labels": [0, -1]}, ValueError, "labels must be class indices >= 0"),
        ({"labels": [0, 3], "num_classes": 2}, ValueError, r"labels must lie in \[0, num_classes = 2\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"model": LinearBinary(W, 0.0), "x": torch.zeros(2, 2), "sigma": 0.5}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(error, match=match):
        certify_sequential(args["model"], args["x"], args["sigma"], **{"n_max": 500, "seed": 0, **kwargs})


def test_round_schedule_describes_one_input():
    s = sequential.round_schedule(100_000, 0.001, radius=0.5, sigma=0.25)
    assert s.ends == round_ends(100_000) and sum(s.alphas) == pytest.approx(0.001, rel=1e-12)
    first = next(k for k, a in enumerate(s.alphas) if a > 0)
    assert s.alphas[first] ** (1 / s.ends[first]) >= stats.norm.cdf(2.0)  # all votes certify 0.5 there
    assert s.lower(np.array([s.ends[first]]), first)[0] >= stats.norm.cdf(2.0)
    grid = sequential.round_schedule(100_000, 0.001)  # the open-ended mode: multiples of 0.1 sigma
    assert grid.alphas[-1] > 0.45 * 0.001


def _axis_inputs(margins):
    """The l1 tests' axis-normal classifier (logits (0, x_2 + 0.1)), whose l1 distance to the boundary
    is |margin| and whose smoothed probability under uniform noise of half-width theta is
    clip(1/2 + margin / (2 theta), 0, 1)."""
    from test_l1_certify import AxisLinear, inputs_with_margins

    model = AxisLinear()
    return model, inputs_with_margins(model, np.asarray(margins, dtype=np.float64))


@pytest.mark.parametrize("mode", [{"tolerance": 0.0}, {"radius": [0.0, 0.1, 0.3]}, {}])
def test_uniform_noise_l1_radii_below_the_truth_with_certify_counts(mode):
    """noise="uniform": L1 radii theta * (2 p_lower - 1), never above the l1 distance to the boundary
    here (truth |margin|); an input that runs to n_max has certify's votes (the same noise)."""
    theta = 0.5
    margins = [-0.4, -0.1, 0.0, 0.05, 0.2, 0.35, 0.45, 0.7]
    model, x = _axis_inputs(margins)
    res = certify_sequential(model, x, theta, n0=30, n_max=4000, alpha=0.01, seed=5, noise="uniform", **mode)
    assert res.norm == "l1"
    ok = res.prediction != ABSTAIN
    assert ok.sum() >= 5
    truth = torch.tensor(np.abs(margins))
    assert (res.radius[ok] <= truth[ok]).all()
    assert torch.allclose(res.radius[ok], theta * (2 * res.p_lower[ok] - 1))
    assert (res.radius <= theta).all()
    ref = certify(model, x, theta, n0=30, n=4000, alpha=0.01, seed=5, noise="uniform")
    full = res.samples == 30 + 4000
    assert torch.equal(res.counts[full], ref.counts[full])
    assert (res.p_lower[full] <= ref.p_lower[full]).all()


def test_uniform_noise_radii_of_interest_are_l1():
    """A radius of interest above theta cannot be certified (the uniform certificate's largest radius is
    theta), so an input far from the boundary stops as soon as it certifies the reachable ones."""
    theta = 0.5
    model, x = _axis_inputs([0.9, 0.9])
    res = certify_sequential(
        model, x, theta, n0=30, n_max=20_000, alpha=0.01, seed=5, noise="uniform", radius=[0.2, 0.4, 0.8]
    )
    assert (res.radius >= 0.4).all() and (res.radius <= theta).all()
    assert (res.samples < 30 + 20_000).all()
    schedule = sequential.round_schedule(20_000, 0.01, radius=[0.2, 0.4, 0.8], sigma=theta, noise="uniform")
    assert sum(schedule.alphas) == pytest.approx(0.01)
