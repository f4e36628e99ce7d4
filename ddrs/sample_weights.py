"""Per-example sampling weights for ``ddrs train --sample-weights`` and the label files of ``ddrs train
--selector-for ... --save-labels`` that provide them.

A weights file holds one non-negative weight per training example, in the order of the training
split ``ddrs train`` uses (``ddrs_ext.data.load_digits_split(--seed)``'s first part), as a ``.pt``
tensor, a ``.npy`` array, or text (anything else: one number per line, or a table with one column
per field, whitespace-separated, ``#`` comments). A table, or a 2-D tensor or array, needs
``--sample-weights-column J`` (0-based). ``--save-labels`` writes the selector's labels as such a table,
one column per sigma level, so that column k of soft held-out labels weights a specialist for level k.
Each epoch then draws ``len(weights)`` examples with replacement in proportion to them
(:func:`draw_epoch`, under a generator seeded by ``--seed``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "check_positive_mass",
    "draw_epoch",
    "load_sample_weights",
    "read_label_settings",
    "save_labels",
    "weights_digest",
]

_SETTINGS = "# settings: "


def _read_table(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"--sample-weights {path}: a .pt file must hold one tensor, got {type(value).__name__}"
                )
            return value.detach().double().numpy()
        if suffix == ".npy":
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        return np.loadtxt(path, dtype=np.float64, comments="#", ndmin=1)
    except FileNotFoundError:
        raise ValueError(f"--sample-weights {path}: no such file") from None
    except ValueError as exc:
        if str(exc).startswith("--sample-weights"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--sample-weights {path}: not a table of numbers ({first})") from None
    except Exception as exc:  # a damaged .pt/.npy: name the file, not the unpickler's internals
        raise ValueError(
            f"--sample-weights {path}: cannot be read ({type(exc).__name__}: {exc})"[:300]
        ) from None


def load_sample_weights(path: str | os.PathLike, count: int, column: int | None = None) -> torch.Tensor:
    """The weights of ``path`` (one per training example, ``count`` of them) as a float64 tensor;
    ``column``: the column of a table. A ValueError says what is wrong: the length, a negative, NaN or
    infinite weight, all weights zero, a table without ``column``."""
    path = Path(path)
    table = _read_table(path)
    if table.ndim == 2 and table.shape[1] == 1 and column is None:
        table = table[:, 0]
    if table.ndim == 2:
        if column is None:
            raise ValueError(
                f"--sample-weights {path} is a table of {table.shape[1]} columns: choose one with "
                "--sample-weights-column J (0-based; for --save-labels' labels, the level's index)"
            )
        if not 0 <= column < table.shape[1]:
            raise ValueError(f"--sample-weights-column {column}: {path} has columns 0..{table.shape[1] - 1}")
        table = table[:, column]
    elif table.ndim == 1:
        if column not in (None, 0):
            raise ValueError(f"--sample-weights-column {column}: {path} holds one column (0)")
    else:
        raise ValueError(f"--sample-weights {path}: a vector or a table expected, got shape {table.shape}")
    if table.shape[0] != count:
        raise ValueError(
            f"--sample-weights {path} has {table.shape[0]} weights; the training split has {count} "
            "examples (one weight per example, in the split's order)"
        )
    bad = ~np.isfinite(table)
    if bad.any():
        raise ValueError(
            f"--sample-weights {path}: weight {int(np.argmax(bad))} is {table[bad][0]} (weights must be "
            "finite numbers >= 0)"
        )
    if (table < 0).any():
        i = int(np.argmax(table < 0))
        raise ValueError(f"--sample-weights {path}: weight {i} is {table[i]:g} (weights must be >= 0)")
    if not (table > 0).any():
        raise ValueError(f"--sample-weights {path}: every weight is 0 (at least one must be > 0)")
    return torch.from_numpy(np.ascontiguousarray(table))


def weights_digest(weights: torch.Tensor) -> str:
    """A digest of a weight vector (what a checkpoint records of the weights it was trained with)."""
    data = weights.detach().cpu().double().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:20]


def draw_epoch(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch's examples: ``len(weights)`` indices drawn with replacement in proportion to
    ``weights``."""
    return torch.multinomial(weights, weights.shape[0], replacement=True, generator=generator)


def save_labels(path: str | os.PathLike, labels: torch.Tensor, settings: dict) -> None:
    """Writes ``labels`` (N, K) to ``path``: ``.pt`` (a float64 tensor), ``.npy``, or text (one row per
    training input, ``%.17g``, after ``#`` lines naming the levels and ``settings`` as JSON)."""
    path = Path(path)
    table = labels.detach().cpu().double()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save(table, tmp)
    elif suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, table.numpy())
    else:
        levels = settings.get("sigma_levels", [])
        header = (
            "selector labels of ddrs train --selector-for: one row per training input (in order), one "
            f"column per level (sigma {' '.join(f'{v:g}' for v in levels)})\n"
            f"{_SETTINGS[2:]}{json.dumps(settings, sort_keys=True)}"
        )
        np.savetxt(tmp, table.numpy(), fmt="%.17g", header=header)
    os.replace(tmp, path)


def read_label_settings(path: str | os.PathLike) -> dict | None:
    """The settings a text file of :func:`save_labels` records (None when it has none)."""
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            if line.startswith(_SETTINGS):
                return json.loads(line[len(_SETTINGS) :])
    return None


def check_positive_mass(weights: torch.Tensor, what: str) -> None:
    """A subset of the weights (a cross-fitting fold's rest) must still weigh something."""
    if not math.isfinite(float(weights.sum())) or not bool((weights > 0).any()):
        raise ValueError(f"{what}: every weight of these training examples is 0")
