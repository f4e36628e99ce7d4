"""Evaluated: a model sampled in lower precision, channels-last or compiled (issue 12, item 5)."""

import pytest
import torch

import ddrs_ext
from ddrs_ext.precision import Evaluated


def _cnn():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 4),
    )


def _inputs(count=3):
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_autocast_certifies_the_model_as_evaluated_in_bfloat16():
    model = _cnn().eval()
    x = _inputs()
    kw = dict(n0=20, n=300, batch_size=128, seed=2)

    def by_hand(z):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(z)

    got = ddrs_ext.certify(Evaluated(model, autocast=torch.bfloat16), x, 0.25, **kw)
    assert torch.equal(got.counts, ddrs_ext.certify(by_hand, x, 0.25, **kw).counts)
    assert (
        model(x).dtype == torch.float32
        and Evaluated(model, autocast=torch.bfloat16)(x).dtype == torch.bfloat16
    )


def test_the_wrapped_module_is_sampled_in_eval_mode_and_left_as_it_was():
    model = _cnn().train()
    wrapped = Evaluated(model, autocast=torch.bfloat16, channels_last=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ddrs_ext.certify(wrapped, _inputs(), 0.25, n0=10, n=100, seed=0)
    assert model.training and wrapped.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in before}  # the model's state, once


def test_channels_last_and_compile_give_the_same_function():
    model = _cnn().eval()
    x = _inputs(5)
    plain = ddrs_ext.certify(model, x, 0.25, n0=20, n=200, seed=4)
    compiled = Evaluated(model, compile={"backend": "eager"})
    assert torch.equal(ddrs_ext.certify(compiled, x, 0.25, n0=20, n=200, seed=4).counts, plain.counts)
    nhwc = Evaluated(model.to(memory_format=torch.channels_last), channels_last=True)
    torch.testing.assert_close(nhwc(x), model(x), rtol=1e-5, atol=1e-5)
    got = ddrs_ext.certify(nhwc, x, 0.25, n0=20, n=200, seed=4)
    assert (got.counts - plain.counts).abs().sum() <= 4  # a copy within rounding of a boundary may flip


def test_sigma_optimisation_through_autocast():
    model = _cnn().eval()
    wrapped = Evaluated(model, autocast=torch.bfloat16)
    sigma = ddrs_ext.optimize_sigma(wrapped, _inputs(), 0.25, iterations=3, num_samples=32, estimator="score")
    assert sigma.shape == (3,) and bool(torch.isfinite(sigma).all())
    with pytest.raises(ValueError, match="does not run under autocast; use estimator='score'"):
        ddrs_ext.optimize_sigma(wrapped, _inputs(), 0.25, iterations=1, num_samples=8, estimator="reparam")
    reparam = Evaluated(model, channels_last=True)  # without autocast, forward mode works
    assert bool(torch.isfinite(ddrs_ext.optimize_sigma(reparam, _inputs(), 0.25, iterations=2)).all())


def test_bad_arguments():
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        Evaluated(_cnn(), autocast=torch.float64)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        Evaluated(_cnn(), channels_last=1)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        Evaluated(_cnn(), compile="max-autotune")
    with pytest.raises(TypeError, match="model must be callable"):
        Evaluated(3)
