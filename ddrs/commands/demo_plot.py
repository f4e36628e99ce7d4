"""``ddrs demo``'s figure: certified accuracy against radius for every sound row (left), and each
row's difference from the fixed-sigma baseline (right), where curves that lie on top of each other on
the left come apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddrs import analyze
from ddrs.commands.demo_table import Row

__all__ = ["plot_demo"]


def plot_demo(results: dict[str, analyze.Certified], rows: list[Row], path: Path, points: int = 1201) -> Path:
    """Writes the two panels for the rows that are certificates at every radius (:attr:`Row.sound`)
    to ``path`` (PNG). The baseline is the first row (the fixed-sigma model at the demo's sigma)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sound = [row for row in rows if row.sound]
    base = results[rows[0].key]
    largest = max(float(results[row.key].radius.max()) for row in sound)
    grid = np.linspace(0.0, 1.05 * largest if largest > 0 else 1.0, points)
    fig = Figure(figsize=(12.0, 4.2 + 0.2 * len(sound)), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    base_curve = base.accuracy(grid)
    for i, row in enumerate(sound):
        res = results[row.key]
        style = {"linestyle": ("-", "--", ":", "-.")[i % 4], "where": "post"}
        left.step(grid, res.accuracy(grid), label=f"{res.title} (ACR {res.acr:.3f})", **style)
        right.step(grid, res.accuracy(grid) - base_curve, **style)
    left.set_ylim(0, 1.02)
    left.set_ylabel("certified accuracy at radius r")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_ylabel(f"difference from: {base.title}")
    for ax in (left, right):
        ax.set_xlabel("L2 radius r")
        ax.set_xlim(grid[0], grid[-1])
        ax.grid(True, alpha=0.3)
    left.set_title("digits: certified accuracy (sound rows)")
    right.set_title("difference from the fixed-σ baseline")
    fig.legend(fontsize="small", loc="outside lower center", ncols=2, frameon=False)
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot write the plot {path}: {exc}") from None
    return Path(path)
