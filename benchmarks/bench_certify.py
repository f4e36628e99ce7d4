"""certify end to end next to the plain per-input Cohen loop, and the model's forward-only floor.

All runs use inference mode, per-input sigma in [0.12, 0.5], alpha = 0.001,
and the same batch size for ddrs_ext, the plain loop and the floor.
"""

from __future__ import annotations

import pytest
import torch
from baselines import forward_floor, plain_certify, sigmas, small_cnn, tiny_linear

import ddrs_ext

ALPHA, NUM_CLASSES = 0.001, 10
CASES = {
    # name: (model factory, input shape, inputs, n0, n, batch_size, rounds)
    "linear": (tiny_linear, (1, 8, 8), 100, 100, 10_000, 1000, 5),
    "cnn": (small_cnn, (3, 32, 32), 4, 100, 2_000, 500, 3),
}


def _case(name):
    factory, shape, B, n0, n, batch_size, rounds = CASES[name]
    model = factory()
    x = torch.rand((B, *shape), generator=torch.Generator().manual_seed(3))
    rows = B * (n0 + n)
    info = dict(inputs=B, n0=n0, n=n, batch_size=batch_size, work={"k rows/s": rows / 1e3})
    return model, x, sigmas(B), n0, n, batch_size, rounds, info


def _check(result, B, n):
    assert result.prediction.shape == (B,) and result.radius.shape == (B,)
    assert result.counts.shape == (B, NUM_CLASSES)
    assert (result.counts.sum(1) == n).all()
    assert (result.radius[result.prediction == ddrs_ext.ABSTAIN] == 0).all()


@pytest.mark.parametrize("name", list(CASES))
def test_certify_ddrs(benchmark, name):
    model, x, sigma, n0, n, batch_size, rounds, info = _case(name)
    benchmark.group = f"certify_{name}"
    benchmark.extra_info.update(
        info, label=f"ddrs_ext.certify ({name})", baseline=f"test_certify_plain[{name}]"
    )
    benchmark.extra_info["reference"] = f"test_forward_floor[{name}]"
    result = benchmark.pedantic(
        lambda: ddrs_ext.certify(
            model, x, sigma, n0=n0, n=n, alpha=ALPHA, batch_size=batch_size, num_classes=NUM_CLASSES, seed=0
        ),
        rounds=rounds,
        warmup_rounds=1,
        iterations=1,
    )
    _check(result, x.shape[0], n)
    # Sound bounds at alpha = 0.001 cannot both certify two different classes
    # for one input; the plain loop must agree wherever both certify.
    torch.manual_seed(0)
    plain = plain_certify(model, x, sigma, n0, n, ALPHA, batch_size, NUM_CLASSES)
    both = (result.prediction != ddrs_ext.ABSTAIN) & (plain.prediction != ddrs_ext.ABSTAIN)
    assert torch.equal(result.prediction[both], plain.prediction[both])


@pytest.mark.parametrize("name", list(CASES))
def test_certify_plain(benchmark, name):
    model, x, sigma, n0, n, batch_size, rounds, info = _case(name)
    benchmark.group = f"certify_{name}"
    benchmark.extra_info.update(info, label=f"plain per-input Cohen loop ({name})")
    torch.manual_seed(0)
    result = benchmark.pedantic(
        plain_certify,
        args=(model, x, sigma, n0, n, ALPHA, batch_size, NUM_CLASSES),
        rounds=rounds,
        warmup_rounds=1,
        iterations=1,
    )
    _check(result, x.shape[0], n)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_floor(benchmark, name):
    model, x, _, n0, n, batch_size, rounds, info = _case(name)
    benchmark.group = f"certify_{name}"
    benchmark.extra_info.update(info, label=f"forward passes only, same rows and batch size ({name})")
    buf = torch.rand((batch_size, *x.shape[1:]), generator=torch.Generator().manual_seed(4))
    rows = x.shape[0] * (n0 + n)
    batches = benchmark.pedantic(
        forward_floor, args=(model, buf, rows), rounds=rounds, warmup_rounds=1, iterations=1
    )
    assert batches == -(-rows // batch_size)
