"""Bad arguments to the public API raise ValueError/TypeError saying what to change."""

import pytest
import torch

from ddrs_ext import Smooth, certify, predict


def model(z):
    return z.flatten(1)[:, :3] * 2.0


X = torch.zeros(4, 3, 2)


@pytest.mark.parametrize(
    "sigma,match",
    [
        (0.0, "sigma must be a finite number > 0"),
        (-0.5, "sigma must be a finite number > 0"),
        (float("nan"), "sigma must be a finite number > 0"),
        (float("inf"), "sigma must be a finite number > 0"),
        (torch.tensor([0.5, 0.5, 0.0, 0.5]), "input 2"),
        (torch.tensor([0.5, float("nan"), 0.5, 0.5]), "input 1"),
        (torch.ones(3), r"shape \(4,\)"),
        (torch.ones(4, 1), r"shape \(4,\)"),
        ([0.5] * 5, r"shape \(4,\)"),
    ],
)
def test_bad_sigma(sigma, match):
    with pytest.raises(ValueError, match=match):
        certify(model, X, sigma, n0=2, n=5)
    with pytest.raises(ValueError, match=match):
        predict(model, X, sigma, n=5)


def test_sigma_type():
    with pytest.raises(TypeError, match="sigma"):
        certify(model, X, "0.5", n0=2, n=5)
    with pytest.raises(TypeError, match="sigma"):
        certify(model, X, True, n0=2, n=5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1"):
        certify(model, X, 0.5, n0=2, n=5, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        predict(model, X, 0.5, n=5, alpha=alpha)


@pytest.mark.parametrize("name", ["n0", "n", "batch_size"])
@pytest.mark.parametrize(
    "value,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_counts(name, value, error):
    kwargs = dict(n0=2, n=5, batch_size=10)
    kwargs[name] = value
    with pytest.raises(error, match=f"{name} must"):
        certify(model, X, 0.5, **kwargs)


def test_bad_x():
    with pytest.raises(TypeError, match="floating-point"):
        certify(model, torch.zeros(4, 3, dtype=torch.int64), 0.5, n=5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        certify(model, [[0.0, 1.0]], 0.5, n=5)
    with pytest.raises(ValueError, match="batch dimension"):
        certify(model, torch.tensor(1.0), 0.5, n=5)
    bad = X.clone()
    bad[3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf .first at input 3"):
        certify(model, bad, 0.5, n=5)
    bad[3, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="input 3"):
        predict(model, bad, 0.5, n=5)


def test_num_classes_mismatch():
    with pytest.raises(ValueError, match="num_classes is 10 but the model returned 3 classes"):
        certify(model, X, 0.5, n0=2, n=5, num_classes=10)
    with pytest.raises(ValueError, match="num_classes is 2 but the model returned 3 classes"):
        Smooth(model, 2, 0.5).predict(X[0], 5, 0.01, 5)
    # more classes than the model's outputs is fine for Smooth, as for core.Smooth: no votes for them
    assert Smooth(model, 5, 0.5, seed=0)._sample_noise(X[0], 7, 5)[3:].tolist() == [0, 0]
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        certify(model, X, 0.5, n0=2, n=5, num_classes=0)


def test_model_returning_nan_names_the_input():
    def nan_for_input_2(z):
        out = model(z).clone()
        out[(z.flatten(1)[:, 0] - 2.0).abs() < 0.5] = float("nan")  # input 2's copies sit near 2.0
        return out

    x = torch.arange(4.0)[:, None, None].expand(4, 3, 2).contiguous()
    with pytest.raises(ValueError, match="NaN for input 2"):
        certify(nan_for_input_2, x, 0.01, n0=3, n=5, batch_size=7)


def test_model_returning_wrong_shapes():
    with pytest.raises(ValueError, match=r"shape \(batch, num_classes\)"):
        certify(lambda z: z.flatten(), X, 0.5, n0=2, n=5)
    with pytest.raises(ValueError, match=r"for a batch of"):
        certify(lambda z: z.flatten(1)[:1], X, 0.5, n0=2, n=5)
    with pytest.raises(TypeError, match="tensor of logits"):
        certify(lambda z: (z, z), X, 0.5, n0=2, n=5)
    with pytest.raises(TypeError, match="floating-point logits"):
        certify(lambda z: z.flatten(1).long(), X, 0.5, n0=2, n=5)
    with pytest.raises(TypeError, match="callable"):
        certify("resnet", X, 0.5, n0=2, n=5)


def test_bad_seed_and_index():
    with pytest.raises(ValueError, match="seed must lie in"):
        certify(model, X, 0.5, n=5, seed=-1)
    with pytest.raises(ValueError, match="seed must lie in"):
        certify(model, X, 0.5, n=5, seed=2**64)
    with pytest.raises(TypeError, match="seed"):
        certify(model, X, 0.5, n=5, seed=1.5)
    with pytest.raises(ValueError, match="one entry per input"):
        certify(model, X, 0.5, n=5, index=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        certify(model, X, 0.5, n=5, index=[0, 1, 2, -1])
    with pytest.raises(TypeError, match="integers"):
        certify(model, X, 0.5, n=5, index=[0.0, 1.0, 2.0, 3.0])


def test_device_without_kernels(monkeypatch):
    """An input on a device this build has no kernels for gets a clear error, not a dispatcher trace."""
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda name, key: False)
    with pytest.raises(ValueError, match="no Meta kernels in this build"):
        certify(model, torch.zeros(4, 3, 2, device="meta"), 0.5, n=5)
