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

from ddrs.checkpoints import (
    is_classifier_checkpoint,
    is_selector_checkpoint,
    load_checkpoint,
    load_selector_checkpoint,
)
from ddrs.options import split_callable
from ddrs.weights import (
    describe,
    file_kind,
    load_state_dict_checked,
    load_weights,
    state_dict_of,
)

__all__ = [
    "load_model",
    "load_classifier",
    "load_weights",
    "model_settings",
    "resolve_device",
    "state_dict_of",
    "load_state_dict_checked",
]


def resolve_device(name: str | None) -> torch.device:
    """``torch.device(name)``, refusing devices this machine does not have; ``None``: ``cuda`` when
    torch sees a GPU, else ``cpu``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    kind = file_kind(path)
    if path.suffix == ".pt2" or kind == "export":
        try:
            return torch.export.load(str(path)).module().to(device)
        except Exception as exc:
            raise ValueError(f"--model: {path} is not a torch.export program ({_one_line(exc)})") from None
    if kind == "checkpoint":
        raise ValueError(f"--model {path} is {_checkpoint_advice(path)}")
    if kind != "torchscript":
        raise ValueError(
            f"--model {path} is not a TorchScript file: it {describe(path, kind)}; "
            "give a TorchScript file, a *.pt2 torch.export program or module:callable"
        )
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ValueError(
            f"--model {path}: a TorchScript file that cannot be loaded ({_one_line(exc)})"
        ) from None


def _checkpoint_advice(path: Path) -> str:
    """What to do with a torch.save file given as --model."""
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        content = None
    if is_selector_checkpoint(content):
        return (
            "a selector checkpoint of python -m ddrs.train_digits --selector-for, not a model file: "
            f"give it as --selector-checkpoint {path}"
        )
    if is_classifier_checkpoint(content):
        return (
            "a checkpoint of python -m ddrs.train_digits, not a model file: "
            f"give it as --checkpoint {path}, without --model"
        )
    return (
        "a checkpoint (a torch.save file of weights), not a model file: give it as "
        f"--checkpoint {path}, with --model module:callable naming the function that builds its network"
    )


_MODEL_OPTION = re.compile(r"(?<![\w-])--model(?![\w-])")
_CHECKPOINT_OPTION = re.compile(r"(?<![\w-])--checkpoint(?![\w-])")


def load_model(
    spec: str | None,
    checkpoint: str | None,
    device: torch.device,
    note: Callable[[str], None] | None = None,
    *,
    role: str = "model",
) -> Callable:
    """The model a ``ddrs`` command evaluates, in eval mode on ``device``: :func:`load_classifier`
    (``role="model"``), or with ``role="selector"`` the selector of ``ddrs certify --sigma-levels``,
    from ``--selector`` and ``--selector-checkpoint``: the same kinds of specs and checkpoints, or alone a
    selector checkpoint (:mod:`ddrs.selector`); its messages name those options."""
    if role == "model":
        return load_classifier(spec, checkpoint, device, note)
    if role != "selector":
        raise ValueError(f"role must be 'model' or 'selector', got {role!r}")

    def renamed(text: str) -> str:
        return _CHECKPOINT_OPTION.sub("--selector-checkpoint", _MODEL_OPTION.sub("--selector", text))

    if spec is None and checkpoint is not None:
        content = load_weights(Path(checkpoint), "--selector-checkpoint")
        if is_selector_checkpoint(content):
            model, _ = load_selector_checkpoint(checkpoint)
            return model.to(device)
    try:
        return load_classifier(spec, checkpoint, device, None if note is None else lambda t: note(renamed(t)))
    except FileNotFoundError as exc:
        raise FileNotFoundError(renamed(str(exc))) from None
    except (ValueError, OSError) as exc:
        raise ValueError(renamed(str(exc))) from None


def load_classifier(
    spec: str | None,
    checkpoint: str | None,
    device: torch.device,
    note: Callable[[str], None] | None = None,
) -> Callable:
    """The model a ``ddrs`` command evaluates, in eval mode on ``device``.

    - ``spec = "module:callable"`` or ``"path/to/file.py:callable"``: the callable is called with no
      arguments to build the model; ``checkpoint`` (optional) is a state_dict, or a dict holding one
      under ``model`` / ``state_dict`` / ``model_state_dict``, loaded with ``weights_only=True``
      (keys renamed as :func:`load_state_dict_checked` says).
    - ``spec = FILE``: a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``*.pt2``,
      ``torch.export.save``); ``checkpoint`` (optional) is loaded into it as above.
    - ``spec = None``: ``checkpoint`` is one written by ``python -m ddrs.train_digits``.

    ``note`` receives a sentence the user should read (Cohen et al.'s keys loaded into a bare network,
    which must then normalise its inputs itself).
    """
    if spec is None and checkpoint is None:
        raise ValueError(
            "give --model (module:callable, file.py:callable or a TorchScript/.pt2 file) or --checkpoint"
        )
    if spec is None:
        path = Path(checkpoint)
        state = load_weights(path, "--checkpoint")
        if is_selector_checkpoint(state):
            raise ValueError(
                f"--checkpoint {path} is a selector checkpoint (python -m ddrs.train_digits --selector-for), "
                "not a classifier: give it as --selector-checkpoint, with --sigma-levels"
            )
        if not is_classifier_checkpoint(state):
            raise ValueError(
                f"--checkpoint {path} is not a checkpoint of python -m ddrs.train_digits; for another "
                "state_dict also give --model module:callable that builds the model it fits"
            )
        try:
            model, _, _ = load_checkpoint(path, map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(f"--checkpoint {path} does not fit its model: {_one_line(exc)}") from None
    else:
        parts = split_callable(spec)
        model = _build(*parts) if parts is not None else _load_file_model(Path(spec), device)
        if checkpoint is not None:
            path = Path(checkpoint)
            if not isinstance(model, torch.nn.Module):
                raise ValueError(
                    f"--checkpoint: the model from {spec} is not a torch.nn.Module, cannot load it"
                )
            content = load_weights(path, "--checkpoint")
            try:
                rename = load_state_dict_checked(model, state_dict_of(content, path), path)
            except ValueError as exc:
                arch = content.get("arch") if isinstance(content, Mapping) else None
                if isinstance(arch, str):
                    raise ValueError(f"{exc} (the checkpoint's arch: {arch})") from None
                raise
            if rename is not None and rename[2] and note is not None:
                note(
                    f"--checkpoint {path}: keys {rename[0]}* loaded as *, Cohen et al.'s layout "
                    "without its NormalizeLayer (which holds no weights); ddrs feeds inputs in [0, 1], so "
                    f"the model from {spec} must normalise them itself"
                )
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
        parts = split_callable(spec)
        if parts is not None and parts[0].endswith(".py"):
            spec = f"{absolute(parts[0])}:{parts[1]}"
        elif parts is None:
            spec = absolute(spec)
    return {"model": spec, "checkpoint": None if checkpoint is None else absolute(checkpoint)}
