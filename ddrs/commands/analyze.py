"""``ddrs analyze``: certified accuracy and average certified radius of certification result files,
as tables and plots. Its options and, in :func:`run`, its work (the tables and plots are
:mod:`ddrs.analyze`'s, imported only there)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddrs.docs_links import docs_epilog
from ddrs.options import HelpFormatter, non_negative, set_command

ANALYZE_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)  # ddrs.analyze.DEFAULT_RADII


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="certified accuracy curves and tables from result files",
        description="""\
Certified accuracy and average certified radius of certification result files, as tables and plots.

Reads the tab-separated result files that ddrs certify writes (and Cohen et al.'s, which lack the
sigma column). Certified accuracy at radius r is the fraction of rows with correct == 1 and
radius >= r (an abstention is never correct); the average certified radius (ACR) is the mean of
radius * correct over all rows.

Radii are L2 radii (Gaussian noise) or L1 radii (ddrs certify --noise uniform), as the files'
settings say; the tables and plots say which, and L1 and L2 files are refused in one table or plot
(analyse each norm's files separately).

A file of ddrs certify --sequential --radius R [R ...] is reported only at its radii of interest
(the table gains a column for each; its other cells and its ACR stay empty, its plot shows points):
its inputs stopped once their answer at those radii was settled. A file of ddrs certify --labels
(evaluation mode) holds the true label or -1 in predict, not a prediction; a note says so.""",
        epilog="examples:\n"
        '  ddrs analyze fixed.tsv dd.tsv --labels "fixed sigma" "data-dependent" --plot curves.png\n'
        "  ddrs analyze results/*.tsv --radii 0 0.5 1 1.5 2 --latex --output table.tex\n"
        + docs_epilog("certify-your-model", "sequential", "l1"),
        formatter_class=HelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="certification result files")
    p.add_argument(
        "--labels", nargs="+", metavar="LABEL", help="one row label per file (default: the file names' stems)"
    )
    p.add_argument(
        "--radii",
        nargs="+",
        type=non_negative,
        default=list(ANALYZE_RADII),
        metavar="R",
        help="radii of the table's columns (default: " + " ".join(f"{r:g}" for r in ANALYZE_RADII) + ")",
    )
    p.add_argument("--latex", action="store_true", help="print a LaTeX (booktabs) table, not markdown")
    p.add_argument(
        "--output",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="also write the table to FILE: LaTeX if it ends in .tex, markdown otherwise (repeatable)",
    )
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a plot of certified accuracy vs radius")
    p.add_argument("--max-radius", type=non_negative, help="right end of the plot's radius axis")
    p.add_argument("--title", help="the plot's title")
    set_command(p, run="ddrs.commands.analyze:run", check=check, resumable=False, uses_torch=False)


def check(args: argparse.Namespace) -> None:
    if args.labels is not None and len(args.labels) != len(args.files):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.files)} files")
    if args.max_radius == 0:
        raise ValueError("--max-radius must be > 0")


def run(args: argparse.Namespace) -> int:
    """``ddrs analyze``: the table on stdout, and in the files of --output and --plot."""
    from ddrs.analyze import latex_table, load, markdown_table, plot_certified_accuracy

    labels = args.labels or [None] * len(args.files)
    results = [load(path, label) for path, label in zip(args.files, labels)]
    print(latex_table(results, args.radii) if args.latex else markdown_table(results, args.radii), end="")
    for out in args.output:
        text = (
            latex_table(results, args.radii) if out.suffix == ".tex" else markdown_table(results, args.radii)
        )
        try:
            out.write_text(text)
        except OSError as exc:
            raise OSError(f"cannot write {out}: {exc.strerror or exc}") from None
        print(f"wrote {out}", file=sys.stderr)
    if args.plot is not None:
        plot_certified_accuracy(results, args.plot, max_radius=args.max_radius, title=args.title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
