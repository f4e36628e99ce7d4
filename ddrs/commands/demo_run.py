"""The work of ``ddrs demo`` (its options: :mod:`ddrs.commands.demo`): fixed against data-dependent
noise levels, end to end on the embedded digits data.

Trains small CNNs on the digits (Gaussian augmentation at a fixed sigma, one model per sigma level
the dual row uses, and one with a data-dependent sigma per training example), optimises a sigma for
every test input, certifies the test set with each model and each choice of sigma (with and without
the memory-based adjustment), and prints certified accuracy at several radii, the average certified
radius and verdicts computed from the run. Two more rows: the fixed-sigma model certified
sequentially (:func:`ddrs_ext.certify_sequential` with the table's radii as its radii of interest; a
second table shows the model evaluations it spends against CERTIFY's), and a dual certificate
(:func:`ddrs_ext.certify_dual`) of experts per level chosen by a selector, built with the recipe of
the dual-certificate study at the demo's scale: :mod:`ddrs.commands.demo_training` says how, and
where and why it deviates from the study. Rows and verdicts: :mod:`ddrs.commands.demo_table`;
certification: :mod:`ddrs.commands.demo_certify`; the models: :mod:`ddrs.commands.demo_training`; the
plot: :mod:`ddrs.commands.demo_plot`. :func:`run` receives the options resolved.

Everything goes into the ``--out`` folder: the checkpoints, one result file per table row,
``table.md`` and ``curves.png``. A re-run over the same folder resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
from pathlib import Path

import torch

from ddrs import analyze, selector
from ddrs.commands.demo_certify import Clock, certify_row, memory_row
from ddrs.commands.demo_plot import plot_demo
from ddrs.commands.demo_table import RADII, evaluations_table, table_rows, verdict
from ddrs.commands.demo_training import (
    DualRow,
    build_dual_row,
    dual_files,
    dual_levels,
    one_thread,  # noqa: F401 (ddrs.commands.demo_run.one_thread, as before)
)
from ddrs.commands.demo_training import train_or_load as _train_or_load
from ddrs.results import read_results
from ddrs_ext.data import load_digits_split
from ddrs_ext.precision import Evaluated, compile_pays

__all__ = ["demo_files", "run"]

# The fixed-sigma rows: sigma * LEVEL_FACTORS (capped at --sigma-max), each with a model of its own.
# The dual row: the study's recipe at the demo's scale (ddrs.commands.demo_training, with every
# deviation from the study).
LEVEL_FACTORS = (1, 2, 4)


def selector_sigma(args: argparse.Namespace) -> float:
    """The dual row's selector sigma: the largest of its levels."""
    return max(dual_levels(args.sigma, args.sigma_max))


# The data-dependent model: Gaussian augmentation, each training example's sigma moved by a few
# ascent steps per minibatch (train_digits' defaults otherwise) on the surrogate that matches
# CERTIFY's radius, chosen over the paper's on the validation split (docs/data-dependent-sigma.md,
# "Which surrogate the demo's data-dependent training ascends").
DD_TRAINING = ("--scheme", "gaussian", "--data-dependent", "--sigma-surrogate", "certify")


def other_levels(sigma: float, sigma_max: float) -> list[float]:
    """The fixed-sigma rows' levels other than ``sigma``: each gets a fixed-sigma model of its own."""
    return [level for level in selector.demo_levels(sigma, sigma_max, LEVEL_FACTORS) if level != sigma]


def _fixed_path(out: Path, level: float) -> Path:
    return out / f"fixed_model_s{level:g}.pt"


def demo_files(out: Path, sigma: float, sigma_max: float) -> list[Path]:
    """Every file the demo writes into ``out`` (what --fresh removes)."""
    files = [out / "fixed_model.pt", out / "dd_model.pt"]
    # an earlier version's dual row (the data-dependent model's selector and its result file)
    files += [out / "dd_selector.pt", out / "dd_model_dual.tsv", out / "dd_model_dual.tsv.settings.json"]
    files += [_fixed_path(out, level) for level in other_levels(sigma, sigma_max)]
    files += dual_files(out, sigma, sigma_max)
    files += [out / "table.md", out / "curves.png"]
    for row in table_rows(sigma, other_levels(sigma, sigma_max)):
        path = out / f"{row.key}.tsv"
        files += [path, path.with_name(path.name + ".settings.json")]
    return files


def _fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _cpu() -> str:
    """The CPU's model name (what the verdicts were computed on), and the threads torch uses."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s)"


def _evaluated(model: torch.nn.Module, rows: int, clock: Clock) -> torch.nn.Module:
    """``model`` as the demo evaluates it: compiled with channels-last weights where a row's forward
    rows repay compiling (:func:`ddrs_ext.precision.compile_pays`; the same function, float32)."""
    if not compile_pays(rows, "cpu"):
        return model
    model = model.to(memory_format=torch.channels_last)
    return Evaluated(model, channels_last=True, compile=True, notify=lambda text: clock.log(f"note: {text}"))


def run(args: argparse.Namespace) -> int:
    """``ddrs demo`` with the options ddrs.commands.demo resolved (--quick's or the full run's filled in)."""
    clock = Clock()
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {out}: exists and is not a folder")
    if args.fresh:
        for path in demo_files(out, args.sigma, args.sigma_max):
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    clock.log(
        f"ddrs demo: digits, {args.count} test inputs, n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}, "
        f"sigma = {args.sigma}, seed = {args.seed}, output in {out.resolve()}/"
    )
    (_, _), (x_test, y_test) = load_digits_split(args.seed)  # 497 test inputs (DEMO_TEST_SIZE)
    x, y = x_test[: args.count], y_test[: args.count]

    common = ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    models = {
        "fixed": _train_or_load(
            out / "fixed_model.pt",
            ["--scheme", "gaussian", "--sigma", str(args.sigma), *common],
            f"fixed-σ model (Gaussian augmentation, σ = {args.sigma:g})",
            clock,
        ),
    }
    for level in other_levels(args.sigma, args.sigma_max):
        models[f"fixed_{level:g}"] = _train_or_load(
            _fixed_path(out, level),
            ["--scheme", "gaussian", "--sigma", str(level), *common],
            f"fixed-σ model at σ = {level:g} (Gaussian augmentation)",
            clock,
        )
    fixed = {args.sigma: (out / "fixed_model.pt", models["fixed"])}
    fixed.update(
        {
            level: (_fixed_path(out, level), models[f"fixed_{level:g}"])
            for level in other_levels(args.sigma, args.sigma_max)
        }
    )
    models["dd"] = _train_or_load(
        out / "dd_model.pt",
        [*DD_TRAINING, "--sigma", str(args.sigma), "--sigma-max", str(args.sigma_max), *common],
        f"data-dependent model (Gaussian augmentation, a σ per training example, σ0 = {args.sigma:g})",
        clock,
    )
    dual: DualRow = build_dual_row(out, fixed, args, clock)
    models["experts"] = dual.experts
    fingerprints = {k: _fingerprint(m) for k, m in models.items() if k != "experts"}
    fingerprints["experts"] = [_fingerprint(m) for m in dual.experts]
    selector_fingerprint = _fingerprint(dual.selector)
    args.levels = dual.levels
    args.selector_sigma = dual.selector_sigma
    forward_rows = args.count * (args.n0 + args.n)
    compiled = compile_pays(forward_rows, "cpu")
    evaluated = {k: _evaluated(m, forward_rows, clock) for k, m in models.items() if k != "experts"}
    evaluated["experts"] = [_evaluated(m, forward_rows, clock) for m in dual.experts]
    dual_selector = _evaluated(dual.selector, forward_rows, clock)

    rows = table_rows(args.sigma, other_levels(args.sigma, args.sigma_max))
    certified = [row for row in rows if not row.memory]
    for row in rows:
        settings = {
            "row": row.key,
            "model": fingerprints[row.model],
            "data_seed": args.seed,
            "count": args.count,
            "n0": args.n0,
            "n": args.n,
            "alpha": args.alpha,
            "seed": args.seed,
            "sigma": row.sigma or args.sigma,
            # how the model was evaluated (the same function either way): recorded, not compared
            "evaluation": {"compile": "default" if compiled else "off", "channels_last": compiled},
        }
        if row.surrogate is not None:
            settings.update(
                surrogate=row.surrogate,
                estimator=args.estimator,
                sigma_iterations=args.sigma_iterations,
                sigma_max=args.sigma_max,
                sigma_samples=args.sigma_samples,
            )
        if row.method == "sequential":
            settings.update(method="sequential", radii_of_interest=list(RADII))
        if row.method == "dual":
            settings.update(
                method="dual",
                levels=args.levels,
                selector_sigma=args.selector_sigma,
                alpha_selector=args.alpha / 2,
                selector=selector_fingerprint,
            )
        path = out / f"{row.key}.tsv"
        if row.memory:
            memory_row(row, out / f"{row.source}.tsv", x, settings, path, clock)
        else:
            stage = f"[{certified.index(row) + 1}/{len(certified)}] "
            certify_row(row, evaluated[row.model], x, y, args, settings, path, clock, stage, dual_selector)

    results = {row.key: analyze.load(out / f"{row.key}.tsv", row.label) for row in rows}
    columns = {row.key: read_results(out / f"{row.key}.tsv") for row in rows}
    ordered = [results[row.key] for row in rows]
    caption = (
        f"Certified accuracy at L2 radius r and average certified radius (ACR) on the first {args.count} "
        f"digits test images (n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}; models trained "
        f"{args.epochs} epoch(s) on the 1100 training images, one thread; seed {args.seed}). Sequential: "
        f"certify_sequential with n_max = {args.n} and the table's radii as its radii of interest (read "
        f"it at those radii only). Dual certificate: experts at σ = "
        f"{', '.join(f'{v:g}' for v in args.levels)} "
        f"(the fixed-σ model at the lowest, specialists above it trained on examples drawn by held-out soft "
        f"labels) chosen by a selector smoothed at σ = {args.selector_sigma:g}, trained with the consistency "
        f"term on the experts' held-out ({args.folds}-fold cross-fitted) soft labels (n0 = {args.label_n0}, "
        f"n = {args.label_n}); alpha split {args.alpha / 2:g} + {args.alpha / 2:g}. Models evaluated "
        + (
            "compiled (torch.compile) with channels-last weights, float32: the same function as eager"
            if compiled
            else "eagerly in float32"
        )
        + f". Run on {_cpu()}; the verdicts below are this run's."
    )
    table = analyze.markdown_table(ordered, RADII)
    table += "\n" + evaluations_table(rows, columns, args)
    verdicts = verdict(results, columns, rows, args.sigma, args.sigma_max, args.n0 + args.n)
    (out / "table.md").write_text(caption + "\n\n" + table + "\n" + "\n".join(verdicts) + "\n")
    plot_demo(results, rows, out / "curves.png")
    clock.log(f"wrote {out}/table.md, {out}/curves.png and one result file per row")
    print()
    print(caption)
    print()
    print(table)
    print("\n".join(verdicts))
    return 0
