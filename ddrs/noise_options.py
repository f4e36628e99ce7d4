"""``--noise {gaussian,uniform}`` of ``ddrs certify``, ``predict``, ``optimize-sigma`` and ``train``:
the noise family, and with it the norm of the certified radii (Gaussian noise: L2 radii
``sigma * Phi^-1(p_lower)``; uniform noise on the cube ``[-theta, theta]^D``: L1 radii
``theta * (2 p_lower - 1)``, ``ddrs_ext.certify(..., noise="uniform")``).

With ``--noise uniform`` the sigma options (--sigma, --sigma-file, --sigma0, --sigma-range, ...) hold
the cube's half-width theta, ``--optimize`` and ``ddrs optimize-sigma`` run
``ddrs_ext.optimize_theta`` (``--paper``: ``ddrs_ext.PAPER_L1_SETTINGS``), the memory holds L1
certificates, and the result file's settings record ``"noise"`` and ``"norm"`` (files written before
they existed are Gaussian, L2; :mod:`ddrs.noise_settings` reads and checks them). ``--sigma-levels``
(dual certification, ``--cascade``, ``--confidence-routing``) then holds half-widths theta_k and
certifies L1 radii, and ``ddrs train --selector-for`` trains a uniform-noise selector. The
Gaussian-only options (``--clip``, ``--estimator score``; for training MACER, SmoothAdv and
``--sigma-estimator score``) are refused with uniform noise.

Imports neither torch, numpy nor ddrs_ext (``ddrs --help`` and argument errors answer at once).
"""

from __future__ import annotations

import argparse

__all__ = [
    "NOISES",
    "NORMS",
    "PAPER_L1_SETTINGS",
    "add_noise_option",
    "add_training_noise_option",
    "check_noise",
    "check_training_noise",
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

NOISE_HELP = (
    "noise family: gaussian (L2 radii sigma * Phi^-1(p_lower)) or uniform on the cube [-theta, theta]^D "
    "(L1 radii theta * (2 p_lower - 1), ddrs_ext.certify(noise='uniform')). With uniform, every sigma "
    "option (--sigma, --sigma-file, --sigma0, --sigma-range, --optimize) means the half-width theta, "
    "and --optimize/--paper run ddrs_ext.optimize_theta (--paper: ddrs_ext.PAPER_L1_SETTINGS)"
)
_THETA = " (--noise uniform: the cube's half-width theta)"
# the options whose values are noise scales (theta with --noise uniform)
_SCALES = ("sigma", "sigma_file", "sigma0", "sigma_range", "sigma_levels", "selector_sigma")


def add_noise_option(p: argparse.ArgumentParser) -> None:
    """Adds ``--noise`` to a command that certifies, predicts or optimises sigma (after its
    ``set_command``): its own group, a note on the sigma options' help that they mean theta with
    uniform noise, and :func:`check_noise` chained after the command's own check."""
    g = p.add_argument_group("noise (L2 or L1 certificates)")
    g.add_argument("--noise", choices=NOISES, default="gaussian", help=NOISE_HELP)
    for action in p._actions:  # the sigma options' help says what they mean with uniform noise
        if action.dest in _SCALES and action.help:
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
        "ddrs_ext.training.uniform_augmentation_loss, --data-dependent with update_sigma(noise='uniform'); "
        "with --selector-for, --sigma-levels and --selector-sigma are half-widths theta, the labels L1 "
        "radii and the selector's augmentation uniform)",
    )


def check_training_noise(args: argparse.Namespace) -> None:
    """``ddrs train --noise uniform``: refuses what is Gaussian-only (MACER, SmoothAdv, the score
    estimator); ``--selector-for`` then trains a selector with uniform noise (L1 labels)."""
    if getattr(args, "noise", "gaussian") != "uniform":
        return
    if args.scheme != "gaussian":
        raise ValueError(
            f"--scheme {args.scheme} is Gaussian-only (its loss is built on the Gaussian certificate or "
            "an L2 attack); with --noise uniform use --scheme gaussian (uniform augmentation)"
        )
    if args.sigma_estimator == "score":
        raise ValueError("--sigma-estimator score is Gaussian-only: use reparam with --noise uniform")


# ----------------------------------------------------------------------------- settings, labels
