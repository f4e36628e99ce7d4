"""Benchmark session setup: options, thread count, kernel build before any timing, machine info for the json.

Options (``pytest benchmarks/ --help``, group "ddrs_ext benchmarks"):
  --device cpu|cuda|cuda:N  where the benchmarks run (default cpu). A module runs on the devices its
                            ``DEVICES`` tuple names (default: the CPU only); the others skip.
  --quick                   small sizes and few rounds: proves the code runs and exercises the report
                            (also implied by --benchmark-disable, which CI uses).
Threads: ``DDRS_BENCH_THREADS`` if set, else torch's default (one per core).
Every ratio in the report comes from one pytest run. How much CPU other
processes (and the hypervisor, as steal time) took during it is recorded,
because a busy machine skews the numbers.
"""

from __future__ import annotations

import os
import platform
import time

import pytest
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


def pytest_addoption(parser) -> None:
    group = parser.getgroup("ddrs", "ddrs_ext benchmarks")
    group.addoption(
        "--device",
        default="cpu",
        help="where to run: cpu (default), cuda or cuda:N; modules that do not list the device in their "
        "DEVICES skip",
    )
    group.addoption(
        "--quick",
        action="store_true",
        help="small sizes and few rounds (implied by --benchmark-disable)",
    )


def bench_device(config) -> torch.device:
    """The --device option, checked: a usage error if it names no device of this machine."""
    value = config.getoption("device")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise pytest.UsageError(f"--device {value}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {value!r}")
    return device


def is_quick(config) -> bool:
    return bool(config.getoption("quick") or config.getoption("benchmark_disable"))


def pytest_configure(config) -> None:
    device = bench_device(config)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)  # so that "cuda" tensors made without an index land there too


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The --device the benchmarks run on."""
    return bench_device(request.config)


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True for --quick or --benchmark-disable: small sizes, few rounds."""
    return is_quick(request.config)


def pytest_collection_modifyitems(config, items) -> None:
    device = bench_device(config)
    for item in items:
        module = getattr(item, "module", None)
        devices = getattr(module, "DEVICES", ("cpu",))
        if device.type not in devices:
            item.add_marker(
                pytest.mark.skip(reason=f"{module.__name__} benchmarks run on {', '.join(devices)} only")
            )


# Markdown lines a benchmark module adds (bench_evaluated.py's tables), printed at the end of the run.
SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if SUMMARY:
        terminalreporter.write_sep("=", "ddrs_ext benchmark tables")
        share = others_share()
        if share:
            terminalreporter.write_line(
                f"(during the run other processes used {share['others']:.0%} of the CPU time, "
                f"steal {share['steal']:.0%}; load average at the start {_LOAD_AT_START[0]:.1f}, "
                f"now {os.getloadavg()[0]:.1f}, on {os.cpu_count()} cores; {cpu_model()}; torch "
                f"{torch.__version__}, {torch.get_num_threads()} thread(s))"
            )
        for line in SUMMARY:
            terminalreporter.write_line(line)


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
        "device": str(bench_device(config)),
        "quick": is_quick(config),
    }
    if torch.cuda.is_available():
        machine_info["ddrs"]["gpu"] = gpu_info()


def gpu_info() -> dict:
    """The current CUDA device: name, capability, memory, the CUDA version torch was built with."""
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "torch_cuda": torch.version.cuda,
    }
