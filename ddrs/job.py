"""What ``ddrs certify``, ``predict`` and ``optimize-sigma`` share when they run: the model, the data
and the selected inputs (:class:`Job`; each input's sigma: ddrs.input_sigma), the result file
(:func:`open_results`, one process or sharded under torchrun) and the loop that computes the inputs
not yet in it, a chunk at a time (:func:`run_chunks`)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddrs import distributed_run
from ddrs.datasets import data_settings, image_settings, load_dataset
from ddrs.evaluation import (
    _convolutional,
    _evaluated,
    _evaluated_settings,
    evaluation_choice,
    forward_rows_per_input,
)
from ddrs.loading import load_model, model_settings, resolve_device
from ddrs.results import ResultFile
from ddrs_ext._validate import evaluating
from ddrs_ext.precision import Evaluated

__all__ = [
    "Job",
    "evaluation_choice",
    "forward_rows_per_input",
    "chunk_sizes",
    "min_chunk",
    "message",
    "open_results",
    "run_chunks",
    "is_sharded",
]

# Without --chunk, inputs per library call grow from min_chunk until a call takes about this long.
CHUNK_SECONDS = 3.0
# ... and a call holds at least enough inputs to fill this many forward batches in its main phase.
FILL_BATCHES = 4
_INDEX_LIMIT = 2**32


def message(exc: BaseException) -> str:
    """An exception's text on one line (its type's name when it has none)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


class Job:
    """What the commands share: the model, the data, the selected inputs, their labels, the classes.

    ``model`` is the model as the commands evaluate it: wrapped in :class:`ddrs_ext.Evaluated` when
    --autocast is given or --compile/--channels-last resolve to something (compiled, and torch's
    refusals noted, by a warm-up forward pass before the settings are written). ``settings`` keeps
    --autocast under "evaluated" (it changes the function: compared on a resume) and how the model
    is evaluated otherwise (compile mode, channels-last, the rows that --compile auto counted, any
    fallback) under "evaluation" (the same function: recorded, not compared,
    ddrs.results.DESCRIPTIVE_SETTINGS)."""

    def __init__(self, args: argparse.Namespace) -> None:
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name")
        if not out.parent.exists():
            raise ValueError(f"--out {out}: its folder {out.parent} does not exist")
        self.command = args.command
        self.device = resolve_device(args.device)
        self.model = load_model(args.model, args.checkpoint, self.device, note=self.note)
        self.data = load_dataset(args.data, args.split, args.image_size)
        n = len(self.data)
        if n > _INDEX_LIMIT:
            raise ValueError(f"--data has {n} inputs; at most 2**32 are supported")
        stop = n if args.max is None else min(n, args.max)
        self.selected = list(range(0, stop, args.skip))
        if not self.selected:
            raise ValueError(
                f"no inputs selected: --data has {n} inputs, --max {args.max}, --skip {args.skip}"
            )
        self.num_classes = self._probe()
        labels = self.data.labels[torch.as_tensor(self.selected)]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"input idx {self.selected[i]} has label {int(labels[i])}, outside [0, {self.num_classes}) "
                f"(the model has {self.num_classes} outputs); {int(bad.sum())} selected label(s) out of range"
            )
        self.labels = {i: int(v) for i, v in zip(self.selected, labels.tolist())}
        self.evaluated = _evaluated_settings(args)
        rows = len(self.selected) * forward_rows_per_input(args)
        self.evaluation = evaluation_choice(args, rows, self.device, _convolutional(self.model))
        if self.evaluated or self.evaluation["compile"] != "off" or self.evaluation["channels_last"]:
            self._warm_up(args)
        self.settings = {
            **model_settings(args.model, args.checkpoint),
            **data_settings(args.data, self.data),
            **image_settings(args.image_size),
            "num_classes": self.num_classes,
            "seed": args.seed,
            "skip": args.skip,
            "max": args.max,
        }
        if self.evaluated:  # only when set, so that earlier settings files still match
            self.settings["evaluated"] = self.evaluated
        self.settings["evaluation"] = self.evaluation

    def evaluate(self, model):
        """Another model of the run (a selector, an expert) evaluated as ``self.model`` is (the
        resolved --autocast, --compile and channels-last; compiled at its first call)."""
        if not isinstance(self.model, Evaluated):
            return model
        return _evaluated(model, self.evaluated.get("autocast"), self.evaluation, self.note)

    def note(self, text: str) -> None:
        """``ddrs COMMAND: note: text`` on stderr (above a progress bar, if one is drawn)."""
        tqdm.write(f"ddrs {self.command}: note: {text}", file=sys.stderr)

    def _warm_up(self, args: argparse.Namespace) -> None:
        """Wraps the model in ddrs_ext.Evaluated and runs one forward batch through it (noise-free
        copies of the first input), so that torch.compile compiles, and torch's refusals (to compile,
        to autocast) are noted and recorded, before the settings are written. A model that fails
        with the channels-last format that --compile auto chose is evaluated without it (noted)."""
        raw, evaluation = self.model, self.evaluation
        x = self.inputs(self.selected[:1])
        x = x.expand(max(2, args.batch_size), *x.shape[1:]).contiguous()
        if evaluation["compile"] != "off":
            why = f", {evaluation['forward_rows']:,} forward rows" if evaluation["auto"] else ""
            cl = " and channels-last" if evaluation["channels_last"] and evaluation["auto"] else ""
            self.note(f"compiling the model (torch.compile, mode {evaluation['compile']}{cl}{why})")
        self.model = _evaluated(raw, self.evaluated.get("autocast"), evaluation, self.note)
        try:
            self._forward(x)
        except Exception as exc:
            if not (
                evaluation["auto"]
                and evaluation["channels_last"]
                and not getattr(args, "channels_last", False)
            ):
                given = [f"--autocast {self.evaluated['autocast']}"] if self.evaluated else []
                given += ["--channels-last"] if evaluation["channels_last"] else []
                given += (
                    [f"--compile {getattr(args, 'compile', None)}"] if evaluation["compile"] != "off" else []
                )
                raise ValueError(
                    f"the model fails when evaluated with {' '.join(given)}: {message(exc)}"
                ) from None
            self.evaluation = evaluation = {**evaluation, "channels_last": False}
            self.note(
                f"the model fails with channels-last weights and inputs ({message(exc)[:200]}); it is "
                "evaluated in the contiguous format"
            )
            self.model = _evaluated(raw, self.evaluated.get("autocast"), evaluation, self.note)
            self._forward(x)
        if self.model.autocast is None and "autocast" in self.evaluated:
            del self.evaluated["autocast"]  # torch refused it: the model is certified in its own precision
        if self.model.compile_options is None and evaluation["compile"] != "off":
            self.evaluation = {**evaluation, "compile": "off", "fallback": self.model.notes[-1]}

    def _forward(self, x: torch.Tensor) -> None:
        with torch.inference_mode(), evaluating(self.model):
            self.model(x)

    def _probe(self) -> int:
        """The model's number of classes, from one forward pass of the model as loaded."""
        x = self.data.inputs(self.selected[:1]).to(self.device)
        try:
            with torch.no_grad():
                out = self.model(x)
        except Exception as exc:
            raise ValueError(
                f"the model fails on one input of shape {tuple(x.shape)} from --data: {message(exc)}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the model must return logits of shape (N, classes); for one input it returned {got}"
            )
        return int(out.shape[1])

    def inputs(self, index: Sequence[int]) -> torch.Tensor:
        return self.data.inputs(index).to(self.device)


# ----------------------------------------------------------------------------- chunks


def min_chunk(batch_size: int, rows_per_input: int) -> int:
    """The fewest inputs per library call whose noisy copies fill :data:`FILL_BATCHES` forward batches
    of ``batch_size`` rows, when each input contributes ``rows_per_input`` rows to one forward pass of
    the phase that does most of the work (the noise samples of a sigma-optimisation step, or
    certification's n). With fewer, those forward passes run part-empty: a GPU then idles, and the
    run that issue 14 reports took twice the CPU time with one input per call as with 25."""
    return max(1, math.ceil(FILL_BATCHES * batch_size / max(1, rows_per_input)))


def chunk_sizes(
    total: int, fixed: int | None, minimum: int = 1, seconds: float = CHUNK_SECONDS
) -> Generator[int, float | None, None]:
    """Sizes of consecutive chunks covering ``total`` inputs. ``fixed``: that many each (the last may
    be smaller). Otherwise the first holds ``minimum`` inputs (see :func:`min_chunk`) and each next
    one grows, at most fourfold, towards ``seconds`` per call given the seconds the previous call
    took (sent back by the caller), never below ``minimum``: inputs slower than ``seconds`` each
    still go ``minimum`` at a time, so the forward passes stay full."""
    size = fixed if fixed is not None else max(1, minimum)
    done = 0
    while done < total:
        size = min(size, total - done)
        took = yield size
        done += size
        if fixed is not None:
            size = fixed
        elif took is not None:
            per_input = max(took, 1e-6) / size
            size = max(minimum, min(4 * size, int(seconds / per_input)))


def run_chunks(
    args: argparse.Namespace,
    job: Job,
    out: ResultFile | distributed_run.ShardedResults,
    rows_per_input: int,
    work: Callable[[torch.Tensor], list[dict]],
) -> None:
    """Calls ``work(index) -> rows`` on chunks of the inputs not yet in ``out`` and writes the rows.

    A sharded run (torchrun) computes this rank's share of the inputs that no rank has done yet, then
    merges every rank's rows into the result file (:meth:`ddrs.distributed_run.ShardedResults.finish`,
    a collective call: every rank gets there, with or without inputs of its own)."""
    total = len(job.selected)
    if is_sharded(out):
        remaining, already, left, rank = out.todo, out.already, out.left, out.rank
    else:
        remaining = [i for i in job.selected if i not in out.done]
        already, left, rank = total - len(remaining), len(remaining), 0
    if rank == 0:
        _report_start(args, out, total, already, left)
    if remaining:
        _chunk_loop(args, out, remaining, rows_per_input, work, progress=rank == 0)
    if is_sharded(out):
        out.finish()


def _report_start(args: argparse.Namespace, out, total: int, already: int, left: int) -> None:
    shared = ""
    if is_sharded(out) and left and out.world > 1:
        shared = f", shared by {out.world} process(es)"
        if left < out.world:
            shared += f" ({out.world - left} of them with nothing to do)"
    if not left:
        print(f"{args.out}: all {total} selected inputs are already done", file=sys.stderr)
    elif already:
        where = f" (in {args.out} and {out.files} rank file(s))" if is_sharded(out) and out.files else ""
        print(
            f"{args.out}: resuming; {already} of {total} selected inputs already done{where}, "
            f"{left} to go{shared}",
            file=sys.stderr,
        )
    elif shared:
        print(f"{args.out}: {left} inputs{shared}", file=sys.stderr)


def _chunk_loop(args, out, remaining: list[int], rows_per_input: int, work, progress: bool) -> None:
    bar = tqdm(
        total=len(remaining),
        desc=args.command,
        unit="input",
        file=sys.stderr,
        disable=args.no_progress or not progress,
        dynamic_ncols=True,
    )
    try:
        sizes = chunk_sizes(len(remaining), args.chunk, min_chunk(args.batch_size, rows_per_input))
        size, start = next(sizes), 0
        while True:
            chunk = remaining[start : start + size]
            began = time.perf_counter()
            rows = work(torch.as_tensor(chunk, dtype=torch.int64))
            took = time.perf_counter() - began
            for row in rows:
                out.write({**row, "time": took / len(chunk)})
            bar.update(len(chunk))
            start += size
            try:
                size = sizes.send(took)
            except StopIteration:
                break
    finally:
        bar.close()


def is_sharded(out) -> bool:
    return isinstance(out, distributed_run.ShardedResults)


def open_results(
    args: argparse.Namespace,
    job: Job,
    columns: Sequence[str],
    settings: dict,
    *,
    order_step: Callable[[list[dict], list[dict]], list[dict]] | None = None,
    **file_options,
) -> ResultFile | distributed_run.ShardedResults:
    """The result file: ``--out`` itself, or under torchrun (or to finish the rank files of an
    interrupted torchrun run) a :class:`ddrs.distributed_run.ShardedResults` over it, which applies
    ``order_step`` (the steps that need the rows in idx order) when it merges."""
    if distributed_run.sharded(args):
        return distributed_run.ShardedResults(
            args.out, job, columns, settings, seed=args.seed, order_step=order_step, **file_options
        )
    return ResultFile(args.out, columns, settings, **file_options)
