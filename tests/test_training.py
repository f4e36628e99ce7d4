"""Data-dependent training: the sigma bank, indexed data, sigma updates with the model frozen, the three
losses against plain-torch references on the same noise, SmoothAdv's attack, a short run on digits,
bad options and torch.compile."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddrs_ext import ops, optimize_sigma, rng, training
from ddrs_ext.training import (
    PHASE_TRAIN,
    IndexedDataset,
    SigmaBank,
    frozen,
    gaussian_augmentation_loss,
    macer_loss,
    noisy_copies,
    smoothadv_attack,
    smoothadv_loss,
    smoothed_cross_entropy,
    update_sigma,
    warmup,
)

SHAPE = (1, 4, 4)  # small inputs: D = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on shared cores: a second thread only adds contention (conftest restores it)."""
    torch.set_num_threads(1)


def _mlp(classes: int = 4, seed: int = 0, batchnorm: bool = False, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Flatten(), torch.nn.Linear(math.prod(SHAPE), 16)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, classes)]
    return torch.nn.Sequential(*layers)


def _batch(B: int = 6, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *SHAPE, generator=g)
    y = torch.randint(0, classes, (B,), generator=g)
    sigma = torch.rand(B, generator=g) * 0.4 + 0.1
    return x, y, sigma


def _reference_noisy(x, sigma, copies, seed, index=None):
    """x[b] + sigma[b] * eps with eps read straight from the kernel for the training phase."""
    B = x.shape[0]
    stream = rng.resolve_streams(index, B, x.device)
    eps, _ = ops.perturb_gaussian(
        torch.zeros_like(x), torch.ones(B, dtype=torch.float64), stream, seed, PHASE_TRAIN, copies
    )
    s = torch.as_tensor(sigma, dtype=x.dtype).repeat_interleave(copies)
    return x.detach().repeat_interleave(copies, 0) + s.view(-1, *([1] * (x.dim() - 1))) * eps


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _zero_grads(model):
    for p in model.parameters():
        p.grad = None


# ---------------------------------------------------------------- SigmaBank


def test_bank_init_and_values():
    bank = SigmaBank(7, 0.25, sigma_range=(0.1, 1.0))
    assert bank.sigma.dtype == torch.float64 and bank.sigma.shape == (7,)
    assert torch.equal(bank.sigma, torch.full((7,), 0.25, dtype=torch.float64))
    assert bank.sigma_range == (0.1, 1.0)
    assert dict(bank.named_buffers()).keys() == {"sigma"} and not list(bank.parameters())
    for index in ([1, 3], torch.tensor([1, 3]), np.array([1, 3]), (1, 3)):
        assert torch.equal(bank[index], torch.full((2,), 0.25, dtype=torch.float64))
    assert bank[4].shape == ()  # an int reads one value, as for a tensor
    assert "num_examples=7" in repr(bank)


def test_bank_getitem_clones_and_update_writes_back():
    bank = SigmaBank(6, 0.25, sigma_range=(0.1, 1.0))
    got = bank[[0, 1]]
    got.fill_(0.9)
    assert torch.equal(bank.sigma, torch.full((6,), 0.25, dtype=torch.float64))
    bank.update(torch.tensor([4, 1]), torch.tensor([0.5, 0.75], dtype=torch.float32))
    assert bank.sigma.tolist() == [0.25, 0.75, 0.25, 0.25, 0.5, 0.25]
    bank.update([0], [1.0])  # the range's ends are allowed
    bank.update([2], [0.1])
    assert bank[[0, 2]].tolist() == [1.0, 0.1]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda b: b[[5]], ValueError, r"\[0, 5\)"),
        (lambda b: b[[-1]], ValueError, r"\[0, 5\)"),
        (lambda b: b[torch.tensor([0.0])], TypeError, "integers"),
        (lambda b: b[torch.tensor([True])], TypeError, "integers"),
        (lambda b: b.update([0, 1], [0.2]), ValueError, "one value per index"),
        (lambda b: b.update([0], [0.05]), ValueError, "inside sigma_range"),
        (lambda b: b.update([0], [1.5]), ValueError, "inside sigma_range"),
        (lambda b: b.update([0], [float("nan")]), ValueError, "inside sigma_range"),
        (lambda b: b.update([7], [0.2]), ValueError, r"\[0, 5\)"),
    ],
)
def test_bank_index_and_update_errors(call, error, match):
    bank = SigmaBank(5, 0.25, sigma_range=(0.1, 1.0))
    with pytest.raises(error, match=match):
        call(bank)
    assert torch.equal(bank.sigma, torch.full((5,), 0.25, dtype=torch.float64))  # nothing written


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((5, 2.0), dict(sigma_range=(0.1, 1.0)), ValueError, "sigma_range must satisfy"),
        ((5, 0.05), dict(sigma_range=(0.1, 1.0)), ValueError, "sigma_range must satisfy"),
        ((5, 0.5), dict(sigma_range=(0.6, 0.4)), ValueError, "sigma_range must satisfy"),
        ((5, 0.5), dict(sigma_range=(0.1, math.inf)), ValueError, "sigma_range must satisfy"),
        ((5, 0.0), {}, ValueError, "sigma0 must be a finite number > 0"),
        ((5, -0.1), {}, ValueError, "sigma0 must be a finite number > 0"),
        ((5, float("nan")), {}, ValueError, "sigma0 must be a finite number > 0"),
        ((0, 0.25), {}, ValueError, "num_examples must be >= 1"),
        ((2.5, 0.25), {}, TypeError, "num_examples must be an int"),
    ],
)
def test_bank_bad_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        SigmaBank(*args, **kwargs)


def test_bank_checkpoint_round_trip(tmp_path):
    model = _mlp(batchnorm=True)
    bank = SigmaBank(10, 0.25, sigma_range=(0.05, 2.0))
    bank.update([2, 7, 9], [0.1, 1.3, 0.333])
    torch.save({"model": model.state_dict(), "sigma_bank": bank.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt")
    fresh_model, fresh_bank = _mlp(seed=1, batchnorm=True), SigmaBank(10, 0.5, sigma_range=(0.05, 2.0))
    fresh_model.load_state_dict(state["model"])
    fresh_bank.load_state_dict(state["sigma_bank"])
    assert torch.equal(fresh_bank.sigma, bank.sigma) and fresh_bank.sigma.dtype == torch.float64
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="size mismatch"):
        SigmaBank(11, 0.25).load_state_dict(state["sigma_bank"])


def test_bank_moves_with_to():
    bank = SigmaBank(4, 0.25, device="meta")
    assert bank.sigma.is_meta
    bank = SigmaBank(4, 0.25)
    assert bank.to("cpu") is bank and bank.sigma.device.type == "cpu"
    owner = torch.nn.Module()  # e.g. a training state holding model and bank
    owner.bank = bank
    owner.to("meta")
    assert bank.sigma.is_meta and bank.sigma.dtype == torch.float64 and bank.sigma.shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bank_on_cuda():
    bank = SigmaBank(4, 0.25).to("cuda")
    bank.update(torch.tensor([1], device="cuda"), torch.tensor([0.5]))
    assert bank.sigma.is_cuda and bank[[1]].tolist() == [0.5]


# ---------------------------------------------------------------- IndexedDataset


def test_indexed_dataset_items():
    x, y = torch.arange(10.0)[:, None], torch.arange(10) % 3
    data = IndexedDataset(torch.utils.data.TensorDataset(x, y))
    assert len(data) == 10
    xi, yi, i = data[4]
    assert torch.equal(xi, x[4]) and int(yi) == 1 and i == 4

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((2,), float(i))

    item, i = IndexedDataset(Plain())[2]
    assert torch.equal(item, torch.full((2,), 2.0)) and i == 2


def test_indexed_dataset_with_a_shuffling_dataloader():
    x, y = torch.arange(37.0)[:, None] * 10, torch.arange(37) % 5
    loader = torch.utils.data.DataLoader(
        IndexedDataset(torch.utils.data.TensorDataset(x, y)),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for xb, yb, index in loader:
        assert index.dtype == torch.int64
        assert torch.equal(xb, x[index]) and torch.equal(yb, y[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(37)) and seen != list(range(37))


# ---------------------------------------------------------------- update_sigma


class _Recorder(torch.nn.Module):
    """Identity that records, at each call, every module's mode and every parameter's requires_grad
    of the model it sits in."""

    def __init__(self):
        super().__init__()
        self.calls, self.watch = [], []  # a plain list: not a submodule

    def forward(self, z):
        (model,) = self.watch
        self.calls.append(
            ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
        )
        return z


def _recorded_model(seed: int = 0):
    model = _mlp(seed=seed, batchnorm=True, dropout=0.5)
    recorder = _Recorder()
    model.insert(4, recorder)  # after Tanh, before Dropout
    recorder.watch.append(model)
    return model, recorder


def test_update_sigma_leaves_the_model_untouched():
    model, recorder = _recorded_model()
    x, _, _ = _batch(8)
    for _ in range(2):  # non-default running statistics
        model(torch.rand(8, *SHAPE))
    model[-1].weight.requires_grad_(False)  # a frozen layer must stay frozen
    requires = [p.requires_grad for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    recorder.calls.clear()
    bank = SigmaBank(20, 0.25, sigma_range=(0.01, 2.0))
    update_sigma(model, bank, x, torch.arange(8) + 3, steps=3, num_samples=8, seed=1)
    assert recorder.calls and all(not any(modes) and not any(req) for modes, req in recorder.calls)
    for k, v in model.state_dict().items():  # running_mean, running_var, num_batches_tracked, weights
        assert torch.equal(v, buffers[k]), k
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())


def test_update_sigma_is_optimize_sigma_ascent_from_the_bank():
    model = _mlp(batchnorm=True, dropout=0.3)
    model(torch.rand(16, *SHAPE))  # running statistics
    x, _, _ = _batch(6)
    index = torch.tensor([9, 2, 14, 0, 5, 11])
    bank = SigmaBank(16, 0.2, sigma_range=(0.01, 3.0))
    bank.update([2, 14, 3], [0.4, 0.1, 0.7])
    before = bank.sigma.clone()
    kw = dict(num_samples=8, lr=0.05, clip=(0.02, 0.98), seed=7)
    sigma = update_sigma(model, bank, x, index, steps=4, **kw)
    model.eval()
    expected = optimize_sigma(
        model, x, before[index], iterations=4, rule="ascent", sigma_range=(0.01, 3.0), index=index, **kw
    )
    model.train()
    assert sigma.dtype == x.dtype and sigma.shape == (6,)
    assert torch.equal(bank.sigma[index], expected)
    assert torch.equal(sigma, expected.float())
    assert (bank.sigma[index] != before[index]).all()
    others = torch.ones(16, dtype=torch.bool)
    others[index] = False
    assert torch.equal(bank.sigma[others], before[others])


def test_update_sigma_stays_in_range_and_follows_the_seed():
    model = _mlp()
    x, _, _ = _batch(8)
    bank = SigmaBank(8, 0.3, sigma_range=(0.2, 0.4))
    sigma = update_sigma(model, bank, x, torch.arange(8), steps=3, num_samples=8, lr=50.0, seed=3)
    assert ((bank.sigma >= 0.2) & (bank.sigma <= 0.4)).all()
    assert ((bank.sigma == 0.2) | (bank.sigma == 0.4)).any()  # the step was large enough to hit an end
    assert torch.equal(sigma, bank.sigma.float())
    again = SigmaBank(8, 0.3, sigma_range=(0.2, 0.4))
    torch.manual_seed(11)
    a = update_sigma(model, again, x, torch.arange(8), steps=2, num_samples=8, lr=0.5)
    torch.manual_seed(11)
    b = update_sigma(
        model, SigmaBank(8, 0.3, sigma_range=(0.2, 0.4)), x, torch.arange(8), steps=2, num_samples=8, lr=0.5
    )
    assert torch.equal(a, b)


def test_update_sigma_bad_index():
    model, bank = _mlp(), SigmaBank(5, 0.25)
    x, _, _ = _batch(3)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        update_sigma(model, bank, x, [0, 1, 5], steps=1, num_samples=2)
    with pytest.raises(ValueError, match="one entry per example"):
        update_sigma(model, bank, x, [0, 1], steps=1, num_samples=2)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        update_sigma(model, bank, x, [0, 1, 2], steps=1, num_samples=0)
    assert torch.equal(bank.sigma, torch.full((5,), 0.25, dtype=torch.float64))
    assert model.training and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- noisy_copies


def test_noisy_copies_shape_order_and_gradient():
    x, _, sigma = _batch(3)
    x.requires_grad_(True)
    out = noisy_copies(x, sigma, copies=4, seed=5, index=[7, 1, 3])
    assert out.shape == (12, *SHAPE) and out.dtype == x.dtype
    torch.testing.assert_close(out, _reference_noisy(x, sigma, 4, 5, [7, 1, 3]), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))


def test_noisy_copies_seed_and_index():
    x, _, sigma = _batch(3)
    a = noisy_copies(x, sigma, copies=2, seed=5)
    assert torch.equal(a, noisy_copies(x, sigma, copies=2, seed=5))
    assert not torch.equal(a, noisy_copies(x, sigma, copies=2, seed=6))
    assert torch.equal(a, noisy_copies(x, sigma, copies=2, seed=5, index=[0, 1, 2]))
    b = noisy_copies(x, sigma, copies=2, seed=5, index=[10, 11, 12])
    assert not (a == b).view(6, -1).all(1).any()
    # an input's noise depends on its index, not its place in the batch
    alone = noisy_copies(x[2:], sigma[2:], copies=2, seed=5, index=[12])
    assert torch.equal(alone, b[4:])
    torch.manual_seed(3)
    c = noisy_copies(x, sigma, copies=2)
    torch.manual_seed(3)
    assert torch.equal(c, noisy_copies(x, sigma, copies=2))


def test_noisy_copies_sigma_per_input():
    x = torch.rand(3, 4096, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 2.0])
    out = noisy_copies(x, sigma, copies=2, seed=1)
    var = (out - x.repeat_interleave(2, 0)).reshape(3, -1).var(1)
    torch.testing.assert_close(var, sigma**2, rtol=0.06, atol=0)
    scalar = noisy_copies(x, 0.5, copies=2, seed=1)
    assert torch.equal(scalar, noisy_copies(x, torch.full((3,), 0.5), copies=2, seed=1))


# ---------------------------------------------------------------- losses against references


def test_gaussian_augmentation_loss_is_mean_cross_entropy_over_copies():
    model = _mlp()
    x, y, sigma = _batch(5)
    loss = gaussian_augmentation_loss(model, x, y, sigma, copies=3, seed=2, index=[4, 0, 8, 1, 6])
    loss.backward()
    got = _grads(model)
    _zero_grads(model)
    noisy = _reference_noisy(x, sigma, 3, 2, [4, 0, 8, 1, 6])
    logits = model(noisy).reshape(5, 3, -1)
    ref = torch.stack([F.cross_entropy(logits[b], y[b].expand(3)) for b in range(5)]).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _macer_reference(model, x, y, sigma, m, lam, gamma, beta, seed):
    B = x.shape[0]
    logits = model(_reference_noisy(x, sigma, m, seed)).reshape(B, m, -1)
    normal = torch.distributions.Normal(0.0, 1.0)
    total, kept = 0.0, 0
    for b in range(B):
        p = torch.softmax(logits[b], 1).mean(0)
        total = total - torch.log(p[y[b]] + 1e-10)
        q = torch.softmax(beta * logits[b], 1).mean(0)
        if int(q.argmax()) == int(y[b]):
            runner_up = q[torch.arange(q.numel()) != y[b]].max()
            margin = normal.icdf(q[y[b]]) - normal.icdf(runner_up)
            total = total + lam * float(sigma[b]) / 2 * torch.clamp(gamma - margin, min=0)
            kept += int(margin < gamma)
    return total / B, kept


def test_macer_loss_matches_the_formula_and_its_gradient():
    model = _mlp(classes=5, seed=3)
    x, _, sigma = _batch(8, classes=5, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 5  # some wrong, some right
    lam, gamma, beta = 12.0, 8.0, 4.0
    loss = macer_loss(model, x, y, sigma, num_samples=6, lam=lam, gamma=gamma, beta=beta, seed=4)
    loss.backward()
    got = _grads(model)
    _zero_grads(model)
    ref, kept = _macer_reference(model, x, y, sigma, 6, lam, gamma, beta, 4)
    assert 0 < kept < 8  # the hinge term is active for some examples, not all
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    classification = macer_loss(model, x, y, sigma, num_samples=6, lam=0.0, beta=beta, seed=4)
    assert loss.item() > classification.item() + 1e-3  # the robustness term adds something


def test_macer_loss_saturated_probabilities_add_nothing():
    """A very confident model gives p_y = 1 in float32: no robustness term and no NaN gradient."""
    model = _mlp(classes=3, seed=2)
    with torch.no_grad():
        model[-1].weight.mul_(200.0)
    x, _, sigma = _batch(4, classes=3)
    with torch.no_grad():
        y = model(x).argmax(1)
    loss = macer_loss(model, x, y, sigma * 0.01, num_samples=4, beta=16.0, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(loss, macer_loss(model, x, y, sigma * 0.01, num_samples=4, lam=0.0, seed=0))


def test_smoothed_cross_entropy_matches_the_formula():
    model = _mlp()
    x, y, sigma = _batch(5)
    got = smoothed_cross_entropy(model, x, y, sigma, num_samples=7, seed=9)
    logits = model(_reference_noisy(x, sigma, 7, 9)).reshape(5, 7, -1)
    ref = torch.stack([-torch.log(torch.softmax(logits[b], 1)[:, y[b]].mean()) for b in range(5)]).mean()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_smoothadv_loss_is_cross_entropy_on_noisy_adversarial_copies():
    model = _mlp(batchnorm=True, dropout=0.2)
    model(torch.rand(16, *SHAPE))
    twin = copy.deepcopy(model)
    x, y, sigma = _batch(6)
    index = [3, 1, 4, 10, 5, 9]
    kw = dict(epsilon=0.4, steps=3, num_samples=4, seed=8, index=index)
    torch.manual_seed(0)  # dropout in the training forward
    loss = smoothadv_loss(model, x, y, sigma, **kw)
    twin.eval()
    adv = smoothadv_attack(twin, x, y, sigma, **kw)
    twin.train()
    torch.manual_seed(0)
    ref = F.cross_entropy(twin(_reference_noisy(adv, sigma, 4, 8, index)), y.repeat_interleave(4))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(adv, x)


# ---------------------------------------------------------------- SmoothAdv attack


def test_smoothadv_attack_increases_the_loss_inside_the_ball():
    model = _mlp(seed=1)
    x, y, sigma = _batch(16, seed=2)
    x[:4] = x[:4].round()  # inputs on the edge of the clamp range
    eps = 0.5
    adv = smoothadv_attack(model, x, y, sigma, epsilon=eps, steps=4, num_samples=8, seed=3)
    assert adv.shape == x.shape and not adv.requires_grad
    assert ((adv - x).flatten(1).norm(dim=1) <= eps + 1e-6).all()
    assert (adv >= 0).all() and (adv <= 1).all()
    with torch.no_grad():
        before = smoothed_cross_entropy(model, x, y, sigma, num_samples=8, seed=3)
        after = smoothed_cross_entropy(model, adv, y, sigma, num_samples=8, seed=3)
    assert float(after) > float(before) + 0.05
    assert all(p.grad is None for p in model.parameters())
    unclamped = smoothadv_attack(model, x, y, sigma, epsilon=eps, steps=4, clamp=None, seed=3)
    assert ((unclamped - x).flatten(1).norm(dim=1) <= eps + 1e-6).all()
    assert torch.allclose((unclamped - x).flatten(1).norm(dim=1), torch.tensor(eps), atol=1e-4)


def test_smoothadv_attack_without_budget_returns_x():
    model = _mlp()
    x, y, sigma = _batch(4)
    assert torch.equal(smoothadv_attack(model, x, y, sigma, epsilon=0.0, seed=1), x)
    assert torch.equal(smoothadv_attack(model, x, y, sigma, steps=0, seed=1), x)


def test_smoothadv_loss_restores_mode_and_requires_grad():
    model, recorder = _recorded_model()
    model[1].bias.requires_grad_(False)
    requires = [p.requires_grad for p in model.parameters()]
    x, y, sigma = _batch(4)
    smoothadv_loss(model, x, y, sigma, steps=2, num_samples=2, seed=0).backward()
    attack_calls, train_calls = recorder.calls[:-1], recorder.calls[-1:]
    assert len(attack_calls) == 2 and all(not any(t) and not any(r) for t, r in attack_calls)
    assert all(train_calls[0][0]) and train_calls[0][1] == requires
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert model[1].bias.grad is None and model[1].weight.grad is not None


def test_frozen_restores_on_error():
    model = _mlp(batchnorm=True)
    model[1].eval()
    with pytest.raises(RuntimeError, match="boom"), frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")
    assert model.training and not model[1].training and all(p.requires_grad for p in model.parameters())


def test_warmup():
    assert [warmup(0.5, e, 4) for e in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert warmup(0.5, 0, 0) == 0.5


# ---------------------------------------------------------------- training runs


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def _digits_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


def _noisy_accuracy(model, x, y, sigma=0.25):
    model.eval()
    with torch.no_grad():
        accuracy = (model(noisy_copies(x, sigma, seed=123)).argmax(1) == y).float().mean().item()
    model.train()
    return accuracy


def test_data_dependent_gaussian_training_on_digits():
    x, y = _digits()
    (x_train, y_train), (x_test, y_test) = (x[:1000], y[:1000]), (x[1400:], y[1400:])
    model = _digits_cnn()
    untrained = _noisy_accuracy(model, x_test, y_test)
    bank = SigmaBank(1000, 0.25, sigma_range=(0.05, 1.0))
    loader = torch.utils.data.DataLoader(
        IndexedDataset(torch.utils.data.TensorDataset(x_train, y_train)),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for xb, yb, index in loader:
            sigma = update_sigma(model, bank, xb, index, steps=2, num_samples=8)
            loss = gaussian_augmentation_loss(model, xb, yb, sigma, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = _noisy_accuracy(model, x_test, y_test)
    assert untrained < 0.3 and trained > 0.6, (untrained, trained)
    assert (bank.sigma != 0.25).all()  # every example's sigma was visited and moved
    assert ((bank.sigma >= 0.05) & (bank.sigma <= 1.0)).all()


@pytest.mark.parametrize("scheme", ["macer", "smoothadv"])
def test_a_few_steps_decrease_the_loss(scheme):
    model = _mlp(seed=4)
    x, y, sigma = _batch(8, seed=5)

    def loss_fn():
        if scheme == "macer":
            return macer_loss(model, x, y, sigma, num_samples=4, lam=1.0, beta=4.0, seed=6)
        return smoothadv_loss(model, x, y, sigma, epsilon=0.25, steps=1, num_samples=2, seed=6)

    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(10):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


# ---------------------------------------------------------------- bad options


def _loss_calls():
    return {
        "noisy_copies": lambda x, y, s, **kw: noisy_copies(x, s, **kw),
        "gaussian": lambda x, y, s, **kw: gaussian_augmentation_loss(_mlp(), x, y, s, **kw),
        "macer": lambda x, y, s, **kw: macer_loss(_mlp(), x, y, s, num_samples=2, **kw),
        "smoothed_ce": lambda x, y, s, **kw: smoothed_cross_entropy(_mlp(), x, y, s, num_samples=2, **kw),
        "attack": lambda x, y, s, **kw: smoothadv_attack(_mlp(), x, y, s, num_samples=2, **kw),
        "smoothadv": lambda x, y, s, **kw: smoothadv_loss(_mlp(), x, y, s, num_samples=2, **kw),
    }


@pytest.mark.parametrize("name", list(_loss_calls()))
@pytest.mark.parametrize(
    "sigma, match",
    [
        (-0.1, "finite number > 0"),
        (0.0, "finite number > 0"),
        (float("nan"), "finite number > 0"),
        (torch.tensor([0.1, 0.2, -0.3]), "input 2"),
        (torch.tensor([0.1, float("nan"), 0.3]), "input 1"),
        (torch.tensor([0.1, 0.2]), r"shape \(3,\)"),
        (torch.full((3,), 0.2, requires_grad=True), "must not require grad"),
    ],
)
def test_bad_sigma(name, sigma, match):
    x, y, _ = _batch(3)
    with pytest.raises(ValueError, match=match):
        _loss_calls()[name](x, y, sigma, seed=0)


@pytest.mark.parametrize("name", [n for n in _loss_calls() if n != "noisy_copies"])
def test_bad_labels(name):
    x, y, sigma = _batch(3)
    with pytest.raises(TypeError, match="integer tensor"):
        _loss_calls()[name](x, y.float(), sigma, seed=0)
    with pytest.raises(TypeError, match="integer tensor"):
        _loss_calls()[name](x, y.tolist(), sigma, seed=0)
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        _loss_calls()[name](x, y[:, None], sigma, seed=0)
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        _loss_calls()[name](x, y[:2], sigma, seed=0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x, y, s: noisy_copies(x, s, copies=0), ValueError, "copies must be >= 1"),
        (lambda m, x, y, s: noisy_copies(x.long(), s), TypeError, "floating-point"),
        (
            lambda m, x, y, s: gaussian_augmentation_loss(m, x, y, s, copies=0),
            ValueError,
            "copies must be >= 1",
        ),
        (lambda m, x, y, s: macer_loss(m, x, y, s, num_samples=0), ValueError, "num_samples must be >= 1"),
        (lambda m, x, y, s: macer_loss(m, x, y, s, lam=-1.0), ValueError, "lam must be"),
        (lambda m, x, y, s: macer_loss(m, x, y, s, gamma=-1.0), ValueError, "gamma must be"),
        (lambda m, x, y, s: macer_loss(m, x, y, s, beta=-1.0), ValueError, "beta must be"),
        (lambda m, x, y, s: macer_loss(m, x, y, s, beta=float("nan")), ValueError, "beta must be"),
        (
            lambda m, x, y, s: smoothed_cross_entropy(m, x, y, s, num_samples=0),
            ValueError,
            "num_samples must be >= 1",
        ),
        (lambda m, x, y, s: smoothadv_attack(m, x, y, s, num_samples=0), ValueError, "num_samples must be"),
        (lambda m, x, y, s: smoothadv_attack(m, x, y, s, epsilon=-0.1), ValueError, "epsilon must be"),
        (lambda m, x, y, s: smoothadv_attack(m, x, y, s, epsilon=math.inf), ValueError, "epsilon must be"),
        (lambda m, x, y, s: smoothadv_attack(m, x, y, s, steps=-1), ValueError, "steps must be >= 0"),
        (lambda m, x, y, s: smoothadv_attack(m, x, y, s, step_size=-1.0), ValueError, "step_size must be"),
        (lambda m, x, y, s: smoothadv_loss(m, x, y, s, epsilon=-0.1), ValueError, "epsilon must be"),
        (lambda m, x, y, s: smoothadv_loss(m, x, y, s, steps=-1), ValueError, "steps must be >= 0"),
        (lambda m, x, y, s: smoothadv_loss(m, x, y, s, num_samples=0), ValueError, "num_samples must be"),
        (lambda m, x, y, s: noisy_copies(x, s, index=[0, 1]), ValueError, "one entry per input"),
        (lambda m, x, y, s: noisy_copies(x, s, seed=-1), ValueError, "seed must lie"),
    ],
)
def test_bad_options(call, error, match):
    model = _mlp()
    model.train()
    requires = [p.requires_grad for p in model.parameters()]
    x, y, sigma = _batch(3)
    with pytest.raises(error, match=match):
        call(model, x, y, sigma)
    assert model.training and [p.requires_grad for p in model.parameters()] == requires


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    w1, w2 = torch.randn(16, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    x, y, sigma = _batch(5)
    stream = torch.tensor([3, 0, 7, 1, 2])

    def loss_fn(x, sigma, w1, w2):
        noisy, _ = ops.perturb_gaussian(x, sigma, stream, 42, PHASE_TRAIN, 3)
        logits = torch.tanh(noisy.flatten(1) @ w1) @ w2
        return F.cross_entropy(logits, y.repeat_interleave(3))

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        xs, ss = x.clone().requires_grad_(True), sigma.clone().requires_grad_(True)
        for w in (w1, w2):
            w.grad = None
        loss = fn(xs, ss, w1, w2)
        loss.backward()
        results.append([loss.detach(), xs.grad, ss.grad, w1.grad.clone(), w2.grad.clone()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_bank_state_dict_keeps_its_range():
    bank = training.SigmaBank(5, 0.3, sigma_range=(0.1, 0.9))
    other = training.SigmaBank(5, 1.0, sigma_range=(0.5, 5.0))
    other.load_state_dict(bank.state_dict())
    assert other.sigma_range == (0.1, 0.9)
    with pytest.raises(ValueError, match="inside sigma_range"):
        other.update([0], [2.0])


def test_attack_works_under_no_grad():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        adv = training.smoothadv_attack(model, x, y, 0.25, epsilon=0.3, steps=2, num_samples=3, seed=1)
    assert not torch.equal(adv, x)
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.3 + 1e-6).all()


def test_train_digits_script_and_checkpoint(tmp_path):
    from ddrs import train_digits

    out = tmp_path / "ck.pt"
    argv = [
        "--scheme",
        "macer",
        "--data-dependent",
        "--epochs",
        "1",
        "--macer-samples",
        "2",
        "--out",
        str(out),
    ]
    assert train_digits.main(argv) == 0
    model, bank, config = train_digits.load_checkpoint(out)
    assert config["scheme"] == "macer" and config["data_dependent"]
    assert bank.sigma.numel() == 1100 and bank.sigma_range == (1e-3, 2.0)
    assert not model.training
    assert config["sigma_estimator"] == "reparam"
    # The score-function estimator moves the bank too, and is recorded in the checkpoint.
    out2 = tmp_path / "ck_score.pt"
    argv2 = ["--data-dependent", "--epochs", "1", "--sigma-estimator", "score", "--out", str(out2)]
    assert train_digits.main(argv2) == 0
    _, bank2, config2 = train_digits.load_checkpoint(out2)
    assert config2["sigma_estimator"] == "score" and bool((bank2.sigma != 0.25).any())
    with pytest.raises(SystemExit):
        train_digits.main(["--sigma", "-1"])
    with pytest.raises(SystemExit):
        train_digits.main(["--sigma-estimator", "finite-difference"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a ddrs_ext training checkpoint"):
        train_digits.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ddrs_ext training checkpoint"):
        train_digits.load_checkpoint(tmp_path / "other.pt")
