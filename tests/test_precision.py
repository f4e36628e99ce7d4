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


def check_autocast_sigma(sigma, reference, model, ts, sigma0, sigma_range):
    """sigma optimised under autocast, against float32's on the same noise and the exact optimum of a
    model with a closed-form surrogate: inside sigma_range; within 10% of float32's sigma (bisection
    pins sigma down to a few per cent, and bfloat16's rounding of the logits may flip one of its late
    decisions where the surrogate is flat); its exact surrogate within 2% of float32's sigma's, at least
    98% of the optimum and above the surrogate at sigma0 (moved the right way)."""
    low, high = sigma_range
    assert bool(((sigma >= low) & (sigma <= high)).all()), f"sigma left {sigma_range}: {sigma.tolist()}"
    for b, t in enumerate(ts):
        _, best = model.exact_optimum(t)
        got, want = model.exact_surrogate(t, float(sigma[b])), model.exact_surrogate(t, float(reference[b]))
        assert got > model.exact_surrogate(t, sigma0), f"input {b}: the surrogate went down"
        assert got >= 0.98 * best and abs(got - want) <= 0.02 * best, f"input {b}: surrogate {got} vs {want}"
        assert abs(float(sigma[b]) - float(reference[b])) <= 0.1 * float(reference[b]), f"input {b}: sigma"


AUTOCAST_SIGMA = dict(estimator="score", iterations=12, num_samples=4000, seed=3, sigma_range=(0.05, 1.0))


def _autocast_sigma_case():
    from test_sigma import Stripes  # surrogate and optimum by quadrature

    model = Stripes()
    ts = [0.0, 0.3, -0.5]
    x = model.points(ts)
    reference = ddrs_ext.optimize_sigma(model, x, 0.1, **AUTOCAST_SIGMA)
    return model, ts, x, reference


def test_sigma_optimisation_through_autocast():
    model, ts, x, reference = _autocast_sigma_case()
    wrapped = Evaluated(model, autocast=torch.bfloat16)
    assert wrapped(x).dtype == torch.bfloat16  # the logits really are computed in bfloat16
    sigma = ddrs_ext.optimize_sigma(wrapped, x, 0.1, **AUTOCAST_SIGMA)
    assert not torch.equal(sigma, reference)  # bfloat16 does change something here ...
    check_autocast_sigma(sigma, reference, model, ts, 0.1, AUTOCAST_SIGMA["sigma_range"])  # ... but little
    with pytest.raises(ValueError, match="does not run under autocast; use estimator='score'"):
        ddrs_ext.optimize_sigma(wrapped, _inputs(), 0.25, iterations=1, num_samples=8, estimator="reparam")
    reparam = Evaluated(_cnn().eval(), channels_last=True)  # without autocast, forward mode works
    assert bool(torch.isfinite(ddrs_ext.optimize_sigma(reparam, _inputs(), 0.25, iterations=2)).all())


def test_negative_control_sigma_moved_against_the_gradient_fails_the_check(monkeypatch):
    """The same check on a sigma step that descends instead of ascending: rejected."""
    model, ts, x, reference = _autocast_sigma_case()
    step = ddrs_ext.ops.sigma_step

    def descent(sigma, top2, dtop2, *args, **kwargs):
        return step(sigma, top2, -dtop2, *args, **kwargs)

    monkeypatch.setattr(ddrs_ext.ops, "sigma_step", descent)
    sigma = ddrs_ext.optimize_sigma(Evaluated(model, autocast=torch.bfloat16), x, 0.1, **AUTOCAST_SIGMA)
    with pytest.raises(AssertionError, match="the surrogate went down"):
        check_autocast_sigma(sigma, reference, model, ts, 0.1, AUTOCAST_SIGMA["sigma_range"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        Evaluated(_cnn(), autocast=torch.float64)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        Evaluated(_cnn(), channels_last=1)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        Evaluated(_cnn(), compile="max-autotune")
    with pytest.raises(TypeError, match="model must be callable"):
        Evaluated(3)
