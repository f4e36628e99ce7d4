"""``ddrs train`` (also ``python -m ddrs.train_digits``): train a small CNN on the embedded digits
data with a randomized-smoothing scheme, at a fixed or a data-dependent noise level, or with
--selector-for a sigma selector for dual certification, and save a checkpoint that ``ddrs certify``
loads. Its options and the dispatch to its work (:mod:`ddrs.digits_training`,
:mod:`ddrs.selector`; torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ddrs.docs_links import docs_epilog
from ddrs.noise_options import add_training_noise_option, check_training_noise
from ddrs.options import HelpFormatter, Parser, set_command
from ddrs.selector_options import add_selector_training_options, check_selector_training

__all__ = ["SCHEMES", "add_parser", "build_parser", "check", "main", "run"]

SCHEMES = ("gaussian", "macer", "smoothadv", "consistency")
DESCRIPTION = (
    "Train a small CNN on the embedded digits data with a randomized-smoothing scheme, with a fixed\n"
    "or a data-dependent noise level, and save a checkpoint that certification can load."
)
EXAMPLES = """
examples:
  ddrs train --scheme gaussian --sigma 0.25 --out fixed.pt
  ddrs train --scheme macer --sigma 0.25 --data-dependent --out dd.pt
  ddrs train --noise uniform --sigma 0.5 --data-dependent --sigma-surrogate certify --out dd_l1.pt
  ddrs train --scheme consistency --sigma 0.25 --consistency-lambda 10 --out expert025.pt
  ddrs train --selector-for dd.pt --sigma-levels 0.25 0.5 1 --selector-sigma 0.5 --out selector.pt
  ddrs train --selector-for expert025.pt expert05.pt --sigma-levels 0.25 0.5 --label-source crossfit \\
      --soft-labels --selector-lambda 20 --selector-eta 0.5 --selector-copies 2 --out selector.pt
  ddrs train --selector-for expert025.pt expert05.pt --sigma-levels 0.25 0.5 --label-source crossfit \\
      --soft-labels --tau 0.1 --save-labels weights.txt
  ddrs train --scheme consistency --sigma 0.5 --consistency-lambda 2 --sample-weights weights.txt \\
      --sample-weights-column 1 --out specialist05.pt
  ddrs train --selector-for --model mlp.py:build --checkpoint mlp.pt --data digits \\
      --sigma-levels 0.25 0.5 --out mlp_selector.pt
"""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of ``ddrs train`` and ``python -m ddrs.train_digits`` (the same)."""
    p.add_argument("--scheme", choices=SCHEMES, default="gaussian", help="training scheme")
    p.add_argument("--sigma", type=_positive(float), default=0.25, help="fixed sigma, or sigma0 of the bank")
    p.add_argument("--data-dependent", action="store_true", help="a sigma per training example (the paper's)")
    add_training_noise_option(p)
    p.add_argument("--epochs", type=_positive(int), default=15)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("digits_checkpoint.pt"), help="checkpoint file")
    g = p.add_argument_group("data-dependent sigma")
    g.add_argument("--sigma-steps", type=_positive(int), default=3, help="ascent steps per minibatch")
    g.add_argument("--sigma-samples", type=_positive(int), default=16, help="noise samples per step")
    g.add_argument("--sigma-lr", type=_positive(float), default=0.04)
    g.add_argument("--sigma-max", type=_positive(float), default=2.0, help="upper end of the bank's range")
    g.add_argument(
        "--sigma-surrogate", choices=("paper", "certify"), default="paper", help="surrogate the steps ascend"
    )
    g.add_argument(
        "--sigma-estimator",
        choices=("reparam", "score"),
        default="reparam",
        help="gradient of the steps: through the model (the paper's) or score function (forward passes only)",
    )
    g = p.add_argument_group("cheaper forward passes (ddrs_ext.Evaluated)")
    g.add_argument(
        "--compile",
        choices=("off", "default", "reduce-overhead", "max-autotune"),
        default="off",
        metavar="MODE",
        help="torch.compile the model for training (with channels-last weights): off, or a torch.compile "
        "mode. Off by default: on the digits CNN a compiled step measured 1.1x faster after about 11 s "
        "of compiling, which repays itself only after hundreds of epochs, and not at all with "
        "--data-dependent (its sigma steps' forward-mode autograd runs uncompiled)",
    )
    g = p.add_argument_group("MACER")
    g.add_argument("--macer-samples", type=_positive(int), default=8)
    g.add_argument("--macer-lambda", type=_non_negative, default=12.0)
    g.add_argument("--macer-gamma", type=_non_negative, default=8.0)
    g.add_argument("--macer-beta", type=_non_negative, default=16.0)
    g = p.add_argument_group("SmoothAdv")
    g.add_argument("--adv-epsilon", type=_non_negative, default=0.5, help="L2 radius of the attack")
    g.add_argument("--adv-steps", type=_positive(int), default=2)
    g.add_argument("--adv-samples", type=_positive(int), default=4)
    g.add_argument("--adv-warmup", type=int, default=3, help="epochs over which epsilon ramps up")
    _add_consistency_options(p)
    _add_sample_weight_options(p)
    g = p.add_argument_group(
        "sigma selector for dual certification (ddrs.selector)",
        "uses --epochs, --batch-size, --lr, --seed and --out; the other options do not apply",
    )
    g.add_argument(
        "--selector-for",
        type=Path,
        nargs="*",
        metavar="CHECKPOINT",
        help="train a selector instead of a classifier, for the classifier of this checkpoint of ddrs train, "
        "or one expert checkpoint per level of --sigma-levels (in level order), or, given with no "
        "checkpoint, for --model/--checkpoint on --data (yours): labels come from CERTIFY's radius of "
        "each training input at each level",
    )
    g.add_argument("--sigma-levels", nargs="+", type=_positive(float), metavar="S", help="increasing sigmas")
    g.add_argument(
        "--selector-sigma",
        type=_positive(float),
        metavar="S",
        help="the selector's own sigma (default: the largest of --sigma-levels)",
    )
    g.add_argument("--label-n0", type=_positive(int), default=64, help="labels: selection samples per level")
    g.add_argument("--label-n", type=_positive(int), default=512, help="labels: estimation samples per level")
    add_selector_training_options(p)


def _add_consistency_options(p: argparse.ArgumentParser) -> None:
    """--scheme consistency's options (ddrs_ext.training.consistency_loss)."""
    g = p.add_argument_group(
        "consistency (ddrs_ext.training.consistency_loss; Jeong & Shin, NeurIPS 2020)",
        "cross-entropy over m noisy copies + lambda * their mean KL to the mean prediction + eta * its "
        "entropy",
    )
    g.add_argument(
        "--consistency-lambda", type=_non_negative, default=10.0, help="lambda (paper: 20 on MNIST)"
    )
    g.add_argument("--consistency-eta", type=_non_negative, default=0.5, help="eta, the entropy weight")
    g.add_argument("--consistency-copies", type=_positive(int), default=2, help="m, noisy copies per input")


def _add_sample_weight_options(p: argparse.ArgumentParser) -> None:
    """--sample-weights (ddrs.sample_weights): a specialist trained on examples drawn by weight."""
    g = p.add_argument_group(
        "sample weights (a specialist: ddrs.sample_weights)",
        "each epoch draws as many examples as the training split has, with replacement, in proportion\n"
        "to the weights (under a generator seeded with --seed)",
    )
    g.add_argument(
        "--sample-weights",
        type=Path,
        metavar="FILE",
        help="one weight >= 0 per training example, in the order of the training split of "
        "ddrs_ext.data.load_digits_split(--seed): a .pt tensor, a .npy array or text (one number per line, "
        "or a table of columns; '#' comments), e.g. what --selector-for ... --save-labels writes",
    )
    g.add_argument(
        "--sample-weights-column",
        type=_column,
        metavar="J",
        help="the column (0-based) of a table in --sample-weights FILE: for --save-labels' labels, the "
        "index of the level in --sigma-levels",
    )


def _column(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser(prog: str = "python -m ddrs.train_digits") -> argparse.ArgumentParser:
    """The parser of ``python -m ddrs.train_digits`` (the options of ``ddrs train``, alone)."""
    p = Parser(prog=prog, description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_options(p)
    return p


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a digits classifier (fixed or data-dependent sigma) or a sigma selector for it",
        description=DESCRIPTION + "\nThe same as python -m ddrs.train_digits.",
        epilog=EXAMPLES + docs_epilog("training", "dual", "l1", "coming-from-the-authors"),
        formatter_class=HelpFormatter,
    )
    add_options(p)
    set_command(p, run="ddrs.commands.train:run", check=check, resumable=False)


def check(args: argparse.Namespace) -> None:
    if args.selector_for is None and (args.sigma_levels is not None or args.selector_sigma is not None):
        raise ValueError("--sigma-levels and --selector-sigma are for --selector-for")
    check_training_noise(args)
    check_selector_training(args)
    if args.selector_for is not None and args.sample_weights is not None:
        raise ValueError(
            "--sample-weights draws a classifier's training examples; a selector (--selector-for) trains "
            "on every input once per epoch"
        )
    if args.sample_weights_column is not None and args.sample_weights is None:
        raise ValueError("--sample-weights-column picks a column of --sample-weights FILE: give the file")
    if args.scheme == "consistency" and args.consistency_lambda > 0 and args.consistency_copies < 2:
        raise ValueError("--consistency-lambda > 0 compares noisy copies: --consistency-copies must be >= 2")


def _options(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` without what ``ddrs`` adds to a command's arguments (the checkpoint stores them all)."""
    names = vars(build_parser().parse_args([]))
    return argparse.Namespace(**{name: getattr(args, name) for name in names})


def run(args: argparse.Namespace) -> int:
    """Trains what ``args`` say (a selector with --selector-for, else a classifier) and saves it."""
    args = _options(args)
    if args.selector_for is not None:
        from ddrs.selector import train_from_args

        train_from_args(args, defaults=vars(build_parser().parse_args([])))
    else:
        from ddrs.digits_training import train

        train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ddrs.train_digits``: 0 when the checkpoint is written, 2 after a one-line error,
    130 after Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
