"""Consistency training (Jeong & Shin, NeurIPS 2020): the loss against a plain-PyTorch transcription of
the paper's formula on the same noise, its gradient, a sigma per example, and bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddrs_ext import ops, rng
from ddrs_ext.training import PHASE_TRAIN, consistency_loss, consistency_penalty, gaussian_augmentation_loss

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _mlp(classes=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(math.prod(SHAPE), 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, classes),
    )


def _batch(B=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *SHAPE, generator=g)
    y = torch.randint(0, classes, (B,), generator=g)
    sigma = torch.rand(B, generator=g) * 0.9 + 0.1
    return x, y, sigma


def _noise(B, copies, seed, index=None):
    """eps (B * copies, ...) of the training phase, read from the kernel with sigma = 1."""
    stream = rng.resolve_streams(index, B, torch.device("cpu"))
    eps, _ = ops.perturb_gaussian(
        torch.zeros(B, *SHAPE), torch.ones(B, dtype=torch.float64), stream, seed, PHASE_TRAIN, copies
    )
    return eps.reshape(B, copies, *SHAPE)


def _paper_loss(model, x, y, sigma, eps, lam, eta):
    """The paper's objective written out one input and one copy at a time."""
    B, m = eps.shape[:2]
    total = 0.0
    for b in range(B):
        probs = [F.softmax(model((x[b] + float(sigma[b]) * eps[b, i])[None])[0], 0) for i in range(m)]
        mean = sum(probs) / m
        ce = sum(-torch.log(p[y[b]]) for p in probs) / m
        kl = sum((mean * (torch.log(mean) - torch.log(p))).sum() for p in probs) / m
        entropy = -(mean * torch.log(mean)).sum()
        total = total + ce + lam * kl + eta * entropy
    return total / B


@pytest.mark.parametrize("copies, lam, eta", [(2, 10.0, 0.5), (4, 20.0, 0.0), (3, 0.0, 1.5)])
def test_loss_and_gradient_match_the_paper_formula(copies, lam, eta):
    model = _mlp()
    x, y, sigma = _batch(5)
    index = [7, 0, 3, 12, 5]
    loss = consistency_loss(model, x, y, sigma, copies=copies, lam=lam, eta=eta, seed=3, index=index)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    ref = _paper_loss(model, x, y, sigma, _noise(5, copies, 3, index), lam, eta)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(bool(g.abs().sum() > 0) for g in got)  # every parameter receives a gradient


def test_sigma_per_example_is_honoured():
    """Each example is perturbed with its own sigma: the loss equals the transcription with those sigmas,
    and moving one example's sigma moves the loss; a shared float equals a constant tensor."""
    model = _mlp(seed=1)
    x, y, sigma = _batch(4, seed=2)
    kw = dict(copies=2, lam=10.0, eta=0.5, seed=5)
    with torch.no_grad():
        loss = consistency_loss(model, x, y, sigma, **kw)
        torch.testing.assert_close(loss, _paper_loss(model, x, y, sigma, _noise(4, 2, 5), 10.0, 0.5))
        swapped = sigma.flip(0)
        assert not torch.allclose(loss, consistency_loss(model, x, y, swapped, **kw))
        shared = consistency_loss(model, x, y, 0.3, **kw)
        torch.testing.assert_close(shared, consistency_loss(model, x, y, torch.full((4,), 0.3), **kw))


def test_without_regulariser_it_is_gaussian_augmentation():
    model = _mlp(seed=2)
    x, y, sigma = _batch(6, seed=4)
    plain = consistency_loss(model, x, y, sigma, copies=3, lam=0.0, eta=0.0, seed=9)
    torch.testing.assert_close(plain, gaussian_augmentation_loss(model, x, y, sigma, copies=3, seed=9))
    # the regulariser is >= 0 and positive once the copies disagree
    assert consistency_loss(model, x, y, sigma, copies=3, lam=10.0, eta=0.0, seed=9) > plain


def test_penalty_of_identical_copies_is_the_entropy_alone():
    logits = torch.randn(3, 1, 5).expand(3, 4, 5)
    p = F.softmax(logits[:, 0], 1)
    entropy = -(p * p.log()).sum(1).mean()
    torch.testing.assert_close(consistency_penalty(logits, lam=7.0, eta=0.5), 0.5 * entropy)
    # saturated logits: finite value and gradient
    big = (torch.randn(2, 2, 4) * 1e4).requires_grad_(True)
    value = consistency_penalty(big, lam=10.0, eta=0.5)
    value.backward()
    assert torch.isfinite(value) and bool(torch.isfinite(big.grad).all())


def test_training_with_it_decreases_the_disagreement():
    """A few Adam steps on the consistency loss leave the copies agreeing more than steps on the plain
    cross-entropy alone (same data, same noise)."""
    x, _, _ = _batch(64, seed=6)
    y = (x.flatten(1)[:, :8].sum(1) > x.flatten(1)[:, 8:].sum(1)).long()  # a learnable rule

    def disagreement(model):
        with torch.no_grad():
            noisy = x.repeat_interleave(4, 0) + 0.5 * _noise(64, 4, 99).reshape(256, *SHAPE)
            logits = model(noisy).reshape(64, 4, -1)
        return float(consistency_penalty(logits, lam=1.0, eta=0.0))

    results = {}
    for lam in (0.0, 20.0):
        model = _mlp(classes=2, seed=3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(60):
            loss = consistency_loss(model, x, y, 0.5, copies=2, lam=lam, eta=0.5, seed=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[lam] = disagreement(model)
    assert results[20.0] < 0.5 * results[0.0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(copies=0), ValueError, "copies must be >= 1"),
        (dict(lam=-1.0), ValueError, "lam must be a finite number >= 0"),
        (dict(lam=math.nan), ValueError, "lam must be"),
        (dict(eta=math.inf), ValueError, "eta must be"),
        (dict(eta=True), ValueError, "eta must be"),
        (dict(sigma=0.0), ValueError, "finite number > 0"),
        (dict(sigma=torch.tensor([0.1, -0.2, 0.3])), ValueError, "input 1"),
        (dict(sigma=torch.full((3,), 0.2, requires_grad=True)), ValueError, "must not require grad"),
        (dict(y=torch.tensor([0.0, 1.0, 0.0])), TypeError, "integer tensor"),
        (dict(y=torch.tensor([0, 1])), ValueError, r"y must have shape \(3,\)"),
        (dict(index=[0, 1]), ValueError, "one entry per input"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, y, sigma = _batch(3)
    args = dict(y=y, sigma=sigma)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        consistency_loss(_mlp(), x, args.pop("y"), args.pop("sigma"), **args)


def test_penalty_bad_arguments():
    with pytest.raises(ValueError, match="shape \\(inputs, copies, classes\\)"):
        consistency_penalty(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="lam must be"):
        consistency_penalty(torch.zeros(4, 2, 3), lam=-0.5)
