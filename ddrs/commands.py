"""The work of ``ddrs certify``, ``ddrs optimize-sigma`` and ``ddrs predict`` (their arguments are
parsed and checked in ddrs.cli, which imports this module only when one of them runs)."""

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
from ddrs.results import (
    CERTIFY_COLUMNS,
    DUAL_COLUMNS,
    LATER_CERTIFY_COLUMNS,
    PREDICT_COLUMNS,
    SIGMA_COLUMNS,
    ResultFile,
    ResultFileError,
    certify_rows,
    read_rows,
)
from ddrs_ext.certification import ABSTAIN, certify, predict
from ddrs_ext.dual import certify_dual
from ddrs_ext.memory import CertificationMemory
from ddrs_ext.precision import Evaluated
from ddrs_ext.sequential import certify_sequential, round_schedule
from ddrs_ext.sigma import optimize_sigma, surrogate_radius

__all__ = ["run_certify", "run_optimize_sigma", "run_predict", "chunk_sizes", "min_chunk"]

# Without --chunk, inputs per library call grow from min_chunk until a call takes about this long.
CHUNK_SECONDS = 3.0
# ... and a call holds at least enough inputs to fill this many forward batches in its main phase.
FILL_BATCHES = 4
_INDEX_LIMIT = 2**32


def _message(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


def _evaluated_settings(args: argparse.Namespace) -> dict:
    """The --autocast / --channels-last / --compile choices that are set (they change the function
    that is certified, so they belong to the settings)."""
    chosen = {
        "autocast": getattr(args, "autocast", None),
        "channels_last": bool(getattr(args, "channels_last", False)),
        "compile": getattr(args, "compile", None),
    }
    return {k: v for k, v in chosen.items() if v}


def _evaluated(model, options: dict):
    """``model`` wrapped in ddrs_ext.Evaluated as the options say (channels-last weights converted)."""
    if options.get("channels_last") and isinstance(model, torch.nn.Module):
        model = model.to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.get("autocast"))
    compile = {"mode": options["compile"]} if options.get("compile") else False
    return Evaluated(model, autocast=dtype, channels_last=bool(options.get("channels_last")), compile=compile)


class _Job:
    """What the commands share: the model, the data, the selected inputs, their labels, the classes."""

    def __init__(self, args: argparse.Namespace) -> None:
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name")
        if not out.parent.exists():
            raise ValueError(f"--out {out}: its folder {out.parent} does not exist")
        self.device = resolve_device(args.device)
        self.model = load_model(
            args.model,
            args.checkpoint,
            self.device,
            note=lambda text: print(f"ddrs {args.command}: note: {text}", file=sys.stderr),
        )
        self.evaluated = _evaluated_settings(args)
        if self.evaluated:
            self.model = _evaluated(self.model, self.evaluated)
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

    def _probe(self) -> int:
        x = self.data.inputs(self.selected[:1]).to(self.device)
        try:
            with torch.no_grad():
                out = self.model(x)
        except Exception as exc:
            raise ValueError(
                f"the model fails on one input of shape {tuple(x.shape)} from --data: {_message(exc)}"
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


def _run_chunks(
    args: argparse.Namespace,
    job: _Job,
    out: ResultFile | distributed_run.ShardedResults,
    rows_per_input: int,
    work: Callable[[torch.Tensor], list[dict]],
) -> None:
    """Calls ``work(index) -> rows`` on chunks of the inputs not yet in ``out`` and writes the rows.

    A sharded run (torchrun) computes this rank's share of the inputs that no rank has done yet, then
    merges every rank's rows into the result file (:meth:`ddrs.distributed_run.ShardedResults.finish`,
    a collective call: every rank gets there, with or without inputs of its own)."""
    total = len(job.selected)
    if _sharded(out):
        remaining, already, left, rank = out.todo, out.already, out.left, out.rank
    else:
        remaining = [i for i in job.selected if i not in out.done]
        already, left, rank = total - len(remaining), len(remaining), 0
    if rank == 0:
        _report_start(args, out, total, already, left)
    if remaining:
        _chunk_loop(args, out, remaining, rows_per_input, work, progress=rank == 0)
    if _sharded(out):
        out.finish()


def _report_start(args: argparse.Namespace, out, total: int, already: int, left: int) -> None:
    shared = ""
    if _sharded(out) and left and out.world > 1:
        shared = f", shared by {out.world} process(es)"
        if left < out.world:
            shared += f" ({out.world - left} of them with nothing to do)"
    if not left:
        print(f"{args.out}: all {total} selected inputs are already done", file=sys.stderr)
    elif already:
        where = f" (in {args.out} and {out.files} rank file(s))" if _sharded(out) and out.files else ""
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


def _sharded(out) -> bool:
    return isinstance(out, distributed_run.ShardedResults)


def _open_results(
    args: argparse.Namespace,
    job: _Job,
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


def _memory_step(job: _Job) -> Callable[[list[dict], list[dict]], list[dict]]:
    """The memory-based adjustment as a step over rows: the memory rebuilt from the rows already in
    the file (as they were adjusted), then the new rows adjusted in idx order, as one process adjusts
    them (CertificationMemory gives the same answers whatever the blocks)."""

    def step(before: list[dict], rows: list[dict]) -> list[dict]:
        memory = CertificationMemory()
        for start in range(0, len(before), 1024):
            part = before[start : start + 1024]
            memory.extend(
                job.inputs([r["idx"] for r in part]),
                torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                torch.tensor([r["radius"] for r in part], dtype=torch.float64),
            )
        adjusted = []
        for start in range(0, len(rows), 1024):
            part = rows[start : start + 1024]
            prediction, radius = memory.adjust(
                job.inputs([r["idx"] for r in part]),
                torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                torch.tensor([r["radius"] for r in part], dtype=torch.float64),
            )
            for k, row in enumerate(part):
                p = int(prediction[k])
                correct = int(p == job.labels[row["idx"]])
                adjusted.append({**row, "predict": p, "radius": float(radius[k]), "correct": correct})
        return adjusted

    return step


# ----------------------------------------------------------------------------- sigma per input


def _digest(values: dict[int, float]) -> str:
    text = "\n".join(f"{i}\t{values[i]!r}" for i in sorted(values))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_sigma_file(path: Path, job: _Job) -> dict[int, float]:
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


class _Sigma:
    """The sigma of each input: ``--sigma``, ``--sigma-file`` or (certify) ``--optimize``."""

    def __init__(self, args: argparse.Namespace, job: _Job) -> None:
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


# ----------------------------------------------------------------------------- commands


def _certify_summary(path: Path, rows: list[dict]) -> str:
    if not rows:
        return f"{path}: no rows"
    correct = [r for r in rows if r["correct"]]
    acr = sum(r["radius"] for r in correct) / len(rows)
    text = (
        f"{path}: {len(rows)} inputs, certified accuracy {len(correct) / len(rows):.3f} at radius 0, "
        f"average certified radius {acr:.4f}"
    )
    if all("samples" in r for r in rows):
        text += f", {sum(r['samples'] for r in rows) / len(rows):.0f} model evaluations per input"
    if all("level" in r for r in rows):
        chose = [r for r in rows if r["level"] != ABSTAIN]
        smaller = sum(r["radius_selector"] < r["radius_classifier"] for r in chose if r["predict"] != ABSTAIN)
        text += (
            f"; the selector abstained on {len(rows) - len(chose)}, its radius was the smaller on {smaller}"
        )
    return text


class _Certifier:
    """What ``ddrs certify`` computes per chunk of inputs: CERTIFY (ddrs_ext.certify), with
    --sequential ddrs_ext.certify_sequential, with --sigma-levels ddrs_ext.certify_dual; and what
    that adds to the result file (columns, settings). Plain CERTIFY adds no setting, so that files
    of earlier versions resume."""

    def __init__(self, args: argparse.Namespace, job: _Job) -> None:
        self.args, self.job = args, job
        self.levels = getattr(args, "sigma_levels", None)
        self.sequential = bool(getattr(args, "sequential", False))
        self.settings: dict = {}
        self.columns, self.later = CERTIFY_COLUMNS, LATER_CERTIFY_COLUMNS
        if self.levels is not None:
            self._setup_dual()
            return
        self.sigma_of = _Sigma(args, job)
        self.sigma_setting = self.sigma_of.setting
        rows = args.n
        if self.sequential:
            self.settings["sequential"] = {"radius": args.radius, "tolerance": args.tolerance}
            self.later = ()
            rows = round_schedule(args.n, args.alpha).ends[0]  # every input runs the first round
        self.rows_per_input = min(rows, self.sigma_of.rows_per_input or rows)

    def _setup_dual(self) -> None:
        args, job = self.args, self.job
        note = lambda text: print(f"ddrs certify: note: {text}", file=sys.stderr)  # noqa: E731
        self.selector = load_model(args.selector, args.selector_checkpoint, job.device, note, role="selector")
        x = job.inputs(job.selected[:1])
        try:
            with torch.no_grad():
                out = self.selector(x)
        except Exception as exc:
            raise ValueError(f"--selector fails on one input from --data: {_message(exc)}") from None
        K = len(self.levels)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != K:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the selector must return one logit per sigma level ({K} levels: --sigma-levels "
                f"{' '.join(f'{v:g}' for v in self.levels)}); for one input it returned {got}"
            )
        self._note_trained_levels(note)
        experts = _expert_specs(args, K)
        self.model = job.model
        if len(experts) > 1:
            self.model = [job.model] + [
                load_model(spec, checkpoint, job.device, note) for spec, checkpoint in experts[1:]
            ]
            self.settings["experts"] = [model_settings(spec, checkpoint) for spec, checkpoint in experts]
        self.alpha_selector = args.alpha / 2 if args.alpha_selector is None else args.alpha_selector
        self.sigma_setting = {"levels": list(self.levels), "selector_sigma": args.selector_sigma}
        self.settings["selector"] = model_settings(args.selector, args.selector_checkpoint)
        self.settings["alpha_selector"] = self.alpha_selector
        self.columns, self.later = DUAL_COLUMNS, ()
        self.rows_per_input = args.n

    def _note_trained_levels(self, note: Callable[[str], None]) -> None:
        """A note when a selector checkpoint of ddrs.train_digits was trained for other levels."""
        args = self.args
        if args.selector is not None or args.selector_checkpoint is None:
            return
        from ddrs.loading import load_weights
        from ddrs.selector import is_selector_checkpoint

        content = load_weights(args.selector_checkpoint, "--selector-checkpoint")
        if not is_selector_checkpoint(content):
            return
        trained = (list(content["sigma_levels"]), content["selector_sigma"])
        if trained != (list(self.levels), args.selector_sigma):
            note(
                f"--selector-checkpoint {args.selector_checkpoint} was trained for --sigma-levels "
                f"{' '.join(f'{v:g}' for v in trained[0])} --selector-sigma {trained[1]:g}; this run uses "
                f"{' '.join(f'{v:g}' for v in self.levels)} and {args.selector_sigma:g}"
            )

    def __call__(self, x: torch.Tensor, index: torch.Tensor):
        args, job = self.args, self.job
        common = dict(batch_size=args.batch_size, num_classes=job.num_classes, seed=args.seed, index=index)
        if self.levels is not None:
            return certify_dual(
                self.model,
                self.selector,
                x,
                self.levels,
                selector_sigma=args.selector_sigma,
                n0=args.n0,
                n=args.n,
                alpha=args.alpha,
                alpha_selector=self.alpha_selector,
                **common,
            )
        sigma = self.sigma_of(x, index)
        if self.sequential:
            return certify_sequential(
                job.model,
                x,
                sigma,
                n0=args.n0,
                n_max=args.n,
                alpha=args.alpha,
                radius=args.radius,
                tolerance=args.tolerance,
                **common,
            )
        return certify(job.model, x, sigma, n0=args.n0, n=args.n, alpha=args.alpha, **common)


def _expert_specs(args: argparse.Namespace, levels: int) -> list[tuple[str | None, str | None]]:
    """``(--model, --checkpoint)`` of each expert: one pair, or one per level when either option is
    repeated (ddrs.cli checked the counts: each once, or once per level)."""
    models, checkpoints = list(args.models), list(args.checkpoints)
    count = max(len(models), len(checkpoints), 1)
    if count == 1:
        return [(args.model, args.checkpoint)]

    def pick(values: list, k: int):
        return None if not values else values[k] if len(values) == levels else values[0]

    return [(pick(models, k), pick(checkpoints, k)) for k in range(levels)]


@distributed_run.command
def run_certify(args: argparse.Namespace) -> int:
    job = _Job(args)
    method = _Certifier(args, job)
    settings = {
        "command": "certify",
        **job.settings,
        "sigma": method.sigma_setting,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "memory": bool(args.memory),
        **method.settings,
    }
    step = _memory_step(job) if args.memory else None
    with _open_results(args, job, method.columns, settings, order_step=step, later=method.later) as out:
        memory = None
        if args.memory and not _sharded(out):  # sharded: adjusted in the merge
            memory = CertificationMemory()
            done = list(out.done.values())
            for start in range(0, len(done), 1024):  # the adjusted answers already given, in order
                part = done[start : start + 1024]
                memory.extend(
                    job.inputs([r["idx"] for r in part]),
                    torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                    torch.tensor([r["radius"] for r in part], dtype=torch.float64),
                )

        def work(index: torch.Tensor) -> list[dict]:
            x = job.inputs(index.tolist())
            result = method(x, index)
            if memory is not None:
                result = memory.adjust_result(x, result)
            index = index.tolist()
            return certify_rows(result, index, [job.labels[i] for i in index])

        _run_chunks(args, job, out, method.rows_per_input, work)
        print(_certify_summary(args.out, [out.done[i] for i in job.selected if i in out.done]))
    return 0


@distributed_run.command
def run_optimize_sigma(args: argparse.Namespace) -> int:
    options = args.optimize_options
    job = _Job(args)
    settings = {
        "command": "optimize-sigma",
        **job.settings,
        "sigma0": args.sigma0,
        **options,
        "surrogate_samples": args.surrogate_samples,
    }
    with _open_results(args, job, SIGMA_COLUMNS, settings) as out:

        def work(index: torch.Tensor) -> list[dict]:
            x = job.inputs(index.tolist())
            sigma = optimize_sigma(
                job.model, x, args.sigma0, **options, batch_size=args.batch_size, seed=args.seed, index=index
            )
            surrogate = surrogate_radius(
                job.model,
                x,
                sigma,
                num_samples=args.surrogate_samples,
                clip=options["clip"],
                probabilities=options["probabilities"],
                batch_size=args.batch_size,
                seed=args.seed,
                index=index,
            )
            return [
                {"idx": i, "label": job.labels[i], "sigma": float(sigma[k]), "surrogate": float(surrogate[k])}
                for k, i in enumerate(index.tolist())
            ]

        _run_chunks(args, job, out, options["num_samples"], work)
        rows = [out.done[i] for i in job.selected if i in out.done]
        if rows:
            mean_sigma = sum(r["sigma"] for r in rows) / len(rows)
            mean_surrogate = sum(r["surrogate"] for r in rows) / len(rows)
            print(
                f"{args.out}: {len(rows)} inputs, mean sigma {mean_sigma:.4f}, "
                f"mean surrogate {mean_surrogate:.4f}"
            )
    return 0


@distributed_run.command
def run_predict(args: argparse.Namespace) -> int:
    job = _Job(args)
    sigma_of = _Sigma(args, job)
    settings = {
        "command": "predict",
        **job.settings,
        "sigma": sigma_of.setting,
        "n": args.n,
        "alpha": args.alpha,
    }
    with _open_results(args, job, PREDICT_COLUMNS, settings) as out:

        def work(index: torch.Tensor) -> list[dict]:
            x = job.inputs(index.tolist())
            sigma = sigma_of(x, index)
            prediction = predict(
                job.model,
                x,
                sigma,
                n=args.n,
                alpha=args.alpha,
                batch_size=args.batch_size,
                num_classes=job.num_classes,
                seed=args.seed,
                index=index,
            )
            sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(len(index))
            rows = []
            for k, i in enumerate(index.tolist()):
                p = int(prediction[k])
                rows.append(
                    {
                        "idx": i,
                        "label": job.labels[i],
                        "predict": p,
                        "correct": int(p == job.labels[i]),
                        "sigma": float(sigma[k]),
                    }
                )
            return rows

        _run_chunks(args, job, out, args.n, work)
        rows = [out.done[i] for i in job.selected if i in out.done]
        if rows:
            correct = sum(r["correct"] for r in rows)
            abstained = sum(r["predict"] == ABSTAIN for r in rows)
            print(
                f"{args.out}: {len(rows)} inputs, accuracy {correct / len(rows):.3f}, {abstained} abstained"
            )
    return 0
