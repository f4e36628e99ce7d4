"""The options of ``ddrs train --selector-for`` beyond the label samples: whose radii label the
training inputs (``ddrs train`` checkpoints, one per level, or your own ``--model``/``--checkpoint`` on
``--data``), held-out labels (``--label-source crossfit``), soft labels and level weights, and the
consistency term of the selector's training; and their checks (no torch: ``ddrs train --help`` and
argument errors answer at once). The work: :mod:`ddrs.selector`, :mod:`ddrs.selector_labels`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ddrs.options import Repeatable, count, non_negative, positive

__all__ = ["LABEL_SOURCES", "add_selector_training_options", "check_selector_training", "parse_level_weights"]

LABEL_SOURCES = ("train", "crossfit")
DEFAULT_FOLDS = 5
DEFAULT_TAU = 0.25

# options that apply only to --selector-for, with the value that means "not given"
_SELECTOR_ONLY = {
    "models": [],
    "checkpoints": [],
    "data": None,
    "split": None,
    "selector_model": None,
    "label_source": "train",
    "folds": None,
    "soft_labels": False,
    "tau": None,
    "level_weights": None,
    "selector_lambda": 0.0,
    "selector_eta": 0.0,
    "selector_copies": 1,
    "save_labels": None,
}


def add_selector_training_options(p: argparse.ArgumentParser) -> None:
    """The option groups of a selector for your own model, and of the selector's labels and training."""
    g = p.add_argument_group(
        "a selector for your own model (with --selector-for given no checkpoint)",
        "the formats of ddrs certify --help; the labels come from CERTIFY of your model (or of one\n"
        "expert per level: --model and/or --checkpoint once per level) on the inputs of --data",
    )
    g.add_argument(
        "--model", metavar="SPEC", action=Repeatable, help="module:callable, file.py:callable, .ts, .pt2"
    )
    g.add_argument("--checkpoint", metavar="FILE", action=Repeatable, help="weights for --model")
    p.set_defaults(models=[], checkpoints=[])
    g.add_argument(
        "--data", metavar="DATA", help="the selector's training data: digits, CIFAR-10 folder, .pt"
    )
    g.add_argument("--split", choices=("train", "validation", "test"), help="of --data (default: train)")
    g.add_argument(
        "--selector-model",
        metavar="SPEC",
        help="module:callable or file.py:callable that builds a fresh selector with one output per level "
        "(default: ddrs_ext.models.digits_cnn, for 1x8x8 inputs); ddrs certify then takes it as "
        "--selector SPEC --selector-checkpoint FILE",
    )
    g = p.add_argument_group(
        "selector labels and training (ddrs_ext.dual: level_radii, cross_fit_radii, soft_level_labels, "
        "train_selector)"
    )
    g.add_argument(
        "--label-source",
        choices=LABEL_SOURCES,
        default="train",
        help="train: radii of the given models on their own training inputs; crossfit: each input "
        "certified by experts re-trained without its fold (ddrs train checkpoints only: they are "
        "re-trained with their recorded settings), so the labels look like those of unseen inputs",
    )
    g.add_argument("--folds", type=count, metavar="F", help=f"crossfit folds (default {DEFAULT_FOLDS})")
    g.add_argument(
        "--soft-labels",
        action="store_true",
        help="labels proportional to exp(radius / tau) per level instead of the best level alone",
    )
    g.add_argument(
        "--tau", type=positive, metavar="T", help=f"soft labels' temperature (default {DEFAULT_TAU})"
    )
    g.add_argument(
        "--level-weights",
        metavar="W",
        help="soft labels' weight per level: none, balanced (every level the same mean label mass) or "
        "W1,W2,... (one positive number per level)",
    )
    g.add_argument(
        "--save-labels",
        type=Path,
        metavar="FILE",
        help="write the labels (one row per training input, one column per level: the soft labels, or "
        "one-hot best levels) to FILE (.pt, .npy, or text with the settings in '#' lines) and stop: no "
        "selector is trained, --out is not written; a column weights a specialist (ddrs train "
        "--sample-weights FILE --sample-weights-column K)",
    )
    g.add_argument(
        "--selector-lambda",
        type=non_negative,
        default=0.0,
        help="consistency term's lambda (needs copies >= 2)",
    )
    g.add_argument("--selector-eta", type=non_negative, default=0.0, help="consistency term's entropy weight")
    g.add_argument("--selector-copies", type=count, default=1, help="noisy copies of each input per step")


def parse_level_weights(text: str | None, levels: int) -> str | list[float] | None:
    """``--level-weights``: None (none), ``"balanced"`` or ``levels`` positive numbers."""
    if text is None or text.strip().lower() == "none":
        return None
    if text.strip().lower() == "balanced":
        return "balanced"
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--level-weights must be none, balanced or {levels} comma-separated numbers, got {text!r}"
        ) from None
    if len(values) != levels or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"--level-weights needs one positive number per level ({levels}: --sigma-levels), got {text!r}"
        )
    return values


def _option(name: str) -> str:
    return {"models": "--model", "checkpoints": "--checkpoint"}.get(name, "--" + name.replace("_", "-"))


def check_selector_training(args: argparse.Namespace) -> None:
    """The checks of the selector options that need no torch (a ValueError is a usage error)."""
    if args.selector_for is None:
        given = [_option(name) for name, unset in _SELECTOR_ONLY.items() if getattr(args, name) != unset]
        if given:
            raise ValueError(f"{', '.join(given)}: for --selector-for (training a selector)")
        return
    if args.sigma_levels is None:
        raise ValueError("--selector-for needs --sigma-levels (the sigma of each level, increasing)")
    levels = args.sigma_levels
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(
            f"--sigma-levels must be strictly increasing, got {' '.join(f'{v:g}' for v in levels)}"
        )
    K = len(levels)
    own = bool(args.models or args.checkpoints)
    if args.selector_for:
        if own or args.data is not None or args.split is not None:
            raise ValueError(
                "--model, --checkpoint, --data and --split are for a selector of your own model: give "
                "--selector-for with no checkpoint, or drop them"
            )
        if len(args.selector_for) not in (1, K):
            raise ValueError(
                f"--selector-for takes one checkpoint, or one per level ({K} levels: --sigma-levels), got "
                f"{len(args.selector_for)}"
            )
    else:
        if not own:
            raise ValueError(
                "--selector-for without a checkpoint trains a selector for your own model: give --model "
                "SPEC (and --checkpoint FILE), or --selector-for CHECKPOINT of ddrs train"
            )
        if args.data is None:
            raise ValueError("a selector for --model needs --data (its training inputs and labels)")
        m, c = len(args.models), len(args.checkpoints)
        if max(m, c) > 1 and (max(m, c) != K or m not in (0, 1, K) or c not in (0, 1, K) or (m, c) == (K, 1)):
            raise ValueError(
                f"one expert per level: give --model and/or --checkpoint once, or once per level ({K} "
                f"levels); got {m} --model and {c} --checkpoint"
            )
        if args.label_source == "crossfit":
            raise ValueError(
                "--label-source crossfit re-trains the experts without each fold, which only ddrs train "
                "checkpoints allow (their settings are recorded); for --model use --label-source train"
            )
    if args.folds is not None and args.label_source != "crossfit":
        raise ValueError("--folds is for --label-source crossfit")
    if not args.soft_labels and (args.tau is not None or args.level_weights is not None):
        raise ValueError("--tau and --level-weights shape soft labels: add --soft-labels")
    parse_level_weights(args.level_weights, K)
    if args.selector_lambda > 0 and args.selector_copies < 2:
        raise ValueError("--selector-lambda > 0 compares noisy copies of each input: --selector-copies >= 2")
