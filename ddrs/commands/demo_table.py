"""The table of ``ddrs demo``: its rows (what each certifies, :func:`table_rows`), the verdicts
printed under it (:func:`verdict`) and the table of model evaluations per input
(:func:`evaluations_table`), all from the rows' result files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import ddrs_ext
from ddrs import analyze

__all__ = [
    "DUAL_LABEL",
    "RADII",
    "SURROGATES",
    "Row",
    "evaluations_table",
    "table_rows",
    "verdict",
    "winners",
]

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
DUAL_LABEL = "experts per level, dual certificate"
SURROGATES = ("paper", "certify")


@dataclass(frozen=True)
class Row:
    key: str  # file stem
    label: str
    model: str  # "fixed", "fixed_<level>" (a fixed-sigma model at another level), "dd" or "experts" (dual)
    surrogate: str | None  # None: the fixed sigma for every input (or the dual certificate's levels)
    memory: bool = False
    method: str = "certify"  # "certify", "sequential" (certify_sequential) or "dual" (certify_dual)
    sigma: float | None = None  # the fixed sigma of a row at another level (None: the demo's --sigma)

    @property
    def sound(self) -> bool:
        """Whether the row's radii are certificates of one smoothed classifier read at every radius:
        not a sigma per input without the memory, not the sequential row (read at its radii only)."""
        return (self.surrogate is None or self.memory) and self.method != "sequential"

    @property
    def source(self) -> str:
        """The file whose certificates the memory adjusts."""
        return self.key.removesuffix("_memory")


def table_rows(sigma: float, levels: Sequence[float] = ()) -> list[Row]:
    """The demo's rows; ``levels``: the other fixed-sigma levels, each with a fixed-sigma model of its own."""
    fixed = f"fixed-σ model, σ = {sigma:g} for every input"
    rows = [Row("fixed_sigma", fixed, "fixed", None)]
    for level in levels:
        label = f"fixed-σ model trained at σ = {level:g}, σ = {level:g} for every input"
        rows.append(Row(f"fixed_sigma_{level:g}", label, f"fixed_{level:g}", None, sigma=level))
    rows.append(
        Row(
            "fixed_sigma_sequential",
            f"fixed-σ model, σ = {sigma:g}, sequential certification at the table's radii",
            "fixed",
            None,
            method="sequential",
        )
    )
    for model, name in (("fixed", "fixed-σ model"), ("dd", "data-dependent model")):
        for surrogate in SURROGATES:
            key, label = f"{model}_model_{surrogate}", f"{name}, σ per input ({surrogate} surrogate)"
            rows.append(Row(key, label, model, surrogate))
            rows.append(Row(key + "_memory", label + " + memory", model, surrogate, memory=True))
    rows.append(Row("experts_dual", DUAL_LABEL, "experts", None, method="dual"))
    return rows


def verdict(
    results: dict[str, analyze.Certified],
    columns: dict[str, dict[str, np.ndarray]],
    rows: list[Row],
    sigma: float,
    sigma_max: float,
    certify_samples: int,
) -> list[str]:
    """Plain sentences comparing the sound data-dependent rows (with memory, and the dual certificate)
    against the fixed sigma, how much of the difference comes from inputs whose sigma reached
    ``sigma_max``, where the dual certificate loses radius, and what sequential certification saves
    against CERTIFY's ``certify_samples`` model evaluations per input."""
    base = results["fixed_sigma"]
    base_acc = base.accuracy(RADII)
    radius_text = ", ".join(f"{r:g}" for r in RADII)
    lines = []
    outcomes = []
    dual_outcome = None
    for row in rows:
        if not (row.memory or row.method == "dual"):
            continue
        res = results[row.key]
        acc = res.accuracy(RADII)
        diff = np.where(res.correct, res.radius, 0.0) - np.where(base.correct, base.radius, 0.0)
        delta = float(diff.mean())
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        higher = [f"{r:g}" for r, a, b in zip(RADII, acc, base_acc) if a > b]
        lower = [f"{r:g}" for r, a, b in zip(RADII, acc, base_acc) if a < b]
        measurable = math.isfinite(se) and abs(delta) > 2 * se
        if delta > 0 and measurable and not lower:
            outcome = "helps"
        elif delta > 0 and measurable:
            outcome = "mixed"
        elif delta < 0 and measurable:
            outcome = "hurts"
        else:
            outcome = "no measurable difference"
        if row.method == "dual":
            dual_outcome = outcome
        else:
            outcomes.append((row, outcome))
        parts = [f"ACR {res.acr:.3f} vs {base.acr:.3f} ({delta:+.3f} ± {se:.3f} paired s.e.)"]
        parts.append(
            f"certified accuracy higher at r = {', '.join(higher)}" if higher else "higher at no radius"
        )
        parts.append(f"lower at r = {', '.join(lower)}" if lower else "lower at no radius")
        if row.method == "dual":
            parts += _dual_facts(columns[row.key], res)
        capped = columns[row.key]["sigma"] >= sigma_max * (1 - 1e-9)
        if row.method != "dual" and capped.any() and not capped.all():
            rest = ~capped
            acr = np.where(res.correct[rest], res.radius[rest], 0.0).mean()
            base_acr = np.where(base.correct[rest], base.radius[rest], 0.0).mean()
            labels = np.bincount(columns[row.key]["label"][capped])
            most = f", {int(labels.max())} of them digit {int(labels.argmax())}"
            parts.append(
                f"{int(capped.sum())} input(s) reached σ = {sigma_max:g}{most} (σ stopped at the cap: the "
                f"model keeps their class under heavy noise); without them ACR {acr:.3f} vs "
                f"{base_acr:.3f} ({acr - base_acr:+.3f})"
            )
        lines.append(f"- {row.label}: {outcome}; " + "; ".join(parts) + ".")
    words = {
        "helps": "helps",
        "mixed": "a mixed result (higher ACR, lower certified accuracy at some radius)",
        "hurts": "hurts",
        "no measurable difference": "no measurable difference",
    }

    def summary(model: str) -> str:
        found = {row.surrogate: o for row, o in outcomes if row.model == model}
        if len(set(found.values())) == 1:
            return f"{words[next(iter(found.values()))]} with both surrogates"
        return ", ".join(f"{words[o]} with the {s} surrogate" for s, o in found.items())

    head = [
        f"Does data-dependent σ help here? The paper's full method (data-dependent training, a σ per test "
        f"input, memory): {summary('dd')}. A σ per test input for the fixed-σ model alone: "
        f"{summary('fixed')}.",
        f"Baseline: the fixed-σ model certified at σ = {sigma:g} (certified accuracy "
        f"{', '.join(f'{a:.3f}' for a in base_acc)} at r = {radius_text}; ACR {base.acr:.3f}); "
        f"{len(base)} test inputs; per-input rows counted with memory, the sound certificates:",
    ]
    if dual_outcome is not None:
        head.insert(
            1,
            f"The dual certificate (experts per level, σ chosen among levels by a certified selector, "
            f"sound without a memory): {words[dual_outcome]}.",
        )
    tail = [winners(results, rows)]
    for row in rows:
        if row.method == "sequential":
            tail.append(_sequential_facts(row, results[row.key], base, columns[row.key], certify_samples))
    return [" ".join(head), *lines, *tail]


def _dual_facts(column: dict[str, np.ndarray], res: analyze.Certified) -> list[str]:
    """Where a dual certificate's row loses: the selector's abstentions and how often its radius, not
    the classifier's, set the certified one."""
    level = column["level"]
    chose = level != ddrs_ext.ABSTAIN
    certified = chose & (column["predict"] != ddrs_ext.ABSTAIN)
    smaller = certified & (column["radius_selector"] < column["radius_classifier"])
    sigmas = column["sigma"][chose]
    picked = ", ".join(f"σ = {v:g}: {int((sigmas == v).sum())}" for v in np.unique(sigmas))
    alone = np.where(res.correct, column["radius_classifier"], 0.0).mean()
    return [
        f"the selector abstained on {int((~chose).sum())} of {len(level)} inputs (they abstain) and chose "
        + (picked or "no level"),
        f"the selector's radius was the smaller one on {int(smaller.sum())} of the {int(certified.sum())} "
        f"certified inputs (the classifier's radius alone would give ACR {alone:.3f}, not a certificate)",
    ]


def _sequential_facts(
    row: Row,
    res: analyze.Certified,
    base: analyze.Certified,
    column: dict[str, np.ndarray],
    certify_samples: int,
) -> str:
    """Sequential certification against CERTIFY: model evaluations and certified accuracy."""
    spent = float(column["samples"].mean())
    acc, base_acc = res.accuracy(RADII), base.accuracy(RADII)
    gap = float(np.abs(acc - base_acc).max())
    return (
        f"Sequential certification of the fixed-σ model (the table's radii as radii of interest, "
        f"n_max = n): {spent:.0f} model evaluations per input against "
        f"CERTIFY's {certify_samples} ({certify_samples / spent:.1f}x fewer); certified accuracy "
        f"{', '.join(f'{a:.3f}' for a in acc)} at r = {', '.join(f'{r:g}' for r in RADII)} (at most "
        f"{gap:.3f} from CERTIFY's); its ACR ({res.acr:.3f} vs {base.acr:.3f}) is not comparable: it stops "
        "an input once the table's radii are settled, not at its largest radius."
    )


def winners(results: dict[str, analyze.Certified], rows: list[Row]) -> str:
    """Which sound row has the largest certified accuracy at each of the table's radii (ties named
    together), and the largest ACR."""
    sound = [row for row in rows if row.sound]
    acc = {row.key: results[row.key].accuracy(RADII) for row in sound}
    parts = []
    for j, r in enumerate(RADII):
        best = max(acc[row.key][j] for row in sound)
        names = [row.label for row in sound if acc[row.key][j] == best]
        parts.append(f"r = {r:g}: {' = '.join(names)} ({best:.3f})")
    top = max(sound, key=lambda row: results[row.key].acr)
    return (
        "Largest certified accuracy among the sound rows (certificates of one smoothed classifier each): "
        + "; ".join(parts)
        + f". Largest ACR: {top.label} ({results[top.key].acr:.3f})."
    )


def evaluations_table(rows: list[Row], columns: dict[str, dict[str, np.ndarray]], args) -> str:
    """Model evaluations per input of CERTIFY, sequential certification and the dual certificate."""
    certify = args.n0 + args.n
    lines = [
        "| result | model evaluations per input (mean) | fewest | most | vs CERTIFY |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.key != "fixed_sigma" and row.method == "certify":
            continue
        samples = columns[row.key].get("samples")
        if samples is None:  # a file of an earlier version: CERTIFY spends n0 + n on every input
            samples = np.full(len(columns[row.key]["idx"]), certify)
        what = {"certify": "", "sequential": "", "dual": " (selector + classifier)"}
        mean = float(samples.mean())
        lines.append(
            f"| {row.label.replace('|', chr(92) + '|')}{what[row.method]} | {mean:.0f} | "
            f"{int(samples.min())} | {int(samples.max())} | {mean / certify:.2f} |"
        )
    return "\n".join(lines) + "\n"
