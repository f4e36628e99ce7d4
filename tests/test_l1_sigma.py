"""Data-dependent theta for the l1 certificate (uniform noise): the step kernel's linear surrogate,
the reparameterisation derivative, optimize_theta against a closed-form optimum and the published loop."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize

import ddrs_ext
from ddrs_ext import PAPER_L1_SETTINGS, ops, optimize_theta, rng, surrogate_radius
from ddrs_ext.noise import UNIFORM
from ddrs_ext.sigma import _SoftSampler

# ---------------------------------------------------------------- the step kernel, gap 1


@pytest.mark.parametrize("clip", [(0.0, 1.0), (0.1, 0.9)])
def test_linear_step_gradient_equals_autograd(clip):
    g = torch.Generator().manual_seed(0)
    B = 40
    sigma = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    top = torch.rand(B, 2, generator=g, dtype=torch.float64).sort(1, descending=True).values
    dtop = torch.randn(B, 2, generator=g, dtype=torch.float64)
    bracket = torch.zeros(B, 2, dtype=torch.float64)
    kw = dict(lr=0.3, clip=clip, sigma_range=(1e-3, 10.0), rule=0, growth=2.0, gap=1)
    new, radius, grad = ops.sigma_step(sigma, top, dtop, bracket, **kw)
    # R(theta) = theta * (clip E_A - clip E_B) along the tangent theta -> (E_A + t dE_A, E_B + t dE_B)
    s = sigma.clone().requires_grad_()
    t = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    e = (top + t[:, None] * dtop).clamp(*clip)
    r = s * (e[:, 0] - e[:, 1])
    ds, dt = torch.autograd.grad(r.sum(), (s, t))
    torch.testing.assert_close(radius, r.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, ds + dt, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new, (sigma + 0.3 * grad).clamp(1e-3, 10.0), rtol=1e-13, atol=0)


def test_linear_step_clip_range_and_gap_checked():
    B = 2
    args = (torch.ones(B, dtype=torch.float64), torch.full((B, 2), 0.5, dtype=torch.float64))
    args += (torch.zeros(B, 2, dtype=torch.float64), torch.zeros(B, 2, dtype=torch.float64))
    kw = dict(lr=0.1, sigma_range=(1e-3, 10.0), rule=0, growth=2.0)
    ops.sigma_step(*args, clip=(0.0, 1.0), gap=1, **kw)  # the linear gap needs no clip
    with pytest.raises(ValueError, match=r"0 < clip_lo < clip_hi < 1"):
        ops.sigma_step(*args, clip=(0.0, 1.0), gap=0, **kw)  # Phi^-1(0) is not finite
    with pytest.raises(ValueError, match=r"0 <= clip_lo < clip_hi <= 1"):
        ops.sigma_step(*args, clip=(0.5, 1.5), gap=1, **kw)
    with pytest.raises(ValueError, match="gap must be 0"):
        ops.sigma_step(*args, clip=(0.1, 0.9), gap=2, **kw)
    torch.library.opcheck(
        torch.ops.ddrs_ext.sigma_step.default, (*args, None, 0.1, 0.0, 1.0, 0.01, 5.0, 1, 2.0, 1)
    )


# ---------------------------------------------------------------- the derivative in theta


def _smooth_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).double()
    with torch.no_grad():  # steep enough that the noise level matters
        model[0].weight.mul_(4)
        model[2].weight.mul_(4)
    return model


def test_reparam_derivative_matches_finite_differences_with_common_noise():
    """dE/dtheta from forward-mode autograd along u equals (E(theta + h) - E(theta - h)) / 2h, E evaluated
    on the same noise u (the same sample indices: common random numbers), to O(h^2)."""
    model = _smooth_model()
    x = torch.randn(3, 5, dtype=torch.float64)
    theta = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    sampler = _SoftSampler(model, x, torch.arange(3), 17, 1000, "reparam", False, UNIFORM)
    m, offset, h = 300, rng.PHASE_SIGMA + 5 * 300, 1e-5
    with torch.no_grad():
        _, deriv = sampler.run(theta, offset, m, derivatives=True)
        up, _ = sampler.run(theta + h, offset, m, derivatives=False)
        down, _ = sampler.run(theta - h, offset, m, derivatives=False)
    fd = (up - down) / (2 * h)
    torch.testing.assert_close(deriv, fd, rtol=1e-6, atol=1e-9)
    assert float(deriv.abs().max()) > 1e-2  # the derivative is not trivially zero
    # Negative control: the same comparison on independent noise (other sample indices) fails.
    with torch.no_grad():
        other, _ = sampler.run(theta + h, offset + 7 * m, m, derivatives=False)
    assert not torch.allclose(deriv, (other - down) / (2 * h), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- optimize_theta against a closed form


class AxisStripes(torch.nn.Module):
    """Two classes in stripes across coordinate k: logits (0, beta * cos(pi * c x_k / width)).

    Under uniform noise only u_k moves c x_k, to t + theta c u_k, so E_1(theta) is a one-dimensional
    average over u_k in [-1, 1] and the surrogate theta * |2 E_1 - 1| and its optimum follow by
    quadrature. Wide noise averages the stripes out: every point has an interior optimum.
    """

    def __init__(self, dim=6, k=1, c=1.5, width=2.0, beta=6.0):
        super().__init__()
        self.dim, self.k, self.c, self.width, self.beta = dim, k, c, width, beta
        self._u = np.linspace(-1, 1, 40001)

    def forward(self, x):
        t = self.c * x.flatten(1)[:, self.k]
        return torch.stack([torch.zeros_like(t), self.beta * torch.cos(math.pi * t / self.width)], dim=1)

    def exact_top(self, t, theta):
        v = t + theta * self.c * self._u
        p = 1 / (1 + np.exp(-self.beta * np.cos(np.pi * v / self.width)))
        return float(np.trapezoid(p, self._u) / 2)

    def exact_surrogate(self, t, theta):
        return theta * abs(2 * self.exact_top(t, theta) - 1)

    def exact_optimum(self, t):
        """The first (smallest-theta) maximum: beyond it the average changes class (keep_prediction)."""
        res = optimize.minimize_scalar(
            lambda s: -self.exact_surrogate(t, s), bounds=(0.01, 0.9 * self.width / self.c), method="bounded"
        )
        return res.x, -res.fun

    def points(self, ts):
        x = torch.zeros(len(ts), self.dim)
        x[:, 0] = 0.3  # other coordinates do not matter
        x[:, self.k] = torch.tensor(ts) / self.c
        return x


def test_axis_stripes_quadrature_has_interior_optima():
    model = AxisStripes()
    for t in (0.0, 0.3, -0.5):
        s_star, r_star = model.exact_optimum(t)
        assert 0.2 < s_star < 1.0 and r_star > 0.2
        assert model.exact_surrogate(t, 0.9 * model.width / model.c) < 0.8 * r_star


@pytest.mark.parametrize("surrogate", ["certify", "paper"])  # the same for two classes
def test_optimize_theta_converges_to_the_exact_optimum(surrogate):
    model = AxisStripes()
    ts = [0.0, 0.3, -0.5]
    theta = optimize_theta(
        model,
        model.points(ts),
        0.1,
        iterations=20,
        num_samples=4000,
        seed=3,
        batch_size=4096,
        surrogate=surrogate,
    )
    for b, t in enumerate(ts):
        s_star, r_star = model.exact_optimum(t)
        assert model.exact_surrogate(t, float(theta[b])) >= 0.985 * r_star, (b, float(theta[b]), s_star)
        assert abs(float(theta[b]) - s_star) < 0.15 * s_star


def test_surrogate_radius_uniform_matches_quadrature():
    model = AxisStripes()
    ts = [0.0, 0.3, -0.5]
    got = surrogate_radius(model, model.points(ts), 0.5, num_samples=20000, seed=1, noise="uniform")
    for b, t in enumerate(ts):
        assert abs(float(got[b]) - model.exact_surrogate(t, 0.5)) < 0.01


def _published_l1_loop(model, x, theta0, seed, iterations, lr, num_samples):
    """ddsmoothing's optimize_isotropic_dds with its L1Certificate, transcribed with reverse-mode autograd
    on ddrs_ext's uniform noise: psi = mean softmax, radius = theta * (top1 - top2), no clamp, no range."""
    B, m = x.shape[0], num_samples
    stream = torch.arange(B)
    theta = torch.full((B,), theta0, dtype=torch.float64)
    path = []
    for t in range(iterations):
        u = ops.perturb_uniform(torch.zeros_like(x), torch.ones(B), stream, seed, rng.PHASE_SIGMA + t * m, m)
        s = theta.clone().requires_grad_()
        noisy = x.repeat_interleave(m, 0) + s.repeat_interleave(m)[:, None] * u
        psi = torch.softmax(model(noisy), 1).view(B, m, -1).mean(1)
        top = psi.topk(2, dim=1).values
        (grad,) = torch.autograd.grad((s * (top[:, 0] - top[:, 1])).sum(), s)
        theta = theta + lr * grad
        path.append(theta)
    return path


def test_paper_l1_settings_follow_the_published_algorithm():
    """Same noise, same settings: theta after each step equals ddsmoothing's l1 loop."""
    model = _smooth_model()
    x = torch.randn(3, 5, dtype=torch.float64)
    settings = {**PAPER_L1_SETTINGS, "iterations": 12, "num_samples": 50, "lr": 0.5}
    seen = []
    ours = optimize_theta(model, x, 0.25, seed=77, callback=lambda s: seen.append(s.next_sigma), **settings)
    path = _published_l1_loop(model, x, 0.25, 77, 12, 0.5, 50)
    for t, theta in enumerate(path):
        torch.testing.assert_close(seen[t], theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, path[-1], rtol=1e-10, atol=1e-12)
    assert float((path[-1] - 0.25).abs().max()) > 1e-3  # theta moved: the comparison has teeth


def test_paper_l1_settings_are_the_published_ones():
    assert PAPER_L1_SETTINGS == dict(
        iterations=900, lr=0.04, num_samples=100, estimator="reparam", rule="ascent", surrogate="paper"
    )
    assert ddrs_ext.PAPER_L1_SETTINGS is PAPER_L1_SETTINGS and ddrs_ext.optimize_theta is optimize_theta


def test_optimize_theta_reproducible_and_in_range():
    model = _smooth_model()
    x = torch.randn(5, 5, dtype=torch.float64)
    a = optimize_theta(
        model, x, 0.3, iterations=6, num_samples=64, seed=2, batch_size=7, sigma_range=(0.05, 0.8)
    )
    b = optimize_theta(
        model, x, 0.3, iterations=6, num_samples=64, seed=2, batch_size=1000, sigma_range=(0.05, 0.8)
    )
    assert torch.equal(a, b)
    assert bool(((a >= 0.05) & (a <= 0.8)).all())
    # uniform noise, not Gaussian: optimize_sigma with the same options goes elsewhere
    c = ddrs_ext.optimize_sigma(model, x, 0.3, iterations=6, num_samples=64, seed=2, sigma_range=(0.05, 0.8))
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimator="score"), "estimator='score' is Gaussian-only"),
        (dict(clip=(0.02, 0.98)), "clip is Gaussian-only"),
        (dict(theta0=0.0), r"theta0 \(theta, the uniform noise's half-width\) must be a finite number > 0"),
        (dict(theta0=-0.2), "theta0"),
        (dict(theta0=torch.tensor([0.2, float("nan")])), "input 1"),
        (dict(theta0=20.0), "theta0 must lie inside sigma_range"),
        (dict(surrogate="gauss"), "surrogate must be one of"),
    ],
)
def test_optimize_theta_bad_arguments(kwargs, match):
    model = _smooth_model()
    x = torch.randn(2, 5, dtype=torch.float64)
    theta0 = kwargs.pop("theta0", 0.2)
    with pytest.raises(ValueError, match=match):
        optimize_theta(model, x, theta0, iterations=1, num_samples=4, **kwargs)


def test_surrogate_radius_refuses_clip_with_uniform_noise():
    model = _smooth_model()
    with pytest.raises(ValueError, match="clip is Gaussian-only"):
        surrogate_radius(model, torch.randn(2, 5, dtype=torch.float64), 0.3, clip=(0.1, 0.9), noise="uniform")
