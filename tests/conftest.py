from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _inside_checkout(path: str) -> bool:
    resolved = Path(path or os.getcwd()).resolve()
    return resolved == CHECKOUT or CHECKOUT in resolved.parents


@dataclass
class OutsideCheckout:
    """Where and how to start a Python subprocess so that it imports the installed ddrs_ext, as a user's
    script would, and never the checkout's source tree (which, without compiled kernels, compiles them
    again): ``cwd`` is a folder outside the checkout and ``env`` has no PYTHONPATH entry inside it."""

    cwd: Path
    env: dict[str, str]

    def python(
        self, code: str, *args: object, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``python -c code *args`` there, with ``env`` added to the environment; output captured."""
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, args)],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def outside_checkout(tmp_path) -> OutsideCheckout:
    cwd = tmp_path / "outside_checkout"
    cwd.mkdir()
    assert not _inside_checkout(str(cwd)), f"pytest's tmp_path {tmp_path} lies inside the checkout {CHECKOUT}"
    env = dict(os.environ)
    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and not _inside_checkout(p)]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return OutsideCheckout(cwd, env)


class LinearBinary(torch.nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: logits (0, w.x + b).

    Under N(0, sigma^2 I) noise, P(class 1) = Phi((w.x + b) / (sigma ||w||)) and the
    smoothed classifier's exact certified radius is the distance |w.x + b| / ||w||.
    """

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.flatten(), b

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.w.double() + self.b

    def forward(self, x):
        score = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.fixture
def linear_binary():
    g = torch.Generator().manual_seed(1)
    return LinearBinary(torch.randn(3, 4, 5, generator=g), 0.3)
