"""Cheaper forward passes: a model evaluated in lower precision, channels-last, or compiled.

The model's forward passes are almost all of certification's cost, on a GPU as on a CPU, so the way
the model is evaluated sets the cost. :class:`Evaluated` wraps a model so that every sampling entry
point (``certify``, ``predict``, ``optimize_sigma``, ``certify_sequential``, ``certify_dual``,
``Smooth``, the training losses) evaluates it compiled by ``torch.compile``, under
``torch.autocast`` (bfloat16 or float16) and/or with channels-last inputs.

What a certificate then means. A certificate is about the function that was sampled.

- ``compile`` and ``channels_last`` evaluate the same function in the same precision: the logits
  differ from the eager model's in the last bits only (as the eager model's own do between CPU
  types, thread counts and batch sizes), so a noisy copy's vote changes only when it lies within
  rounding of a decision boundary (the benchmarks count them: benchmarks/bench_evaluated.py).
- ``autocast`` changes the function: matrix products and convolutions run in bfloat16 (or float16),
  so a certificate computed through ``Evaluated(model, autocast=torch.bfloat16)`` is about the model
  *as evaluated in bfloat16*; deploy it that way.

Where torch cannot do what was asked, :class:`Evaluated` evaluates the model another way and says so
in one :class:`EvaluationWarning` (one line): a model that ``torch.compile`` cannot compile (an
unsupported op, no C++ compiler for the inductor backend) runs uncompiled; ``torch.compile`` does
not carry forward-mode derivatives, so ``optimize_sigma(estimator="reparam")`` evaluates the model
uncompiled; an autocast dtype that torch does not support on the inputs' device falls back to the
model's own precision (the warning says the certificate is then about that function). On a CPU
without native bfloat16 instructions (AVX-512 BF16 or AMX) bfloat16 autocast runs emulated and is
usually slower than float32: a warning says so, and the model is still evaluated in bfloat16, as
asked.

:func:`compile_pays` is the rule ``ddrs`` uses to compile by default: on the CPU, for runs of at
least :data:`COMPILE_MIN_ROWS` forward rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["AUTOCAST_DTYPES", "COMPILE_MIN_ROWS", "EvaluationWarning", "Evaluated", "compile_pays"]

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)

#: Forward rows (noisy copies evaluated) from which compiling the model pays on a CPU: below, the
#: compilation (tens of seconds with a cold cache) costs more than it saves. Set from
#: benchmarks/bench_evaluated.py on the digits CNN, the cheapest model per row that ddrs ships, so
#: that a costlier model (which repays its compilation sooner) is covered too.
COMPILE_MIN_ROWS = 2_000_000


class EvaluationWarning(RuntimeWarning):
    """:class:`Evaluated` evaluates the model otherwise than asked (or slower than one would expect);
    the message, one line, says how and what that means for a certificate."""


def compile_pays(rows: int, device: torch.device | str) -> bool:
    """Whether compiling the model is expected to pay for a run of ``rows`` forward rows on ``device``:
    on the CPU from :data:`COMPILE_MIN_ROWS` rows (measured: benchmarks/bench_evaluated.py); never on
    other devices, where it was not measured (ask for it: ``Evaluated(model, compile=True)``)."""
    return torch.device(device).type == "cpu" and rows >= COMPILE_MIN_ROWS


def _native_cpu_dtype(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for ``dtype`` matrix products (else oneDNN emulates them)."""
    cpu = torch.cpu
    checks = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }[dtype]
    found = [getattr(cpu, name, None) for name in checks]
    if not any(callable(f) for f in found):
        return True  # this torch cannot tell: no warning
    return any(callable(f) and f() for f in found)


class Evaluated(torch.nn.Module):
    """``model`` evaluated with the given precision, memory format and compilation.

    autocast: ``torch.bfloat16`` or ``torch.float16``: the forward runs under
    ``torch.autocast(device, dtype)`` (matrix products and convolutions in that dtype); logits come
    back in whatever dtype the model returns them (the vote kernels take any float dtype). This
    changes the function that is certified: deploy the model evaluated that way.
    channels_last: 4-d inputs are given to the model in channels-last memory format (convolutions
    then pick NHWC kernels when the model's weights are channels-last too:
    ``model.to(memory_format=torch.channels_last)``).
    compile: ``False``; ``True`` for ``torch.compile(model)``; or a dict of ``torch.compile``
    keyword arguments, e.g. ``{"mode": "reduce-overhead"}`` (CUDA graphs). The batch dimension is
    compiled as dynamic (unless the dict sets ``dynamic``), so the last, smaller forward batch of a
    run does not compile the model a second time. Compilation happens at the first call.

    torch's forward-mode autograd does not run under autocast, so optimise sigma through an autocast
    model with ``estimator="score"`` (forward passes only); ``"reparam"`` raises a ValueError saying so.
    Where torch cannot compile the model or autocast on the inputs' device, the model is evaluated
    without it and an :class:`EvaluationWarning` says so (see the module's documentation); the
    attributes ``autocast`` and ``compile_options`` then say what is evaluated, and ``notes``
    lists the warnings' messages. ``notify``: a function that receives each such message instead
    (an application's logger), in place of the warning.

    The wrapped model is a submodule, so eval/train modes, ``.to()``, ``parameters()`` and
    ``state_dict()`` reach it; the sampling entry points evaluate it in eval mode as they do any module.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        *,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        notify: Callable[[str], None] | None = None,
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
        if notify is not None and not callable(notify):
            raise TypeError(f"notify must be None or a function of one string, got {notify!r}")
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last
        self.compile_options: dict[str, Any] | None = (
            None if compile is False else {} if compile is True else dict(compile)
        )
        self.notes: list[str] = []
        self.notify = notify
        # not registered submodules: they wrap the same model, whose state must appear once
        object.__setattr__(self, "_compiled", None)
        object.__setattr__(self, "_checked_devices", set())
        object.__setattr__(self, "_mark_batch", "dynamic" not in (self.compile_options or {}))

    # ------------------------------------------------------------------------- fallbacks

    def _warn(self, text: str) -> None:
        self.notes.append(text)
        if self.notify is not None:
            self.notify(text)
        else:
            warnings.warn(text, EvaluationWarning, stacklevel=4)

    def _check_autocast(self, device_type: str) -> None:
        """Once per device type: can torch autocast to ``self.autocast`` there? Falls back if not."""
        if device_type in self._checked_devices:
            return
        self._checked_devices.add(device_type)
        dtype = self.autocast
        name = str(dtype).removeprefix("torch.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's own, multi-line "Disabling autocast" warning
                with torch.autocast(device_type=device_type, dtype=dtype):
                    enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, ValueError):
            enabled = False
        if not enabled:
            self.autocast = None
            self._warn(
                f"torch cannot autocast to {name} on {device_type}: the model is evaluated in its own "
                "precision, and certificates are about the model so evaluated"
            )
        elif device_type == "cpu" and not _native_cpu_dtype(dtype):
            self._warn(
                f"this CPU has no native {name} instructions: autocast to {name} runs emulated and is "
                "usually slower than float32 here (the model is still evaluated in "
                f"{name}, as asked)"
            )

    def _compile_failed(self, exc: BaseException) -> None:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        self.compile_options = None
        object.__setattr__(self, "_compiled", None)
        self._warn(
            f"torch.compile could not compile the model ({type(exc).__name__}: {text}); it is evaluated "
            "uncompiled (the same function)"
        )

    # ------------------------------------------------------------------------- evaluation

    def _call(self, x: torch.Tensor, dual: bool) -> torch.Tensor:
        if self.compile_options is None:
            return self.model(x)
        if dual:
            if not any("forward-mode" in f for f in self.notes):
                self._warn(
                    "torch.compile does not carry forward-mode derivatives: forward passes with them "
                    "(optimize_sigma's estimator='reparam') evaluate the model uncompiled (the same function)"
                )
            return self.model(x)
        if self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.model, **self.compile_options))
        if self._mark_batch and x.dim() > 0 and x.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        try:
            out = self._compiled(x)
        except Exception as exc:
            out = self.model(x)  # the model's own error, if it is not the compiler's, surfaces here
            self._compile_failed(exc)
            return out
        object.__setattr__(self, "_mark_batch", False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dual = fwAD.unpack_dual(x).tangent is not None
        if self.autocast is not None:
            self._check_autocast(x.device.type)
        if self.autocast is None:
            return self._call(x, dual)
        if dual:
            raise ValueError(
                "torch's forward-mode autograd (optimize_sigma's estimator='reparam') does not run under "
                "autocast; use estimator='score' with an autocast model, or optimise sigma on the model "
                "itself"
            )
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            return self._call(x, dual)

    def extra_repr(self) -> str:
        compile = "off" if self.compile_options is None else (self.compile_options or "on")
        return f"autocast={self.autocast}, channels_last={self.channels_last}, compile={compile}"
