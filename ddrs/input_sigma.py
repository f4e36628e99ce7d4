"""The sigma of each input of ``ddrs certify`` and ``predict`` (:class:`Sigma`): ``--sigma``,
``--sigma-file`` (a file of ``ddrs optimize-sigma``, checked against the selected inputs and their
labels) or ``--optimize``."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddrs.results import ResultFileError, read_rows
from ddrs_ext.sigma import optimize_sigma, optimize_theta

if TYPE_CHECKING:
    from ddrs.job import Job

__all__ = ["Sigma"]


def _digest(values: dict[int, float]) -> str:
    text = "\n".join(f"{i}\t{values[i]!r}" for i in sorted(values))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_sigma_file(path: Path, job: Job) -> dict[int, float]:
    try:
        header, rows = read_rows(path)
    except ResultFileError as exc:
        raise ValueError(f"--sigma-file {exc}") from None
    if "idx" not in header or "sigma" not in header:
        raise ValueError(f"--sigma-file {path}: no idx and sigma columns (header {' '.join(header)!r})")
    found = {row["idx"]: row for row in rows}
    missing = [i for i in job.selected if i not in found]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"--sigma-file {path} has no sigma for {len(missing)} selected input(s): idx {shown}; "
            "finish 'ddrs optimize-sigma' with the same --data/--skip/--max first"
        )
    sigma = {}
    for i in job.selected:
        row = found[i]
        if "label" in row and row["label"] != job.labels[i]:
            raise ValueError(
                f"--sigma-file {path}: idx {i} has label {row['label']}, --data has {job.labels[i]}; "
                "was it made for other data?"
            )
        s = row["sigma"]
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"--sigma-file {path}: idx {i} has sigma {s}; sigmas must be finite and > 0")
        sigma[i] = s
    return sigma


class Sigma:
    """The sigma of each input: ``--sigma``, ``--sigma-file`` or (certify) ``--optimize``."""

    def __init__(self, args: argparse.Namespace, job: Job) -> None:
        self.args, self.job = args, job
        self.fixed = args.sigma
        self.of = None
        self.optimize = getattr(args, "optimize_options", None) if getattr(args, "optimize", False) else None
        if self.fixed is not None:
            self.setting = {"fixed": args.sigma}
        elif args.sigma_file is not None:
            self.of = _read_sigma_file(args.sigma_file, job)
            self.setting = {"file": os.path.abspath(args.sigma_file), "digest": _digest(self.of)}
        else:
            self.setting = {"optimize": {"sigma0": args.sigma0, **self.optimize}}

    @property
    def rows_per_input(self) -> int | None:
        """Rows per input in one forward pass of the sigma optimisation, if any."""
        return None if self.optimize is None else self.optimize["num_samples"]

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> float | torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        if self.of is not None:
            return torch.tensor([self.of[i] for i in index.tolist()], dtype=torch.float64)
        optimize = optimize_theta if getattr(self.args, "noise", "gaussian") == "uniform" else optimize_sigma
        return optimize(
            self.job.model,
            x,
            self.args.sigma0,
            **self.optimize,
            batch_size=self.args.batch_size,
            seed=self.args.seed,
            index=index,
        )
