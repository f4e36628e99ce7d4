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
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "load_model",
    "load_classifier",
    "load_weights",
    "model_settings",
    "resolve_device",
    "state_dict_of",
    "load_state_dict_checked",
]

# Keys under which checkpoints commonly keep the state_dict (train_digits uses "model").
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SHOWN = 3  # keys named in a mismatch message


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
            f"--model {path} is not a TorchScript file: it {_describe(path, kind)}; "
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
    from ddrs import selector, train_digits

    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        content = None
    if selector.is_selector_checkpoint(content):
        return (
            "a selector checkpoint of python -m ddrs.train_digits --selector-for, not a model file: "
            f"give it as --selector-checkpoint {path}"
        )
    if isinstance(content, Mapping) and content.get("format") == train_digits.FORMAT:
        return (
            "a checkpoint of python -m ddrs.train_digits, not a model file: "
            f"give it as --checkpoint {path}, without --model"
        )
    return (
        "a checkpoint (a torch.save file of weights), not a model file: give it as "
        f"--checkpoint {path}, with --model module:callable naming the function that builds its network"
    )


# ----------------------------------------------------------------------------- reading torch.save files

_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def file_kind(path: Path) -> str:
    """What ``path`` holds, from its bytes: ``"empty"``, ``"checkpoint"`` (torch.save's zip format),
    ``"torchscript"``, ``"export"`` (a torch.export archive), ``"damaged zip"`` (a zip archive that
    is truncated or corrupt), ``"legacy"`` (torch.save's pre-1.6 pickle format), ``"text"`` or
    ``"other"``."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "damaged zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "checkpoint"
        if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
            return "export"
        return "other"
    if head[:1] == b"\x80":
        return "legacy"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
        # a multi-byte character cut at the end of the head
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            pass
    if text is not None and all(ch.isprintable() or ch in "\t\r\n\f" for ch in text):
        return "text"
    return "other"


def _describe(path: Path, kind: str) -> str:
    return {
        "empty": "is empty",
        "checkpoint": "is a torch.save file",
        "torchscript": "is a TorchScript model",
        "export": "is a torch.export program",
        "damaged zip": "is truncated or damaged (a zip archive, torch.save's format, whose end or "
        "directory is missing; copy or save it again)",
        "legacy": "is a pickle (torch.save's format before torch 1.6)",
        "text": "is a text file",
        "other": "is not a file written by torch.save (it starts with bytes "
        + path.read_bytes()[:4].hex(" ")
        + ")",
    }[kind]


def load_weights(path: str | os.PathLike, option: str):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, never
    code. A file that cannot be read that way raises ``ValueError`` (``FileNotFoundError`` when
    missing) with one line that starts with ``option`` (e.g. ``--checkpoint``) and says what the file
    is: empty, truncated, text, a model, another kind of file, or a pickle of other Python objects.
    Torch's own advice to load with ``weights_only=False``, which would run code from the file, is
    never passed on."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")
    kind = file_kind(path)
    if kind == "torchscript":
        raise ValueError(f"{option} {path} is a TorchScript model, not a file of weights: give it as --model")
    if kind not in ("checkpoint", "legacy"):
        raise ValueError(f"{option} {path} {_describe(path, kind)}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        problem = _load_problem(kind, exc)
    raise ValueError(f"{option} {path} {problem}")


def _load_problem(kind: str, exc: BaseException) -> str:
    """Why torch.load(weights_only=True) failed on a torch.save file or a pickle, without torch's
    advice to retry with weights_only=False."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if "Weights only load failed" in text and found and not found.group(1).startswith("torch."):
        return (
            f"holds Python objects besides tensors and plain containers ({found.group(1)}); ddrs loads "
            "weights only, never code: save the state_dict alone, e.g. torch.save(model.state_dict(), 'w.pt')"
        )
    detail = "" if "weights_only" in text else f" ({_one_line(exc)})"
    if kind == "checkpoint":
        return f"is a torch.save file that cannot be read: truncated or damaged?{detail}"
    return (
        "is a pickle that torch.load(weights_only=True) cannot read: not written by torch.save, or "
        f"truncated or damaged?{detail}"
    )


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


# Renamings tried, in order, when a checkpoint's keys are not the model's: (prefix on every key of the
# checkpoint, its replacement, whether the model must then normalise its inputs itself).
# DataParallel saves "module.<key>"; Cohen et al.'s models are Sequential(NormalizeLayer,
# DataParallel(network)) and save "1.module.<key>" (the NormalizeLayer holds no weights): they load
# into the bare network, or into a Sequential(normalisation, network) built without DataParallel.
_RENAMES = (("module.", "", False), ("1.module.", "", True), ("1.module.", "1.", False))


def _renamed(state: Mapping, own: Mapping) -> tuple[Mapping, tuple[str, str, bool] | None]:
    """``state`` with the first renaming of :data:`_RENAMES` that makes its keys the model's, or, if
    none does, the candidate sharing the most keys with the model; and the renaming used."""
    if state.keys() == own.keys():
        return state, None
    best, best_rename, best_shared = state, None, len(state.keys() & own.keys())
    for rename in _RENAMES:
        prefix, new, _ = rename
        if not all(k.startswith(prefix) for k in state):
            continue
        candidate = {new + k[len(prefix) :]: v for k, v in state.items()}
        if candidate.keys() == own.keys():
            return candidate, rename
        shared = len(candidate.keys() & own.keys())
        if shared > best_shared:
            best, best_rename, best_shared = candidate, rename, shared
    return best, best_rename


def load_state_dict_checked(
    model: torch.nn.Module, state: Mapping, path: Path | str = "checkpoint"
) -> tuple[str, str, bool] | None:
    """``model.load_state_dict(state)``, with a one-line ``ValueError`` naming the first keys that do
    not fit. Keys saved through ``DataParallel`` (``module.``) or in Cohen et al.'s layout
    (``1.module.``) are renamed to the model's when that makes them fit; returns the renaming used
    ``(prefix, replacement, the model must normalise its inputs)``, or None."""
    own = model.state_dict()
    state, rename = _renamed(state, own)
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
        renamed = "" if rename is None else f" (its keys {rename[0]}* read as {rename[1]}*)"
        raise ValueError(f"--checkpoint {path} does not fit the model{renamed}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--checkpoint {path} does not fit the model: {_one_line(exc)}") from None
    return rename


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
        from ddrs import selector

        content = load_weights(Path(checkpoint), "--selector-checkpoint")
        if selector.is_selector_checkpoint(content):
            model, _ = selector.load_selector_checkpoint(checkpoint)
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
        from ddrs import selector, train_digits

        path = Path(checkpoint)
        state = load_weights(path, "--checkpoint")
        if selector.is_selector_checkpoint(state):
            raise ValueError(
                f"--checkpoint {path} is a selector checkpoint (python -m ddrs.train_digits --selector-for), "
                "not a classifier: give it as --selector-checkpoint, with --sigma-levels"
            )
        if not (isinstance(state, Mapping) and state.get("format") == train_digits.FORMAT):
            raise ValueError(
                f"--checkpoint {path} is not a checkpoint of python -m ddrs.train_digits; for another "
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
        parts = _split_callable(spec)
        if parts is not None and parts[0].endswith(".py"):
            spec = f"{absolute(parts[0])}:{parts[1]}"
        elif parts is None:
            spec = absolute(spec)
    return {"model": spec, "checkpoint": None if checkpoint is None else absolute(checkpoint)}
