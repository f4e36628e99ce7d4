"""Interleaved rounds: ratios of times measured side by side.

On a shared or virtualised machine the speed drifts by tens of percent, over
fractions of a second to minutes, and pytest-benchmark runs all rounds of one
benchmark before the next, so a ratio of two benchmarks' times would also
measure the drift.
:func:`pedantic_interleaved` runs one round of every comparison function (its
baseline, its reference) right before each round of the benchmark and stores
all the round times in ``extra_info["interleaved"]`` by benchmark name; the
report divides those.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def pedantic_interleaved(
    benchmark,
    target: Callable[[], Any],
    others: dict[str, Callable[[], Any]],
    rounds: int,
    warmup_rounds: int = 1,
) -> Any:
    """``benchmark.pedantic(target)``, with each of ``others`` (name: function) timed before every round."""
    times: dict[str, list[float]] = {name: [] for name in others}
    own: list[float] = []

    order = list(others)

    def setup() -> None:
        for name in order:
            start = time.perf_counter()
            others[name]()
            times[name].append(time.perf_counter() - start)
        order.append(order.pop(0))  # no comparison always runs right before the benchmark

    def timed() -> Any:
        start = time.perf_counter()
        result = target()
        own.append(time.perf_counter() - start)
        return result

    result = benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    kept = slice(warmup_rounds, warmup_rounds + rounds)
    rounds_by_name = {benchmark.name: own[kept], **{k: v[kept] for k, v in times.items()}}
    benchmark.extra_info["interleaved"] = rounds_by_name
    return result
