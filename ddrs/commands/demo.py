"""``ddrs demo``: fixed against data-dependent noise levels, end to end on the embedded digits data.
Its options, their defaults and --quick's, and their checks (no torch); its work is
:func:`ddrs.commands.demo_run.run`, its table's verdicts :mod:`ddrs.commands.demo_table`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddrs.docs_links import docs_epilog
from ddrs.options import HelpFormatter, count, number, positive, probability, set_command
from ddrs.sigma_options import ESTIMATORS

# The full run and --quick's tiny one (explicit options win over either)
DEMO_TEST_SIZE = 497  # the embedded digits' test split (ddrs_ext.data.load_digits_split's default)
DEMO_DEFAULTS = {
    "epochs": 15,
    "count": DEMO_TEST_SIZE,
    "n0": 100,
    "n": 10_000,
    "sigma_samples": 512,
    "sigma_iterations": 16,
    "label_n0": 64,  # ddrs.selector.LABEL_SETTINGS
    "label_n": 512,
    "folds": 5,
}
DEMO_QUICK = {
    "epochs": 1,
    "count": 20,
    "n0": 20,
    "n": 200,
    "sigma_samples": 64,
    "sigma_iterations": 4,
    "label_n0": 8,
    "label_n": 32,
    "folds": 2,
}

DESCRIPTION = """\
Fixed against data-dependent noise levels, end to end on the embedded digits data (no download).

Trains small CNNs on the digits' 1100 training images: one with Gaussian augmentation at a fixed
sigma, one more at sigma*2 and at sigma*4 (capped at --sigma-max), and one with a data-dependent
sigma per training example (the paper's scheme, ascending the surrogate that matches CERTIFY's
radius, sigma capped at --sigma-max). It
optimises a sigma for every test input, certifies the test set with each model and each choice
of sigma (with and without the memory-based adjustment that keeps per-input certificates
sound), and prints certified accuracy at several radii, the average certified radius and
verdicts computed from this run: whether data-dependent sigma helps, and which sound row is
best at each radius. Two more rows: the fixed-sigma model certified sequentially
(certify_sequential with the table's radii as its radii of interest; a second table shows the
model evaluations it saves), and a dual certificate (certify_dual) built with the recipe of the
dual-certificate study (docs/dual.md) at the demo's scale: experts at sigma and sigma*2 (the
fixed-sigma model, and a specialist trained on examples drawn by held-out soft labels), and a
selector smoothed at the largest level, trained with the consistency term on the experts'
held-out (--folds-fold cross-fitted) soft labels; alpha split in halves. Where a
row evaluates enough noisy copies to repay compiling (ddrs_ext.precision.compile_pays), the
models are evaluated compiled with channels-last weights (the same function; the caption says
so). --quick runs tiny settings in about a minute.

Everything goes into the --out folder (default ddrs_demo, in the current folder): the
checkpoints (the models and the selector), one result file per table row (the tab-separated
format 'ddrs analyze' reads), table.md and curves.png (the sound rows' curves, and each one's
difference from the fixed-sigma baseline). A re-run over the same folder resumes: it reuses
checkpoints trained with the same settings and skips inputs already certified, and refuses
(with an error) a folder started with other settings; --fresh deletes the demo's files there
first."""

EXAMPLES = (
    "examples:\n  ddrs demo\n  ddrs demo --quick --out /tmp/ddrs_demo\n"
    "  ddrs demo --count 200 --seed 1 --sigma 0.5 --sigma-max 2 --out ddrs_demo_s05\n"
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train two small models on the embedded digits, certify them: fixed vs data-dependent sigma",
        description=DESCRIPTION,
        epilog=EXAMPLES + docs_epilog("getting-started"),
        formatter_class=HelpFormatter,
    )
    full, quick = DEMO_DEFAULTS, DEMO_QUICK

    def preset(name: str) -> str:
        return f"(default {full[name]}; --quick: {quick[name]})"

    p.add_argument("--out", type=Path, default=Path("ddrs_demo"), help="output folder")
    p.add_argument(
        "--fresh", action="store_true", help="delete the demo's files in --out first instead of resuming"
    )
    p.add_argument("--quick", action="store_true", help="tiny settings: a whole run in seconds")
    p.add_argument("--sigma", type=positive, default=0.25, help="fixed sigma, and sigma0")
    p.add_argument(
        "--sigma-max",
        type=positive,
        default=1.0,
        help="upper end of every per-input sigma, in training and at test",
    )
    p.add_argument("--epochs", type=count, help=f"training epochs of each model {preset('epochs')}")
    p.add_argument(
        "--count", type=count, help=f"test inputs to certify, the first of the test split {preset('count')}"
    )
    p.add_argument("--n0", "--N0", type=count, help=f"selection samples per input {preset('n0')}")
    p.add_argument("--n", "--N", type=count, help=f"estimation samples per input {preset('n')}")
    p.add_argument("--alpha", type=probability, default=0.001, help="failure probability")
    p.add_argument(
        "--sigma-samples",
        type=count,
        help=f"noise samples per step of the test-time sigma optimisation {preset('sigma_samples')}",
    )
    p.add_argument(
        "--sigma-iterations",
        type=count,
        help=f"steps of the test-time sigma optimisation {preset('sigma_iterations')}",
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="score",
        help="gradient estimator of the test-time sigma optimisation",
    )
    p.add_argument(
        "--label-n0",
        type=count,
        help=f"selection samples per level of the selector's training labels {preset('label_n0')}",
    )
    p.add_argument(
        "--label-n",
        type=count,
        help=f"estimation samples per level of the selector's training labels {preset('label_n')}",
    )
    p.add_argument(
        "--folds",
        type=number(int, minimum=2, what="an integer"),
        help=f"cross-fitting folds of the dual row's held-out labels {preset('folds')}",
    )
    p.add_argument(
        "--seed",
        type=number(int, minimum=0, below=2**32, what="an integer"),
        default=0,
        help="data split, training and noise",
    )
    p.add_argument("--batch-size", "--batch", type=count, default=2000, help="rows per forward pass")
    set_command(p, run="ddrs.commands.demo_run:run", check=check, resumable=True)


def check(args: argparse.Namespace) -> None:
    """Fills the options left unset from the defaults (or --quick's) and checks them together."""
    for name, value in (DEMO_QUICK if args.quick else DEMO_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.count > DEMO_TEST_SIZE:
        raise ValueError(f"--count must lie in 1..{DEMO_TEST_SIZE} (the test split's size), got {args.count}")
    if args.sigma > args.sigma_max:
        raise ValueError(f"--sigma {args.sigma:g} exceeds --sigma-max {args.sigma_max:g}")
