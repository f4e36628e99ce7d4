"""``--noise {gaussian,uniform}`` of ``ddrs certify``, ``predict``, ``optimize-sigma`` and ``train``:
the noise family, and with it the norm of the certified radii (Gaussian noise: L2 radii
``sigma * Phi^-1(p_lower)``; uniform noise on the cube ``[-theta, theta]^D``: L1 radii
``theta * (2 p_lower - 1)``, ``ddrs_ext.certify(..., noise="uniform")``).

With ``--noise uniform`` the sigma options (--sigma, --sigma-file, --sigma0, --sigma-range, ...) hold
the cube's half-width theta, ``--optimize`` and ``ddrs optimize-sigma`` run
``ddrs_ext.optimize_theta`` (``--paper``: ``ddrs_ext.PAPER_L1_SETTINGS``), the memory holds L1
certificates, and the result file's settings record ``"noise"`` and ``"norm"`` (files written before
they existed are Gaussian, L2: :data:`SETTING_DEFAULTS`). The Gaussian-only options (``--clip``,
``--estimator score``, ``--sigma-levels``; for training MACER, SmoothAdv, ``--sigma-estimator score``
and ``--selector-for``) are refused with uniform noise.

Imports neither torch nor ddrs_ext (``ddrs --help`` and argument errors answer at once); the work
side's helpers import ddrs_ext only when called.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from ddrs.results import IMPLIED_SETTINGS

__all__ = [
    "NOISES",
    "NORMS",
    "PAPER_L1_SETTINGS",
    "SETTING_DEFAULTS",
    "add_noise_option",
    "add_training_noise_option",
    "check_noise",
    "check_training_noise",
    "noise_settings",
    "norm_of",
    "radius_label",
    "check_resumed_noise",
    "check_sigma_file_noise",
]

NOISES = ("gaussian", "uniform")  # ddrs_ext.noise.NOISES
NORMS = {"gaussian": "l2", "uniform": "l1"}  # ddrs_ext.noise.NORMS
#: ddrs_ext.PAPER_L1_SETTINGS, written out (tests/test_cli_l1.py holds them equal): the authors'
#: l1 procedure, --paper with --noise uniform.
PAPER_L1_SETTINGS = {
    "iterations": 900,
    "lr": 0.04,
    "num_samples": 100,
    "estimator": "reparam",
    "rule": "ascent",
    "surrogate": "paper",
}
#: What a result file's settings without these keys (written before --noise existed) mean.
SETTING_DEFAULTS = IMPLIED_SETTINGS

NOISE_HELP = (
    "noise family: gaussian (L2 radii sigma * Phi^-1(p_lower)) or uniform on the cube [-theta, theta]^D "
    "(L1 radii theta * (2 p_lower - 1), ddrs_ext.certify(noise='uniform')). With uniform, every sigma "
    "option (--sigma, --sigma-file, --sigma0, --sigma-range, --optimize) means the half-width theta, "
    "and --optimize/--paper run ddrs_ext.optimize_theta (--paper: ddrs_ext.PAPER_L1_SETTINGS)"
)
_THETA = " (--noise uniform: the cube's half-width theta)"


def add_noise_option(p: argparse.ArgumentParser) -> None:
    """Adds ``--noise`` to a command that certifies, predicts or optimises sigma (after its
    ``set_command``): its own group, a note on the sigma options' help that they mean theta with
    uniform noise, and :func:`check_noise` chained after the command's own check."""
    g = p.add_argument_group("noise (L2 or L1 certificates)")
    g.add_argument("--noise", choices=NOISES, default="gaussian", help=NOISE_HELP)
    for action in p._actions:  # the sigma options' help says what they mean with uniform noise
        if action.dest in ("sigma", "sigma_file", "sigma0", "sigma_range") and action.help:
            action.help += _THETA
    first = p.get_default("check")

    def check(args: argparse.Namespace) -> None:
        if first is not None:
            first(args)
        check_noise(args)

    p.set_defaults(check=check)


def _given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) is not None


def check_noise(args: argparse.Namespace) -> None:
    """With ``--noise uniform``: refuses the Gaussian-only options and turns the resolved sigma
    optimisation options (``args.optimize_options``) into ``optimize_theta``'s (no ``clip``; with
    ``--paper``: :data:`PAPER_L1_SETTINGS`). A ValueError is a usage error."""
    if args.noise != "uniform":
        return
    if _given(args, "sigma_levels"):
        raise ValueError(
            "--sigma-levels (dual certification) is Gaussian-only; drop --noise uniform, or certify "
            "with --sigma, --sigma-file or --optimize"
        )
    if _given(args, "clip"):
        raise ValueError(
            "--clip is Gaussian-only (it keeps Phi^-1 finite); uniform noise's linear surrogate needs "
            "none: drop --clip with --noise uniform"
        )
    if getattr(args, "estimator", None) == "score":
        raise ValueError(
            "--estimator score is Gaussian-only (the cube's support moves with theta, so the score "
            "function does not give its derivative): use --estimator reparam with --noise uniform"
        )
    options = getattr(args, "optimize_options", None)
    if options is not None:
        options = {k: v for k, v in options.items() if k != "clip"}
        if getattr(args, "paper", False):
            options.update(PAPER_L1_SETTINGS)
            for key in PAPER_L1_SETTINGS:  # options given explicitly override --paper
                if _given(args, key):
                    options[key] = getattr(args, key)
        args.optimize_options = options


def add_training_noise_option(p: argparse.ArgumentParser) -> None:
    """Adds ``--noise`` to ``ddrs train`` / ``python -m ddrs.train_digits``."""
    p.add_argument(
        "--noise",
        choices=NOISES,
        default="gaussian",
        help="noise of the augmentation: gaussian, or uniform on [-theta, theta]^D for L1 certificates "
        "(--sigma, --sigma-max then mean theta; --scheme gaussian then trains with "
        "ddrs_ext.training.uniform_augmentation_loss, --data-dependent with update_sigma(noise='uniform'))",
    )


def check_training_noise(args: argparse.Namespace) -> None:
    """``ddrs train --noise uniform``: refuses what is Gaussian-only (MACER, SmoothAdv, the score
    estimator, a selector for dual certification)."""
    if getattr(args, "noise", "gaussian") != "uniform":
        return
    if args.scheme != "gaussian":
        raise ValueError(
            f"--scheme {args.scheme} is Gaussian-only (its loss is built on the Gaussian certificate or "
            "an L2 attack); with --noise uniform use --scheme gaussian (uniform augmentation)"
        )
    if args.sigma_estimator == "score":
        raise ValueError("--sigma-estimator score is Gaussian-only: use reparam with --noise uniform")
    if args.selector_for is not None:
        raise ValueError("--selector-for trains a selector for dual certification, which is Gaussian-only")


# ----------------------------------------------------------------------------- settings, labels


def norm_of(noise: str) -> str:
    """``"l2"`` for Gaussian noise, ``"l1"`` for uniform noise."""
    return NORMS[noise]


def noise_settings(args: argparse.Namespace) -> dict:
    """What a result file's settings record about the noise: ``{"noise": ..., "norm": ...}``."""
    noise = getattr(args, "noise", "gaussian")
    return {"noise": noise, "norm": norm_of(noise)}


def radius_label(norm: str) -> str:
    """``"L1 radius"`` or ``"L2 radius"``."""
    return f"{norm.upper()} radius"


def setting(settings: Mapping | None, key: str) -> str:
    """``settings[key]`` for "noise" or "norm", with :data:`SETTING_DEFAULTS` for files without it."""
    value = None if settings is None else settings.get(key)
    return SETTING_DEFAULTS[key] if value is None else value


def check_resumed_noise(args: argparse.Namespace) -> None:
    """Refuses, with a message that says what to give, to resume a result file made with the other
    noise (the generic settings check would refuse it too, less plainly)."""
    from ddrs.result_notes import resumed_settings

    before = resumed_settings(args.out)
    if before is None:
        return
    then, now = setting(before, "noise"), getattr(args, "noise", "gaussian")
    if then != now:
        raise ValueError(
            f"{args.out} was made with --noise {then} ({norm_of(then).upper()} radii); this run uses "
            f"--noise {now}: give --noise {then} to resume it, or use another --out"
        )


def check_sigma_file_noise(args: argparse.Namespace) -> None:
    """Refuses a --sigma-file of ``ddrs optimize-sigma`` made for the other noise (its values are
    sigmas of one family, thetas of the other); a file without settings is taken as it is."""
    from ddrs.result_notes import read_settings

    path = getattr(args, "sigma_file", None)
    if path is None:
        return
    settings = read_settings(Path(path))
    if settings is None or settings.get("command") != "optimize-sigma":
        return
    then, now = setting(settings, "noise"), getattr(args, "noise", "gaussian")
    if then != now:
        what = {"gaussian": "Gaussian sigmas", "uniform": "uniform half-widths theta"}
        raise ValueError(
            f"--sigma-file {path} holds {what[then]} (ddrs optimize-sigma --noise {then}); this run uses "
            f"--noise {now}: give --noise {then}, or optimise for --noise {now}"
        )
