"""Certification beside a competing busy process: torch's thread count and OpenMP's wait policy.

On a machine whose cores other processes also use, torch's default (one thread per core) can be
tens of times slower than one thread (issue 24): an OpenMP worker that reaches the end of a parallel
region first keeps a core busy spinning while it waits for the one whose core another process holds.
What the environment of a process decides (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT``) is read when the OpenMP runtime loads, with torch; so every setting runs in its
own child process (this file, run as ``python bench_contention.py --worker ...``), which times:

- ``certify``: ``ddrs_ext.certify`` of 16 digits-shaped inputs with an untrained ``digits_cnn``
  (n0 = 100, n = 20 000; the first call of the process, as a ``ddrs certify`` run makes it);
- ``noise kernel``: ddrs_ext's Gaussian-noise op (``perturb_gaussian_out``, whose loop is the
  kernel's own ``at::parallel_for``), repeated;
- ``noise ATen``: the same amount of noise from ATen's ``randn`` and ``addcmul`` (baselines.py).

Settings (``SETTINGS``): torch's default threads; one thread; the default threads with a passive wait
policy (``OMP_WAIT_POLICY=PASSIVE``: a waiting worker sleeps); the default threads with libgomp's
spin shortened to 10 000 iterations (``GOMP_SPINCOUNT``). The OpenMP runtime is libgomp for
torch's Linux wheels; ``torch.__config__.parallel_info()`` names it. The passive wait is what the
``import ddrs_ext`` sets before torch loads when the environment does not choose
(``ddrs_ext._threads.prefer_passive_wait``; the ``ddrs`` command line imports ddrs_ext first).

Competitors: each test runs with ``contenders`` busy processes (a Python loop each): one, as in
the issue, and none added (the quiet case, as quiet as the rest of the machine is; the quick run
skips it). In each round every setting runs
once, in an order that rotates from round to round, so that the machine's drift spreads over all
settings; the table gives each setting's median over rounds, the range, and the ratio of medians to
the best setting's. All settings must produce the same certificates. The competitors are killed at
the end of every test, whatever happens.

    pytest benchmarks/bench_contention.py                           # 3 rounds, n = 20 000
    pytest benchmarks/bench_contention.py --benchmark-disable      # quick: 1 round, n = 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

#: Name: the environment variables a child process gets on top of the parent's, less THREADING_VARS.
SETTINGS: dict[str, dict[str, str]] = {
    "default threads": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10 000": {"GOMP_SPINCOUNT": "10000"},
}
#: Removed from the children's environment, so that the benchmark's shell (COMMON advice:
#: OMP_NUM_THREADS=1) does not decide what is measured.
THREADING_VARS = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "KMP_BLOCKTIME",
    "DDRS_BENCH_THREADS",
)
WORKLOADS = ("certify", "noise kernel", "noise ATen")
FULL = {"n": 20_000, "samples": 2000, "repeat": 20, "rounds": 3}
QUICK = {"n": 200, "samples": 50, "repeat": 2, "rounds": 1}
# A busy Python loop that ends by itself once its parent (the benchmark) is gone, however it ended.
BUSY_LOOP = (
    "import os\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(1_000_000):\n"
    "        pass\n"
)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREADING_VARS}
    env.update(extra)
    return env


def start_contenders(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.kill()
    for p in processes:
        p.wait()


def run_worker(setting: str, sizes: dict[str, int]) -> dict:
    """One child process under ``SETTINGS[setting]``: its times (s) by workload, and what it certified."""
    args = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    args += [f"--{k}={sizes[k]}" for k in ("n", "samples", "repeat")]
    done = subprocess.run(
        args, env=child_env(SETTINGS[setting]), capture_output=True, text=True, check=False, cwd=HERE
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker under {setting!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary_lines(
    contenders: int, rounds: dict[str, list[dict]], sizes: dict[str, int], threads: int
) -> list[str]:
    """A markdown table: per workload and setting, median (min - max) over rounds, ÷ the best median."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "",
        f"Contention ({contenders} busy process(es) beside each child; {cores} usable cores; default "
        f"threads {threads}; {len(next(iter(rounds.values())))} interleaved round(s); certify: 16 "
        f"inputs, n0 = 100, n = {sizes['n']:,}; noise: 16 x {sizes['samples']} copies of 1x8x8, "
        f"{sizes['repeat']} calls). Median (min - max) seconds, ÷ the best median:",
        "",
        "| workload | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---:|" * len(SETTINGS),
    ]
    for workload in WORKLOADS:
        medians = {s: statistics.median(r["times"][workload] for r in rounds[s]) for s in SETTINGS}
        best = min(medians.values())
        cells = []
        for s in SETTINGS:
            times = [r["times"][workload] for r in rounds[s]]
            cells.append(f"{medians[s]:.3g} ({min(times):.3g} - {max(times):.3g}), {medians[s] / best:.2f}x")
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    return lines


@pytest.mark.benchmark(group="contention")
@pytest.mark.parametrize("contenders", [1, 0], ids=["1 busy process", "none added"])
def test_contention(benchmark, quick: bool, contenders: int) -> None:
    from conftest import SUMMARY

    if quick and contenders == 0:
        pytest.skip("the quick run measures beside one busy process only")
    sizes = QUICK if quick else FULL
    order = list(SETTINGS)
    rounds: dict[str, list[dict]] = {s: [] for s in SETTINGS}

    def one_round() -> None:
        for setting in order:
            rounds[setting].append(run_worker(setting, sizes))
        order.append(order.pop(0))

    competitors = start_contenders(contenders)
    try:
        time.sleep(0.2)  # let them start spinning
        benchmark.pedantic(one_round, rounds=sizes["rounds"], warmup_rounds=0, iterations=1)
    finally:
        stop(competitors)
    digests = {r["certified"] for runs in rounds.values() for r in runs}
    assert len(digests) == 1, "the settings certified differently"
    benchmark.extra_info["label"] = f"certify and noise under each setting, {contenders} busy process(es)"
    benchmark.extra_info["contention"] = {s: [r["times"] for r in runs] for s, runs in rounds.items()}
    threads = rounds["default threads"][0]["threads"]
    assert rounds["1 thread"][0]["threads"] == 1
    SUMMARY.extend(summary_lines(contenders, rounds, sizes, threads))


def worker(n: int, samples: int, repeat: int) -> dict:
    """The workloads, timed in this process (after torch and ddrs_ext are imported)."""
    import torch
    from baselines import PlainNoise

    import ddrs_ext
    from ddrs_ext import ops
    from ddrs_ext.models import digits_cnn

    times: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    model = digits_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.rand(16, 1, 8, 8, generator=g)
    start = time.perf_counter()
    result = ddrs_ext.certify(model, x, 0.25, n0=100, n=n, alpha=0.001, seed=0)
    times["certify"] = time.perf_counter() - start
    certified = torch.cat([result.prediction.double(), result.radius.double()]).numpy().tobytes()

    sigma = torch.full((16,), 0.25)
    stream = torch.arange(16)
    out = torch.empty(16 * samples, 1, 8, 8)
    plain = PlainNoise(x, sigma, samples)
    for name, call in (
        ("noise kernel", lambda: ops.perturb_gaussian_out(x, sigma, stream, 1, 0, samples, 0, out)),
        ("noise ATen", plain),
    ):
        call()  # first call outside the timing
        start = time.perf_counter()
        for _ in range(repeat):
            call()
        times[name] = time.perf_counter() - start
    return {
        "times": times,
        "threads": torch.get_num_threads(),
        "certified": hashlib.sha256(certified).hexdigest(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the child process of bench_contention.py")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--repeat", type=int, required=True)
    a = parser.parse_args()
    sys.path.insert(0, str(HERE))
    print(json.dumps(worker(a.n, a.samples, a.repeat)))
