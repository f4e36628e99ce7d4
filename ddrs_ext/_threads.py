"""How OpenMP's idle threads wait: passively, unless the user chose otherwise (imports no torch).

With OpenMP's default (active) policy, a thread that finishes its share of a parallel loop spins until
the others have finished theirs; when another process holds a core, the thread waiting for it spins
through whole time slices, and certification ran 2x (an idle AMD EPYC) to 12.5x (a crowded Intel Xeon)
slower than the best setting beside one busy process. Passively waiting threads sleep instead; on
an idle machine they were as fast as the default (benchmarks/bench_contention.py, docs/benchmarks.md
"On a shared machine"). Results do not depend on it: only the speed does.

The OpenMP runtime reads its environment once, when it loads with torch, so ``import ddrs_ext`` sets
``OMP_WAIT_POLICY=PASSIVE`` before it imports torch, and only then: a program that imported torch
first keeps the policy it started with.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Container, MutableMapping

__all__ = ["WAIT_POLICY_VARS", "prefer_passive_wait"]

#: The variables by which a user chooses how OpenMP's idle threads wait (libgomp and Intel's runtime);
#: when one is set, ddrs_ext leaves the choice to it.
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def prefer_passive_wait(
    environ: MutableMapping[str, str] | None = None, modules: Container[str] | None = None
) -> bool:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (default ``os.environ``) unless one of
    :data:`WAIT_POLICY_VARS` is set there or torch is already in ``modules`` (default ``sys.modules``:
    then it is too late to take effect). Returns whether it set it."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or any(environ.get(name) for name in WAIT_POLICY_VARS):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
