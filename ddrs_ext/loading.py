"""Models for the ``ddrs`` command line: built from user code, TorchScript, ``torch.export`` or a checkpoint.

Every way a user can get a model wrong (a spec that does not import, a file of another kind, a
checkpoint that does not fit) raises ``ValueError`` or ``OSError`` with a one-line message.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = ["load_model", "model_settings", "resolve_device", "state_dict_of", "load_state_dict_checked"]

# Keys under which checkpoints commonly keep the state_dict (train_digits uses "model").
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SHOWN = 3  # keys named in a mismatch message


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing devices this machine does not have."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}; use cpu or cuda")
    return device


def _split_callable(spec: str) -> tuple[str, str] | None:
    """``(module or .py file, attribute path)`` for ``module:callable`` / ``file.py:callable``, else None."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not _CALLABLE.match(attr):
        return None
    if target.endswith(".py") or _CALLABLE.match(target):
        return target, attr
    return None


def _import(target: str):
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"--model: {target}: no such file")
        name = "_ddrs_user_model_" + re.sub(r"\W", "_", str(path.resolve()))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # so that the file can import its neighbours
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ValueError(f"--model: running {target} failed: {_one_line(exc)}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    # The console script does not put the working directory on sys.path; `python -m` does.
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ValueError(f"--model: cannot import module {target!r} ({_one_line(exc)})") from None
    except Exception as exc:
        raise ValueError(f"--model: importing {target!r} failed: {_one_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _build(target: str, attr: str) -> Callable:
    obj = _import(target)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"--model: {target} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"--model: {target}:{attr} is not callable")
    try:
        model = obj()
    except Exception as exc:
        raise ValueError(f"--model: calling {target}:{attr}() failed: {_one_line(exc)}") from None
    if not callable(model):
        raise ValueError(
            f"--model: {target}:{attr}() returned a {type(model).__name__}, not a model (a torch.nn.Module)"
        )
    return model


def _load_file_model(path: Path, device: torch.device) -> Callable:
    if not path.exists():
        raise FileNotFoundError(f"--model: {path}: no such file")
    if path.is_dir():
        raise ValueError(f"--model: {path} is a folder, not a TorchScript or .pt2 file")
    if path.suffix == ".py":
        raise ValueError(f"--model: name the function that builds the model: {path}:build_model")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module().to(device)
        except Exception as exc:
            raise ValueError(f"--model: {path} is not a torch.export program ({_one_line(exc)})") from None
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ValueError(
            f"--model: {path} is not a TorchScript file ({_one_line(exc)}); for a state_dict or checkpoint "
            "use --model module:callable --checkpoint FILE, for a torch.export program name it *.pt2"
        ) from None


def _torch_load(path: Path, what: str):
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path}: no such file")
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(
            f"{what}: {path} cannot be read by torch.load(weights_only=True) ({_one_line(exc)})"
        ) from None


def state_dict_of(checkpoint, path: Path | str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint: the checkpoint itself, or the mapping kept under
    one of :data:`STATE_DICT_KEYS`."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"--checkpoint: {path} holds a {type(checkpoint).__name__}, not a state_dict")
    for key in STATE_DICT_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"--checkpoint: {path} holds no tensors (keys {', '.join(map(str, list(checkpoint)[:5]))}); "
            f"expected a state_dict, or a dict with one under {', '.join(STATE_DICT_KEYS)}"
        )
    return checkpoint


def _names(keys, shown: int = _SHOWN) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_state_dict_checked(model: torch.nn.Module, state: Mapping, path: Path | str = "checkpoint") -> None:
    """``model.load_state_dict(state)``, with a one-line ``ValueError`` naming the first keys that do
    not fit. A ``module.`` prefix on every key (``DataParallel``) is removed when the model has none."""
    own = model.state_dict()
    if (
        state
        and all(k.startswith("module.") for k in state)
        and not any(k.startswith("module.") for k in own)
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
    missing = own.keys() - state.keys()
    unexpected = state.keys() - own.keys()
    mismatched = sorted(
        k
        for k in own.keys() & state.keys()
        if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:_SHOWN]]
        more = f" and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
        problems.append(f"shapes differ (checkpoint vs model): {', '.join(shapes)}{more}")
    if problems:
        raise ValueError(f"--checkpoint {path} does not fit the model: {'; '.join(problems)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--checkpoint {path} does not fit the model: {_one_line(exc)}") from None


def load_model(spec: str | None, checkpoint: str | None, device: torch.device) -> Callable:
    """The model a ``ddrs`` command evaluates, in eval mode on ``device``.

    - ``spec = "module:callable"`` or ``"path/to/file.py:callable"``: the callable is called with no
      arguments to build the model; ``checkpoint`` (optional) is a state_dict, or a dict holding one
      under ``model`` / ``state_dict`` / ``model_state_dict``, loaded with ``weights_only=True``.
    - ``spec = FILE``: a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``*.pt2``,
      ``torch.export.save``); ``checkpoint`` (optional) is loaded into it as above.
    - ``spec = None``: ``checkpoint`` is one written by ``python -m ddrs_ext.train_digits``.
    """
    if spec is None and checkpoint is None:
        raise ValueError(
            "give --model (module:callable, file.py:callable or a TorchScript/.pt2 file) or --checkpoint"
        )
    if spec is None:
        from ddrs_ext import train_digits

        path = Path(checkpoint)
        state = _torch_load(path, "--checkpoint")
        if not (isinstance(state, Mapping) and state.get("format") == train_digits.FORMAT):
            raise ValueError(
                f"--checkpoint: {path} is not a checkpoint of python -m ddrs_ext.train_digits; for another "
                "state_dict also give --model module:callable that builds the model it fits"
            )
        try:
            model, _, _ = train_digits.load_checkpoint(path, map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(f"--checkpoint {path} does not fit its model: {_one_line(exc)}") from None
    else:
        parts = _split_callable(spec)
        model = _build(*parts) if parts is not None else _load_file_model(Path(spec), device)
        if checkpoint is not None:
            path = Path(checkpoint)
            if not isinstance(model, torch.nn.Module):
                raise ValueError(
                    f"--checkpoint: the model from {spec} is not a torch.nn.Module, cannot load it"
                )
            load_state_dict_checked(model, state_dict_of(_torch_load(path, "--checkpoint"), path), path)
    if isinstance(model, torch.nn.Module):
        try:
            model.eval()
        except NotImplementedError:  # torch.export modules keep the mode they were exported in
            pass
        model = model.to(device)
    return model


def model_settings(spec: str | None, checkpoint: str | None) -> dict:
    """What identifies the model in a result file's settings (files by absolute path)."""

    def absolute(p: str) -> str:
        return os.path.abspath(p)

    if spec is not None:
        parts = _split_callable(spec)
        if parts is not None and parts[0].endswith(".py"):
            spec = f"{absolute(parts[0])}:{parts[1]}"
        elif parts is None:
            spec = absolute(spec)
    return {"model": spec, "checkpoint": None if checkpoint is None else absolute(checkpoint)}
