"""Memory-based certification: ``CertificationMemory.adjust`` next to a plain PyTorch loop.

The stream: ``QUERIES`` certified answers on digits-sized inputs (1x8x8): digits images drawn with
replacement plus N(0, 0.05^2) jitter, random classes 0-9, 10% abstentions (radius 0), radii uniform
in [0, 1). Pairwise distances have a median of about 3.1 and a 1st percentile of about 1.6, so
the balls interact: about a tenth of the answers change class and a third shrink (the counts are
in extra_info). Every round starts from an empty memory.

``baselines.plain_memory_adjust`` handles one query at a time (distances to every stored entry,
then the rule); ddrs_ext's ``adjust`` runs with all queries in one call, in calls of 100 (a
certify batch) and with one query per call, each in rounds interleaved with the plain loop
(timing.py). Every ddrs_ext result must equal the plain loop's bit for bit.

On a GPU (``--device cuda``) the memory and the plain loop keep their entries on the GPU, and
each round of ddrs_ext's is also interleaved with the same calls to a memory on the CPU
(``test_memory_ddrs_cpu[...]``): the GPU memory should be at least as fast per call. Results there
must equal the plain loop's classes exactly and its radii to float64 rounding (the GPU's distances
may differ from the plain loop's in the last bits).

With ``--quick`` or ``--benchmark-disable`` (CI) the stream has 200 queries.
"""

from __future__ import annotations

import pytest
import torch
from baselines import digits, plain_memory_adjust
from timing import pedantic_interleaved, synced, synchronizer

from ddrs_ext import ABSTAIN
from ddrs_ext.memory import CertificationMemory

DEVICES = ("cpu", "cuda")
QUERIES, QUICK_QUERIES = 2000, 200
MODES = {"one_call": None, "calls_of_100": 100, "per_query": 1}  # queries per adjust call (None: all)
ROUNDS = {
    "cpu": {"one_call": 10, "calls_of_100": 10, "per_query": 5},
    "cuda": {"one_call": 5, "calls_of_100": 5, "per_query": 1},
}
PLAIN_ROUNDS = {"cpu": 5, "cuda": 2}
PLAIN = "test_memory_plain"


class MemoryCase:
    def __init__(self, queries: int, device: torch.device) -> None:
        (x_train, _), (x_test, _) = digits(seed=0)
        images = torch.cat([x_train, x_test])
        g = torch.Generator().manual_seed(7)
        pick = torch.randint(0, images.shape[0], (queries,), generator=g)
        self.x_cpu = images[pick] + 0.05 * torch.randn((queries, *images.shape[1:]), generator=g)
        self.device = device
        self.x = self.x_cpu.to(device)
        self.sync = synchronizer(device)
        self.prediction = torch.randint(0, 10, (queries,), generator=g)
        self.radius = torch.rand(queries, generator=g, dtype=torch.float64)
        abstain = torch.rand(queries, generator=g) < 0.1
        self.prediction[abstain], self.radius[abstain] = ABSTAIN, 0.0
        self.expected = self.plain()
        c, r = self.expected
        kept = self.prediction != ABSTAIN
        self.outcomes = {
            "queries": queries,
            "abstained": int((~kept).sum()),
            "changed class": int((c != self.prediction).sum()),
            "shrunk": int(((c == self.prediction) & (r < self.radius)).sum()),
            "unchanged": int((kept & (c == self.prediction) & (r == self.radius)).sum()),
        }
        self.work = {"k queries/s": queries / 1e3}

    def plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        return plain_memory_adjust(self.x, self.prediction, self.radius)

    def ddrs(self, per_call: int | None, on_cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x_cpu if on_cpu else self.x
        memory = CertificationMemory(device=x.device)
        if per_call is None:
            return memory.adjust(x, self.prediction, self.radius)
        answers = []
        for i in range(0, x.shape[0], per_call):
            part = slice(i, i + per_call)
            answers.append(memory.adjust(x[part], self.prediction[part], self.radius[part]))
        return torch.cat([c for c, _ in answers]), torch.cat([r for _, r in answers])

    def check(self, result: tuple[torch.Tensor, torch.Tensor]) -> None:
        assert torch.equal(result[0], self.expected[0])
        if self.device.type == "cpu":
            assert torch.equal(result[1], self.expected[1])
        else:
            torch.testing.assert_close(result[1], self.expected[1], rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def memory_case(quick, device) -> MemoryCase:
    case = MemoryCase(QUICK_QUERIES if quick else QUERIES, device)
    case.quick = quick
    return case


@pytest.mark.benchmark(group="memory")
@pytest.mark.parametrize("mode", list(MODES))
def test_memory_ddrs(benchmark, memory_case, mode):
    per_call = MODES[mode]
    how = {None: "all queries in one call", 1: "one query per call"}.get(
        per_call, f"{per_call} queries per call"
    )
    device = memory_case.device
    where = "" if device.type == "cpu" else f" on {device}"
    benchmark.extra_info.update(
        label=f"CertificationMemory.adjust{where}, {how}; {memory_case.x.shape[0]} queries of 1x8x8",
        work=memory_case.work,
        baseline=PLAIN,
        outcomes=memory_case.outcomes,
    )
    others = {PLAIN: memory_case.plain}
    if device.type != "cpu":
        cpu = f"test_memory_ddrs_cpu[{mode}]"
        benchmark.extra_info["cpu_memory"] = cpu
        others[cpu] = lambda: memory_case.ddrs(per_call, on_cpu=True)
    result = pedantic_interleaved(
        benchmark,
        lambda: memory_case.ddrs(per_call),
        others,
        rounds=1 if memory_case.quick else ROUNDS[device.type][mode],
        sync=memory_case.sync,
    )
    memory_case.check(result)


@pytest.mark.benchmark(group="memory")
def test_memory_plain(benchmark, memory_case):
    benchmark.extra_info.update(
        label=f"plain loop, one query at a time (cdist, argmin); {memory_case.x.shape[0]} queries",
        work=memory_case.work,
        outcomes=memory_case.outcomes,
    )
    rounds = 1 if memory_case.quick else PLAIN_ROUNDS[memory_case.device.type]
    fn = synced(memory_case.plain, memory_case.sync)
    result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    memory_case.check(result)
