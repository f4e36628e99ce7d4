"""``ddrs certify``'s training-free routes between sigma levels (:mod:`ddrs_ext.routing`): the options
--cascade (with --cascade-threshold, --alpha-levels) and --confidence-routing, and their checks (no
torch). Their work: :mod:`ddrs.routes_run`."""

from __future__ import annotations

import argparse

from ddrs.options import number, probability

__all__ = ["DEFAULT_CASCADE_THRESHOLD", "add_route_options", "check_routes", "route_of"]

DEFAULT_CASCADE_THRESHOLD = 0.5
_threshold = number(float, minimum=0.5, below=1, what="a number")
_confidence = number(float, above=0, what="a number")


def add_route_options(p: argparse.ArgumentParser) -> None:
    """The option group of the training-free routes (with --sigma-levels, instead of a selector)."""
    g = p.add_argument_group(
        "training-free routes between --sigma-levels (ddrs_ext.routing; no selector)",
        "--cascade: from the largest sigma down, the first level whose smoothed model gives one class\n"
        "probability >= P0 answers (ddrs_ext.routing.certify_cascade); the radius also stays inside the\n"
        "abstention regions of the levels above. Columns level radius_level radius_above stopped.\n"
        "--confidence-routing T1 ... T(K-1): the selector of the dual certificate is the experts' own\n"
        "confidence (ddrs_ext.routing.ConfidenceSelector): the largest level k whose model's top softmax\n"
        "probability on the noisy input is >= T_k, else the lowest; smoothed at --selector-sigma.",
    )
    g.add_argument("--cascade", action="store_true", help="certify with the cascade over --sigma-levels")
    g.add_argument(
        "--cascade-threshold",
        type=_threshold,
        metavar="P0",
        help="the probability a level's class needs to answer, in [0.5, 1) "
        f"(default {DEFAULT_CASCADE_THRESHOLD:g})",
    )
    g.add_argument(
        "--alpha-levels",
        nargs="+",
        type=probability,
        metavar="A",
        help="the cascade's failure probability per level, adding up to at most --alpha "
        "(default: --alpha / K each)",
    )
    g.add_argument(
        "--confidence-routing",
        nargs="+",
        type=_confidence,
        metavar="T",
        help="one confidence threshold in (0, 1] per level above the lowest: route by the experts' "
        "confidence",
    )


def route_of(args: argparse.Namespace) -> str | None:
    """``"cascade"``, ``"confidence"`` or None (a selector, or no levels)."""
    if getattr(args, "cascade", False):
        return "cascade"
    if getattr(args, "confidence_routing", None) is not None:
        return "confidence"
    return None


def check_routes(args: argparse.Namespace) -> None:
    """The checks of the route options (a ValueError is a usage error)."""
    route = route_of(args)
    if route is None:
        if args.cascade_threshold is not None or args.alpha_levels is not None:
            raise ValueError("--cascade-threshold and --alpha-levels are for --cascade")
        return
    if args.sigma_levels is None:
        raise ValueError(
            f"--{'cascade' if route == 'cascade' else 'confidence-routing'} needs --sigma-levels"
        )
    if args.cascade and args.confidence_routing is not None:
        raise ValueError("--cascade and --confidence-routing are two routes: give one")
    if args.selector is not None or args.selector_checkpoint is not None:
        raise ValueError(
            f"--{'cascade' if route == 'cascade' else 'confidence-routing'} routes without a selector: drop "
            "--selector and --selector-checkpoint"
        )
    K = len(args.sigma_levels)
    if route == "cascade":
        if getattr(args, "sequential", False):
            raise ValueError(
                "--sequential does not apply to --cascade (the cascade draws CERTIFY's samples at each "
                "level it visits); --confidence-routing and --selector run sequentially"
            )
        if args.selector_sigma is not None or args.alpha_selector is not None:
            raise ValueError("--selector-sigma and --alpha-selector do not apply to --cascade (no selector)")
        if args.alpha_levels is not None:
            if len(args.alpha_levels) != K:
                raise ValueError(
                    f"--alpha-levels needs one value per level ({K}), got {len(args.alpha_levels)}"
                )
            if sum(args.alpha_levels) > args.alpha * (1 + 1e-12):
                raise ValueError(
                    f"--alpha-levels add up to {sum(args.alpha_levels):g}, more than --alpha {args.alpha:g}"
                )
        return
    if args.cascade_threshold is not None or args.alpha_levels is not None:
        raise ValueError("--cascade-threshold and --alpha-levels are for --cascade")
    if K < 2:
        raise ValueError("--confidence-routing routes between at least 2 levels (--sigma-levels)")
    if len(args.confidence_routing) != K - 1:
        raise ValueError(
            f"--confidence-routing needs one threshold per level above the lowest ({K - 1}), got "
            f"{len(args.confidence_routing)}"
        )
    if any(t > 1 for t in args.confidence_routing):
        raise ValueError(f"--confidence-routing thresholds must lie in (0, 1], got {args.confidence_routing}")
