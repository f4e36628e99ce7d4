"""The checkpoint formats of ``ddrs train`` (``python -m ddrs.train_digits``): a digits classifier
(:data:`FORMAT`, written by :func:`ddrs.digits_training.train`) and a sigma selector for dual
certification (:data:`SELECTOR_FORMAT`, written by :func:`ddrs.selector.train_digits_selector`),
and their readers. Both hold a ``ddrs_ext.models:digits_cnn`` state_dict and their settings, and
are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch

from ddrs_ext import training

__all__ = [
    "BUILDER",
    "FORMAT",
    "SELECTOR_FORMAT",
    "SELECTOR_VERSIONS",
    "build",
    "is_classifier_checkpoint",
    "is_selector_checkpoint",
    "load_checkpoint",
    "load_selector_checkpoint",
]

BUILDER = "ddrs_ext.models:digits_cnn"
FORMAT = "ddrs_ext-checkpoint"
SELECTOR_FORMAT = "ddrs-selector-checkpoint"
#: Selector checkpoint versions read: 1 (labels from one classifier, best level) and 2 (also experts per
#: level, held-out and soft labels, the consistency term, a selector of your own: recorded beside it).
SELECTOR_VERSIONS = (1, 2)


def build(spec: str):
    """The callable named by ``spec`` (``"module:name"``), e.g. :data:`BUILDER`."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def is_classifier_checkpoint(content) -> bool:
    """Whether a ``torch.load``-ed object is a classifier checkpoint of ``ddrs train``."""
    return isinstance(content, Mapping) and content.get("format") == FORMAT


def is_selector_checkpoint(content) -> bool:
    """Whether a ``torch.load``-ed object is a selector checkpoint of ``ddrs train --selector-for``."""
    return isinstance(content, Mapping) and content.get("format") == SELECTOR_FORMAT


def load_checkpoint(path, map_location=None):
    """``(model in eval mode, SigmaBank or None, config dict)`` from a classifier checkpoint of
    ``ddrs train`` (``python -m ddrs.train_digits``)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a ddrs_ext training checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ddrs_ext training checkpoint")
    if state.get("version") != 1:
        raise ValueError(f"{path}: unknown checkpoint version {state.get('version')!r}")
    model = build(state["builder"])()
    model.load_state_dict(state["model"])
    model.eval()
    bank = None
    if state["sigma_bank"] is not None:
        sigma = state["sigma_bank"]["sigma"]
        lo, hi = float(sigma.min()), float(sigma.max())
        bank = training.SigmaBank(sigma.numel(), lo, sigma_range=(lo, max(lo, hi)))
        bank.load_state_dict(state["sigma_bank"])  # restores the values and the saved sigma_range
    return model, bank, state["config"]


def load_selector_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """``(selector in eval mode, checkpoint)`` from a selector checkpoint of ``ddrs train
    --selector-for`` (``weights_only=True``); a file of another kind raises ``ValueError``."""
    from ddrs_ext.models import digits_cnn

    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"{path} is not a selector checkpoint ({type(exc).__name__})") from None
    if not is_selector_checkpoint(state):
        raise ValueError(f"{path} is not a selector checkpoint of python -m ddrs.train_digits --selector-for")
    if state.get("version") not in SELECTOR_VERSIONS:
        raise ValueError(f"{path}: unknown selector checkpoint version {state.get('version')!r}")
    if state.get("builder") != BUILDER:
        raise ValueError(
            f"{path} holds the weights of a selector built by {state.get('builder')} (ddrs train "
            f"--selector-model): give it as --selector {state.get('builder')} --selector-checkpoint {path}"
        )
    selector = digits_cnn(int(state["num_levels"]))
    try:
        selector.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path}: the selector's weights do not fit its network ({first})") from None
    return selector.eval(), state
