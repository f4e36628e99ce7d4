"""The noise and norm of a result file (``ddrs certify/predict/optimize-sigma --noise``,
:mod:`ddrs.noise_options`): what its settings record, how ``ddrs analyze`` names its radii, and the
refusals to resume a file, or to read a --sigma-file, made for the other noise. Files written before
``--noise`` existed have neither setting: they are Gaussian, their radii L2
(:data:`ddrs.results.IMPLIED_SETTINGS`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from ddrs.noise_options import NORMS
from ddrs.result_notes import read_settings, resumed_settings
from ddrs.results import IMPLIED_SETTINGS

__all__ = [
    "check_resumed_noise",
    "check_sigma_file_noise",
    "noise_settings",
    "norm_of",
    "note_checkpoint_noise",
    "radius_label",
    "setting",
]


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
    """``settings[key]`` for "noise" or "norm", with its implied value for files without it."""
    value = None if settings is None else settings.get(key)
    return IMPLIED_SETTINGS[key] if value is None else value


def check_resumed_noise(args: argparse.Namespace) -> None:
    """Refuses, with a message that says what to give, to resume a result file made with the other
    noise (the generic settings check would refuse it too, less plainly)."""
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


def note_checkpoint_noise(args: argparse.Namespace, note) -> None:
    """``note(text)`` when --checkpoint alone is a checkpoint of ``ddrs train`` trained with the other
    noise than this run's --noise (checkpoints without ``"noise"`` in their config are Gaussian):
    legitimate, but most likely a forgotten --noise."""
    if getattr(args, "model", None) is not None or getattr(args, "checkpoint", None) is None:
        return
    from ddrs.checkpoints import is_classifier_checkpoint
    from ddrs.weights import load_weights

    content = load_weights(args.checkpoint, "--checkpoint")
    if not is_classifier_checkpoint(content) or not isinstance(content.get("config"), Mapping):
        return
    trained, now = content["config"].get("noise") or "gaussian", getattr(args, "noise", "gaussian")
    if trained != now:
        note(
            f"--checkpoint {args.checkpoint} was trained with {trained} noise (ddrs train --noise "
            f"{trained}); this run uses --noise {now}"
        )
