"""``ddrs certify``: its options and the checks of its arguments (no torch); its work is
:func:`ddrs.commands.certify_run.run`."""

from __future__ import annotations

import argparse

from ddrs.docs_links import docs_epilog
from ddrs.noise_options import add_noise_option
from ddrs.options import (
    FORMATS,
    HelpFormatter,
    add_model_and_data,
    count,
    positive,
    probability,
    set_command,
)
from ddrs.route_options import add_route_options, check_routes, route_of
from ddrs.sequential_options import SEQUENTIAL_TOLERANCE, add_sequential_options, check_sequential
from ddrs.sigma_options import (
    OPTIMIZE_WHY,
    add_sigma_choice,
    add_sigma_options,
    optimize_options,
    sigma_options_given,
)

__all__ = ["SEQUENTIAL_TOLERANCE", "add_parser", "check"]

DESCRIPTION = (
    "Certifies inputs of --data with the smoothed version of --model (Cohen et al.'s "
    "CERTIFY: n0 noisy copies\nselect a class, n fresh ones bound its probability at confidence "
    "1 - alpha; radius sigma * Phi^-1(p_lower)),\nwith a fixed sigma, a sigma per input from "
    "'ddrs optimize-sigma', or one optimised on the fly.\nA sigma per input goes through the paper's "
    "memory-based adjustment (--memory, the default), which\nkeeps per-input-sigma certificates sound; "
    "--no-memory opts out (the radii are then not certificates\nof one classifier, and the result "
    "file says so).\n--sequential "
    "stops each input as soon as its answers at the radii of interest (--radius) are settled\n"
    "(fewer model evaluations). --labels: evaluation mode, certifies each input's true label.\n"
    "--sigma-levels: dual certification, a certified selector picks the sigma (sound without a "
    "memory)."
)

EXAMPLES = """
examples:
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --out digits.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --sigma 0.25 --skip 20 --n 100000 --out cifar_025.tsv
  ddrs optimize-sigma --model mymodels:resnet110 --checkpoint ckpt.pth.tar \\
      --data cifar-10-batches-py --skip 20 --sigma0 0.12 --out sigma.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --skip 20 --sigma-file sigma.tsv --memory --out cifar_dd.tsv
  ddrs certify --model model.ts --data test.pt --optimize --sigma0 0.25 --max 100 --out dd.tsv
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential --out seq.tsv
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential --radius 0.5 \\
      --n 100000 --out seq_r05.tsv
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential \\
      --radius 0 0.25 0.5 0.75 1 --labels --out seq_paper.tsv
  ddrs certify --checkpoint dd.pt --selector-checkpoint selector.pt --data digits \\
      --sigma-levels 0.25 0.5 1 --selector-sigma 0.5 --out dual.tsv
  ddrs certify --checkpoint expert025.pt --checkpoint expert05.pt --data digits \\
      --sigma-levels 0.25 0.5 --cascade --out cascade.tsv
"""


# the pages that explain certify's options (its --help's last line)
DOCS = ("certify-your-model", "data-dependent-sigma", "memory", "sequential", "dual", "l1", "faster")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "certify",
        help="certify a dataset with your model: a certified class and L2 radius per input",
        description=DESCRIPTION,
        epilog=FORMATS + "\n" + OPTIMIZE_WHY + EXAMPLES + docs_epilog(*DOCS),
        formatter_class=HelpFormatter,
    )
    add_model_and_data(p)
    add_sigma_choice(p, optimize=True)
    g = p.add_argument_group("certification")
    g.add_argument("--n0", "--N0", type=count, default=100, help="noisy copies that select the class")
    g.add_argument(
        "--n", "--N", type=count, default=100_000, help="noisy copies that estimate its probability"
    )
    g.add_argument("--alpha", type=probability, default=0.001, help="failure probability")
    m = g.add_mutually_exclusive_group()
    m.add_argument(
        "--memory",
        action="store_const",
        const=True,
        default=None,
        help="memory-based certification (ddrs_ext.CertificationMemory, inputs in idx order): the "
        "default with a sigma per input (--optimize, --sigma-file); with --sigma it may be asked for",
    )
    m.add_argument(
        "--no-memory",
        dest="memory",
        action="store_const",
        const=False,
        help="with a sigma per input: certify each input at its own sigma, without the memory. The "
        "radii are then NOT certificates of one classifier (two nearby inputs can be certified for "
        "different classes with overlapping balls); the result file's settings, its summary and "
        "'ddrs analyze' say so",
    )
    add_sequential_options(p)
    _add_selector_options(p)
    add_route_options(p)
    add_sigma_options(p, "sigma optimisation (with --optimize)")
    set_command(p, run="ddrs.commands.certify_run:run", check=check, resumable=True)
    add_noise_option(p)


def _add_selector_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "dual certification (--sigma-levels: ddrs_ext.certify_dual; sound without --memory)",
        "A selector model with one output per sigma level, smoothed at --selector-sigma, picks each\n"
        "input's level and certifies a radius within which its choice is constant; the model is then\n"
        "certified at the chosen level (--n0, --n); the radius is the smaller of the two, and the\n"
        "selector's abstentions abstain. --model/--checkpoint may be given once per level (in level\n"
        "order): one expert per level. A selector for the digits: python -m ddrs.train_digits\n"
        "--selector-for CHECKPOINT. With --noise uniform the levels and --selector-sigma are half-widths\n"
        "theta and every radius is an L1 radius (docs: l1).",
    )
    g.add_argument(
        "--selector",
        metavar="SPEC",
        help="the selector, given as --model is (module:callable, file.py:callable, TorchScript/.pt2)",
    )
    g.add_argument(
        "--selector-checkpoint",
        metavar="FILE",
        help="weights for --selector, or alone a selector checkpoint of python -m ddrs.train_digits "
        "--selector-for",
    )
    g.add_argument(
        "--selector-sigma",
        type=positive,
        metavar="S",
        help="the selector's own fixed sigma (default: the one a --selector-checkpoint of ddrs train was "
        "trained at, else the largest of --sigma-levels)",
    )
    g.add_argument(
        "--alpha-selector",
        type=probability,
        metavar="A",
        help="the selector's share of --alpha (default: half of it); the model gets the rest",
    )


# ----------------------------------------------------------------------------- checks


def check(args: argparse.Namespace) -> None:
    """The checks of certify's arguments that need no torch (a ValueError is a usage error)."""
    _resolve_memory(args)
    args.optimize_options = None
    if args.optimize:
        args.optimize_options = optimize_options(args)
    elif sigma_options_given(args):
        raise ValueError("sigma optimisation options (--sigma0, --iterations, ...) need --optimize")
    check_sequential(args)
    check_routes(args)
    _check_dual(args)


def _resolve_memory(args: argparse.Namespace) -> None:
    """``args.memory``: as given (--memory, --no-memory), else the memory exactly when the sigma is
    chosen per input (--optimize, --sigma-file). ``args.memory_given`` says whether it was given (a
    rerun of a file started without the memory, before it was the default, resumes without it)."""
    args.memory_given = args.memory is not None
    if args.memory is None:
        args.memory = bool(args.optimize or args.sigma_file is not None)


def _check_dual(args: argparse.Namespace) -> None:
    """--sigma-levels with its selector options, and one expert per level if --model repeats."""
    options = ("selector", "selector_checkpoint", "selector_sigma", "alpha_selector")
    if args.sigma_levels is None:
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for dual certification, with --sigma-levels")
        return
    levels = args.sigma_levels
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(
            f"--sigma-levels must be strictly increasing, got {' '.join(f'{v:g}' for v in levels)}"
        )
    if args.selector is None and args.selector_checkpoint is None and route_of(args) is None:
        raise ValueError(
            "--sigma-levels needs a selector: --selector SPEC and/or --selector-checkpoint FILE (or a "
            "training-free route: --cascade, --confidence-routing)"
        )
    if args.alpha_selector is not None and not args.alpha_selector < args.alpha:
        raise ValueError(
            f"--alpha-selector {args.alpha_selector:g} must be below --alpha {args.alpha:g} "
            "(the model gets the rest)"
        )
    if args.memory:
        raise ValueError(
            "--memory does not apply to --sigma-levels: the dual certificate is sound on its own"
        )
    K, m, c = len(levels), len(args.models), len(args.checkpoints)
    if max(m, c) > 1 and (max(m, c) != K or m not in (0, 1, K) or c not in (0, 1, K) or (m, c) == (K, 1)):
        raise ValueError(
            f"one expert per level: give --model and/or --checkpoint once, or once per level ({K} levels); "
            f"got {m} --model and {c} --checkpoint"
        )
