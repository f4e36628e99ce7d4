"""Selector labels and training for certify_dual: radii per level from one expert per level, soft labels
with level weights, cross-fitted (held-out) radii, and train_selector with soft labels, copies and the
consistency term."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddrs_ext import certify
from ddrs_ext.dual import (
    best_level,
    cross_fit_radii,
    default_selector_sigma,
    fold_assignment,
    level_radii,
    soft_level_labels,
    train_selector,
)
from ddrs_ext.training import gaussian_augmentation_loss, noisy_copies

DIM = 6


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Halfspace(torch.nn.Module):
    def __init__(self, w, b, flip=False):
        super().__init__()
        self.w, self.b, self.flip = w.double(), float(b), flip

    def forward(self, x):
        s = x.flatten(1).double() @ self.w + self.b
        s = -s if self.flip else s
        return torch.stack([torch.zeros_like(s), s], 1).to(x.dtype)


def _data(count=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, generator=g, dtype=torch.float64)
    x = torch.randn(count, DIM, generator=g, dtype=torch.float64)
    y = (x @ w > 0).long()
    return w, x, y


def test_level_radii_with_one_expert_per_level():
    w, x, y = _data()
    right, wrong = Halfspace(w, 0.0), Halfspace(w, 0.0, flip=True)
    radii = level_radii([right, wrong], x, y, [0.25, 0.5], n0=20, n=300, alpha=0.01, seed=3)
    assert radii.shape == (40, 2) and radii.dtype == torch.float64
    plain = certify(right, x, 0.25, n0=20, n=300, alpha=0.01, seed=3)
    expected = torch.where(plain.prediction == y, plain.radius, torch.tensor(-1.0, dtype=torch.float64))
    assert torch.equal(radii[:, 0], expected)
    assert bool((radii[:, 1] == -1).all())  # the flipped expert is wrong everywhere it answers
    assert (
        best_level([right, wrong], x, y, [0.25, 0.5], n0=20, n=300, alpha=0.01, seed=3).tolist() == [0] * 40
    )
    assert best_level([wrong, right], x, y, [0.25, 0.5], n0=20, n=300, alpha=0.01, seed=3).sum() > 30
    single = level_radii(right, x, y, [0.25, 0.5], n0=20, n=300, alpha=0.01, seed=3)
    assert torch.equal(single[:, 0], radii[:, 0])
    with pytest.raises(ValueError, match="list of 3 models but there are 2 sigma levels"):
        level_radii([right] * 3, x, y, [0.25, 0.5])
    with pytest.raises(ValueError, match="one label per input"):
        level_radii(right, x, y[:3], [0.25, 0.5])


def test_soft_labels_formula_temperature_and_weights():
    radii = torch.tensor([[0.5, 0.8, -1.0], [0.2, -1.0, -1.0], [0.1, 0.3, 0.9]], dtype=torch.float64)
    q = soft_level_labels(radii, tau=0.25)
    expected = torch.softmax(radii / 0.25, 1).float()
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    # a small temperature gives best_level's one-hot labels
    sharp = soft_level_labels(radii, tau=1e-3)
    assert torch.equal(sharp.argmax(1), radii.argmax(1)) and bool((sharp.max(1).values > 0.999).all())
    # weights multiply the unnormalised labels
    weighted = soft_level_labels(radii, tau=0.25, level_weights=[1.0, 2.0, 0.5])
    raw = torch.exp(radii / 0.25) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(weighted, (raw / raw.sum(1, keepdim=True)).float())


def test_balanced_weights_even_out_the_label_mass():
    g = torch.Generator().manual_seed(0)
    radii = torch.rand(200, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 0.2]).double()
    plain = soft_level_labels(radii, tau=0.1)
    assert plain.mean(0)[0] > 3 * plain.mean(0)[2]  # level 0 usually wins
    balanced = soft_level_labels(radii, tau=0.1, level_weights="balanced")
    torch.testing.assert_close(balanced.mean(0), torch.full((3,), 1 / 3), rtol=0, atol=1e-5)
    # the weights only rescale columns: the order of the inputs within a level is kept
    ratio = (balanced[:, 2] / balanced[:, 0]) / (plain[:, 2] / plain[:, 0])
    torch.testing.assert_close(ratio, ratio[:1].expand(200), rtol=1e-4, atol=0)
    assert float(ratio[0]) > 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
        (dict(level_weights="even"), ValueError, "'balanced'"),
        (dict(level_weights=[1.0, 2.0]), ValueError, "3 finite numbers > 0"),
        (dict(level_weights=[1.0, 0.0, 1.0]), ValueError, "3 finite numbers > 0"),
        (dict(radii=torch.zeros(3)), ValueError, r"shape \(inputs, levels\)"),
        (dict(radii=torch.tensor([[0.1, math.nan, 0.2]])), ValueError, "finite"),
        (
            dict(radii=torch.tensor([[2.0, -1.0, 0.0]]), tau=1e-3, level_weights="balanced"),
            ValueError,
            "no label mass",
        ),
    ],
)
def test_soft_labels_bad_arguments(kwargs, error, match):
    args = dict(radii=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        soft_level_labels(args.pop("radii"), **args)


class Memorizer(torch.nn.Module):
    """1-nearest-neighbour on its training inputs: right on them, a coin flip elsewhere (random labels)."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x.flatten(1).double(), y

    def forward(self, z):
        nearest = torch.cdist(z.flatten(1).double(), self.x).argmin(1)
        return F.one_hot(self.y[nearest], 2).to(z.dtype) * 10


def test_cross_fitting_labels_come_from_experts_that_never_saw_the_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, DIM, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 2, (60,), generator=g)  # labels no rule can learn: only memory gets them right
    seen = []

    def fit(xs, ys, fold):
        seen.append((fold, xs.clone()))
        return Memorizer(xs, ys)

    kw = dict(n0=10, n=100, alpha=0.05, seed=4)
    held = cross_fit_radii(fit, x, y, [0.1, 0.2], folds=3, **kw)
    in_sample = level_radii(Memorizer(x, y), x, y, [0.1, 0.2], **kw)
    assert bool((in_sample > 0).all())  # an expert certifies its own training inputs
    assert float((held > 0).float().mean()) < 0.75  # on unseen inputs it is right about half the time
    assert [f for f, _ in seen] == [0, 1, 2] and sum(len(s) for _, s in seen) == 2 * 60
    for _, xs in seen:  # every input is held out exactly once, and each fit saw 2/3 of them
        assert len(xs) == 40
    trained_on = [(x[:, None, :] == xs[None]).all(2).any(1) for _, xs in seen]
    assert torch.equal(torch.stack(trained_on).sum(0), torch.full((60,), 2))
    part = fold_assignment(60, 3, 4)  # the folds cross_fit_radii used with seed 4
    for j in range(3):
        assert torch.equal(part == j, ~trained_on[j])
    # held-out radii are the fold model's level_radii on its part, with the input's position as stream
    again = cross_fit_radii(fit, x, y, [0.1, 0.2], folds=3, **kw)
    assert torch.equal(held, again)
    for j, (_, xs) in enumerate(seen[:3]):
        part = ~trained_on[j]
        idx = part.nonzero()[:, 0]
        direct = level_radii(Memorizer(xs, y[~part]), x[part], y[part], [0.1, 0.2], index=idx, **kw)
        assert torch.equal(held[part], direct)


def test_cross_fit_bad_arguments():
    _, x, y = _data(10)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        cross_fit_radii(lambda a, b, j: None, x, y, [0.1], folds=1)
    with pytest.raises(ValueError, match="must not exceed the number of inputs"):
        cross_fit_radii(lambda a, b, j: None, x, y, [0.1], folds=11)
    with pytest.raises(TypeError, match="fit must be a callable"):
        cross_fit_radii("model", x, y, [0.1])


def _net(out=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Linear(32, out))


def test_old_calls_train_as_before():
    """Integer labels, one copy, no penalty: exactly the loop of the earlier version (Gaussian augmentation
    at selector_sigma with the same noise keys and order)."""
    w, x, _ = _data(100, seed=2)
    x = x.float()
    labels = (x.double() @ w > 0.3).long()
    net = _net()
    losses = train_selector(net, x, labels, selector_sigma=0.2, epochs=3, batch_size=32, lr=1e-2, seed=11)
    ref = _net()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    order_gen = torch.Generator().manual_seed(11)
    ref_losses = []
    for epoch in range(3):
        order = torch.randperm(100, generator=order_gen)
        total = 0.0
        for start in range(0, 100, 32):
            rows = order[start : start + 32]
            loss = gaussian_augmentation_loss(
                ref, x[rows], labels[rows], 0.2, seed=11 + epoch + 1, index=rows
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        ref_losses.append(total / 100)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_one_hot_soft_labels_equal_hard_labels():
    w, x, _ = _data(64, seed=3)
    x = x.float()
    labels = (x.double() @ w > 0).long()
    hard, soft = _net(), _net()
    kw = dict(selector_sigma=0.3, epochs=2, batch_size=16, lr=1e-2, seed=5, copies=2, lam=5.0, eta=0.5)
    a = train_selector(hard, x, labels, **kw)
    b = train_selector(soft, x, F.one_hot(labels, 2).float(), **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for p, q in zip(hard.parameters(), soft.parameters()):
        torch.testing.assert_close(p, q)


def test_soft_labels_are_learned():
    """Two levels whose radii cross along a direction: the soft labels of soft_level_labels vary smoothly
    with x; the trained selector reproduces them (small mean error) and picks the level with the larger
    radius where the two differ clearly."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(DIM, generator=g, dtype=torch.float64)
    u /= u.norm()
    x = torch.randn(600, DIM, generator=g, dtype=torch.float64)
    t = x @ u
    radii = torch.stack([0.4 - 0.3 * t, 0.4 + 0.3 * t], 1).clamp(min=-1.0)
    labels = soft_level_labels(radii, tau=0.2)
    net = _net(seed=1)
    losses = train_selector(
        net, x.float(), labels, selector_sigma=0.05, epochs=60, batch_size=64, lr=5e-3, seed=0
    )
    assert losses[-1] < losses[0]
    with torch.no_grad():
        predicted = torch.softmax(net(x.float()), 1)
    assert float((predicted - labels).abs().mean()) < 0.06
    clear = (radii[:, 0] - radii[:, 1]).abs() > 0.2
    assert float((predicted.argmax(1) == radii.argmax(1))[clear].float().mean()) > 0.97
    # the labels are soft: the soft targets' own entropy bounds the loss from below
    entropy = float(-(labels * labels.clamp_min(1e-12).log()).sum(1).mean())
    assert losses[-1] > entropy - 1e-3
    # a selector trained on the hard argmax instead is far more confident in the crossing region
    hard = _net(seed=1)
    train_selector(
        hard, x.float(), radii.argmax(1), selector_sigma=0.05, epochs=60, batch_size=64, lr=5e-3, seed=0
    )
    middle = t.abs() < 0.3
    with torch.no_grad():
        hard_conf = torch.softmax(hard(x.float()), 1).max(1).values[middle].mean()
    assert float(hard_conf) > float(predicted.max(1).values[middle].mean()) + 0.1


def test_the_consistency_term_makes_the_smoothed_vote_more_decisive():
    """Labels that the selector's noise blurs (they alternate along a direction faster than sigma = 1
    resolves): trained with cross-entropy alone, the smoothed selector's vote is split; with the
    consistency term (same data, noise and seed) its noisy copies agree, so it certifies larger radii."""
    w, x, _ = _data(300, seed=9)
    x = x.float()
    labels = (torch.sin(2 * (x.double() @ w)) > 0).long()

    def vote_share(net):
        with torch.no_grad():
            noisy = noisy_copies(x, 1.0, copies=64, seed=123)
            votes = net(noisy).argmax(1).reshape(300, 64)
        top = torch.stack([torch.bincount(v, minlength=2).max() for v in votes]).float() / 64
        return float(top.mean())

    shares = {}
    for lam in (0.0, 20.0):
        net = _net(seed=2)
        train_selector(
            net,
            x,
            labels,
            selector_sigma=1.0,
            epochs=15,
            batch_size=32,
            lr=5e-3,
            seed=1,
            copies=2,
            lam=lam,
            eta=0.5,
        )
        shares[lam] = vote_share(net)
    assert shares[20.0] > shares[0.0] + 0.1


def test_selector_sigma_defaults_to_the_largest_level():
    assert default_selector_sigma([0.25, 0.5, 1.0]) == 1.0
    _, x, y = _data(32, seed=4)
    a, b = _net(), _net()
    kw = dict(epochs=1, batch_size=8, seed=2)
    la = train_selector(a, x.float(), y, sigma_levels=[0.25, 0.5, 1.0], **kw)
    lb = train_selector(b, x.float(), y, selector_sigma=1.0, **kw)
    assert la == lb


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(selector_sigma=None), ValueError, "pass selector_sigma, or sigma_levels"),
        (dict(lam=1.0), ValueError, "pass copies >= 2"),
        (dict(lam=-1.0, copies=2), ValueError, "lam must be a finite number >= 0"),
        (dict(eta=math.nan), ValueError, "eta must be"),
        (dict(copies=0), ValueError, "copies must be >= 1"),
        (
            dict(labels=torch.full((16, 3), 1 / 3)),
            ValueError,
            "soft labels have 3 levels but the selector returns 2",
        ),
        (dict(labels=torch.full((16,), 2)), ValueError, r"level indices in \[0, 2\)"),
        (dict(labels=-torch.ones(16, 2)), ValueError, "finite, >= 0"),
        (dict(labels=torch.zeros(16, 2)), ValueError, "positive sum"),
        (dict(labels=torch.zeros(16)), TypeError, "level indices"),
        (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "one entry per input"),
    ],
)
def test_train_selector_bad_arguments(kwargs, error, match):
    _, x, y = _data(16)
    args = dict(labels=y, selector_sigma=0.5)
    args.update(kwargs)
    net = _net()
    net.eval()
    with pytest.raises(error, match=match):
        train_selector(net, x.float(), args.pop("labels"), epochs=1, seed=0, **args)
    assert not net.training  # its mode is restored even after an error


class ThreeClass(torch.nn.Module):
    """Class 1 where x.u > offset, class ``below`` (0 or 2) under it; three logits."""

    def __init__(self, u, offset, below):
        super().__init__()
        self.u, self.offset, self.below = u, offset, below

    def forward(self, x):
        s = 20 * (x.flatten(1).double() @ self.u - self.offset)
        out = torch.full((len(x), 3), -50.0, dtype=torch.float64)
        out[:, 1] = s
        out[:, self.below] = 0.0
        return out.to(x.dtype)


def test_experts_per_level_end_to_end_through_certify_dual():
    """One expert per level is first-class from labels to certificate: level_radii of the experts give the
    labels, the selector learns where each expert is the better one, and certify_dual's classifier part for
    each input is the chosen expert's own CERTIFY (same counts) at alpha - alpha_selector."""
    from ddrs_ext import certify_dual

    g = torch.Generator().manual_seed(11)
    u = torch.randn(DIM, generator=g, dtype=torch.float64)
    u /= u.norm()
    x = torch.randn(400, DIM, generator=g, dtype=torch.float64)
    y = (x @ u > 0).long()
    # level 0 is right everywhere; level 1 (larger sigma, larger radii) is right only where x.u > 0.5 and
    # answers a class that does not exist (2) below
    right = ThreeClass(u, 0.0, below=0)
    partly = ThreeClass(u, 0.5, below=2)
    levels = [0.25, 0.5]
    radii = level_radii([right, partly], x, y, levels, n0=20, n=300, alpha=0.01, seed=1)
    labels = soft_level_labels(radii, tau=0.05)
    t = x @ u
    assert float(labels[t > 1.5, 1].mean()) > 0.9 and float(labels[t < 0, 0].mean()) > 0.9
    net = _net(seed=3)
    train_selector(net, x.float(), labels, sigma_levels=levels, epochs=40, batch_size=64, lr=5e-3, seed=0)
    test = torch.randn(60, DIM, generator=g, dtype=torch.float64)
    r = certify_dual(
        [right, partly], net, test.float(), levels, selector_sigma=0.5, n0=20, n=400, alpha=0.02, seed=5
    )
    chose = r.level != -1
    tt = test @ u
    assert float((r.level[chose & (tt > 2.0)] == 1).float().mean()) > 0.8
    assert float((r.level[chose & (tt < -0.5)] == 0).float().mean()) > 0.8
    for k, (expert, sigma) in enumerate(zip([right, partly], levels)):
        here = (r.level == k).nonzero()[:, 0]
        alone = certify(expert, test.float()[here], sigma, n0=20, n=400, alpha=0.01, seed=5, index=here)
        assert torch.equal(r.classifier.counts[here], alone.counts)
        assert torch.equal(r.radius_classifier[here], alone.radius)
