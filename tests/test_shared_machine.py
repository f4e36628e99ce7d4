"""On a shared machine: ``ddrs`` makes OpenMP's idle threads wait passively unless the user chose a
wait policy, before torch loads; the wait policy and the thread count change no result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ddrs import cli


def test_passive_wait_is_set_when_nothing_is_chosen():
    env = {"PATH": "/bin"}
    assert cli.prefer_passive_wait(env, modules={"os", "sys"}) is True
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": ""}  # set but empty: nothing chosen
    assert cli.prefer_passive_wait(env, modules=set()) is True
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    "chosen", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"KMP_BLOCKTIME": "200"}]
)
def test_a_users_choice_is_left_alone(chosen):
    env = dict(chosen)
    assert cli.prefer_passive_wait(env, modules=set()) is False
    assert env == chosen


def test_nothing_is_set_once_torch_is_loaded():
    """Too late to take effect, and the environment of a program that calls ``main`` is its own."""
    env: dict[str, str] = {}
    assert cli.prefer_passive_wait(env, modules={"torch"}) is False
    assert env == {}


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in cli.WAIT_POLICY_VARS + ("OMP_NUM_THREADS",)}
    env.update(extra)
    return env


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_the_command_line_sets_it_before_torch_loads(tmp_path, preset):
    code = textwrap.dedent(
        """
        import contextlib, io, os, sys
        from ddrs import cli
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main(["certify", "--help"])
            except SystemExit:
                pass
        print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
        """
    )
    env = _child_env(**({"OMP_WAIT_POLICY": preset} if preset else {}))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [preset or "PASSIVE", "False"]


CERTIFY = """
import torch, ddrs_ext
from ddrs_ext.models import digits_cnn
torch.manual_seed(0)
model = digits_cnn()
x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
r = ddrs_ext.certify(model, x, 0.5, n0=50, n=600, batch_size=128, alpha=0.01, seed=3)
print(torch.get_num_threads(), r.prediction.tolist(), r.radius.tolist(), r.counts.tolist())
"""


def test_wait_policy_and_threads_change_no_certificate(tmp_path):
    """Two threads waiting passively certify exactly as one thread waiting actively."""
    outputs = []
    for env in (
        _child_env(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE"),
        _child_env(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE"),
    ):
        argv = [sys.executable, "-c", CERTIFY]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        threads, _, rest = done.stdout.strip().partition(" ")
        outputs.append((int(threads), rest))
    assert [t for t, _ in outputs] == [2, 1]
    assert outputs[0][1] == outputs[1][1]
