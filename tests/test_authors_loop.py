"""The authors' kind of training loop with ddrs_ext's sigma machinery: a model whose forward ends in
softmax (``update_sigma(probabilities=True)``), the surrogate radius the sigma steps measured
(``return_radius=True``, held to a plain-PyTorch recomputation on the same noise), and a sigma bank
that reads like the tensor their loop kept (reductions, indexing, torch functions) while writes go
only through ``update``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from ddrs_ext import optimize_sigma, reference, rng
from ddrs_ext.data import load_digits_splits
from ddrs_ext.training import IndexedDataset, SigmaBank, noisy_copies, update_sigma

CLASSES = 10


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    (x, y), _, _ = load_digits_splits()
    return x[:96], y[:96]


def _net(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    """A small MLP for 1x8x8 digits that returns logits."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES)
    )
    return net.to(dtype)


@pytest.fixture(scope="module")
def trained():
    """A float64 MLP trained briefly on the digits (full batch): confident enough that the noise moves
    its mean softmax, so the surrogate depends on sigma and on the noise drawn."""
    (x, y), _, _ = load_digits_splits()
    net = _net(seed=2, dtype=torch.float64)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(net(x.double()), y).backward()
        optimizer.step()
    return net


def _softmax_model(net: torch.nn.Module) -> torch.nn.Module:
    """The same network with the softmax inside its forward, as the authors' models have it."""
    return torch.nn.Sequential(net, torch.nn.Softmax(dim=1))


# ------------------------------------------------------------------ probabilities=True


@pytest.mark.parametrize(
    "options",
    [
        dict(estimator="reparam", surrogate="paper"),
        dict(estimator="score", surrogate="paper"),
        dict(estimator="reparam", surrogate="certify"),
        dict(estimator="reparam", surrogate="paper", noise="uniform"),
    ],
    ids=["reparam", "score", "certify", "uniform"],
)
def test_softmax_inside_equals_softmax_outside(digits, trained, options):
    """A model ending in softmax with probabilities=True takes the same steps as its logits."""
    x = digits[0][:12].double()
    index = torch.arange(12) * 7 + 3
    net = trained
    results = []
    for model, probabilities in ((net, False), (_softmax_model(net), True)):
        bank = SigmaBank(100, 0.3, sigma_range=(0.01, 2.0))
        sigma, radius = update_sigma(
            model,
            bank,
            x,
            index,
            steps=4,
            num_samples=16,
            lr=0.2,
            seed=11,
            probabilities=probabilities,
            return_radius=True,
            **options,
        )
        results.append((sigma, radius, bank.tensor()))
    (s_logits, r_logits, b_logits), (s_probs, r_probs, b_probs) = results
    assert not torch.equal(b_logits[index], torch.full((12,), 0.3, dtype=torch.float64))  # sigma moved
    torch.testing.assert_close(s_probs, s_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r_probs, r_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_probs, b_logits, rtol=1e-10, atol=1e-12)


def _same_error(call, error):
    with pytest.raises(error) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize(
    "which, probabilities, error",
    [
        ("softmax", False, ValueError),  # probabilities taken as logits: refused, as optimize_sigma does
        ("logits", True, ValueError),  # logits taken as probabilities
        ("rows_off_by_0.1", True, ValueError),  # non-negative rows that do not sum to 1
        ("softmax", "yes", TypeError),
        ("softmax", 1, TypeError),
    ],
)
def test_wrong_output_kind_is_refused_as_optimize_sigma_refuses_it(digits, which, probabilities, error):
    x = digits[0][:6]
    net = _net()
    model = {
        "softmax": _softmax_model(net),
        "logits": net,
        "rows_off_by_0.1": torch.nn.Sequential(_softmax_model(net), torch.nn.ConstantPad1d((0, 1), 0.1)),
    }[which]
    bank = SigmaBank(6, 0.25)
    theirs = _same_error(
        lambda: optimize_sigma(
            model, x, 0.25, iterations=2, num_samples=4, rule="ascent", probabilities=probabilities, seed=1
        ),
        error,
    )
    ours = _same_error(
        lambda: update_sigma(
            model, bank, x, torch.arange(6), steps=2, num_samples=4, probabilities=probabilities, seed=1
        ),
        error,
    )
    assert ours == theirs
    assert "probabilities" in ours
    assert torch.equal(bank.tensor(), torch.full((6,), 0.25, dtype=torch.float64))  # nothing written
    assert net.training and all(p.requires_grad for p in net.parameters())  # the model is restored


def test_return_radius_must_be_a_bool(digits):
    bank = SigmaBank(4, 0.25)
    with pytest.raises(TypeError, match="return_radius must be a bool"):
        update_sigma(_net(), bank, digits[0][:4], torch.arange(4), steps=1, num_samples=4, return_radius=1)


# ------------------------------------------------------------------ return_radius=True


def _independent_radius(
    model, x, sigma, index, seed, offset, m, surrogate="paper", noise="gaussian", probabilities=True
):
    """The surrogate at ``sigma`` from the noise of samples ``[offset, offset + m)``: the noise from the
    plain-PyTorch reference generator, the mean softmax in float64, Phi^-1 from SciPy."""
    B = x.shape[0]
    stream = torch.as_tensor(index, dtype=torch.int64)
    perturb = reference.perturb_uniform if noise == "uniform" else reference.perturb_gaussian
    noisy = perturb(x, sigma, stream, seed, offset, m)
    noisy = noisy[0] if isinstance(noisy, tuple) else noisy
    with torch.no_grad():
        out = model(noisy).double()  # the models here have no BatchNorm or dropout
    probs = out if probabilities else out.softmax(1)
    mean = probs.reshape(B, m, -1).mean(1)
    top = mean.topk(2, dim=1).values.numpy()
    s = sigma.double().numpy()
    if noise == "uniform":
        return torch.from_numpy(s * (top[:, 0] - top[:, 1]))
    e_a = np.clip(top[:, 0], 0.02, 0.98)
    e_b = np.clip(1 - top[:, 0] if surrogate == "certify" else top[:, 1], 0.02, 0.98)
    return torch.from_numpy(s / 2 * (stats.norm.ppf(e_a) - stats.norm.ppf(e_b)))


@pytest.mark.parametrize(
    "surrogate, noise, probabilities",
    [("paper", "gaussian", True), ("certify", "gaussian", False), ("paper", "uniform", True)],
)
def test_radius_is_the_surrogate_the_last_step_measured(digits, trained, surrogate, noise, probabilities):
    x = digits[0][:10].double()
    index = torch.arange(10) + 40
    net = trained
    model = _softmax_model(net) if probabilities else net
    steps, m, seed = 3, 16, 1234
    kw = dict(num_samples=m, lr=0.2, seed=seed, surrogate=surrogate, noise=noise, probabilities=probabilities)
    bank = SigmaBank(60, 0.3, sigma_range=(0.01, 2.0))
    before_last = copy.deepcopy(bank)
    update_sigma(model, before_last, x, index, steps=steps - 1, **kw)  # the same first steps (same noise)
    start = before_last[index]
    sigma, radius = update_sigma(model, bank, x, index, steps=steps, return_radius=True, **kw)
    assert radius.dtype == torch.float64 and radius.shape == (10,) and radius.device == x.device
    offset = rng.PHASE_SIGMA + (steps - 1) * m
    args = (surrogate, noise, probabilities)
    want = _independent_radius(model, x, start, index, seed, offset, m, *args)
    torch.testing.assert_close(radius, want, rtol=1e-9, atol=1e-12)
    assert bool((radius != 0).all())  # not a clipped-to-nothing case
    # negative controls: the surrogate at the returned sigma, or with the step before's noise, is not it
    after = _independent_radius(model, x, sigma.double(), index, seed, offset, m, *args)
    earlier = _independent_radius(model, x, start, index, seed, offset - m, m, *args)
    for wrong in (after, earlier):
        assert not torch.allclose(radius, wrong, rtol=1e-6, atol=1e-9)


def test_radius_without_steps_is_the_surrogate_at_the_bank_values(digits, trained):
    x = digits[0][:8].double()
    index = torch.arange(8)
    model = _softmax_model(trained)
    bank = SigmaBank(8, 0.4)
    bank.update([2, 5], [0.2, 0.7])
    start = bank.tensor()
    sigma, radius = update_sigma(
        model, bank, x, index, steps=0, num_samples=16, seed=5, probabilities=True, return_radius=True
    )
    assert torch.equal(bank.tensor(), start) and torch.equal(sigma, start)
    want = _independent_radius(model, x, start, index, 5, rng.PHASE_SIGMA, 16)
    torch.testing.assert_close(radius, want, rtol=1e-9, atol=1e-12)


def test_default_return_is_unchanged(digits):
    x = digits[0][:4]
    a = update_sigma(_net(), SigmaBank(4, 0.25), x, torch.arange(4), steps=2, num_samples=4, seed=3)
    b, _ = update_sigma(
        _net(), SigmaBank(4, 0.25), x, torch.arange(4), steps=2, num_samples=4, seed=3, return_radius=True
    )
    assert isinstance(a, torch.Tensor) and torch.equal(a, b)


# ------------------------------------------------------------------ SigmaBank reads like a tensor


def _bank() -> tuple[SigmaBank, torch.Tensor]:
    bank = SigmaBank(9, 0.25, sigma_range=(0.01, 2.0))
    values = torch.tensor([0.25, 0.5, 0.1, 1.5, 0.25, 0.75, 0.3, 0.2, 0.9], dtype=torch.float64)
    bank.update(torch.arange(9), values)
    bank.synchronize()  # forget the changes: reads must not mark any
    return bank, values


@pytest.mark.parametrize(
    "read, expected",
    [
        (lambda b: b.mean(), lambda v: v.mean()),
        (lambda b: b.min(), lambda v: v.min()),
        (lambda b: b.max(), lambda v: v.max()),
        (lambda b: b.max(dim=0).indices, lambda v: v.max(dim=0).indices),
        (lambda b: b.std(), lambda v: v.std()),
        (lambda b: b.sum(), lambda v: v.sum()),
        (lambda b: b.median(), lambda v: v.median()),
        (lambda b: torch.tensor(float(b.mean())), lambda v: torch.tensor(v.mean().item())),
        (lambda b: torch.tensor(b.min().item()), lambda v: torch.tensor(v.min().item())),
        (lambda b: b[3], lambda v: v[3]),
        (lambda b: b[2:7:2], lambda v: v[2:7:2]),
        (lambda b: b[torch.tensor([[0, 8], [3, 3]])], lambda v: v[torch.tensor([[0, 8], [3, 3]])]),
        (lambda b: b[[1, 4]], lambda v: v[[1, 4]]),
        (lambda b: b[np.array([6, 0])], lambda v: v[[6, 0]]),
        (lambda b: torch.tensor(len(b)), lambda v: torch.tensor(len(v))),
        (lambda b: torch.tensor(b.numel()), lambda v: torch.tensor(v.numel())),
        (lambda b: torch.stack(list(b)), lambda v: v),
        (lambda b: b.tensor(), lambda v: v),
        (lambda b: torch.as_tensor(b), lambda v: v),
        (lambda b: torch.tensor(b), lambda v: v),
        (lambda b: torch.from_dlpack(b), lambda v: v),
        (lambda b: torch.from_numpy(np.asarray(b)), lambda v: v),
        (lambda b: torch.quantile(b, 0.75), lambda v: torch.quantile(v, 0.75)),
        (lambda b: torch.histc(b, bins=4, min=0, max=2), lambda v: torch.histc(v, bins=4, min=0, max=2)),
        (lambda b: torch.log(b), lambda v: torch.log(v)),
        (lambda b: torch.ones(9, dtype=torch.float64) * b, lambda v: v),
        (lambda b: torch.stack([b, b]), lambda v: torch.stack([v, v])),
        (lambda b: torch.where(torch.as_tensor(b) > 0.4, b, 0.0), lambda v: torch.where(v > 0.4, v, 0.0)),
    ],
)
def test_bank_reads_like_its_tensor(read, expected):
    bank, values = _bank()
    got, want = read(bank), expected(values.clone())
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(bank.tensor(), values) and int(bank._flags().sum()) == 0  # no change, none recorded


def test_log_lines_like_the_authors(capsys):
    bank, values = _bank()
    print(f"sigma mean {bank.mean():.4f} min {bank.min().item():.4f} max {float(bank.max()):.4f}")
    assert capsys.readouterr().out == f"sigma mean {values.mean():.4f} min 0.1000 max 1.5000\n"


@pytest.mark.parametrize(
    "write, error",
    [
        (lambda b: b.__setitem__(1, 0.3), "bank.update"),
        (lambda b: b.__setitem__(slice(None), torch.zeros(9)), "bank.update"),
        (lambda b: b.__iadd__(1.0), "bank.update"),
        (lambda b: b.__imul__(torch.zeros(9)), "bank.update"),
        (lambda b: torch.relu_(b), "relu_"),
        (lambda b: torch.clamp_(b, 0.0, 0.2), "clamp_"),
        (lambda b: torch.nn.init.uniform_(b), "uniform_"),
        (lambda b: torch.add(torch.ones(9, dtype=torch.float64), 1, out=b), "add"),
        (lambda b: torch.Tensor.add_(b, 1), "add_"),
    ],
)
def test_writes_to_the_bank_are_refused(write, error):
    bank, values = _bank()
    with pytest.raises(TypeError, match=error):
        write(bank)
    assert torch.equal(bank.tensor(), values) and int(bank._flags().sum()) == 0


def test_the_augmented_assignment_is_refused_not_rebound():
    bank, values = _bank()
    original = bank
    with pytest.raises(TypeError, match="bank.update"):
        bank += torch.ones(9, dtype=torch.float64)  # would otherwise rebind the name to a tensor
    assert bank is original and torch.equal(bank.tensor(), values)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[[0, 1]].fill_(0.0),
        lambda b: b[2:5].zero_(),
        lambda b: b[3].fill_(9.0),
        lambda b: b.tensor().mul_(2),
        lambda b: torch.as_tensor(b).fill_(7.0),
        lambda b: torch.from_dlpack(b).fill_(7.0),
        lambda b: np.asarray(b).fill(7.0),
        lambda b: torch.reshape(b, (3, 3)).add_(1),  # a view, but of a copy
        lambda b: torch.flatten(b).neg_(),
        lambda b: next(iter(b)).fill_(0.0),
        lambda b: torch.ones(9, dtype=torch.float64).copy_(b).zero_(),  # copying from the bank reads it
    ],
)
def test_mutating_what_was_read_leaves_the_bank_alone(mutate):
    bank, values = _bank()
    mutate(bank)
    assert torch.equal(bank.tensor(), values) and int(bank._flags().sum()) == 0


@pytest.mark.parametrize(
    "key, error, match",
    [
        (9, ValueError, r"\[0, 9\)"),
        (-1, ValueError, r"\[0, 9\)"),
        ([[0], [12]], ValueError, r"\[0, 9\)"),
        (torch.tensor([0.5]), TypeError, "integers"),
        (torch.ones(9, dtype=torch.bool), TypeError, "integers"),
    ],
)
def test_bad_reads(key, error, match):
    bank, _ = _bank()
    with pytest.raises(error, match=match):
        bank[key]


def test_the_bank_stays_float64_and_moves_devices():
    bank, values = _bank()
    owner = torch.nn.Sequential(torch.nn.Linear(2, 2))
    owner.bank = bank  # a submodule: the owner's casts reach it
    owner.half()
    bank.float()
    bank.to(torch.float32)
    assert owner[0].weight.dtype == torch.float16
    assert bank.sigma.dtype == torch.float64 and torch.equal(bank.tensor(), values)  # not rounded on the way
    bank.to("cpu", torch.float16)
    assert bank.sigma.dtype == torch.float64
    restored = SigmaBank(9, 0.3, sigma_range=(0.01, 2.0))
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.tensor(), values)
    if torch.cuda.is_available():
        bank.to("cuda")
        assert bank.sigma.is_cuda and bank.sigma.dtype == torch.float64
        assert torch.equal(torch.as_tensor(bank).cpu(), values) and torch.equal(bank[[3]].cpu(), values[[3]])
        assert float(bank.mean()) == pytest.approx(float(values.mean()), rel=1e-15)


# ------------------------------------------------------------------ the loop


def _authors_loss(model, x, y, sigma, index, copies: int) -> torch.Tensor:
    """Their classification loss on a softmax model: the negative log of the mean softmax over
    ``copies`` noisy copies of each input (MACER's classification term), each input at its own sigma."""
    probs = model(noisy_copies(x, sigma, copies=copies, index=index))
    mean = probs.reshape(x.shape[0], copies, -1).mean(1)
    return F.nll_loss(torch.log(mean + 1e-10), y)


def _train(digits, epochs: int = 3, warmup_epochs: int = 1, check_radius: bool = False, seed: int = 0):
    """The loop: per-example sigma in a bank, sigma steps from the epoch ``warmup_epochs`` on (none
    before, as the authors' loop trains with its initial sigma until its switch epoch), the bank's
    mean, min and max logged per epoch."""
    x_all, y_all = digits
    model = _softmax_model(_net(seed=1))  # the same initial model whatever the seed
    torch.manual_seed(seed)  # the shuffling and every noise seed follow it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(IndexedDataset(TensorDataset(x_all, y_all)), batch_size=32, shuffle=True)
    bank = SigmaBank(len(x_all), 0.25, sigma_range=(0.05, 1.0))
    logs, banks, checked = [], [], 0
    for epoch in range(epochs):
        steps = 2 if epoch >= warmup_epochs else 0
        for x, y, index in loader:
            noise_seed = int(torch.randint(2**62, ()))  # from torch's generator: manual_seed reproduces it
            kw = dict(steps=steps, num_samples=8, lr=0.1, seed=noise_seed, probabilities=True)
            if check_radius and steps:
                before_last = copy.deepcopy(bank)
                update_sigma(model, before_last, x, index, **{**kw, "steps": steps - 1})
                start = before_last[index]
            sigma, radius = update_sigma(model, bank, x, index, return_radius=True, **kw)
            if check_radius and steps:
                offset = rng.PHASE_SIGMA + (steps - 1) * 8
                want = _independent_radius(model, x, start, index, noise_seed, offset, 8)
                torch.testing.assert_close(radius, want, rtol=1e-5, atol=1e-6)  # float32 model
                checked += 1
            loss = _authors_loss(model, x, y, sigma, index, copies=4)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        logs.append(
            f"epoch {epoch} loss {loss.item():.4f} sigma mean {bank.mean():.4f} "
            f"min {bank.min().item():.4f} max {bank.max().item():.4f}"
        )
        banks.append(bank.tensor())
    return model, bank, logs, banks, checked


def test_the_authors_loop_runs_reproducibly_with_ddrs_ext_sigma(digits):
    model, bank, logs, banks, checked = _train(digits, check_radius=True)
    assert checked == 2 * 3  # every batch of the two epochs with sigma steps
    assert len(logs) == 3 and all("sigma mean" in line for line in logs)
    assert torch.equal(banks[0], torch.full((96,), 0.25, dtype=torch.float64))  # warm-up: no steps
    assert bool((banks[1] != banks[0]).all())  # every example seen, every sigma moved
    assert bool((banks[2] != banks[1]).all())
    assert bool(((banks[2] >= 0.05) & (banks[2] <= 1.0)).all())
    assert model.training and all(p.requires_grad for p in model.parameters())
    again = _train(digits, check_radius=False)
    assert again[2] == logs and all(torch.equal(a, b) for a, b in zip(again[3], banks))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again[0].parameters()))


def test_the_loop_with_another_seed_differs(digits):
    """The reproducibility check above can fail: another torch seed, other noise, other sigma."""
    _, _, logs, banks, _ = _train(digits, epochs=2)
    _, _, other_logs, other_banks, _ = _train(digits, epochs=2, seed=1)
    assert torch.equal(banks[0], other_banks[0])  # the warm-up epoch leaves both at sigma0
    assert not torch.equal(banks[1], other_banks[1]) and other_logs != logs
