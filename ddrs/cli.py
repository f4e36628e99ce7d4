"""The ddrs command line: certify a dataset with your model, optimise a sigma per input, predict,
analyse result files, train a model, run a demo.

    ddrs certify --model mymodels:build --checkpoint model.pt --data cifar-10-batches-py \\
        --sigma 0.25 --skip 20 --out certify.tsv
    ddrs optimize-sigma --model mymodels:build --checkpoint model.pt --data data.pt --out sigma.tsv
    ddrs certify ... --sigma-file sigma.tsv --memory --out certify_dd.tsv

Every command writes one row per input as soon as it is done and resumes an interrupted run when
given the same command again. User errors end the command with a one-line message on stderr and
exit status 2; an interrupt (Ctrl-C) exits with 130.

This module assembles the parser from the commands' modules (:mod:`ddrs.commands`) and dispatches;
it imports neither torch nor ddrs_ext, so that --help and argument errors answer at once; a
command's work is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ddrs.commands import analyze, certify, demo, optimize_sigma, predict, train
from ddrs.docs_links import docs_epilog
from ddrs.options import Parser, check_repeated, one_line

__all__ = ["COMMANDS", "main", "build_parser", "parse_args"]

#: The commands' modules (torch-free: options and checks), in the order ``ddrs --help`` lists them.
COMMANDS = (demo, certify, optimize_sigma, predict, analyze, train)


def build_parser() -> argparse.ArgumentParser:
    """The ``ddrs`` parser (imports neither torch nor ddrs_ext)."""
    parser = Parser(
        prog="ddrs",
        description="Data Dependent Randomized Smoothing (Alfarra et al., UAI 2022) from the command line:\n"
        "certify a dataset with your model at a fixed sigma or a sigma per input, optimise those sigmas,\n"
        "predict, analyse the result files. Run 'ddrs COMMAND --help' for a command's options, file\n"
        "formats and examples.",
        epilog="examples:\n"
        + __doc__.split("\n\n")[1]
        + "\n\n"
        + __doc__.split("\n\n")[2]
        + "\n"
        + docs_epilog("index", "getting-started", "certify-your-model"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _under_torchrun() -> bool:
    """As ddrs.distributed_run.launched (which imports torch): there, every rank checks and reports."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _message(exc: BaseException) -> str:
    return one_line(exc) or type(exc).__name__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``ddrs``'s arguments, checked (the checks that need no torch) and with defaults filled in: what
    a command's ``run`` receives. A usage error exits (``SystemExit(2)``) after a one-line message."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m ddrs -- certify ...: a separator that reached us
        argv = argv[1:]
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, which names the command and its --help
        args.usage_error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if hasattr(args, "models"):
            check_repeated(args)
        if args.check is not None:
            args.check(args)
    except ValueError as exc:
        args.usage_error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs ``ddrs`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Argument errors raise ``SystemExit(2)`` after a one-line message, as argparse does; so does
    ``--help`` (``SystemExit(0)``). Ctrl-C exits with 130 and no traceback, at any point. A command
    that uses torch imports ddrs_ext before its own work, so that OpenMP's idle threads wait passively
    unless the environment chooses otherwise (:mod:`ddrs_ext._threads`).
    """
    command, started = "ddrs", False
    try:
        args = parse_args(argv)
        command = f"ddrs {args.command}"
        if getattr(args, "check_paths", None) is not None and not _under_torchrun():
            args.check_paths(args)  # a wrong path answers before torch loads (under torchrun: every rank)
        module, _, name = args.run.partition(":")
        if args.uses_torch:  # ddrs_ext first: it sets the wait policy before torch loads
            importlib.import_module("ddrs_ext")
        run = getattr(importlib.import_module(module), name)  # torch and ddrs_ext load here
        started = True
        return int(run(args) or 0)
    except KeyboardInterrupt:
        if started:
            hint = "; run the same command again to resume" if args.resumable else ""
            print(f"{command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{command}: error: {_message(exc)}", file=sys.stderr)
        return 2
