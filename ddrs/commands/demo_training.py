"""The models of ``ddrs demo`` (:mod:`ddrs.commands.demo_run`): each trained as ``ddrs train`` trains it,
on one thread, or reused from the ``--out`` folder when it was trained with the same settings; and
the dual row's experts and selector, built with the recipe of the dual-certificate study
(``benchmarks/study_dual.py``; docs/dual.md, "The study") at the demo's scale:

1. levels ``--sigma * DUAL_FACTORS`` (0.25 and 0.5 at the defaults: the study's levels), capped at
   ``--sigma-max``; the selector is smoothed at the largest level (the study's sigma_e);
2. the experts' *generalists* are the demo's fixed-sigma models at those levels;
3. their held-out radii (``--folds``-fold cross-fitting: every training input certified by models
   re-trained without its fold) give soft labels at tau = ``SPECIALIST_TAU`` (0.1), written to
   ``dual_weights.txt`` (``ddrs train --selector-for ... --save-labels``);
4. each level above the lowest gets a *specialist*: a fixed-sigma model trained as the generalist
   but on examples drawn in proportion to that level's column (``ddrs train --sample-weights``);
   the experts of the dual row are the lowest level's generalist and the specialists;
5. the selector's labels are the experts' held-out radii (the same cross-fitting; a fold re-trains
   each specialist on its rows' weights), soft at tau = 0.25; the selector trains twice ``--epochs``
   epochs at lr 0.001 with the consistency term (lambda 20, eta 0.5, two copies).

Deviations from the study's recipe, for the demo's cost and its comparisons:

- the experts are trained as the demo's fixed-sigma rows are (Gaussian augmentation, ``--epochs`` =
  15 epochs) instead of 60 epochs of consistency training (lambda 10 at 0.25, 2 at 0.5): the dual row
  is then compared with fixed-sigma rows trained the same way, and the generalists cost nothing more
  (they are the fixed rows' models); consistency training would make the dual row better than the
  fixed rows for a reason that is not the choice of sigma;
- the labels take ``--label-n`` = 512 estimation samples per level (the study: 2000), which caps
  the label radius at sigma = 0.25 near 0.6; ``--label-n 2000`` is the study's, about 3x the labels'
  certification time;
- the selector trains ``2 * --epochs`` epochs (30 at the default 15: the study's; 2 with --quick);
  --quick uses 2 folds and tiny label samples (the study: 5 folds).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ddrs import selector
from ddrs.checkpoints import load_checkpoint, load_selector_checkpoint
from ddrs.commands.demo_certify import Clock
from ddrs.commands.train import build_parser as train_parser
from ddrs.digits_training import train
from ddrs.sample_weights import load_sample_weights, read_label_settings, weights_digest

__all__ = [
    "DUAL_FACTORS",
    "DualRow",
    "SELECTOR_TRAINING",
    "SPECIALIST_TAU",
    "build_dual_row",
    "check_config",
    "dual_files",
    "dual_levels",
    "one_thread",
    "train_or_load",
]

DUAL_FACTORS = (1, 2)  # the study's levels 0.25 and 0.5 at --sigma 0.25
SPECIALIST_TAU = 0.1  # the study's specialists' sampling weights
SELECTOR_TRAINING = (  # the study's selector: soft held-out labels, the consistency term, lr 0.001
    ("--label-source", "crossfit", "--soft-labels", "--tau", "0.25")
    + ("--selector-lambda", "20", "--selector-eta", "0.5", "--selector-copies", "2", "--lr", "0.001")
)
_INDENT = "           "


def dual_levels(sigma: float, sigma_max: float) -> list[float]:
    """The dual row's sigma levels: ``sigma * DUAL_FACTORS`` capped at ``sigma_max``, without repeats."""
    return selector.demo_levels(sigma, sigma_max, DUAL_FACTORS)


def _specialist_path(out: Path, level: float) -> Path:
    return out / f"specialist_s{level:g}.pt"


def dual_files(out: Path, sigma: float, sigma_max: float) -> list[Path]:
    """The files the dual row writes into ``out`` besides its result file."""
    files = [out / "dual_weights.txt", out / "dual_selector.pt"]
    return files + [_specialist_path(out, level) for level in dual_levels(sigma, sigma_max)[1:]]


@contextlib.contextmanager
def one_thread():
    """Trains on one thread: the weights then do not depend on how many threads torch would use (float
    sums are grouped by thread), and on the digits' small CNN one thread is about as fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _plain(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def check_config(path: Path, config: dict, wanted: dict, ignore: tuple[str, ...] = ("out",)) -> None:
    """Refuses a checkpoint trained with other settings than ``wanted``. An option that a checkpoint of
    an earlier version lacks did not exist then: it matches while it has its default now."""
    defaults = _plain(vars(train_parser().parse_args([])))
    keys = (set(config) | set(wanted)) - set(ignore)
    then = {k: config.get(k, defaults.get(k)) for k in keys}
    changed = ", ".join(
        f"{k}: {then[k]!r} then, {wanted.get(k)!r} now" for k in sorted(keys) if then[k] != wanted.get(k)
    )
    if changed:
        raise ValueError(
            f"{path} was trained with other settings ({changed}); pass --fresh or use another --out"
        )


def train_or_load(
    path: Path, argv: list[str], what: str, clock: Clock, extra: dict | None = None
) -> torch.nn.Module:
    """A model trained by ``ddrs.digits_training.train`` with ``argv`` (plus ``--out path``): the checkpoint
    at ``path`` when it was trained with the same settings (and ``extra``, more entries its config
    must hold: with them, the path of --sample-weights is not compared, its weights' digest is),
    otherwise trained now."""
    args = train_parser().parse_args([*argv, "--out", str(path)])
    wanted = {k: v for k, v in _plain(vars(args)).items() if k != "out"}
    wanted.update(extra or {})
    if path.exists():
        model, _, config = load_checkpoint(path)
        check_config(path, config, wanted, ignore=("out", "sample_weights") if extra else ("out",))
        clock.log(f"{what}: reusing {path}")
        return model
    clock.log(f"training the {what}, {args.epochs} epoch(s)")
    with one_thread():
        train(args, log=lambda line: print(_INDENT + line, flush=True))
    model, _, _ = load_checkpoint(path)
    return model


@dataclass
class DualRow:
    """What the dual row certifies with: the levels, one expert per level, the selector and its sigma."""

    levels: list[float]
    experts: list[torch.nn.Module]
    selector: torch.nn.Module
    selector_sigma: float


def _label_argv(paths: Sequence[Path], levels: Sequence[float], args: argparse.Namespace) -> list[str]:
    argv = ["--selector-for", *map(str, paths), "--sigma-levels", *map(str, levels)]
    argv += ["--label-source", "crossfit", "--folds", str(args.folds)]
    return argv + ["--label-n0", str(args.label_n0), "--label-n", str(args.label_n), "--seed", str(args.seed)]


def _weights_or_load(
    path: Path, generalists: dict[float, Path], models: list[torch.nn.Module], args, clock: Clock
) -> None:
    """The specialists' sampling weights at ``path``: the generalists' held-out soft labels (tau
    ``SPECIALIST_TAU``), as ``ddrs train --selector-for ... --save-labels`` writes them; a file of
    earlier settings is refused."""
    levels = list(generalists)
    argv = _label_argv(generalists.values(), levels, args)
    argv += ["--soft-labels", "--tau", str(SPECIALIST_TAU), "--save-labels", str(path)]
    targs = train_parser().parse_args(argv)
    wanted = {
        "sigma_levels": [float(v) for v in levels],
        "label_source": "crossfit",
        "folds": args.folds,
        "tau": SPECIALIST_TAU,
        "label_n0": args.label_n0,
        "label_n": args.label_n,
        "seed": args.seed,
        "data_seed": args.seed,
        "fingerprints": [selector.fingerprint(m) for m in models],
    }
    if path.exists():
        then = read_label_settings(path) or {}
        changed = ", ".join(
            f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in wanted.items() if then.get(k) != v
        )
        if changed:
            raise ValueError(
                f"{path} was made with other settings ({changed}); pass --fresh or use another --out"
            )
        clock.log(f"specialists' sampling weights: reusing {path}")
        return
    clock.log(
        f"specialists' sampling weights: held-out soft labels (τ = {SPECIALIST_TAU:g}, {args.folds} folds) "
        f"of the fixed-σ models at σ = {', '.join(f'{v:g}' for v in levels)}"
    )
    _train_selector(targs)


def _train_selector(targs: argparse.Namespace) -> None:
    """``ddrs train --selector-for ...`` with ``targs``, on one thread, its log indented."""
    with one_thread():
        selector.train_from_args(
            targs,
            log=lambda line: print(_INDENT + line, flush=True),
            defaults=vars(train_parser().parse_args([])),
        )


def build_dual_row(
    out: Path, fixed: dict[float, tuple[Path, torch.nn.Module]], args: argparse.Namespace, clock: Clock
) -> DualRow:
    """The dual row's experts and selector (the module's recipe), trained now or reused from ``out``;
    ``fixed``: the demo's fixed-sigma models by level (checkpoint path and model)."""
    levels = dual_levels(args.sigma, args.sigma_max)
    common = ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    experts = [fixed[levels[0]][1]]
    paths = [fixed[levels[0]][0]]
    if len(levels) > 1:
        weights = out / "dual_weights.txt"
        generalists = {level: fixed[level][0] for level in levels}
        _weights_or_load(weights, generalists, [fixed[level][1] for level in levels], args, clock)
        for k, level in enumerate(levels[1:], start=1):
            argv = ["--scheme", "gaussian", "--sigma", str(level), *common]
            argv += ["--sample-weights", str(weights.resolve()), "--sample-weights-column", str(k)]
            path = _specialist_path(out, level)
            experts.append(
                train_or_load(
                    path,
                    argv,
                    f"σ = {level:g} specialist (Gaussian augmentation, examples drawn by column {k})",
                    clock,
                    extra={"sample_weights_digest": _column_digest(weights, k, args.seed)},
                )
            )
            paths.append(path)
    sigma_e = max(levels)
    path = out / "dual_selector.pt"
    argv = _label_argv(paths, levels, args)
    argv += [*SELECTOR_TRAINING, "--selector-sigma", str(sigma_e), "--epochs", str(2 * args.epochs)]
    targs = train_parser().parse_args([*argv, "--out", str(path)])
    wanted = _plain(vars(targs))
    prints = [selector.fingerprint(m) for m in experts]
    wanted.update(
        {"classifier_fingerprint": prints[0]} if len(prints) == 1 else {"expert_fingerprints": prints},
        label_alpha=selector.LABEL_SETTINGS["alpha"],
        data_seed=args.seed,
    )
    if path.exists():
        model, checkpoint = load_selector_checkpoint(path)
        check_config(path, checkpoint["config"], wanted, ignore=("out", "selector_for"))
        clock.log(f"selector: reusing {path}")
    else:
        clock.log(
            f"training the dual row's selector (σ levels {', '.join(f'{v:g}' for v in levels)}, selector σ = "
            f"{sigma_e:g}; held-out soft labels, {args.folds} folds), {2 * args.epochs} epoch(s)"
        )
        _train_selector(targs)
        model, _ = load_selector_checkpoint(path)
    return DualRow(levels, experts, model, sigma_e)


def _column_digest(path: Path, column: int, seed: int) -> str:
    """The digest ``ddrs train --sample-weights path --sample-weights-column column`` records."""
    from ddrs_ext.data import load_digits_split

    (_, y), _ = load_digits_split(seed)
    return weights_digest(load_sample_weights(path, len(y), column))
