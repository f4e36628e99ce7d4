"""``ddrs certify``'s options for sequential certification (``--sequential`` with ``--radius R ...`` or
``--tolerance T``) and for evaluation with labels (``--labels``): the argument group, the checks
(no torch), the settings they add to a result file, and the keyword arguments they pass to
:func:`ddrs_ext.certify_sequential`, :func:`ddrs_ext.certify` and :func:`ddrs_ext.certify_dual`.

Settings written (``<file>.settings.json``): ``"sequential": {"radius": R, "tolerance": T}`` with
``R`` one number (one radius of interest: radius mode, as files of earlier versions have it), a
list (several radii of interest) or null (open-ended mode, then ``T`` is the grid step in units of
sigma); ``"sequential_rule": 2`` (the stopping rule of radii of interest; files of the earlier rule,
a relative tolerance on the radius, lack it and are not continued under this one); ``"labels_mode":
true`` for an evaluation run (absent otherwise, so that earlier files resume).
"""

from __future__ import annotations

import argparse

from ddrs.options import non_negative

__all__ = [
    "SEQUENTIAL_RULE",
    "SEQUENTIAL_TOLERANCE",
    "check_sequential_rule",
    "add_sequential_options",
    "check_sequential",
    "labels_kwargs",
    "sequential_kwargs",
    "sequential_settings",
]

SEQUENTIAL_TOLERANCE = 0.1  # ddrs_ext.sequential.DEFAULT_TOLERANCE (not imported: no torch here)
#: The stopping rule the rows of a --sequential file were certified under (its "sequential_rule"):
#: 2, radii of interest (ddrs_ext.certify_sequential's radius= / tolerance= grid). Files without the
#: key were certified under rule 1 (rounds from 100, a relative tolerance on the radius): other rows
#: for the same settings, so they cannot be continued under rule 2.
SEQUENTIAL_RULE = 2

GROUP_DESCRIPTION = (
    "--n is then the most estimation samples an input may use; the column samples says how many\n"
    "model evaluations each input took (selection included). A certified-accuracy table or curve is\n"
    "read at radii; each input stops as soon as none of those radii of interest lies between the\n"
    "radius it has certified and the most it could still certify with --n samples:\n"
    "  --radius R [R ...]  the radii you read (one: 'certified at R or not'; the paper's 0 0.25 0.5\n"
    "                      0.75 1; or a dense grid for a curve). At those radii the answers are\n"
    "                      those of certify(--n) with the same seed (up to a small steering error);\n"
    "                      between them nothing is promised, so ddrs analyze reports only those radii.\n"
    "  (no --radius)       open-ended mode: the radii of interest are the multiples of --tolerance\n"
    "                      times each input's sigma; ddrs analyze reports the whole curve.\n"
    "With --sigma-levels both stages of the dual certificate stop early (certify_dual(sequential=True))."
)

LABELS_HELP = (
    "evaluation mode, not a prediction: certify each input's TRUE label (from --data) directly, "
    "without selection (--n0 unused): predict is the label or -1, a sound certificate that the "
    "smoothed classifier returns the label within the radius. Certified accuracy is that of CERTIFY "
    "(up to the rare input where selection picks another class); the result file's settings say so "
    "(labels_mode), as does ddrs analyze. Not with --memory or --sigma-levels"
)


def add_sequential_options(p: argparse.ArgumentParser) -> None:
    """The argument group "sequential certification" of ``ddrs certify``, and ``--labels``."""
    g = p.add_argument_group("sequential certification (ddrs_ext.certify_sequential)", GROUP_DESCRIPTION)
    g.add_argument(
        "--sequential",
        action="store_true",
        help="estimate in rounds and stop each input as soon as its answers at the radii of interest "
        "are settled, with a bound valid at every round at once: the same kind of certificate from "
        "fewer model evaluations (column samples)",
    )
    m = g.add_mutually_exclusive_group()
    m.add_argument(
        "--radius",
        type=non_negative,
        nargs="+",
        metavar="R",
        help="the radii of interest: the radii at which the result is read (one radius: radius mode)",
    )
    m.add_argument(
        "--tolerance",
        type=non_negative,
        metavar="T",
        help="open-ended mode: the radii of interest are the multiples of T * sigma up to the largest "
        f"radius --n can certify (default {SEQUENTIAL_TOLERANCE:g}; 0: every radius, an input that can "
        "still certify more runs to --n)",
    )
    e = p.add_argument_group("evaluation with labels")
    e.add_argument("--labels", dest="labels_mode", action="store_true", help=LABELS_HELP)


def check_sequential(args: argparse.Namespace) -> None:
    """The checks of --sequential, --radius, --tolerance and --labels (a ValueError is a usage error).
    Needs ``args.memory`` resolved. Sets ``args.tolerance`` to its default in open-ended mode and
    ``args.radius`` to the sorted, de-duplicated radii of interest (one number for one radius)."""
    if not args.sequential:
        if args.radius is not None or args.tolerance is not None:
            raise ValueError("--radius and --tolerance need --sequential")
    elif args.radius is None and args.tolerance is None:
        args.tolerance = SEQUENTIAL_TOLERANCE
    if args.radius is not None:
        radii = sorted(set(float(r) for r in args.radius))
        args.radius = radii[0] if len(radii) == 1 else radii
    if getattr(args, "labels_mode", False):
        if args.sigma_levels is not None:
            raise ValueError(
                "--labels does not apply to --sigma-levels (certify_dual certifies the selector's "
                "choice and the model's class; certify without --sigma-levels to evaluate with labels)"
            )
        if args.memory:
            raise ValueError(
                "--labels does not apply to --memory: the memory adjusts the classifier's own answers, "
                "and with --labels the answers are the true label or abstain; give --no-memory with a "
                "sigma per input (its radii are then per-input certificates, and the file says so)"
            )


def sequential_settings(args: argparse.Namespace) -> dict:
    """What --sequential and --labels add to the result file's settings (nothing without them)."""
    settings: dict = {}
    if getattr(args, "sequential", False):
        settings["sequential"] = {"radius": args.radius, "tolerance": args.tolerance}
        settings["sequential_rule"] = SEQUENTIAL_RULE
    if getattr(args, "labels_mode", False):
        settings["labels_mode"] = True
    return settings


def check_sequential_rule(args: argparse.Namespace) -> None:
    """Refuses to resume a --sequential file whose rows were certified under an earlier stopping rule."""
    from ddrs.result_notes import resumed_settings  # (numpy: not at argument parsing)

    if not getattr(args, "sequential", False):
        return
    before = resumed_settings(args.out)
    if before is not None and before.get("sequential") is not None:
        if before.get("sequential_rule") != SEQUENTIAL_RULE:
            raise ValueError(
                f"{args.out} was certified sequentially under the stopping rule of an earlier ddrs version "
                f"(rule {before.get('sequential_rule', 1)}: a relative --tolerance on the radius; now rule "
                f"{SEQUENTIAL_RULE}: radii of interest); its rows cannot be continued under the current "
                "rule: certify into another --out (or delete the file to start it again)"
            )


def sequential_kwargs(args: argparse.Namespace) -> dict:
    """``radius`` and ``tolerance`` as certify_sequential and certify_dual(sequential=True) take them."""
    return {"radius": args.radius, "tolerance": args.tolerance}


def labels_kwargs(args: argparse.Namespace, labels) -> dict:
    """``labels=`` (the chunk's true labels) with --labels, else nothing."""
    return {"labels": labels} if getattr(args, "labels_mode", False) else {}
