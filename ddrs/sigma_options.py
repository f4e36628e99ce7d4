"""The sigma options that ``ddrs certify``, ``predict`` and ``optimize-sigma`` share: the choice of
sigma (--sigma, --sigma-file, certify's --optimize and --sigma-levels) and the settings of the sigma
optimisation (ddrs_ext.optimize_sigma), with the library's names and defaults written out so that
the parser is built without importing torch (tests/test_cli.py holds them equal to the library's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddrs.options import count, non_negative_int, number, positive, probability

__all__ = [
    "ESTIMATORS",
    "RULES",
    "SURROGATES",
    "PAPER_SETTINGS",
    "LIBRARY_OPTIMIZE_DEFAULTS",
    "OPTIMIZE_DEFAULTS",
    "SIGMA0",
    "OPTIMIZE_WHY",
    "add_sigma_choice",
    "add_sigma_options",
    "optimize_options",
    "sigma_options_given",
]

ESTIMATORS = ("reparam", "score")
RULES = ("ascent", "bisect")
SURROGATES = ("paper", "certify")
PAPER_SETTINGS = {
    "iterations": 900,
    "lr": 0.04,
    "num_samples": 100,
    "estimator": "reparam",
    "rule": "ascent",
    "clip": (0.02, 0.98),
}
LIBRARY_OPTIMIZE_DEFAULTS = {
    "iterations": 16,
    "num_samples": 512,
    "lr": 0.04,
    "estimator": "reparam",
    "rule": "bisect",
    "growth": 2.0,
    "surrogate": "paper",
    "clip": (0.02, 0.98),
    "sigma_range": (1e-3, 10.0),
    "keep_prediction": True,
}
# The command line's own choice, from measurements on the digits' validation split
# (docs/data-dependent-sigma.md, "Which --optimize defaults", with the commands that measure it):
# the surrogate that matches CERTIFY's radius rather than the paper's. --paper gives the published
# procedure.
OPTIMIZE_DEFAULTS = {**LIBRARY_OPTIMIZE_DEFAULTS, "surrogate": "certify"}
SIGMA0 = 0.12  # the paper's starting sigma (its CIFAR-10 models' smallest training sigma)

OPTIMIZE_WHY = """\
Defaults of the sigma optimisation: 16 bisection steps of 512 noise samples from --sigma0, with the
reparameterisation gradient (through the model), on the surrogate that matches CERTIFY's radius,
sigma * Phi^-1(E_A), not the paper's. Chosen on the digits' validation split with the demo's two
models: that surrogate certified more (average certified radius +0.10 and +0.04) and the
reparameterisation gradient a little more than the score estimator (+0.018, +0.013), which needs
forward passes only and is several times faster (docs/data-dependent-sigma.md: "Which --optimize
defaults", with the commands). --paper gives the published procedure instead (900 plain ascent
steps of 100 samples, the paper's surrogate, the reparameterisation gradient).
"""

# optimize_sigma's options that have a command-line flag of the same name (keep_prediction's is
# --no-keep-prediction).
_OPTIMIZE_OPTIONS = (
    "iterations",
    "num_samples",
    "lr",
    "estimator",
    "rule",
    "growth",
    "surrogate",
    "clip",
    "sigma_range",
)


def add_sigma_choice(p: argparse.ArgumentParser, optimize: bool) -> None:
    """--sigma or --sigma-file, and with ``optimize`` (certify) also --optimize and --sigma-levels."""
    g = p.add_argument_group("sigma (exactly one)").add_mutually_exclusive_group(required=True)
    g.add_argument("--sigma", type=positive, help="one sigma for every input")
    g.add_argument(
        "--sigma-file", type=Path, metavar="FILE", help="a sigma per input from ddrs optimize-sigma"
    )
    if optimize:
        g.add_argument(
            "--optimize", action="store_true", help="optimise a sigma per input first (options below)"
        )
        g.add_argument(
            "--sigma-levels",
            nargs="+",
            type=positive,
            metavar="S",
            help="dual certification: a smoothed --selector picks one of these sigmas (increasing) per "
            "input and certifies its choice (options below)",
        )


def add_sigma_options(p: argparse.ArgumentParser, title: str) -> None:
    """The settings of the sigma optimisation (unset: :func:`optimize_options` fills them in)."""
    d = OPTIMIZE_DEFAULTS
    g = p.add_argument_group(title)
    g.add_argument("--sigma0", type=positive, help=f"starting sigma (default {SIGMA0:g}, the paper's)")
    g.add_argument(
        "--paper",
        action="store_true",
        help="the published procedure as the authors' OptimzeSigma.py runs it, ddrs_ext.PAPER_SETTINGS ("
        + ", ".join(f"{k} {v}" for k, v in PAPER_SETTINGS.items())
        + ", surrogate paper); options given explicitly override it (--paper --clip 0.001 0.999 is "
        "their run_optimization_dataset.py, ddrs_ext.PAPER_DATASET_SETTINGS)",
    )
    g.add_argument("--iterations", type=non_negative_int, help=f"steps per input (default {d['iterations']})")
    g.add_argument("--num-samples", type=count, help=f"noise samples per step (default {d['num_samples']})")
    g.add_argument("--lr", type=positive, help=f"ascent step size, --rule ascent (default {d['lr']})")
    g.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help=f"derivative in sigma: reparam (through the model, the paper's) or score (forward passes "
        f"only, several times faster) (default {d['estimator']})",
    )
    g.add_argument("--rule", choices=RULES, help=f"update rule (default {d['rule']})")
    g.add_argument("--growth", type=number(float, above=1), help=f"bisection factor (default {d['growth']})")
    g.add_argument(
        "--surrogate",
        choices=SURROGATES,
        help="radius surrogate maximised: certify, sigma * Phi^-1(E_A), or paper, "
        f"sigma/2 (Phi^-1(E_A) - Phi^-1(E_B)) (default {d['surrogate']})",
    )
    g.add_argument(
        "--clip",
        nargs=2,
        type=probability,
        metavar=("LOW", "HIGH"),
        help=f"clip of E_A, E_B (default {d['clip'][0]} {d['clip'][1]})",
    )
    g.add_argument(
        "--sigma-range",
        nargs=2,
        type=positive,
        metavar=("LOW", "HIGH"),
        help=f"sigma stays inside (default {d['sigma_range'][0]:g} {d['sigma_range'][1]:g})",
    )
    g.add_argument(
        "--no-keep-prediction",
        dest="keep_prediction",
        action="store_false",
        default=None,
        help="(bisection) let sigma move to where the top class changes or falls below 1/2",
    )
    g.add_argument("--probabilities", action="store_true", help="the model returns probabilities, not logits")


def optimize_options(args: argparse.Namespace) -> dict:
    """optimize_sigma's keyword arguments: the command line's defaults, then --paper's (the published
    procedure, on the paper's surrogate), then the ones given. Sets ``args.sigma0`` when unset."""
    if args.sigma0 is None:
        args.sigma0 = SIGMA0
    options = dict(OPTIMIZE_DEFAULTS)
    if args.paper:
        options.update(PAPER_SETTINGS, surrogate="paper")
    for key in (*_OPTIMIZE_OPTIONS, "keep_prediction"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    options["clip"] = tuple(float(v) for v in options["clip"])
    options["sigma_range"] = tuple(float(v) for v in options["sigma_range"])
    if not options["clip"][0] < options["clip"][1]:
        raise ValueError(f"--clip: LOW must be below HIGH, got {options['clip'][0]} {options['clip'][1]}")
    if not options["sigma_range"][0] <= options["sigma_range"][1]:
        raise ValueError("--sigma-range: LOW must not exceed HIGH")
    if not options["sigma_range"][0] <= args.sigma0 <= options["sigma_range"][1]:
        low, high = options["sigma_range"]
        raise ValueError(f"--sigma0 {args.sigma0:g} lies outside --sigma-range {low:g} {high:g}")
    if options["estimator"] == "score" and options["num_samples"] < 2:
        raise ValueError("--num-samples must be >= 2 with --estimator score")
    options["probabilities"] = bool(args.probabilities)
    return options


def sigma_options_given(args: argparse.Namespace) -> bool:
    """Whether any sigma optimisation option was given."""
    return (
        any(getattr(args, k) is not None for k in _OPTIMIZE_OPTIONS)
        or args.paper
        or args.probabilities
        or args.keep_prediction is not None
        or args.sigma0 is not None
    )
