"""The work of ``ddrs demo`` (its options: :mod:`ddrs.commands.demo`): fixed against data-dependent
noise levels, end to end on the embedded digits data.

Trains two small CNNs on the digits (one with Gaussian augmentation at a fixed sigma, one with a
data-dependent sigma per training example), optimises a sigma for every test input, certifies the
test set with each model and each choice of sigma (with and without the memory-based adjustment),
and prints certified accuracy at several radii, the average certified radius and a verdict. Two
more rows: the fixed-sigma model certified sequentially (:func:`ddrs_ext.certify_sequential`, curve
mode, default tolerance; a second table shows the model evaluations it spends against CERTIFY's),
and the data-dependent model with a dual certificate (:func:`ddrs_ext.certify_dual`: a selector
trained by :mod:`ddrs.selector` picks sigma among :func:`ddrs.selector.demo_levels`). The rows and
the verdicts are :mod:`ddrs.commands.demo_table`'s; :func:`run` receives the options resolved.

Everything goes into the ``--out`` folder: the checkpoints, one result file per table row,
``table.md`` and ``curves.png``. A re-run over the same folder resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

import ddrs_ext
from ddrs import analyze, selector
from ddrs.checkpoints import load_checkpoint, load_selector_checkpoint
from ddrs.commands.demo_table import RADII, Row, evaluations_table, table_rows, verdict
from ddrs.commands.train import build_parser as train_parser
from ddrs.digits_training import train
from ddrs.results import (
    CERTIFY_COLUMNS,
    DUAL_COLUMNS,
    LATER_CERTIFY_COLUMNS,
    ResultFile,
    ResultFileError,
    certify_rows,
    read_results,
    read_rows,
)
from ddrs_ext.data import load_digits_split
from ddrs_ext.sequential import DEFAULT_TOLERANCE

__all__ = ["demo_files", "run"]

CHUNK = 100  # inputs per certification step (progress and resume granularity)
# The dual row: sigma levels sigma * LEVEL_FACTORS (capped at --sigma-max), the selector smoothed at
# SELECTOR_FACTOR * sigma, alpha split in halves; picked in an exploratory trial (README, the demo's
# step 5): best_level labels over nearest_level ones, a selector sigma of 2 sigma over 1 sigma.
LEVEL_FACTORS = (1, 2, 4)
SELECTOR_FACTOR = 2

# The data-dependent model: Gaussian augmentation, each training example's sigma moved by a few
# ascent steps per minibatch (train_digits' defaults otherwise) on the surrogate that matches
# CERTIFY's radius: on these digits a model trained on the paper's surrogate certified about a fifth
# fewer test inputs at radius 0 (0.795 against 0.990 in a 200-input trial; see the README).
DD_TRAINING = ("--scheme", "gaussian", "--data-dependent", "--sigma-surrogate", "certify")


def demo_files(out: Path, sigma: float) -> list[Path]:
    """Every file the demo writes into ``out`` (what --fresh removes)."""
    files = [out / "fixed_model.pt", out / "dd_model.pt", out / "dd_selector.pt"]
    files += [out / "table.md", out / "curves.png"]
    for row in table_rows(sigma):
        path = out / f"{row.key}.tsv"
        files += [path, path.with_name(path.name + ".settings.json")]
    return files


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)


def _fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _train_or_load(path: Path, argv: list[str], what: str, clock: _Clock) -> torch.nn.Module:
    """A model trained by ``ddrs.digits_training.train`` with ``argv`` (plus ``--out path``): the checkpoint
    at ``path`` when it was trained with the same settings, otherwise trained now."""
    args = train_parser().parse_args([*argv, "--out", str(path)])
    wanted = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    if path.exists():
        model, _, config = load_checkpoint(path)
        _check_config(path, config, wanted)
        clock.log(f"{what}: reusing {path}")
        return model
    clock.log(f"training the {what}, {args.epochs} epoch(s)")
    train(args, log=lambda line: print("           " + line, flush=True))
    model, _, _ = load_checkpoint(path)
    return model


def _check_config(path: Path, config: dict, wanted: dict, ignore: tuple[str, ...] = ("out",)) -> None:
    """Refuses a checkpoint trained with other settings than ``wanted``. An option that a checkpoint of
    an earlier version lacks did not exist then: it matches while it has its default now."""
    defaults = vars(train_parser().parse_args([]))
    defaults = {k: (str(v) if isinstance(v, Path) else v) for k, v in defaults.items()}
    keys = (set(config) | set(wanted)) - set(ignore)
    then = {k: config.get(k, defaults.get(k)) for k in keys}
    changed = ", ".join(
        f"{k}: {then[k]!r} then, {wanted.get(k)!r} now" for k in sorted(keys) if then[k] != wanted.get(k)
    )
    if changed:
        raise ValueError(
            f"{path} was trained with other settings ({changed}); pass --fresh or use another --out"
        )


def _selector_or_load(
    path: Path, classifier_path: Path, classifier: torch.nn.Module, args: argparse.Namespace, clock: _Clock
) -> torch.nn.Module:
    """The dual row's selector for ``classifier`` (saved at ``classifier_path``): the checkpoint at
    ``path`` when it was trained for this classifier with the same settings, otherwise trained now, as
    ``python -m ddrs.train_digits --selector-for`` trains it (with the demo's label samples)."""
    levels = selector.demo_levels(args.sigma, args.sigma_max, LEVEL_FACTORS)
    argv = ["--selector-for", str(classifier_path), "--sigma-levels", *map(str, levels)]
    argv += ["--selector-sigma", str(SELECTOR_FACTOR * args.sigma), "--epochs", str(args.epochs)]
    argv += ["--label-n0", str(args.label_n0), "--label-n", str(args.label_n), "--seed", str(args.seed)]
    targs = train_parser().parse_args([*argv, "--out", str(path)])
    wanted = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(targs).items()}
    wanted.update(
        classifier_fingerprint=selector.fingerprint(classifier),
        label_alpha=selector.LABEL_SETTINGS["alpha"],
        data_seed=args.seed,
    )
    if path.exists():
        model, checkpoint = load_selector_checkpoint(path)
        _check_config(path, checkpoint["config"], wanted, ignore=("out", "selector_for"))
        clock.log(f"selector: reusing {path}")
        return model
    clock.log(
        f"training the selector (σ levels {', '.join(f'{v:g}' for v in levels)}, selector σ = "
        f"{SELECTOR_FACTOR * args.sigma:g}), {args.epochs} epoch(s)"
    )
    selector.train_from_args(targs, log=lambda line: print("           " + line, flush=True))
    model, _ = load_selector_checkpoint(path)
    return model


def _open(path: Path, settings: dict, dual: bool = False) -> ResultFile:
    try:
        if dual:
            return ResultFile(path, DUAL_COLUMNS, settings)
        return ResultFile(path, CERTIFY_COLUMNS, settings, later=LATER_CERTIFY_COLUMNS)
    except ResultFileError as exc:
        raise ResultFileError(f"{exc}; or pass --fresh to start over") from None


def _certify_row(
    row: Row,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    settings: dict,
    path: Path,
    clock: _Clock,
    stage: str = "",
    dual_selector: torch.nn.Module | None = None,
) -> None:
    """Certifies the inputs of ``x`` that ``path`` does not hold yet, a chunk at a time, with the
    fixed sigma or a sigma optimised per input (test index = noise stream, so any chunking and any
    resumption give the same rows), by CERTIFY, sequentially or (``dual_selector``) with a dual
    certificate. Logs each chunk with the rate and the time left for the row."""
    with _open(path, settings, dual=row.method == "dual") as out:
        todo = [i for i in range(len(y)) if i not in out.done]
        if not todo:
            clock.log(f"{stage}{row.label}: all {len(y)} inputs already in {path}")
            return
        clock.log(
            f"{stage}{row.label}: certifying {len(todo)} inputs"
            + (f" ({len(out.done)} done before)" if out.done else "")
        )
        row_began = time.perf_counter()
        for start in range(0, len(todo), CHUNK):
            index = torch.tensor(todo[start : start + CHUNK], dtype=torch.int64)
            began = time.perf_counter()
            xb = x[index]
            if row.surrogate is None:
                sigma = torch.full((len(index),), args.sigma, dtype=torch.float64)
            else:
                sigma = ddrs_ext.optimize_sigma(
                    model,
                    xb,
                    args.sigma,
                    iterations=args.sigma_iterations,
                    num_samples=args.sigma_samples,
                    estimator=args.estimator,
                    surrogate=row.surrogate,
                    sigma_range=(1e-3, args.sigma_max),
                    batch_size=args.batch_size,
                    seed=args.seed,
                    index=index,
                )
            result = _certify_chunk(row, model, xb, sigma, index, args, dual_selector)
            per_input = (time.perf_counter() - began) / len(index)
            for line in certify_rows(result, index.tolist(), y[index].tolist()):
                out.write({**line, "time": per_input})
            certified = start + len(index)
            rate = certified / (time.perf_counter() - row_began)
            left = len(todo) - certified
            clock.log(
                f"  {len(out.done)}/{len(y)} inputs, {rate:.1f} inputs/s, "
                + (f"about {_duration(left / rate)} left" if left else "row done")
            )


def _certify_chunk(
    row: Row,
    model: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    index: torch.Tensor,
    args: argparse.Namespace,
    dual_selector: torch.nn.Module | None,
):
    """One chunk of a row: CERTIFY, certify_sequential (n_max = n, default tolerance) or certify_dual."""
    common = dict(n0=args.n0, alpha=args.alpha, batch_size=args.batch_size, seed=args.seed, index=index)
    if row.method == "sequential":
        return ddrs_ext.certify_sequential(model, x, sigma, n_max=args.n, **common)
    if row.method == "dual":
        return ddrs_ext.certify_dual(
            model,
            dual_selector,
            x,
            selector.demo_levels(args.sigma, args.sigma_max, LEVEL_FACTORS),
            selector_sigma=SELECTOR_FACTOR * args.sigma,
            n=args.n,
            alpha_selector=args.alpha / 2,
            **common,
        )
    return ddrs_ext.certify(model, x, sigma, n=args.n, **common)


def _memory_row(row: Row, source: Path, x: torch.Tensor, settings: dict, path: Path, clock: _Clock) -> None:
    """Passes the certificates of ``source`` through one CertificationMemory in test-index order."""
    _, rows = read_rows(source)
    rows.sort(key=lambda r: r["idx"])
    if [r["idx"] for r in rows] != list(range(len(x))):
        raise ResultFileError(f"{source}: incomplete; re-run the demo to finish it")
    prediction = torch.tensor([r["predict"] for r in rows], dtype=torch.int64)
    radius = torch.tensor([r["radius"] for r in rows], dtype=torch.float64)
    adjusted, new_radius = ddrs_ext.CertificationMemory().adjust(x, prediction.clone(), radius.clone())
    changed = int(((adjusted != prediction) | (new_radius != radius)).sum())
    with _open(path, settings) as out:
        for r, p, rad in zip(rows, adjusted.tolist(), new_radius.tolist()):
            new = dict(r, predict=p, radius=rad, correct=int(p == r["label"]))
            new.setdefault("samples", settings["n0"] + settings["n"])  # a source of an earlier version
            if r["idx"] in out.done:
                old = out.done[r["idx"]]
                if (old["predict"], old["radius"]) != (p, rad):
                    raise ResultFileError(f"{path}: row {r['idx']} disagrees with {source}; pass --fresh")
                continue
            out.write(new)
    clock.log(f"{row.label}: {changed} of {len(x)} certificates changed by the memory")


def run(args: argparse.Namespace) -> int:
    """``ddrs demo`` with the options ddrs.commands.demo resolved (--quick's or the full run's filled in)."""
    clock = _Clock()
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {out}: exists and is not a folder")
    if args.fresh:
        for path in demo_files(out, args.sigma):
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    clock.log(
        f"ddrs demo: digits, {args.count} test inputs, n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}, "
        f"sigma = {args.sigma}, seed = {args.seed}, output in {out.resolve()}/"
    )
    (_, _), (x_test, y_test) = load_digits_split(args.seed)  # 497 test inputs (DEMO_TEST_SIZE)
    x, y = x_test[: args.count], y_test[: args.count]

    common = ["--sigma", str(args.sigma), "--epochs", str(args.epochs), "--seed", str(args.seed)]
    models = {
        "fixed": _train_or_load(
            out / "fixed_model.pt",
            ["--scheme", "gaussian", *common],
            f"fixed-σ model (Gaussian augmentation, σ = {args.sigma:g})",
            clock,
        ),
        "dd": _train_or_load(
            out / "dd_model.pt",
            [*DD_TRAINING, "--sigma-max", str(args.sigma_max), *common],
            f"data-dependent model (Gaussian augmentation, a σ per training example, σ0 = {args.sigma:g})",
            clock,
        ),
    }
    fingerprints = {k: _fingerprint(m) for k, m in models.items()}
    dual_selector = _selector_or_load(out / "dd_selector.pt", out / "dd_model.pt", models["dd"], args, clock)
    levels = selector.demo_levels(args.sigma, args.sigma_max, LEVEL_FACTORS)

    rows = table_rows(args.sigma)
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
            "sigma": args.sigma,
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
            settings.update(method="sequential", tolerance=DEFAULT_TOLERANCE)
        if row.method == "dual":
            settings.update(
                method="dual",
                levels=levels,
                selector_sigma=SELECTOR_FACTOR * args.sigma,
                alpha_selector=args.alpha / 2,
                selector=_fingerprint(dual_selector),
            )
        path = out / f"{row.key}.tsv"
        if row.memory:
            _memory_row(row, out / f"{row.source}.tsv", x, settings, path, clock)
        else:
            stage = f"[{certified.index(row) + 1}/{len(certified)}] "
            _certify_row(row, models[row.model], x, y, args, settings, path, clock, stage, dual_selector)

    results = {row.key: analyze.load(out / f"{row.key}.tsv", row.label) for row in rows}
    columns = {row.key: read_results(out / f"{row.key}.tsv") for row in rows}
    ordered = [results[row.key] for row in rows]
    caption = (
        f"Certified accuracy at L2 radius r and average certified radius (ACR) on the first {args.count} "
        f"digits test images (n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}; models trained "
        f"{args.epochs} epoch(s); seed {args.seed}). Sequential: certify_sequential with n_max = {args.n}. "
        f"Dual certificate: σ levels {', '.join(f'{v:g}' for v in levels)} chosen by a selector "
        f"smoothed at σ = {SELECTOR_FACTOR * args.sigma:g}, trained on best_level's labels for the "
        f"training inputs (n0 = {args.label_n0}, n = {args.label_n}); alpha split {args.alpha / 2:g} + "
        f"{args.alpha / 2:g}."
    )
    table = analyze.markdown_table(ordered, RADII)
    table += "\n" + evaluations_table(rows, columns, args)
    verdicts = verdict(results, columns, rows, args.sigma, args.sigma_max, args.n0 + args.n)
    (out / "table.md").write_text(caption + "\n\n" + table + "\n" + "\n".join(verdicts) + "\n")
    plotted = [results[row.key] for row in rows if row.surrogate is None or row.memory]
    analyze.plot_certified_accuracy(plotted, out / "curves.png", title="digits: certified accuracy")
    clock.log(f"wrote {out}/table.md, {out}/curves.png and one result file per row")
    print()
    print(caption)
    print()
    print(table)
    print("\n".join(verdicts))
    return 0
