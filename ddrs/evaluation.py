"""How ``ddrs`` commands evaluate the model: --autocast (a different function, compared on a resume),
--compile and --channels-last (the same function: recorded only), and the --compile auto rule that
compiles where the run is long enough to repay it (:func:`evaluation_choice`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ddrs_ext.precision import Evaluated, compile_pays

__all__ = ["evaluation_choice", "forward_rows_per_input"]


def _evaluated_settings(args: argparse.Namespace) -> dict:
    """--autocast, when given: it changes the function that is certified, so it belongs to the
    settings that a resume must match (under "evaluated")."""
    autocast = getattr(args, "autocast", None)
    return {"autocast": autocast} if autocast else {}


def forward_rows_per_input(args: argparse.Namespace) -> int:
    """Forward rows (noisy copies through the model) that the command evaluates per input, at least,
    in forward passes that torch.compile speeds up (optimize_sigma's reparam estimator runs
    uncompiled: forward-mode autograd does not go through a compiled model)."""
    options = getattr(args, "optimize_options", None)
    sigma_rows = 0
    if options is not None and options["estimator"] != "reparam":
        sigma_rows = options["iterations"] * options["num_samples"]
    if args.command == "predict":
        return args.n
    if args.command == "optimize-sigma":
        return sigma_rows + args.surrogate_samples
    n = args.n
    if getattr(args, "sequential", False):
        from ddrs_ext.sequential import round_schedule

        n = round_schedule(args.n, args.alpha).ends[0]  # every input runs the first round
    return sigma_rows + args.n0 + n


def evaluation_choice(args: argparse.Namespace, rows: int, device: torch.device, convolutional: bool) -> dict:
    """How the model is evaluated (the same function either way), for a run of ``rows`` forward rows:
    ``{"compile": MODE or "off", "channels_last": bool, "auto": bool, "forward_rows": rows}``.
    --compile auto compiles (mode "default") where :func:`ddrs_ext.precision.compile_pays` (on the
    CPU, from COMPILE_MIN_ROWS rows) and then gives a ``convolutional`` model (4-d weights)
    channels-last weights and inputs too (measured faster compiled on the CPU); --channels-last asks
    for channels-last always."""
    given = getattr(args, "compile", None) or "off"
    auto = given == "auto"
    mode = ("default" if compile_pays(rows, device) else "off") if auto else given
    channels_last = bool(getattr(args, "channels_last", False)) or (auto and mode != "off" and convolutional)
    return {"compile": mode, "channels_last": channels_last, "auto": auto, "forward_rows": rows}


def _convolutional(model) -> bool:
    return isinstance(model, torch.nn.Module) and any(p.dim() == 4 for p in model.parameters())


def _evaluated(model, autocast: str | None, evaluation: dict, note: Callable[[str], None]):
    """``model`` wrapped in ddrs_ext.Evaluated as chosen (channels-last weights converted in place),
    its fallbacks said by ``note``."""
    channels_last = evaluation["channels_last"]
    if isinstance(model, torch.nn.Module):
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    compile = False if evaluation["compile"] == "off" else {"mode": evaluation["compile"]}
    return Evaluated(model, autocast=dtype, channels_last=channels_last, compile=compile, notify=note)
