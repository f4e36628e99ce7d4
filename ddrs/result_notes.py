"""What a certification result file's radii are not, from its settings (``<file>.settings.json``).

A file of ``ddrs certify --no-memory`` with a sigma per input (``--optimize`` or ``--sigma-file``)
certifies each input at its own sigma: every radius is a certificate of the smoothed classifier at
that input's sigma, but the rows together are not certificates of one classifier (two nearby inputs
can be "certified" for different classes with overlapping balls). Such a file's settings say so
under ``"notes"``, and ``ddrs analyze``, the run's summary and :func:`ddrs.analyze.load` (its
:attr:`~ddrs.analyze.Certified.notes`) report it. Files written before the memory became the
default lack ``"notes"``: :func:`certificate_notes` derives the same notes from their other
settings (``"memory": false`` with a per-input ``"sigma"``), so they are flagged too.

A file of ``ddrs certify --sequential --radius r`` (radius mode) answers one question per input:
certified at ``r`` or not (each input stops as soon as that is settled, so its radius says nothing
about other radii). Its notes say so, and ``ddrs analyze`` and the summary report only the
fraction of inputs certified (and correct) at ``r``: no curve, no average certified radius
(:func:`radius_mode`). With several radii of interest (``--radius r1 r2 ...``) the same holds at
each of them (:func:`radii_of_interest`); the open-ended mode (no ``--radius``) keeps the whole curve.

A file of ``ddrs certify --labels`` (evaluation mode, ``"labels_mode": true``) certified each input's
true label or abstained: its ``predict`` column is the label or -1, not a prediction. Its notes say so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ddrs.results import rank_files

__all__ = [
    "LABELS_MODE",
    "PER_INPUT_WITHOUT_MEMORY",
    "certificate_notes",
    "radii_of_interest",
    "radius_mode",
    "read_settings",
    "resumed_settings",
]

#: (tag for a table row, sentence) of a file certified at a sigma per input without the memory.
PER_INPUT_WITHOUT_MEMORY = (
    "per-input σ without memory",
    "per-input sigma without memory: not a certificate of one classifier",
)


def _per_input(settings: Mapping) -> bool:
    sigma = settings.get("sigma")
    return isinstance(sigma, Mapping) and ("file" in sigma or "optimize" in sigma)


#: (tag, sentence) of a file of evaluation with labels (``ddrs certify --labels``).
LABELS_MODE = (
    "labels mode",
    "evaluation mode (--labels): each input was certified for its true label or abstained; predict is "
    "the label or -1, not a prediction (an abstention includes the inputs it gets wrong); certified "
    "accuracy is meaningful",
)


def radii_of_interest(settings: Mapping | None) -> tuple[float, ...] | None:
    """The radii of interest of a certify file made with ``--sequential --radius r1 [r2 ...]`` (in
    increasing order), else None (open-ended mode, not sequential, another command's file). The
    settings hold one number for one radius (as files of earlier versions do) or a list."""
    if settings is None or settings.get("command") != "certify":
        return None
    sequential = settings.get("sequential")
    if not isinstance(sequential, Mapping) or sequential.get("radius") is None:
        return None
    radius = sequential["radius"]
    radii = radius if isinstance(radius, list) else [radius]
    return tuple(sorted(float(r) for r in radii)) or None


def radius_mode(settings: Mapping | None) -> float | None:
    """The radius ``r`` of a certify file made with ``--sequential --radius r`` (one radius of
    interest), else None."""
    radii = radii_of_interest(settings)
    return radii[0] if radii is not None and len(radii) == 1 else None


def _radii_text(radii: tuple[float, ...]) -> str:
    return ", ".join(f"{r:g}" for r in radii)


def certificate_notes(settings: Mapping) -> list[tuple[str, str]]:
    """``(tag, sentence)`` for each thing a certify result file's ``settings`` say its radii are not
    (none for other commands' files)."""
    if settings.get("command") != "certify":
        return []
    notes = []
    if _per_input(settings) and not settings.get("memory"):
        notes.append(PER_INPUT_WITHOUT_MEMORY)
    radii = radii_of_interest(settings)
    if radii is not None and len(radii) == 1:
        r = radii[0]
        notes.append(
            (
                f"radius mode, r = {r:g}",
                f"sequential certification in radius mode (r = {r:g}): each input is certified at r or "
                "not; only the certified accuracy at r is meaningful (no curve, no average certified radius)",
            )
        )
    elif radii is not None:
        notes.append(
            (
                f"radii of interest r = {_radii_text(radii)}",
                f"sequential certification with radii of interest (r = {_radii_text(radii)}): each input's "
                "answer is settled only at those radii; only the certified accuracy at them is meaningful "
                "(no curve between them, no average certified radius)",
            )
        )
    if settings.get("labels_mode"):
        notes.append(LABELS_MODE)
    return notes


def settings_path(path: str | os.PathLike) -> Path:
    """``<path>.settings.json``, where a result file's settings are kept."""
    path = Path(path)
    return path.with_name(path.name + ".settings.json")


def read_settings(path: str | os.PathLike) -> dict | None:
    """The settings kept beside the result file ``path``, or None when there are none (a file of
    another program, or copied without them) or they cannot be read."""
    try:
        settings = json.loads(settings_path(path).read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def _has_rows(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return False
    return data.count(b"\n") >= 2  # a header and a complete row


def resumed_settings(path: str | os.PathLike) -> dict | None:
    """The settings a rerun writing ``path`` resumes under: those of ``path`` or of one of its rank
    files (an interrupted torchrun run) that holds rows; None when the rerun starts afresh."""
    for candidate in (Path(path), *rank_files(path).values()):
        if _has_rows(candidate):
            settings = read_settings(candidate)
            if settings is not None:
                return settings
    return None
