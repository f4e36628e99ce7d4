"""Benchmark session setup: thread count, kernel build before any timing, machine info for the json.

Threads: ``DDRS_BENCH_THREADS`` if set, else torch's default (one per core).
Every ratio in the report comes from one pytest run, so all of its numbers
share the machine state; the load average before and after is recorded because
a busy machine skews them.
"""

from __future__ import annotations

import os
import platform

import torch

import ddrs_ext  # noqa: F401  (compiles the kernels now, not inside a timed round)

if os.environ.get("DDRS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DDRS_BENCH_THREADS"]))

_LOAD_AT_START = os.getloadavg()


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
    }
