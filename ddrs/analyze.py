"""Certified accuracy and average certified radius of certification result files, as tables and plots.

    ddrs analyze fixed.tsv dd.tsv --labels "fixed sigma" "data-dependent" --plot curves.png

Reads the tab-separated result files that :mod:`ddrs.results` writes (and Cohen et al.'s, which
lack the ``sigma`` column). Certified accuracy at radius ``r`` is the fraction of rows with
``correct == 1`` and ``radius >= r`` (an abstention is never correct); the average certified radius
(ACR) is the mean of ``radius * correct`` over all rows.

A file whose settings (``<file>.settings.json``) say its radii are not certificates of one
classifier (``ddrs certify --no-memory`` with a sigma per input, :mod:`ddrs.result_notes`) is
labelled so in tables and plots, and the tables end with a note that says it. A file of sequential
certification with radii of interest (``ddrs certify --sequential --radius r [r ...]``; one radius:
radius mode) shows only its certified accuracy at those radii (the tables gain a column for each
one they lack; its other cells and its ACR are left empty, and a plot marks those points instead of
a curve); the open-ended mode (no ``--radius``) keeps its whole curve.

Radii are L2 radii (Gaussian noise) or L1 radii (``ddrs certify --noise uniform``, the settings'
``"norm"``; files without settings are taken as L2, as Cohen et al.'s are). Tables and plots say
which (:func:`radius_norm`); L1 and L2 files are never put in one table or on one plot (their radii
are not comparable): analyse them separately.

These are the functions of the ``ddrs analyze`` command (:mod:`ddrs.commands.analyze`) and of the
demo's table, for use from Python.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddrs.noise_settings import radius_label, setting
from ddrs.result_notes import certificate_notes, radii_of_interest, read_settings
from ddrs.results import read_results

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Certified:
    """One result file's certificates: ``correct`` (bool) and ``radius`` (float64), one entry per input."""

    label: str
    correct: np.ndarray
    radius: np.ndarray
    #: ``(tag, sentence)`` for what the file's radii are not (:func:`ddrs.result_notes.certificate_notes`)
    notes: tuple[tuple[str, str], ...] = ()
    #: The radii of interest of a file of sequential certification, where only "certified at r" at
    #: each of them is meaningful (:func:`ddrs.result_notes.radii_of_interest`); None otherwise.
    radii_of_interest: tuple[float, ...] | None = None
    #: the norm of the radii: ``"l2"`` (Gaussian noise) or ``"l1"`` (uniform noise)
    norm: str = "l2"

    @property
    def radius_mode(self) -> float | None:
        """``r`` of a file of sequential certification in radius mode (one radius of interest)."""
        radii = self.radii_of_interest
        return radii[0] if radii is not None and len(radii) == 1 else None

    @property
    def title(self) -> str:
        """The label, with the notes' tags: what a table row or a plot's legend shows."""
        return self.label + "".join(f" ({tag})" for tag, _ in self.notes)

    def __len__(self) -> int:
        return len(self.radius)

    def accuracy(self, radii: Sequence[float]) -> np.ndarray:
        """Certified accuracy at each of ``radii``: correct and certified with ``radius >= r``."""
        return certified_accuracy(self.correct, self.radius, radii)

    @property
    def acr(self) -> float:
        return average_certified_radius(self.correct, self.radius)


def certified_accuracy(correct, radius, radii: Sequence[float]) -> np.ndarray:
    """Fraction of inputs with ``correct`` true and ``radius >= r``, for each ``r`` in ``radii``."""
    correct = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius, dtype=np.float64)
    if len(correct) == 0:
        raise ValueError("no inputs: certified accuracy is undefined")
    r = np.asarray(radii, dtype=np.float64)
    hits = correct[None, :] & (radius[None, :] >= r[:, None])
    return hits.mean(axis=1)


def average_certified_radius(correct, radius) -> float:
    """Mean of ``radius * correct`` over all inputs (abstentions and wrong answers count 0)."""
    correct = np.asarray(correct, dtype=bool)
    radius = np.asarray(radius, dtype=np.float64)
    if len(correct) == 0:
        raise ValueError("no inputs: the average certified radius is undefined")
    return float(np.where(correct, radius, 0.0).mean())


def load(path: str | os.PathLike, label: str | None = None) -> Certified:
    """Reads a result file's ``correct`` and ``radius`` columns (``correct`` from ``predict == label``
    when the file has no ``correct`` column), and the notes its settings file gives (none without
    one). Raises ``ValueError`` on a missing, empty or malformed file."""
    path = Path(path)
    columns = read_results(path)  # ResultFileError (a ValueError) for missing / unreadable files
    if "radius" not in columns:
        raise ValueError(
            f"{path}: no 'radius' column (columns: {' '.join(columns)}); not a certification result"
        )
    if "correct" in columns:
        correct = columns["correct"]
    elif "predict" in columns and "label" in columns:
        correct = (columns["predict"] == columns["label"]).astype(np.int64)
    else:
        raise ValueError(f"{path}: no 'correct' column, nor 'predict' and 'label' to derive it from")
    radius = columns["radius"]
    if len(radius) == 0:
        raise ValueError(f"{path}: no rows, only a header")
    if not np.isin(correct, (0, 1)).all():
        raise ValueError(f"{path}: 'correct' must be 0 or 1 in every row")
    if not (np.isfinite(radius).all() and (radius >= 0).all()):
        raise ValueError(f"{path}: every radius must be finite and >= 0")
    settings = read_settings(path)
    notes = tuple(certificate_notes(settings)) if settings is not None else ()
    label = path.stem if label is None else label
    norm = setting(settings, "norm")
    return Certified(
        label, correct == 1, radius, notes=notes, radii_of_interest=radii_of_interest(settings), norm=norm
    )


def radius_norm(results: Sequence[Certified]) -> str:
    """The norm of the radii of ``results`` (``"l2"`` or ``"l1"``); a ``ValueError`` when they mix
    norms, which one table or plot cannot show (an L1 and an L2 radius measure different balls)."""
    norms = {res.norm for res in results}
    if len(norms) > 1:
        by = {norm: [res.label for res in results if res.norm == norm] for norm in sorted(norms)}
        listed = "; ".join(f"{n.upper()} radii: {', '.join(labels)}" for n, labels in by.items())
        raise ValueError(
            f"these files certify radii in different norms ({listed}); "
            "L1 and L2 radii are not comparable on one curve: analyse each norm's files separately"
        )
    return norms.pop() if norms else "l2"


def _notes(results: Sequence[Certified]) -> list[str]:
    """``note: LABEL: SENTENCE`` for each note of each result."""
    return [f"note: {res.label}: {sentence}" for res in results for _, sentence in res.notes]


def _radius_text(r: float) -> str:
    return f"{r:g}"


def _table_radii(results: Sequence[Certified], radii: Sequence[float]) -> list[float]:
    """``radii``, and the radii of interest of each result that they lack, in increasing order."""
    extra = {r for res in results for r in res.radii_of_interest or ()} - set(radii)
    return sorted([*radii, *extra]) if extra else list(radii)


def _cells(res: Certified, radii: Sequence[float], empty: str) -> list[str]:
    """Certified accuracy at ``radii`` and the ACR; ``empty`` where a result with radii of interest
    says nothing (at other radii, and its ACR)."""
    accuracy = [f"{a:.3f}" for a in res.accuracy(radii)]
    if res.radii_of_interest is None:
        return [*accuracy, f"{res.acr:.3f}"]
    return [*(a if r in res.radii_of_interest else empty for a, r in zip(accuracy, radii)), empty]


def markdown_table(results: Sequence[Certified], radii: Sequence[float] = DEFAULT_RADII) -> str:
    """A markdown table: one row per result, certified accuracy at ``radii``, ACR and input count."""
    norm = radius_norm(results)
    radii = _table_radii(results, radii)
    first = "result" if norm == "l2" else f"result ({radius_label(norm)} r)"
    head = [first, *(f"r = {_radius_text(r)}" for r in radii), "ACR", "inputs"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for res in results:
        cells = [res.title.replace("|", "\\|"), *_cells(res, radii, "–"), str(len(res))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = _notes(results)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "σ": r"$\sigma$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex_table(results: Sequence[Certified], radii: Sequence[float] = DEFAULT_RADII) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``): certified accuracy at ``radii``,
    ACR and input count, one row per result."""
    norm = radius_norm(results)
    radii = _table_radii(results, radii)
    k = len(radii)
    lines = [
        f"% certified accuracy at {radius_label(norm)} r; ACR = average certified radius; "
        "needs \\usepackage{booktabs}",
        "\\begin{tabular}{l" + "r" * (k + 2) + "}",
        "\\toprule",
        f" & \\multicolumn{{{k}}}{{c}}{{certified accuracy at radius $r$}} & & \\\\",
        f"\\cmidrule(lr){{2-{k + 1}}}",
        "result & " + " & ".join(_radius_text(r) for r in radii) + " & ACR & inputs \\\\",
        "\\midrule",
    ]
    for res in results:
        cells = [latex_escape(res.title), *_cells(res, radii, "--"), str(len(res))]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", *(f"% {note}" for note in _notes(results))]
    return "\n".join(lines) + "\n"


def plot_certified_accuracy(
    results: Sequence[Certified],
    path: str | os.PathLike,
    *,
    max_radius: float | None = None,
    title: str | None = None,
    points: int = 2001,
) -> Path:
    """Writes a PNG (or any format matplotlib infers from the suffix) of certified accuracy against
    radius, one step curve per result (points at its radii of interest for a result that has them)
    over ``points`` radii from 0 to ``max_radius`` (default: a little past the largest certified
    radius). Headless: draws on an Agg canvas without pyplot, so it neither needs a display nor
    changes the backend of a session that uses pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("nothing to plot")
    norm = radius_norm(results)
    path = Path(path)
    if max_radius is None:
        largest = max(max([float(res.radius.max()), *(res.radii_of_interest or ())]) for res in results)
        max_radius = 1.05 * largest if largest > 0 else 1.0
    if not (math.isfinite(max_radius) and max_radius > 0):
        raise ValueError(f"max_radius must be > 0, got {max_radius}")
    grid = np.linspace(0.0, max_radius, points)
    fig = Figure(figsize=(6.4, 4.0 + 0.22 * len(results)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for res in results:
        if res.radii_of_interest is not None:  # points: certified at each radius of interest or not
            at = list(res.radii_of_interest)
            where = ", ".join(f"{r:g}" for r in at)
            ax.plot(at, res.accuracy(at), marker="o", linestyle="none", label=f"{res.title} (at r = {where})")
            continue
        ax.step(grid, res.accuracy(grid), where="post", label=f"{res.title} (ACR {res.acr:.3f})")
    ax.set_xlabel(f"{radius_label(norm)} r")
    ax.set_ylabel("certified accuracy at radius r")
    ax.set_xlim(0, max_radius)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    if title:
        ax.set_title(title)
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot write the plot {path}: {exc}") from None
    return path
