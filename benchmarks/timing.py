"""Interleaved rounds: ratios of times measured side by side.

On a shared or virtualised machine the speed drifts by tens of percent, over
fractions of a second to minutes, and pytest-benchmark runs all rounds of one
benchmark before the next, so a ratio of two benchmarks' times would also
measure the drift.
:func:`pedantic_interleaved` runs one round of every comparison function (its
baseline, its reference) right before each round of the benchmark and stores
all the round times in ``extra_info["interleaved"]`` by benchmark name; the
report divides those.

On a GPU the work is queued, so every timed call ends with ``sync`` (see
:func:`synchronizer`): a round's time is then the time until its kernels have
finished. Work that takes well under a millisecond is repeated inside a round
by the benchmark itself, so that the synchronisation is a small part of it.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _nothing() -> None:
    pass


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _nothing


def synced(fn: Callable[[], Any], sync: Callable[[], None]) -> Callable[[], Any]:
    """``fn`` followed by ``sync``, for ``benchmark.pedantic``."""
    if sync is _nothing:
        return fn

    def call() -> Any:
        result = fn()
        sync()
        return result

    return call


def pedantic_interleaved(
    benchmark,
    target: Callable[[], Any],
    others: dict[str, Callable[[], Any]],
    rounds: int,
    warmup_rounds: int = 1,
    sync: Callable[[], None] = _nothing,
) -> Any:
    """``benchmark.pedantic(target)``, with each of ``others`` (name: function) timed before every round."""
    times: dict[str, list[float]] = {name: [] for name in others}
    own: list[float] = []

    order = list(others)

    def setup() -> None:
        for name in order:
            sync()
            start = time.perf_counter()
            others[name]()
            sync()
            times[name].append(time.perf_counter() - start)
        order.append(order.pop(0))  # no comparison always runs right before the benchmark

    def timed() -> Any:
        start = time.perf_counter()
        result = target()
        sync()
        own.append(time.perf_counter() - start)
        return result

    result = benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    kept = slice(warmup_rounds, warmup_rounds + rounds)
    rounds_by_name = {benchmark.name: own[kept], **{k: v[kept] for k, v in times.items()}}
    benchmark.extra_info["interleaved"] = rounds_by_name
    return result


def _caller(stack: list[traceback.FrameSummary]) -> str:
    """``file:line (function)`` of the innermost frame in ddrs_ext, else the innermost outside torch."""
    for marker in ("/ddrs_ext/", None):
        for frame in reversed(stack):
            path = frame.filename.replace("\\", "/")
            inside = (
                marker in path
                if marker
                else not any(part in path for part in ("/torch/", "/warnings.py", "/timing.py"))
            )
            if inside:
                return f"{Path(path).name}:{frame.lineno} ({frame.name})"
    return "?"


# CUDA runtime calls that block the host until the device has caught up.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _runtime_syncs(fn: Callable[[], Any]) -> Counter[str]:
    """The blocking CUDA runtime calls made during ``fn()``, by name, as torch's profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name in SYNC_CALLS)


def count_syncs(fn: Callable[[], Any], device: torch.device, profile: bool = True) -> dict | None:
    """The device-to-host synchronisations of ``fn()`` on a CUDA device, counted in two calls:

    - ``total`` and ``where``: as torch's sync debug mode reports them (``.item()``, ``.cpu()``,
      ``nonzero``, copies to the host, from Python or C++), by place, the place being the innermost
      Python frame in ddrs_ext (else the innermost outside torch): ``{"file:line (function)": n}``;
    - ``runtime_total`` and ``runtime_calls``: the blocking CUDA runtime calls (``SYNC_CALLS``) that
      torch's profiler saw, which also catches synchronisations the debug mode does not report
      (``runtime_error`` instead if the profiler failed); only with ``profile``, since the profiler
      takes seconds to sort the events of a long call.

    None on other devices.
    """
    if device.type != "cuda":
        return None
    where: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            where[_caller(traceback.extract_stack()[:-1])] += 1

    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize(device)
    result: dict[str, Any] = {"total": sum(where.values()), "where": dict(where.most_common())}
    if not profile:
        return result
    # A second call under the profiler, less what the profiler itself does (it synchronises on exit).
    try:
        calls = _runtime_syncs(fn) - _runtime_syncs(_nothing)
        result["runtime_calls"] = dict(calls)
        result["runtime_total"] = sum(calls.values())
    except Exception as err:  # informative only; the debug mode's count stands
        result["runtime_error"] = f"{type(err).__name__}: {err}"[:200]
    return result
