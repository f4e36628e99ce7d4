"""The certification of ``ddrs demo``'s rows (:func:`certify_row`, :func:`memory_row`): each row's
result file filled a chunk at a time (resumable; the test index is the noise stream, so chunking and
resumption do not change a row), and the demo's clock."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ddrs_ext
from ddrs.commands.demo_table import RADII, Row
from ddrs.results import (
    CERTIFY_COLUMNS,
    DUAL_COLUMNS,
    LATER_CERTIFY_COLUMNS,
    ResultFile,
    ResultFileError,
    certify_rows,
    read_rows,
)

__all__ = ["CHUNK", "Clock", "certify_row", "duration", "memory_row"]

CHUNK = 100  # inputs per certification step (progress and resume granularity)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)


def _open(path: Path, settings: dict, dual: bool = False) -> ResultFile:
    try:
        if dual:
            return ResultFile(path, DUAL_COLUMNS, settings)
        return ResultFile(path, CERTIFY_COLUMNS, settings, later=LATER_CERTIFY_COLUMNS)
    except ResultFileError as exc:
        raise ResultFileError(f"{exc}; or pass --fresh to start over") from None


def certify_row(
    row: Row,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    settings: dict,
    path: Path,
    clock: Clock,
    stage: str = "",
    dual_selector: torch.nn.Module | None = None,
) -> None:
    """Certifies the inputs of ``x`` that ``path`` does not hold yet, a chunk at a time, with the
    fixed sigma or a sigma optimised per input (test index = noise stream, so any chunking and any
    resumption give the same rows), by CERTIFY, sequentially or (``dual_selector``) with a dual
    certificate. Logs each chunk with the rate and the time left for the row."""
    with _open(path, settings, dual=row.method == "dual") as out:
        todo = [i for i in range(len(y)) if i not in out.done]
        if not todo:
            clock.log(f"{stage}{row.label}: all {len(y)} inputs already in {path}")
            return
        clock.log(
            f"{stage}{row.label}: certifying {len(todo)} inputs"
            + (f" ({len(out.done)} done before)" if out.done else "")
        )
        row_began = time.perf_counter()
        for start in range(0, len(todo), CHUNK):
            index = torch.tensor(todo[start : start + CHUNK], dtype=torch.int64)
            began = time.perf_counter()
            xb = x[index]
            if row.surrogate is None:
                sigma = torch.full((len(index),), row.sigma or args.sigma, dtype=torch.float64)
            else:
                sigma = ddrs_ext.optimize_sigma(
                    model,
                    xb,
                    args.sigma,
                    iterations=args.sigma_iterations,
                    num_samples=args.sigma_samples,
                    estimator=args.estimator,
                    surrogate=row.surrogate,
                    sigma_range=(1e-3, args.sigma_max),
                    batch_size=args.batch_size,
                    seed=args.seed,
                    index=index,
                )
            result = _certify_chunk(row, model, xb, sigma, index, args, dual_selector)
            per_input = (time.perf_counter() - began) / len(index)
            for line in certify_rows(result, index.tolist(), y[index].tolist()):
                out.write({**line, "time": per_input})
            certified = start + len(index)
            rate = certified / (time.perf_counter() - row_began)
            left = len(todo) - certified
            clock.log(
                f"  {len(out.done)}/{len(y)} inputs, {rate:.1f} inputs/s, "
                + (f"about {duration(left / rate)} left" if left else "row done")
            )


def _certify_chunk(
    row: Row,
    model: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    index: torch.Tensor,
    args: argparse.Namespace,
    dual_selector: torch.nn.Module | None,
):
    """One chunk of a row: CERTIFY, certify_sequential (n_max = n, the table's radii as its radii of
    interest) or certify_dual (``args.levels``, ``args.selector_sigma``)."""
    common = dict(n0=args.n0, alpha=args.alpha, batch_size=args.batch_size, seed=args.seed, index=index)
    if row.method == "sequential":
        return ddrs_ext.certify_sequential(model, x, sigma, n_max=args.n, radius=list(RADII), **common)
    if row.method == "dual":
        return ddrs_ext.certify_dual(
            model,
            dual_selector,
            x,
            args.levels,
            selector_sigma=args.selector_sigma,
            n=args.n,
            alpha_selector=args.alpha / 2,
            **common,
        )
    return ddrs_ext.certify(model, x, sigma, n=args.n, **common)


def memory_row(row: Row, source: Path, x: torch.Tensor, settings: dict, path: Path, clock: Clock) -> None:
    """Passes the certificates of ``source`` through one CertificationMemory in test-index order."""
    _, rows = read_rows(source)
    rows.sort(key=lambda r: r["idx"])
    if [r["idx"] for r in rows] != list(range(len(x))):
        raise ResultFileError(f"{source}: incomplete; re-run the demo to finish it")
    prediction = torch.tensor([r["predict"] for r in rows], dtype=torch.int64)
    radius = torch.tensor([r["radius"] for r in rows], dtype=torch.float64)
    adjusted, new_radius = ddrs_ext.CertificationMemory().adjust(x, prediction.clone(), radius.clone())
    changed = int(((adjusted != prediction) | (new_radius != radius)).sum())
    with _open(path, settings) as out:
        for r, p, rad in zip(rows, adjusted.tolist(), new_radius.tolist()):
            new = dict(r, predict=p, radius=rad, correct=int(p == r["label"]))
            new.setdefault("samples", settings["n0"] + settings["n"])  # a source of an earlier version
            if r["idx"] in out.done:
                old = out.done[r["idx"]]
                if (old["predict"], old["radius"]) != (p, rad):
                    raise ResultFileError(f"{path}: row {r['idx']} disagrees with {source}; pass --fresh")
                continue
            out.write(new)
    clock.log(f"{row.label}: {changed} of {len(x)} certificates changed by the memory")
