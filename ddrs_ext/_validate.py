"""Argument checks for the public API: each failure says what to change."""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator

import numpy as np
import torch

# A model or selector: a batch of inputs in, a batch of logits out.
Model = Callable[[torch.Tensor], torch.Tensor]


def check_model(model: Callable) -> None:
    if not callable(model):
        raise TypeError(
            f"model must be callable (an nn.Module or a function returning logits), got {model!r}"
        )


def _module_of(model) -> torch.nn.Module | None:
    """The nn.Module behind ``model``: the model itself, or the module a bound method belongs to."""
    if isinstance(model, torch.nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


@contextlib.contextmanager
def evaluating(model: Callable) -> Iterator[None]:
    """Samples ``model`` in eval mode, as ``core.Smooth`` does, and puts every submodule back in the
    mode it was in afterwards.

    A module in training mode must never be sampled as is: BatchNorm would normalise each noisy
    copy with the statistics of the other rows of its forward batch (so the votes would not be
    draws from one fixed classifier) and overwrite its running statistics; dropout would add
    noise of its own. Plain functions are called as they are (their owner is responsible for the
    modules they call), but a bound method of an ``nn.Module`` (``net.forward``) counts as that module.
    A module whose ``eval()`` is not supported (``torch.export``'s, whose mode was fixed at export) has
    its flags set directly.
    """
    module = _module_of(model)
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in modes):
        yield
        return
    try:
        module.eval()
    except NotImplementedError:
        for m, _ in modes:
            m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def check_inputs(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it, e.g. x.float()"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (B, ...), got a 0-d tensor")
    finite = torch.isfinite(x.flatten(1) if x.dim() > 1 else x[:, None]).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or Inf (first at input {bad}); inputs must be finite")
    return x.detach()


def check_sigma(sigma, num_inputs: int, device: torch.device, name: str = "sigma") -> torch.Tensor:
    """A float or one value per input -> float64 tensor (B,) on device, all finite and > 0."""
    if isinstance(sigma, bool):
        raise TypeError(f"{name} must be a float or a tensor of shape ({num_inputs},), got a bool")
    if isinstance(sigma, (int, float, np.floating, np.integer)):
        value = float(sigma)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
        return torch.full((num_inputs,), value, dtype=torch.float64, device=device)
    try:
        s = torch.as_tensor(sigma)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a float or a tensor of shape ({num_inputs},), got {type(sigma).__name__}"
        ) from None
    if s.dtype == torch.bool or s.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {s.dtype}")
    s = s.detach().to(device=device, dtype=torch.float64)
    if s.dim() == 0:
        s = s.expand(num_inputs).clone()
    if s.dim() != 1 or s.shape[0] != num_inputs:
        raise ValueError(
            f"{name} must be a float or have shape ({num_inputs},) (one per input), got {tuple(s.shape)}"
        )
    ok = torch.isfinite(s) & (s > 0)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise ValueError(f"{name} must be finite and > 0 for every input; input {bad} has {float(s[bad])}")
    return s


def check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
        raise TypeError(f"alpha must be a float in (0, 1), got {alpha!r}")
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {a}")
    return a


def check_logits(out, rows: int, num_classes: int | None, min_classes: int = 1) -> int:
    """Checks a model's output for a batch of ``rows``; returns its class count."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor of logits, got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != rows:
        raise ValueError(
            f"model must return logits of shape (batch, num_classes); for a batch of {rows} it returned "
            f"shape {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise TypeError(f"model must return floating-point logits, got dtype {out.dtype}")
    if num_classes is None:
        if out.shape[1] < min_classes:
            raise ValueError(f"this needs a model with at least {min_classes} classes, got {out.shape[1]}")
        return int(out.shape[1])
    if out.shape[1] != num_classes:
        raise ValueError(
            f"num_classes is {num_classes} but the model returned {out.shape[1]} classes; "
            "pass the model's number of outputs as num_classes"
        )
    return num_classes


def check_num_classes(num_classes) -> int | None:
    if num_classes is None:
        return None
    return check_count(num_classes, "num_classes")


def check_sigma_levels(sigma_levels) -> torch.Tensor:
    """Levels as a float64 tensor (K,): finite, > 0 and strictly increasing, K >= 1."""
    try:
        levels = torch.as_tensor(sigma_levels, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sigma_levels must be a sequence of numbers, got {sigma_levels!r}") from None
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"sigma_levels must be a non-empty 1-d sequence, got shape {tuple(levels.shape)}")
    if not bool((torch.isfinite(levels) & (levels > 0)).all()):
        raise ValueError(f"sigma_levels must all be finite and > 0, got {levels.tolist()}")
    if levels.numel() > 1 and not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(f"sigma_levels must be strictly increasing, got {levels.tolist()}")
    return levels


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def _experts(model, levels: int) -> list[Model]:
    if isinstance(model, (list, tuple)):
        if len(model) != levels:
            raise ValueError(
                f"model is a list of {len(model)} models but there are {levels} sigma levels; "
                "pass one model per level (or a single model for every level)"
            )
        for m in model:
            check_model(m)
        return list(model)
    check_model(model)
    return [model] * levels
