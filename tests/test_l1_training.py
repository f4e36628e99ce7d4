"""Training for the l1 certificate: uniform noisy copies, uniform augmentation with a theta per example,
theta updates from a bank, and a short data-dependent run on digits."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_training import _digits, _digits_cnn

from ddrs_ext import ops, optimize_theta, rng
from ddrs_ext.training import (
    PHASE_TRAIN,
    IndexedDataset,
    SigmaBank,
    noisy_copies,
    uniform_augmentation_loss,
    update_sigma,
)

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _mlp(classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(math.prod(SHAPE), 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, classes),
    )


def _batch(B: int = 6, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(B, *SHAPE, generator=g),
        torch.randint(0, classes, (B,), generator=g),
        torch.rand(B, generator=g) * 0.4 + 0.1,
    )


def test_uniform_noisy_copies_are_the_kernels_and_differentiable():
    x, _, theta = _batch()
    index = torch.tensor([4, 9, 0, 2, 7, 1])
    x.requires_grad_(True)
    out = noisy_copies(x, theta, copies=3, seed=5, index=index, noise="uniform")
    u = ops.perturb_uniform(torch.zeros_like(x), torch.ones(6), index, 5, PHASE_TRAIN, 3)
    expected = x.detach().repeat_interleave(3, 0) + theta.repeat_interleave(3).view(-1, 1, 1, 1) * u
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-7)
    assert bool(
        (
            (out.detach() - x.detach().repeat_interleave(3, 0)).abs()
            <= theta.view(-1, 1, 1, 1).repeat_interleave(3, 0) + 1e-6
        ).all()
    )
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 3.0))
    gaussian = noisy_copies(x.detach(), theta, copies=3, seed=5, index=index)
    assert not torch.equal(gaussian, out.detach())


def test_uniform_augmentation_loss_is_mean_cross_entropy_over_copies():
    model = _mlp()
    x, y, theta = _batch()
    loss = uniform_augmentation_loss(model, x, y, theta, copies=2, seed=3)
    noisy = noisy_copies(x, theta, copies=2, seed=3, noise="uniform")
    torch.testing.assert_close(loss, F.cross_entropy(model(noisy), y.repeat_interleave(2)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_update_sigma_uniform_is_optimize_theta_from_the_bank():
    model = _mlp()
    model(torch.rand(16, *SHAPE))  # running statistics
    x, _, _ = _batch(6)
    index = torch.tensor([9, 2, 14, 0, 5, 11])
    bank = SigmaBank(16, 0.2, sigma_range=(0.01, 3.0))
    before = bank.sigma.clone()
    kw = dict(num_samples=8, lr=0.5, seed=7)
    theta = update_sigma(model, bank, x, index, steps=4, noise="uniform", surrogate="certify", **kw)
    model.eval()
    expected = optimize_theta(
        model,
        x,
        before[index],
        iterations=4,
        rule="ascent",
        sigma_range=(0.01, 3.0),
        index=index,
        surrogate="certify",
        keep_prediction=False,
        **kw,
    )
    model.train()
    assert torch.equal(bank.sigma[index], expected) and torch.equal(theta, expected.float())
    assert bool((bank.sigma[index] != before[index]).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimator="score"), "estimator='score' is Gaussian-only"),
        (dict(clip=(0.02, 0.98)), "clip is Gaussian-only"),
        (dict(noise="cauchy"), "noise must be one of"),
    ],
)
def test_update_sigma_uniform_refuses_gaussian_only_options(kwargs, match):
    model = _mlp()
    x, _, _ = _batch(4)
    bank = SigmaBank(4, 0.2)
    with pytest.raises(ValueError, match=match):
        update_sigma(
            model, bank, x, torch.arange(4), steps=1, num_samples=4, **{"noise": "uniform", **kwargs}
        )


@pytest.mark.parametrize(
    "theta,match",
    [(0.0, "theta, the uniform noise's half-width"), (-0.3, "> 0"), (float("inf"), "finite")],
)
def test_bad_theta(theta, match):
    model = _mlp()
    x, y, _ = _batch(3)
    with pytest.raises(ValueError, match=match):
        uniform_augmentation_loss(model, x, y, theta)
    with pytest.raises(ValueError, match=match):
        noisy_copies(x, theta, noise="uniform")


def _uniform_noisy_accuracy(model, x, y, theta=0.5):
    model.eval()
    with torch.no_grad():
        noisy = noisy_copies(x, theta, seed=123, noise="uniform")
        accuracy = (model(noisy).argmax(1) == y).float().mean().item()
    model.train()
    return accuracy


def test_data_dependent_uniform_training_on_digits():
    x, y = _digits()
    (x_train, y_train), (x_test, y_test) = (x[:1000], y[:1000]), (x[1400:], y[1400:])
    model = _digits_cnn()
    untrained = _uniform_noisy_accuracy(model, x_test, y_test)
    bank = SigmaBank(1000, 0.5, sigma_range=(0.05, 1.5))
    loader = torch.utils.data.DataLoader(
        IndexedDataset(torch.utils.data.TensorDataset(x_train, y_train)),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for xb, yb, index in loader:
            theta = update_sigma(
                model, bank, xb, index, steps=2, num_samples=8, noise="uniform", surrogate="certify"
            )
            loss = uniform_augmentation_loss(model, xb, yb, theta, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = _uniform_noisy_accuracy(model, x_test, y_test)
    assert untrained < 0.3 and trained > 0.6, (untrained, trained)
    assert bool((bank.sigma != 0.5).all())
    assert bool(((bank.sigma >= 0.05) & (bank.sigma <= 1.5)).all())
    assert rng.PHASE_SIGMA != PHASE_TRAIN
