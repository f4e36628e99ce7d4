"""What ``ddrs certify``, ``predict`` and ``optimize-sigma`` share when they run: the model, the data
and the selected inputs (:class:`Job`), the sigma of each input (:class:`Sigma`), the result file
(:func:`open_results`, one process or sharded under torchrun) and the loop that computes the inputs
not yet in it, a chunk at a time (:func:`run_chunks`)."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddrs import distributed_run
from ddrs.datasets import data_settings, image_settings, load_dataset
from ddrs.loading import load_model, model_settings, resolve_device
from ddrs.results import ResultFile, ResultFileError, read_rows
from ddrs_ext._validate import evaluating
from ddrs_ext.precision import Evaluated, compile_pays
from ddrs_ext.sigma import optimize_sigma

__all__ = [
    "Job",
    "Sigma",
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


def _evaluated_settings(args: argparse.Namespace) -> dict:
    """--autocast, when given: it changes the function that is certified, so it belongs to the
    settings that a resume must match (under "evaluated")."""
    autocast = getattr(args, "autocast", None)
    return {"autocast": autocast} if autocast else {}


def forward_rows_per_input(args: argparse.Namespace) -> int:
    """Forward rows (noisy copies through the model) that the command evaluates per input, at least,
    in forward passes that torch.compile speeds up (optimize_sigma's reparam estimator runs
    uncompiled: forward-mode autograd does not go through a compiled model)."""
    options = getattr(args, "optimize_options", None)
    sigma_rows = 0
    if options is not None and options["estimator"] != "reparam":
        sigma_rows = options["iterations"] * options["num_samples"]
    if args.command == "predict":
        return args.n
    if args.command == "optimize-sigma":
        return sigma_rows + args.surrogate_samples
    n = args.n
    if getattr(args, "sequential", False):
        from ddrs_ext.sequential import round_schedule

        n = round_schedule(args.n, args.alpha).ends[0]  # every input runs the first round
    return sigma_rows + args.n0 + n


def evaluation_choice(args: argparse.Namespace, rows: int, device: torch.device, convolutional: bool) -> dict:
    """How the model is evaluated (the same function either way), for a run of ``rows`` forward rows:
    ``{"compile": MODE or "off", "channels_last": bool, "auto": bool, "forward_rows": rows}``.
    --compile auto compiles (mode "default") where :func:`ddrs_ext.precision.compile_pays` (on the
    CPU, from COMPILE_MIN_ROWS rows) and then gives a ``convolutional`` model (4-d weights)
    channels-last weights and inputs too (measured faster compiled on the CPU); --channels-last asks
    for channels-last always."""
    given = getattr(args, "compile", None) or "off"
    auto = given == "auto"
    mode = ("default" if compile_pays(rows, device) else "off") if auto else given
    channels_last = bool(getattr(args, "channels_last", False)) or (auto and mode != "off" and convolutional)
    return {"compile": mode, "channels_last": channels_last, "auto": auto, "forward_rows": rows}


def _convolutional(model) -> bool:
    return isinstance(model, torch.nn.Module) and any(p.dim() == 4 for p in model.parameters())


def _evaluated(model, autocast: str | None, evaluation: dict, note: Callable[[str], None]):
    """``model`` wrapped in ddrs_ext.Evaluated as chosen (channels-last weights converted in place),
    its fallbacks said by ``note``."""
    channels_last = evaluation["channels_last"]
    if isinstance(model, torch.nn.Module):
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    compile = False if evaluation["compile"] == "off" else {"mode": evaluation["compile"]}
    return Evaluated(model, autocast=dtype, channels_last=channels_last, compile=compile, notify=note)


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


# ----------------------------------------------------------------------------- sigma per input


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
        return optimize_sigma(
            self.job.model,
            x,
            self.args.sigma0,
            **self.optimize,
            batch_size=self.args.batch_size,
            seed=self.args.seed,
            index=index,
        )
