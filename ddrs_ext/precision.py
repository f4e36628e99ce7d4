"""Cheaper forward passes: a model evaluated in lower precision, channels-last, or compiled.

On a GPU the model's forward pass is almost all of certification, so the way it is evaluated sets
the cost. :class:`Evaluated` wraps a model so that every sampling entry point (``certify``,
``predict``, ``optimize_sigma``, ``certify_sequential``, ``certify_dual``, ``Smooth``) evaluates it
under ``torch.autocast`` (bfloat16 or float16), with channels-last inputs, and/or compiled by
``torch.compile`` (``mode="reduce-overhead"`` captures CUDA graphs for the fixed batch shape).

A certificate is about the function that was sampled: one computed through ``Evaluated(model,
autocast=torch.bfloat16)`` certifies the model *as evaluated in bfloat16*, so deploy it that way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class Evaluated(torch.nn.Module):
    """``model`` evaluated with the given precision, memory format and compilation.

    autocast: ``torch.bfloat16`` or ``torch.float16``: the forward runs under
    ``torch.autocast(device, dtype)`` (matrix products and convolutions in that dtype); logits come
    back in whatever dtype the model returns them (the vote kernels take any float dtype).
    channels_last: 4-d inputs are given to the model in channels-last memory format (convolutions
    then pick NHWC kernels when the model's weights are channels-last too:
    ``model.to(memory_format=torch.channels_last)``).
    compile: ``False``; ``True`` for ``torch.compile(model)``; or a dict of ``torch.compile``
    keyword arguments, e.g. ``{"mode": "reduce-overhead"}`` (CUDA graphs) or ``{"dynamic": False}``.

    torch's forward-mode autograd does not run under autocast, so optimise sigma through an autocast
    model with ``estimator="score"`` (forward passes only); ``"reparam"`` raises a ValueError saying so.

    The wrapped model is a submodule, so eval/train modes, ``.to()`` and ``state_dict()`` reach it;
    the sampling entry points evaluate it in eval mode as they do any module.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        *,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {model!r}")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {channels_last!r}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        # not a registered submodule: it wraps the same model, whose state must appear once
        object.__setattr__(self, "_compiled", None)

    def _target(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.compile_options is None:
            return self.model
        if self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.model, **self.compile_options))
        return self._compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        target = self._target()
        if self.autocast is None:
            return target(x)
        if fwAD.unpack_dual(x).tangent is not None:
            raise ValueError(
                "torch's forward-mode autograd (optimize_sigma's estimator='reparam') does not run under "
                "autocast; use estimator='score' with an autocast model, or optimise sigma on the model "
                "itself"
            )
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            return target(x)

    def extra_repr(self) -> str:
        compile = "off" if self.compile_options is None else (self.compile_options or "on")
        return f"autocast={self.autocast}, channels_last={self.channels_last}, compile={compile}"
