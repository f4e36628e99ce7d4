"""Result files: tab-separated text, one row per input, written as each input is done, resumable.

The certification format is the one the randomized-smoothing literature's analysis scripts read
(Cohen et al.'s ``certify.py``): a header ``idx label predict radius correct time`` and one row per
input, ``predict`` = -1 for an abstention; ddrs adds the columns ``sigma`` and ``samples`` (model
evaluations spent on the input) after them, and dual certification (``ddrs certify --sigma-levels``)
the chosen ``level`` and both radii; readers that pick columns by name read them all, and files
written before ``samples`` existed are read and resumed as they are. ``ddrs predict`` writes
Cohen et al.'s ``predict.py`` format, ``idx label predict correct time``, plus ``sigma``. ``time`` is a
``datetime.timedelta`` string (``0:00:01.250000``). Radii and sigmas are written exactly (the
shortest text that reads back as the same float64), so a run resumed from a file (the memory-based
adjustment rebuilt from its rows included) continues exactly as an uninterrupted one.

:class:`ResultFile` opens such a file for appending: rows already complete are kept (and
reported, so a run skips their inputs), a partial last row left by a kill mid-write is cut off,
and every new row goes out in one ``write`` followed by ``fsync``. A re-run therefore continues
after the last complete row, and an interrupted run followed by a resumed one gives the same file
as an uninterrupted run whenever the rows themselves are reproducible (ddrs_ext's noise depends
only on the seed and each input's index). The run's settings are kept beside the file
(``<file>.settings.json``) and a resume with different ones is refused.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "sigma", "samples")
# Columns that files written by earlier versions lack: such a file is resumed without them.
LATER_CERTIFY_COLUMNS = ("samples",)
# ddrs certify --sigma-levels (ddrs_ext.certify_dual): level -1 and sigma nan where the selector abstained.
DUAL_COLUMNS = (*CERTIFY_COLUMNS, "level", "radius_selector", "radius_classifier")
# ddrs certify --cascade (ddrs_ext.routing.certify_cascade): radius_above inf where the top level answered.
CASCADE_COLUMNS = (*CERTIFY_COLUMNS, "level", "radius_level", "radius_above", "stopped")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time", "sigma")
SIGMA_COLUMNS = ("idx", "label", "sigma", "surrogate", "time")
# Settings that describe the others (what the rows mean, for a reader; ddrs.result_notes) or how
# they were computed without changing what they are ("evaluation": --compile, --channels-last, the
# same function, logits equal up to rounding, like a change of --batch-size or threads): not
# compared on a resume, so that files written before they existed resume, and a resume may change them.
DESCRIPTIVE_SETTINGS = frozenset({"notes", "evaluation"})
# Settings that qualify another one (key -> the setting it qualifies): a difference in them is not
# listed when the setting they qualify differs too (e.g. the memory's rule when the memory itself
# was off then and is on now), so the message names what the user changed.
QUALIFYING_SETTINGS = {"memory_rule": "memory", "sequential_rule": "sequential"}
# Settings that files written before they existed lack, and what those files mean by their absence
# (--noise: ddrs.noise_options): such a file resumes as if it had them.
IMPLIED_SETTINGS = {"noise": "gaussian", "norm": "l2"}
INT_COLUMNS = frozenset({"idx", "label", "predict", "correct", "samples", "level", "stopped"})
FLOAT_COLUMNS = frozenset(
    {"radius", "sigma", "surrogate", "radius_selector", "radius_classifier", "radius_level", "radius_above"}
)
_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


class ResultFileError(ValueError):
    """A result file that cannot be read or resumed (bad header, malformed row, other settings)."""


def format_time(seconds: float) -> str:
    """``datetime.timedelta`` text, as the established format writes the ``time`` column."""
    return str(datetime.timedelta(seconds=float(seconds)))


def parse_time(text: str) -> float:
    """Seconds from a ``time`` cell: a ``timedelta`` string or a plain number."""
    match = _TIMEDELTA.match(text.strip())
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def format_radius(radius: float) -> str:
    """Exact (``repr`` of the float64); ``0.0`` for an abstention."""
    r = float(radius)
    if not math.isfinite(r):
        raise ValueError(f"a radius must be finite, got {r}")
    return repr(r)


def format_cell(column: str, value) -> str:
    if column == "time":
        return format_time(value) if isinstance(value, (int, float, np.floating, np.integer)) else str(value)
    if column == "radius":
        return format_radius(value)
    if column in INT_COLUMNS:
        return str(int(value))
    if column in FLOAT_COLUMNS:
        return repr(float(value))  # shortest text that reads back as the same float64
    text = str(value)
    if "\t" in text or "\n" in text:
        raise ValueError(f"column {column!r}: a cell cannot hold a tab or a newline: {text!r}")
    return text


def parse_cell(column: str, text: str):
    if column == "time":
        return parse_time(text)
    if column in INT_COLUMNS:
        return int(text)
    if column in FLOAT_COLUMNS:
        return float(text)
    return text


def _split_complete(data: bytes) -> tuple[bytes, int]:
    """The complete lines of ``data`` and the byte length they take (a partial last line is dropped)."""
    end = data.rfind(b"\n") + 1
    return data[:end], end


def _parse_rows(path: Path, text: str, columns: Sequence[str] | None) -> tuple[tuple[str, ...], list[dict]]:
    lines = text.split("\n")[:-1] if text else []
    if not lines:
        return tuple(columns or ()), []
    header = tuple(lines[0].split("\t"))
    if columns is not None and header != tuple(columns):
        raise ResultFileError(
            f"{path}: its header is {' '.join(header)!r}, this run writes {' '.join(columns)!r}; "
            "use another output file"
        )
    rows, seen = [], set()
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ResultFileError(f"{path}, line {number}: {len(cells)} cells, the header has {len(header)}")
        try:
            row = {c: parse_cell(c, v) for c, v in zip(header, cells)}
        except ValueError as e:
            raise ResultFileError(f"{path}, line {number}: {e}") from None
        if "idx" in row:
            if row["idx"] in seen:
                raise ResultFileError(f"{path}, line {number}: idx {row['idx']} appears twice")
            seen.add(row["idx"])
        rows.append(row)
    return header, rows


def read_rows(path: str | os.PathLike) -> tuple[tuple[str, ...], list[dict]]:
    """``(columns, rows)`` of a result file; each row a dict of parsed cells. A partial last line
    (a run killed mid-write) is ignored."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultFileError(f"{path}: is a directory, not a result file") from None
    complete, _ = _split_complete(data)
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError:
        raise ResultFileError(f"{path}: not a text result file") from None
    header, rows = _parse_rows(path, text, None)
    if not header or header == ("",):
        raise ResultFileError(f"{path}: empty, no header")
    return header, rows


def read_results(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A result file's columns as arrays (integers int64, radius/sigma/time float64, others str)."""
    header, rows = read_rows(path)
    out = {}
    for c in header:
        values = [r[c] for r in rows]
        if c in INT_COLUMNS:
            out[c] = np.array(values, dtype=np.int64)
        elif c in FLOAT_COLUMNS or c == "time":
            out[c] = np.array(values, dtype=np.float64)
        else:
            out[c] = np.array(values, dtype=object)
    return out


def certify_rows(result, index: Sequence[int], labels: Sequence[int]) -> list[dict]:
    """The rows (every CERTIFY_COLUMNS entry but ``time``) of a :class:`ddrs_ext.CertifyResult` whose
    inputs have dataset indices ``index`` and true classes ``labels``; given a
    :class:`ddrs_ext.DualCertifyResult`, every DUAL_COLUMNS entry but ``time``; given a
    :class:`ddrs_ext.routing.CascadeCertifyResult`, every CASCADE_COLUMNS entry but ``time``."""
    if result.samples is None:
        raise ValueError("the result has no samples (model evaluations per input); certify it with ddrs_ext")
    dual = hasattr(result, "radius_selector")
    rows = []
    for k, (i, label) in enumerate(zip(index, labels)):
        predict = int(result.prediction[k])
        row = {
            "idx": int(i),
            "label": int(label),
            "predict": predict,
            "radius": float(result.radius[k]),
            "correct": int(predict == int(label)),
            "sigma": float(result.sigma[k]),
            "samples": int(result.samples[k]),
        }
        if dual:
            row.update(
                level=int(result.level[k]),
                radius_selector=float(result.radius_selector[k]),
                radius_classifier=float(result.radius_classifier[k]),
            )
        elif hasattr(result, "radius_above"):
            row.update(
                level=int(result.level[k]),
                radius_level=float(result.radius_level[k]),
                radius_above=float(result.radius_above[k]),
                stopped=int(result.stopped[k]),
            )
        rows.append(row)
    return rows


def _compared(key: str, value):
    """A setting as a resume compares it: "evaluated" (the function: --autocast) without "compile"
    and "channels_last", where versions before --compile auto recorded those (they are now in the
    descriptive "evaluation"); a missing setting of :data:`IMPLIED_SETTINGS` as its implied value."""
    if key == "evaluated" and isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in ("compile", "channels_last")} or None
    if value is None and key in IMPLIED_SETTINGS:
        return IMPLIED_SETTINGS[key]
    return value


class ResultFile:
    """A result file open for appending rows, resuming whatever complete rows it already holds.

    ``done`` maps each finished ``idx`` to its parsed row. ``settings`` (JSON-able) describe what
    produces the rows: they are stored beside the file when it is created and must match on a
    resume. ``later``: columns that files written by earlier versions lack (e.g.
    :data:`LATER_CERTIFY_COLUMNS`); a file whose header is ``columns`` without them is resumed in its
    own format (``columns`` then is its header, and :meth:`write` leaves those cells out). Only one
    process may hold a file (an advisory lock; a second one gets an error).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        columns: Sequence[str],
        settings: Mapping | None = None,
        *,
        sync: bool = True,
        later: Sequence[str] = (),
    ) -> None:
        self._fd = -1
        self.path, self.columns, self.sync = Path(path), tuple(columns), sync
        self._earlier = tuple(c for c in self.columns if c not in later)
        if "idx" not in self.columns:
            raise ValueError("a result file needs an 'idx' column")
        if self.path.is_dir():
            raise ResultFileError(f"{self.path}: is a directory")
        if not self.path.parent.exists():
            raise ResultFileError(f"{self.path}: its folder {self.path.parent} does not exist")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock()
            self._resume(settings)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ResultFileError(f"{self.path}: another run is writing this file") from None
            raise

    @property
    def settings_path(self) -> Path:
        return self.path.with_name(self.path.name + ".settings.json")

    def _resume(self, settings: Mapping | None) -> None:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        complete, end = _split_complete(data)
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError:
            raise ResultFileError(f"{self.path}: not a text result file; use another output file") from None
        first = text.split("\n", 1)[0] if "\n" in text else None
        if first is not None and self._earlier != self.columns and tuple(first.split("\t")) == self._earlier:
            self.columns = self._earlier  # a file of an earlier version: resumed in its format
        _, rows = _parse_rows(self.path, text, self.columns)
        self.done = {row["idx"]: row for row in rows}
        if settings is not None:
            settings = json.loads(json.dumps(dict(settings)))  # as it reads back
            if self.settings_path.exists() and rows:
                try:
                    before = json.loads(self.settings_path.read_text())
                except (OSError, ValueError):
                    raise ResultFileError(f"{self.settings_path}: unreadable; remove it to resume") from None
                keys = (set(before) | set(settings)) - DESCRIPTIVE_SETTINGS
                changed = sorted(
                    k for k in keys if _compared(k, before.get(k)) != _compared(k, settings.get(k))
                )
                changed = [k for k in changed if QUALIFYING_SETTINGS.get(k) not in changed]
                if changed:
                    what = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
                    raise ResultFileError(
                        f"{self.path} was started with other settings ({what}); "
                        "resume with the same ones or use another output file"
                    )
            else:
                tmp = self.settings_path.with_name(self.settings_path.name + ".tmp")
                tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, self.settings_path)
        if end != size:  # a partial row from an interrupted write
            os.ftruncate(self._fd, end)
        os.lseek(self._fd, end, os.SEEK_SET)
        if end == 0:
            self._write_line("\t".join(self.columns))

    def _write_line(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # os.write may be partial for large writes
            written += os.write(self._fd, data[written:])
        if self.sync:
            os.fsync(self._fd)

    def write(self, row: Mapping) -> None:
        """Appends one row (a mapping with every column). Refuses an ``idx`` already in the file."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: closed")
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise ValueError(f"row lacks column(s) {', '.join(missing)}")
        idx = int(row["idx"])
        if idx in self.done:
            raise ValueError(f"{self.path}: idx {idx} is already written")
        cells = [format_cell(c, row[c]) for c in self.columns]
        self._write_line("\t".join(cells))
        self.done[idx] = {c: parse_cell(c, v) for c, v in zip(self.columns, cells)}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# ----------------------------------------------------------------------------- rank files (torchrun)


def rank_file(path: str | os.PathLike, rank: int) -> Path:
    """The file in which rank ``rank`` of a run launched by torchrun keeps its rows of ``path``:
    ``<path>.rank<rank>``, the same format, holding each row as computed (before an order-dependent
    step such as the memory-based adjustment), with its own settings file."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{int(rank)}")


def rank_files(path: str | os.PathLike) -> dict[int, Path]:
    """The rank files of ``path`` present in its folder, by rank."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.rank(\d+)")
    found = {}
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is not None and entry.is_file():
                found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def remove_result_file(path: str | os.PathLike) -> None:
    """Deletes a result file and its settings file (either may be absent)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".settings.json")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
