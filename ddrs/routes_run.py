"""The work of ``ddrs certify``'s training-free routes (options: :mod:`ddrs.route_options`): --cascade
(:func:`ddrs_ext.routing.certify_cascade`) and the selector of --confidence-routing
(:class:`ddrs_ext.routing.ConfidenceSelector`), and the selector sigma a dual run uses when none is
given."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ddrs.checkpoints import is_selector_checkpoint
from ddrs.results import CASCADE_COLUMNS
from ddrs.route_options import DEFAULT_CASCADE_THRESHOLD
from ddrs.weights import load_weights
from ddrs_ext.certification import ABSTAIN
from ddrs_ext.dual import default_selector_sigma
from ddrs_ext.routing import ConfidenceSelector, cascade_alphas, certify_cascade

__all__ = ["Cascade", "cascade_summary", "confidence_selector", "resolve_selector_sigma"]


def resolve_selector_sigma(args: argparse.Namespace) -> float:
    """--selector-sigma as given; else the sigma a --selector-checkpoint of ``ddrs train`` was trained at;
    else the largest of --sigma-levels (:func:`ddrs_ext.dual.default_selector_sigma`)."""
    if args.selector_sigma is not None:
        return float(args.selector_sigma)
    if getattr(args, "selector_checkpoint", None) is not None:
        content = load_weights(args.selector_checkpoint, "--selector-checkpoint")
        if is_selector_checkpoint(content) and content.get("selector_sigma") is not None:
            return float(content["selector_sigma"])
    return default_selector_sigma(args.sigma_levels)


def confidence_selector(args: argparse.Namespace, model) -> ConfidenceSelector:
    """--confidence-routing's selector over the run's experts (``model``: one model, or one per level)."""
    K = len(args.sigma_levels)
    experts = list(model) if isinstance(model, (list, tuple)) else [model] * K
    return ConfidenceSelector(experts, list(args.confidence_routing))


class Cascade:
    """``ddrs certify --cascade``: per chunk of inputs, :func:`ddrs_ext.routing.certify_cascade` of the
    run's model (or one expert per level), and what it adds to the result file."""

    def __init__(self, args: argparse.Namespace, model) -> None:
        self.args, self.model = args, model
        self.levels = list(args.sigma_levels)
        self.threshold = (
            DEFAULT_CASCADE_THRESHOLD if args.cascade_threshold is None else args.cascade_threshold
        )
        self.alphas = list(cascade_alphas(args.alpha, len(self.levels), args.alpha_levels))
        self.columns = CASCADE_COLUMNS
        self.sigma_setting = {
            "levels": self.levels,
            "route": "cascade",
            "cascade_threshold": self.threshold,
            "alpha_levels": self.alphas,
        }

    def __call__(self, x: torch.Tensor, index: torch.Tensor, common: dict):
        args = self.args
        return certify_cascade(
            self.model,
            x,
            self.levels,
            threshold=self.threshold,
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            alpha_levels=self.alphas,
            noise=getattr(args, "noise", "gaussian"),
            **common,
        )


def cascade_summary(rows: Sequence[dict], levels: Sequence[float]) -> str:
    """What the summary line adds for a cascade file: where the inputs were answered, how many
    abstained, and on how many a higher level's abstention radius was the smaller."""
    answered = ", ".join(f"σ = {s:g}: {sum(r['level'] == k for r in rows)}" for k, s in enumerate(levels))
    bound = sum(r["radius_above"] < r["radius_level"] for r in rows if r["predict"] != ABSTAIN)
    abstained = sum(r["predict"] == ABSTAIN for r in rows)
    return (
        f"; the cascade answered at {answered}, abstained on {abstained}, and a higher level's abstention "
        f"radius was the smaller on {bound}"
    )
