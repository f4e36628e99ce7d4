"""Benchmark session setup: thread count, kernel build before any timing, machine info for the json.

Threads: ``DDRS_BENCH_THREADS`` if set, else torch's default (one per core).
Every ratio in the report comes from one pytest run. How much CPU other
processes (and the hypervisor, as steal time) took during it is recorded,
because a busy machine skews the numbers.
"""

from __future__ import annotations

import os
import platform
import time

import torch

import ddrs_ext  # noqa: F401  (compiles the kernels now, not inside a timed round)

if os.environ.get("DDRS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DDRS_BENCH_THREADS"]))


def cpu_snapshot() -> dict[str, float] | None:
    """Seconds of busy and stolen CPU on the whole machine, and of this process, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    own = os.times()
    return {
        "wall": time.monotonic(),
        "busy": (user + nice + system + irq + softirq) / hz,
        "steal": steal / hz,
        "own": own.user + own.system + own.children_user + own.children_system,
    }


_LOAD_AT_START = os.getloadavg()
_CPU_AT_START = cpu_snapshot()


def others_share() -> dict[str, float]:
    """Fractions of all cores' time, since the session began, used by other processes and stolen."""
    end = cpu_snapshot()
    if _CPU_AT_START is None or end is None:
        return {}
    d = {k: end[k] - _CPU_AT_START[k] for k in end}
    capacity = d["wall"] * (os.cpu_count() or 1)
    return {"others": max(0.0, d["busy"] - d["own"]) / capacity, "steal": d["steal"] / capacity}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ddrs"] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_parallel_backend": "OpenMP" if "OpenMP" in torch.__config__.parallel_info() else "other",
        "ddrs_ext": ddrs_ext.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(_LOAD_AT_START),
        "loadavg_end": list(os.getloadavg()),
        "cpu_share_during_run": others_share(),
    }
