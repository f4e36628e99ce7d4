"""Data-dependent sigma: kernels against references, convergence to an exactly computed optimum,
paper faithfulness, ranges, reproducibility and bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import ddrs_ext
from ddrs_ext import PAPER_SETTINGS, ops, optimize_sigma, reference, rng, surrogate_radius

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["score", "tangent", "probabilities"])
@pytest.mark.parametrize("splits", [[21], [1] * 21, [5, 9, 7]])
def test_soft_votes_against_reference(dtype, mode, splits):
    g = torch.Generator().manual_seed(3)
    m, B, C, row_start = 6, 4, 5, 2
    rows = sum(splits)
    logits = torch.randn(rows, C, generator=g).to(dtype)
    probabilities = mode == "probabilities"
    if probabilities:
        logits = torch.softmax(logits.double(), 1).to(dtype)
    dlogits = torch.randn(rows, C, generator=g).to(dtype) if mode != "score" else None
    sq = torch.rand(rows, generator=g, dtype=torch.float64) * 20 if mode == "score" else None
    prob = torch.zeros(B, C, dtype=torch.float64)
    deriv = torch.zeros(B, C, dtype=torch.float64)
    total = torch.zeros(B, dtype=torch.float64) if mode == "score" else None
    at = 0
    for n in splits:
        ops.soft_votes_(
            logits[at : at + n],
            row_start + at,
            m,
            prob,
            dlogits=None if dlogits is None else dlogits[at : at + n],
            sq_norm=None if sq is None else sq[at : at + n],
            dim=7,
            probabilities=probabilities,
            deriv_sum=deriv,
            score_total=total,
        )
        at += n
    ref_prob, ref_deriv, ref_total = reference.soft_votes(
        logits, row_start, m, B, dlogits=dlogits, sq_norm=sq, dim=7, probabilities=probabilities
    )
    torch.testing.assert_close(prob, ref_prob, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deriv, ref_deriv, rtol=1e-12, atol=1e-12)
    if total is not None:
        torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-12)


def test_soft_votes_chunking_is_bitwise_reproducible():
    g = torch.Generator().manual_seed(4)
    logits, sq = torch.randn(40, 3, generator=g), torch.rand(40, generator=g, dtype=torch.float64)
    results = []
    for splits in ([40], [3, 17, 20], [1] * 40):
        prob, deriv = torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
        at = 0
        for n in splits:
            ops.soft_votes_(logits[at : at + n], at, 8, prob, sq_norm=sq[at : at + n], dim=2, deriv_sum=deriv)
            at += n
        results.append((prob, deriv))
    for prob, deriv in results[1:]:
        assert torch.equal(prob, results[0][0]) and torch.equal(deriv, results[0][1])


def test_soft_votes_score_total_without_deriv_sum():
    g = torch.Generator().manual_seed(5)
    logits, sq = torch.randn(9, 4, generator=g), torch.rand(9, generator=g, dtype=torch.float64) * 5
    prob, total = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    ops.soft_votes_(logits, 0, 3, prob, sq_norm=sq, dim=2, score_total=total)
    ref_prob, _, ref_total = reference.soft_votes(logits, 0, 3, 3, sq_norm=sq, dim=2)
    torch.testing.assert_close(prob, ref_prob, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "row, probabilities",
    [
        ([0.0, float("nan"), 0.0], False),
        ([0.0, float("inf"), 0.0], False),  # softmax of +Inf is undefined
        ([float("-inf")] * 3, False),  # no class has any probability
        ([0.5, float("-inf"), 0.5], True),  # probabilities must be finite
        ([0.5, float("nan"), 0.5], True),
    ],
)
def test_soft_votes_refused_rows_name_the_input(row, probabilities):
    logits = torch.full((12, 3), 1 / 3)
    logits[7] = torch.tensor(row)
    with pytest.raises(ValueError, match=r"soft_votes: the model returned .* for input 2 \(noise sample 1"):
        ops.soft_votes_(logits, 0, 3, torch.zeros(4, 3, dtype=torch.float64), probabilities=probabilities)
    with pytest.raises(ValueError, match="has no softmax"):
        reference.soft_votes(logits, 0, 3, 4, probabilities=probabilities)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["score", "tangent"])
def test_soft_votes_accept_minus_inf_logits(dtype, mode):
    # A model returning log(softmax(z)) gives -Inf for a class of probability 0: that class gets
    # probability 0, and its tangent (often NaN or -Inf there) contributes nothing.
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(18, 4, generator=g).to(dtype)
    logits[torch.rand(18, 4, generator=g) < 0.4] = float("-inf")
    logits[3, 1:] = float("-inf")  # one finite logit: probability 1
    logits[torch.isinf(logits).all(1), 0] = 0.0  # at least one finite logit per row
    assert bool(torch.isfinite(logits).any(1).all())
    dlogits = torch.randn(18, 4, generator=g).to(dtype) if mode == "tangent" else None
    if dlogits is not None:
        dlogits[logits == float("-inf")] = float("nan")
    sq = torch.rand(18, generator=g, dtype=torch.float64) * 10 if mode == "score" else None
    prob, deriv = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    for at, n in ((0, 5), (5, 13)):
        ops.soft_votes_(
            logits[at : at + n],
            at,
            6,
            prob,
            dlogits=None if dlogits is None else dlogits[at : at + n],
            sq_norm=None if sq is None else sq[at : at + n],
            dim=3,
            deriv_sum=deriv,
        )
    ref_prob, ref_deriv, _ = reference.soft_votes(logits, 0, 6, 3, dlogits=dlogits, sq_norm=sq, dim=3)
    torch.testing.assert_close(prob, ref_prob, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deriv, ref_deriv, rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(deriv).all()) and prob[0].sum().item() == pytest.approx(6.0)
    # the same rows with the -Inf classes given a very negative finite logit agree
    finite = torch.where(logits == float("-inf"), torch.tensor(-1e4, dtype=dtype), logits)
    ref_finite, _, _ = reference.soft_votes(finite, 0, 6, 3)
    torch.testing.assert_close(prob, ref_finite, rtol=1e-12, atol=1e-12)


def test_optimize_sigma_with_a_log_softmax_model():
    # log(softmax) with class 2 impossible: -Inf everywhere in that column, for both estimators
    model = Stripes()

    def log_probs(z):
        out = torch.log_softmax(model(z), 1)
        return torch.cat([out, torch.full_like(out[:, :1], float("-inf"))], 1)

    x = model.points([0.05, 0.2, 0.35])
    for estimator in ("reparam", "score"):
        got = optimize_sigma(log_probs, x, 0.1, estimator=estimator, iterations=4, num_samples=64, seed=3)
        want = optimize_sigma(model, x, 0.1, estimator=estimator, iterations=4, num_samples=64, seed=3)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_soft_votes_bad_arguments():
    prob = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly one of dlogits"):
        ops.soft_votes_(torch.zeros(4, 3), 0, 2, prob, deriv_sum=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prob_sum must be"):
        ops.soft_votes_(torch.zeros(4, 3), 0, 2, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside"):
        ops.soft_votes_(torch.zeros(5, 3), 0, 2, prob)
    with pytest.raises(ValueError, match="score_total needs sq_norm"):
        ops.soft_votes_(torch.zeros(4, 3), 0, 2, prob, score_total=torch.zeros(2, dtype=torch.float64))


def _random_steps(n, seed):
    g = np.random.default_rng(seed)
    e_a = g.uniform(0.3, 1.0, n)
    e_b = g.uniform(0.0, 1.0, n) * (1 - e_a)
    e_a[:4] = [0.99, 0.97, 0.999, 0.5]  # clipped and unclipped tops
    e_b[:4] = [0.001, 0.02, 0.0005, 0.5]
    sigma = g.uniform(0.05, 2.0, n)
    d = g.normal(0, 0.5, (n, 2))
    f64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return f64(sigma), f64(np.stack([e_a, e_b], 1)), f64(d)


@pytest.mark.parametrize("clip", [(0.02, 0.98), (0.001, 0.999)])
def test_sigma_step_gradient_equals_autograd(clip):
    """The closed-form dR/dsigma equals autograd of the surrogate written with torch ops."""
    sigma, top2, dtop2 = _random_steps(64, 0)
    new, radius, grad = ops.sigma_step(
        sigma,
        top2,
        dtop2,
        torch.zeros(64, 2, dtype=torch.float64),
        lr=0.04,
        clip=clip,
        sigma_range=(1e-3, 10.0),
        rule=0,
        growth=2.0,
    )
    s = sigma.clone().requires_grad_()
    e = top2 + dtop2 * (s - sigma)[:, None]  # E(s) to first order: dE/ds = dtop2
    r = reference.surrogate_radius(s, e[:, 0], e[:, 1], clip)
    (auto,) = torch.autograd.grad(r.sum(), s)
    torch.testing.assert_close(radius, r.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new, (sigma + 0.04 * auto).clamp(1e-3, 10.0), rtol=1e-13, atol=1e-13)


def test_sigma_step_quantile_accuracy():
    """Phi^-1 inside the kernel matches SciPy's to 1e-13 across the clip range and into the tails."""
    p = np.concatenate([np.linspace(0.5, 0.999999, 200), [1 - 1e-9, 1 - 1e-12]])
    sigma = torch.full((p.size,), 2.0, dtype=torch.float64)
    top2 = torch.tensor(np.stack([p, np.full_like(p, 0.5)], 1))
    _, radius, _ = ops.sigma_step(
        sigma,
        top2,
        torch.zeros_like(top2),
        torch.zeros_like(top2),
        lr=1.0,
        clip=(1e-13, 1 - 1e-13),
        sigma_range=(1e-3, 10.0),
        rule=0,
        growth=2.0,
    )
    np.testing.assert_allclose(radius.numpy(), stats.norm.ppf(p), rtol=1e-13, atol=1e-15)


def test_sigma_step_bisection_rule():
    f64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    sigma = f64([0.5, 0.5, 0.5, 0.5])
    top2 = f64([[0.999, 0.0005]] * 2 + [[0.7, 0.2]] * 2)
    dtop2 = f64([[0.0, 0.0]] * 2 + [[-3.0, 1.0]] * 2)  # rows 0, 1: clipped, grad > 0; rows 2, 3: grad < 0
    bracket = f64([[0.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.125, 0.0]])
    new, _, grad = ops.sigma_step(
        sigma, top2, dtop2, bracket, lr=1.0, clip=(0.02, 0.98), sigma_range=(0.01, 5.0), rule=1, growth=2.0
    )
    assert (grad[:2] > 0).all() and (grad[2:] < 0).all()
    # grow, bisect (0.5, 2) geometrically, shrink, bisect (0.125, 0.5)
    torch.testing.assert_close(new, f64([1.0, 1.0, 0.25, 0.25]), rtol=1e-15, atol=0)
    torch.testing.assert_close(
        bracket, f64([[0.5, 0.0], [0.5, 2.0], [0.0, 0.5], [0.125, 0.5]]), rtol=0, atol=0
    )
    # `beyond` overrides a positive gradient: shrink / bisect downwards instead of growing.
    bracket = f64([[0.0, 0.0], [0.125, 0.0], [0.0, 0.0], [0.0, 0.0]])
    new, _, _ = ops.sigma_step(
        sigma,
        top2,
        dtop2,
        bracket,
        beyond=torch.tensor([True, True, False, False]),
        lr=1.0,
        clip=(0.02, 0.98),
        sigma_range=(0.01, 5.0),
        rule=1,
        growth=2.0,
    )
    torch.testing.assert_close(new, f64([0.25, 0.25, 0.25, 0.25]), rtol=1e-15, atol=0)
    torch.testing.assert_close(bracket[:2], f64([[0.0, 0.5], [0.125, 0.5]]), rtol=0, atol=0)


def test_sigma_step_bad_arguments():
    sigma, top2, dtop2 = _random_steps(4, 1)
    bracket = torch.zeros(4, 2, dtype=torch.float64)
    kw = dict(lr=0.1, clip=(0.02, 0.98), sigma_range=(0.01, 5.0), rule=0, growth=2.0)
    with pytest.raises(ValueError, match="clip range"):
        ops.sigma_step(sigma, top2, dtop2, bracket, **{**kw, "clip": (0.9, 0.1)})
    with pytest.raises(ValueError, match="sigma range"):
        ops.sigma_step(sigma, top2, dtop2, bracket, **{**kw, "sigma_range": (0.0, 1.0)})
    with pytest.raises(ValueError, match="rule"):
        ops.sigma_step(sigma, top2, dtop2, bracket, **{**kw, "rule": 5})
    with pytest.raises(ValueError, match="shape"):
        ops.sigma_step(sigma, top2[:3], dtop2, bracket, **kw)


def test_opcheck_sigma_ops():
    sigma, top2, dtop2 = _random_steps(5, 2)
    torch.library.opcheck(
        torch.ops.ddrs_ext.sigma_step.default,
        (
            sigma,
            top2,
            dtop2,
            torch.zeros(5, 2, dtype=torch.float64),
            None,
            0.1,
            0.02,
            0.98,
            0.01,
            5.0,
            1,
            2.0,
        ),
    )
    torch.library.opcheck(
        torch.ops.ddrs_ext.sigma_step.default,
        (
            sigma,
            top2,
            dtop2,
            torch.zeros(5, 2, dtype=torch.float64),
            torch.tensor([True, False] * 2 + [True]),
            0.1,
            0.02,
            0.98,
            0.01,
            5.0,
            1,
            2.0,
        ),
    )
    logits, sq = torch.randn(12, 3), torch.rand(12, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.ddrs_ext.soft_votes_.default,
        (
            logits,
            None,
            sq,
            0,
            4,
            5,
            False,
            torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
        ),
    )


# ---------------------------------------------------------------- optimize_sigma


class Stripes(torch.nn.Module):
    """Two classes in alternating stripes across the direction w: logits (0, beta * cos(pi * w.x / width)).

    Under noise w.(x + sigma eps) = t + sigma ||w|| Z, so
    E_1(sigma) = E[sigmoid(beta cos(pi (t + sigma ||w|| Z) / width))] is a one-dimensional Gaussian
    integral, and the surrogate and its optimum follow by quadrature. Far-reaching noise averages
    the stripes out, so every point has an interior optimum.
    """

    def __init__(self, dim=8, width=2.0, beta=6.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, generator=g, dtype=torch.float64)
        self.register_buffer("w", w / w.norm() * 1.5)
        self.width, self.beta = width, beta
        self._z = np.linspace(-12, 12, 48001)
        self._wz = np.exp(-(self._z**2) / 2) / np.exp(-(self._z**2) / 2).sum()

    def forward(self, x):
        t = x.flatten(1) @ self.w.to(x.dtype)
        return torch.stack([torch.zeros_like(t), self.beta * torch.cos(math.pi * t / self.width)], dim=1)

    def exact_top(self, t, sigma):
        """E_1(sigma) at projection t (trapezoid rule on a fine grid; the integrand oscillates)."""
        u = t + sigma * float(self.w.norm()) * self._z
        return float(np.sum(self._wz / (1 + np.exp(-self.beta * np.cos(np.pi * u / self.width)))))

    def exact_surrogate(self, t, sigma, clip=(0.02, 0.98)):
        e1 = self.exact_top(t, sigma)
        q = stats.norm.ppf(np.clip([max(e1, 1 - e1), min(e1, 1 - e1)], *clip))
        return sigma / 2 * (q[0] - q[1])

    def exact_optimum(self, t, clip=(0.02, 0.98)):
        res = optimize.minimize_scalar(
            lambda s: -self.exact_surrogate(t, s, clip),
            bounds=(0.01, 1.5),
            method="bounded",
            options={"xatol": 1e-6},
        )
        return res.x, -res.fun

    def points(self, ts):
        unit = (self.w / self.w.norm()).float()
        return torch.stack([unit * (t / float(self.w.norm())) for t in ts])


def test_stripes_quadrature_has_interior_optima():
    model = Stripes()
    for t in (0.0, 0.3, -0.5):
        s_star, r_star = model.exact_optimum(t)
        assert 0.2 < s_star < 0.5 and r_star > 0.25
        assert model.exact_surrogate(t, 1.5) < 0.1 * r_star


@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_converges_to_the_exact_optimum(estimator):
    model = Stripes()
    ts = [0.0, 0.3, -0.5]
    x = model.points(ts)
    sigma = optimize_sigma(
        model, x, 0.1, estimator=estimator, iterations=20, num_samples=10000, seed=3, batch_size=4096
    )
    for b, t in enumerate(ts):
        s_star, r_star = model.exact_optimum(t)
        assert model.exact_surrogate(t, float(sigma[b])) >= 0.985 * r_star, (b, float(sigma[b]), s_star)
        assert abs(float(sigma[b]) - s_star) < 0.15 * s_star  # the surrogate is flat at its optimum


def test_paper_ascent_converges_too():
    model = Stripes()
    x = model.points([0.0, 0.3])
    sigma = optimize_sigma(
        model, x, 0.2, estimator="reparam", rule="ascent", lr=0.1, iterations=150, num_samples=1000, seed=4
    )
    for b, t in enumerate([0.0, 0.3]):
        _, r_star = model.exact_optimum(t)
        assert model.exact_surrogate(t, float(sigma[b])) >= 0.98 * r_star


def _published_loop(model, x, sigma0, seed, iterations, lr, num_samples, clip):
    """The published ascent (OptimzeSigma.py; ddsmoothing's isotropic_dds), transcribed with
    reverse-mode autograd on ddrs_ext's noise and NOT clamped to any range, as published."""
    B, m = x.shape[0], num_samples
    stream = torch.arange(B)
    sigma = torch.full((B,), sigma0, dtype=torch.float64)
    path = []
    for t in range(iterations):
        eps, _ = ops.perturb_gaussian(
            torch.zeros_like(x), torch.ones(B), stream, seed, rng.PHASE_SIGMA + t * m, m
        )
        s = sigma.clone().requires_grad_()
        noisy = x.repeat_interleave(m, 0) + s.repeat_interleave(m)[:, None] * eps
        psi = torch.softmax(model(noisy), 1).view(B, m, -1).mean(1)
        top = psi.topk(2, dim=1).values
        radius = reference.surrogate_radius(s, top[:, 0], top[:, 1], clip)
        (grad,) = torch.autograd.grad(radius.sum(), s)
        sigma = sigma + lr * grad
        path.append(sigma)
    return path


@pytest.mark.parametrize("preset", ["PAPER_SETTINGS", "PAPER_DATASET_SETTINGS"])
def test_reparam_ascent_follows_the_published_algorithm(preset):
    """Same noise, same settings: inside sigma_range, sigma after each step equals the paper's
    (unclamped) autograd loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    settings = {**getattr(ddrs_ext, preset), "iterations": 12, "num_samples": 50}
    seed, seen = 77, []
    ours = optimize_sigma(
        model,
        x,
        0.25,
        seed=seed,
        sigma_range=(1e-3, 10.0),
        callback=lambda s: seen.append(s.next_sigma),
        **settings,
    )
    path = _published_loop(
        model,
        x,
        0.25,
        seed,
        settings["iterations"],
        settings["lr"],
        settings["num_samples"],
        settings["clip"],
    )
    moved = 0.0
    for t, sigma in enumerate(path):
        assert bool(((sigma > 1e-3) & (sigma < 10.0)).all())  # the published path stays inside the range
        torch.testing.assert_close(seen[t], sigma, rtol=1e-10, atol=1e-12)
        moved = max(moved, float((sigma - 0.25).abs().max()))
    torch.testing.assert_close(ours, path[-1], rtol=1e-10, atol=1e-12)
    assert moved > 1e-3  # sigma actually moved, so the comparison has teeth


def test_published_algorithm_leaves_the_range_and_ours_does_not():
    """Outside sigma_range the two part ways on purpose: the published loop has no range (its sigma
    can grow without bound or go negative); ours stops at the range's ends."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    settings = dict(PAPER_SETTINGS, iterations=30, num_samples=20, lr=2.0)
    seen = []
    ours = optimize_sigma(
        model,
        x,
        0.3,
        seed=5,
        sigma_range=(0.01, 2.0),
        callback=lambda s: seen.append(s.next_sigma),
        **settings,
    )
    path = torch.stack(_published_loop(model, x, 0.3, 5, 30, 2.0, 20, settings["clip"]))
    assert bool((path.max(0).values > 2.0).any())  # the published loop left the range
    assert bool(((torch.stack(seen) >= 0.01) & (torch.stack(seen) <= 2.0)).all())
    assert bool((ours == 2.0).any())
    inside = int((path > 2.0).any(1).nonzero()[0, 0])  # the first step that left
    torch.testing.assert_close(torch.stack(seen[:inside]), path[:inside], rtol=1e-10, atol=1e-12)


def test_paper_settings_are_the_published_ones():
    assert PAPER_SETTINGS == dict(
        iterations=900, lr=0.04, num_samples=100, estimator="reparam", rule="ascent", clip=(0.02, 0.98)
    )
    assert ddrs_ext.PAPER_DATASET_SETTINGS == dict(PAPER_SETTINGS, clip=(0.001, 0.999))


@pytest.mark.parametrize("rule", ["ascent", "bisect"])
@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_sigma_stays_in_range(rule, estimator):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    x = torch.randn(6, 5) * 3
    seen = []
    out = optimize_sigma(
        model,
        x,
        0.3,
        iterations=15,
        num_samples=16,
        lr=5.0,
        rule=rule,
        estimator=estimator,
        sigma_range=(0.2, 0.4),
        seed=0,
        callback=lambda s: seen.append(s.next_sigma),
    )
    allsig = torch.stack(seen)
    assert (allsig >= 0.2).all() and (allsig <= 0.4).all() and (out >= 0.2).all() and (out <= 0.4).all()
    assert (allsig == 0.4).any() or (allsig == 0.2).any()  # the range was actually reached


@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_reproducible_whatever_the_batch_size(estimator):
    model = Stripes()
    x = model.points([0.0, 0.2, 0.4])
    kw = dict(estimator=estimator, iterations=6, num_samples=30, seed=11, index=[5, 6, 7])
    ref = optimize_sigma(model, x, 0.3, batch_size=1000, **kw)
    for batch_size in (1, 7, 31):
        assert torch.equal(optimize_sigma(model, x, 0.3, batch_size=batch_size, **kw), ref)
    alone = optimize_sigma(model, x[1:2], 0.3, batch_size=13, **{**kw, "index": [6]})
    assert torch.equal(alone, ref[1:2])


def test_score_works_without_autograd():
    """A black-box model (numpy inside, no autograd) with the score estimator."""
    model = Stripes()

    def black_box(z):
        logits = model(torch.from_numpy(z.detach().numpy().copy()))
        return torch.from_numpy(logits.numpy())

    x = model.points([0.0])
    sigma = optimize_sigma(black_box, x, 0.1, estimator="score", iterations=12, num_samples=500, seed=2)
    s_star, r_star = model.exact_optimum(0.0)
    assert model.exact_surrogate(0.0, float(sigma[0])) >= 0.95 * r_star


def test_keep_prediction_stops_at_a_class_change():
    """A model that calls everything far from x class 2 with growing confidence: the surrogate grows
    without bound, so bisection runs to sigma_max unless the top class is held to the one at sigma0."""

    def model(z):
        r = z.flatten(1).norm(dim=1) / 8  # about sigma for the 64-dimensional noise around x = 0
        return torch.stack([50 * (1 - r), torch.zeros_like(r), 50 * (r - 1)], dim=1)

    x = torch.zeros(2, 64)
    kw = dict(iterations=14, num_samples=256, seed=0, sigma_range=(1e-3, 10.0), estimator="score")
    free = optimize_sigma(model, x, 0.1, keep_prediction=False, **kw)
    held = optimize_sigma(model, x, 0.1, **kw)
    assert (free > 5).all()  # the runaway: class 2 is confident everywhere beyond sigma ~ 1
    assert (held < 1.0).all() and (held > 0.4).all()
    counts = ddrs_ext.certify(model, x, held, n0=10, n=500, seed=1).counts
    assert (counts.argmax(1) == 0).all()  # still the class of sigma0


def test_certify_surrogate_equals_paper_with_two_classes():
    """With two classes E_B = 1 - E_A, so both surrogates are the same function of sigma."""
    model = Stripes()
    x = model.points([0.0, 0.3])
    kw = dict(iterations=8, num_samples=200, seed=5)
    paper = optimize_sigma(model, x, 0.1, **kw)
    certify = optimize_sigma(model, x, 0.1, surrogate="certify", **kw)
    torch.testing.assert_close(paper, certify, rtol=1e-9, atol=1e-12)


def test_certify_surrogate_maximises_sigma_times_quantile():
    """Three classes: the 'certify' surrogate tracks sigma * Phi^-1(E_A), which the paper's overstates."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(
            torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]])
        )
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0]])
    seen = []
    optimize_sigma(
        model,
        x,
        0.2,
        surrogate="certify",
        rule="ascent",
        lr=0.05,
        iterations=3,
        num_samples=400,
        seed=1,
        callback=lambda s: seen.append(s),
    )
    for step in seen:
        mean = ddrs_ext.sigma._SoftSampler(model, x, torch.arange(1), 1, 1000, "reparam", False)
        e, _ = mean.run(step.sigma, rng.PHASE_SIGMA + step.iteration * 400, 400, derivatives=False)
        e_a = float(e.max().clamp(0.02, 0.98))
        assert float(step.radius[0]) == pytest.approx(float(step.sigma[0]) * stats.norm.ppf(e_a), rel=1e-9)


def test_probabilities_output():
    model = Stripes()
    x = model.points([0.0, 0.3])
    kw = dict(iterations=5, num_samples=64, seed=1)
    a = optimize_sigma(model, x, 0.2, **kw)
    b = optimize_sigma(lambda z: torch.softmax(model(z), 1), x, 0.2, probabilities=True, **kw)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("estimator", ["reparam", "score"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_of_the_other_kind_is_refused(estimator, dtype):
    # The authors' models end in softmax; passed as logits they silently drove every sigma to the
    # floor (issue 9). Both mistakes are refused, for optimize_sigma and surrogate_radius.
    model = Stripes()
    x = model.points([0.0, 0.3]).to(dtype)
    kw = dict(iterations=2, num_samples=16, seed=1, estimator=estimator)
    with pytest.raises(ValueError, match="seems to return class probabilities.*probabilities=True"):
        optimize_sigma(lambda z: torch.softmax(model(z).float(), 1).to(dtype), x, 0.2, **kw)
    with pytest.raises(ValueError, match="rows are not probability vectors"):
        optimize_sigma(model, x, 0.2, probabilities=True, **kw)
    with pytest.raises(ValueError, match="seems to return class probabilities"):
        surrogate_radius(lambda z: torch.softmax(model(z).float(), 1).to(dtype), x, 0.2, num_samples=8)


def test_surrogate_radius_matches_quadrature():
    model = Stripes()
    ts = [0.0, 0.4]
    x = model.points(ts)
    est = surrogate_radius(model, x, torch.tensor([0.3, 0.6]), num_samples=20000, seed=0)
    for b, (t, s) in enumerate(zip(ts, [0.3, 0.6])):
        assert abs(float(est[b]) - model.exact_surrogate(t, s)) < 0.02


def test_progress_bar_runs(capsys):
    model = Stripes()
    optimize_sigma(model, model.points([0.0]), 0.2, iterations=2, num_samples=8, progress=True, seed=0)
    assert "optimize_sigma" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sigma0=0.0), ValueError, "sigma0 must be a finite number > 0"),
        (dict(sigma0=float("nan")), ValueError, "sigma0 must be a finite number > 0"),
        (dict(sigma0=torch.tensor([0.1, -1.0])), ValueError, "input 1"),
        (dict(sigma0=torch.ones(3)), ValueError, r"shape \(2,\)"),
        (dict(sigma0=20.0), ValueError, "inside sigma_range"),
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=1, estimator="score"), ValueError, "num_samples must be >= 2"),
        (dict(iterations=-1), ValueError, "iterations must be >= 0"),
        (dict(iterations=2.5), TypeError, "iterations must be an int"),
        (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0"),
        (dict(estimator="magic"), ValueError, "estimator must be one of"),
        (dict(rule="newton"), ValueError, "rule must be one of"),
        (dict(clip=(0.5, 0.1)), ValueError, "clip must satisfy"),
        (dict(clip=0.1), TypeError, "clip must be a pair"),
        (dict(sigma_range=(0.0, 1.0)), ValueError, "sigma_range must satisfy"),
        (dict(growth=1.0), ValueError, "growth must be a finite number > 1"),
        (dict(keep_prediction=1), TypeError, "keep_prediction must be a bool"),
        (dict(surrogate="tight"), ValueError, "surrogate must be one of"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(x=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "floating-point"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = Stripes()
    args = dict(x=model.points([0.0, 0.1]), sigma0=0.2, iterations=1, num_samples=4)
    args.update(kwargs)
    x, sigma0 = args.pop("x"), args.pop("sigma0")
    with pytest.raises(error, match=match):
        optimize_sigma(model, x, sigma0, **args)


def test_one_class_model_is_rejected():
    with pytest.raises(ValueError, match="at least 2 classes"):
        optimize_sigma(lambda z: z.flatten(1)[:, :1], torch.zeros(2, 3), 0.2, iterations=1, num_samples=4)


def test_nan_model_names_the_input():
    def model(z):
        out = torch.stack([z[:, 0], -z[:, 0]], 1)
        out[z[:, 1] > 0.5] = float("nan")  # only input 1 has x[1] = 1
        return out

    x = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="input 1"):
        optimize_sigma(model, x, 0.01, estimator="score", iterations=1, num_samples=4)


def test_module_exports():
    assert ddrs_ext.optimize_sigma is optimize_sigma and math.isfinite(PAPER_SETTINGS["lr"])
