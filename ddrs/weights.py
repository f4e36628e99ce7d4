"""Reading the weights files a user gives ``ddrs`` (``--checkpoint``, ``--selector-checkpoint``,
``--selector-for``, a ``.pt`` data file): what a file holds from its bytes (:func:`file_kind`),
``torch.load(weights_only=True)`` with one-line errors that say what the file is
(:func:`load_weights`), and loading a state_dict into a model with keys renamed from
``DataParallel``'s and Cohen et al.'s layouts (:func:`load_state_dict_checked`).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = [
    "STATE_DICT_KEYS",
    "file_kind",
    "describe",
    "load_weights",
    "state_dict_of",
    "load_state_dict_checked",
]

# Keys under which checkpoints commonly keep the state_dict (ddrs train uses "model").
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
_SHOWN = 3  # keys named in a mismatch message


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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


def describe(path: Path, kind: str) -> str:
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
        raise ValueError(f"{option} {path} {describe(path, kind)}")
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
