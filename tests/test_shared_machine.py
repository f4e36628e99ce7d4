"""On a shared machine: ``import ddrs_ext`` (and so ``ddrs``) makes OpenMP's idle threads wait passively
unless the user chose a wait policy, when it loads before torch; the wait policy and the thread count
change no result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ddrs_ext._threads import WAIT_POLICY_VARS, prefer_passive_wait


def test_passive_wait_is_set_when_nothing_is_chosen():
    env = {"PATH": "/bin"}
    assert prefer_passive_wait(env, modules={"os", "sys"}) is True
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": ""}  # set but empty: nothing chosen
    assert prefer_passive_wait(env, modules=set()) is True
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    "chosen", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"KMP_BLOCKTIME": "200"}]
)
def test_a_users_choice_is_left_alone(chosen):
    env = dict(chosen)
    assert prefer_passive_wait(env, modules=set()) is False
    assert env == chosen


def test_nothing_is_set_once_torch_is_loaded():
    """Too late to take effect, and the environment of a program that imported torch is its own."""
    env: dict[str, str] = {}
    assert prefer_passive_wait(env, modules={"torch"}) is False
    assert env == {}


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY_VARS + ("OMP_NUM_THREADS",)}
    env.update(extra)
    return env


def _spin_count(code: str, tmp_path, **extra: str) -> str:
    """The spin count libgomp (torch's OpenMP runtime on Linux) took when it loaded in a child that runs
    ``code``: it prints its settings on stderr with OMP_DISPLAY_ENV=VERBOSE; PASSIVE is a count of 0."""
    env = _child_env(OMP_DISPLAY_ENV="VERBOSE", **extra)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    counts = [line.split("=")[1].strip(" '") for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not counts:
        pytest.skip("the OpenMP runtime is not libgomp (nothing printed for OMP_DISPLAY_ENV)")
    return counts[0]


@pytest.mark.parametrize(
    "code, preset, passive",
    [
        ("import ddrs_ext", None, True),  # imported first: passive
        ("import ddrs_ext", "ACTIVE", False),  # the user's choice stands (libgomp: 3e10 spins)
        ("import torch, ddrs_ext", None, False),  # torch first: too late, OpenMP's default (3e5 spins)
    ],
    ids=["ddrs_ext first", "user chose ACTIVE", "torch first"],
)
def test_the_runtime_waits_as_the_import_order_says(tmp_path, code, preset, passive):
    """What the OpenMP runtime itself took (not only the variable): the third case is the control that
    shows the check can see the default's spinning."""
    extra = {"OMP_WAIT_POLICY": preset} if preset else {}
    assert (_spin_count(code, tmp_path, **extra) == "0") is passive


def test_the_command_line_loads_ddrs_ext_before_torch(tmp_path):
    """``ddrs`` imports ddrs_ext before a command's work (which imports torch), so its runs wait
    passively; ``ddrs analyze`` (no torch) and ``--help`` load neither."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from ddrs import cli
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main(["certify", "--help"])
            except SystemExit:
                pass
        assert "torch" not in sys.modules
        cli.main(["certify", "--model", "ddrs_ext.models:digits_cnn", "--data", "digits", "--sigma",
                  "0.5", "--max", "1", "--n0", "8", "--n", "16", "--no-progress", "--out", "c.tsv"])
        """
    )
    assert _spin_count(code, tmp_path) == "0"


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
