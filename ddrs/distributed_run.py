"""``ddrs certify``, ``optimize-sigma`` and ``predict`` on several processes, launched by torchrun.

    torchrun --nproc-per-node 4 -m ddrs -- certify --model ... --n 100000 --max 500 --out certify.tsv

The ``--`` after ``-m ddrs`` keeps torchrun's own option parser away from ddrs's options: without
it, torchrun (argparse, which accepts abbreviations) stops at ``--n`` and ``--max``, prefixes of its
``--nnodes``, ``--nproc-per-node``, ``--max-restarts``, ... (``ambiguous option``).

A run under torchrun (``RANK`` and ``WORLD_SIZE`` in the environment) goes like this:

- every rank joins the process group (gloo on the CPU; NCCL with one GPU per process, ``--device
  cuda`` meaning ``cuda:LOCAL_RANK``), every collective call bounded by ``--dist-timeout``;
- the ranks agree on the settings (those of the settings file, plus digests of the model's weights
  and of the selected labels): any difference stops every rank with an error naming it;
- rank ``r`` keeps the rows it computes in its own rank file ``<out>.rank<r>`` (one row at a time,
  as ``<out>`` is written), before any order-dependent step; rank 0 holds ``<out>`` itself;
- the inputs not yet done (in ``<out>`` or in any rank's file) are shared out by position
  (:func:`ddrs_ext.distributed.share`), so a resumed run, with as many processes or another number,
  splits what is left evenly. Every input's noise depends on the seed and its index only, so the
  rows do not depend on which rank computes them;
- when every rank is done, the rows go to rank 0 (one collective call; no shared file system is
  needed), which appends them to ``<out>`` in idx order, applying the memory-based adjustment
  (``certify --memory``) there, and each rank deletes its rank file.

A rank that fails tells the others at their next collective call, so every rank stops with an
error (``rank R of W: ...``); nothing waits longer than ``--dist-timeout``. A run without torchrun
whose ``<out>`` has rank files (an interrupted torchrun run) finishes it the same way, as one rank.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddrs.loading import resolve_device
from ddrs.results import DESCRIPTIVE_SETTINGS, ResultFile, rank_file, rank_files, remove_result_file
from ddrs_ext.distributed import OtherRankError, agree, exchange, rank_and_world_size, share

__all__ = ["Launch", "ShardedResults", "command", "join", "launched", "leave", "sharded"]

_SHARED = "_ddrs_every_rank"  # marks an exception that every rank raised in the same collective call
_progress = {"merged": False}  # whether this process's command is past its last collective call


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local_rank: int | None
    device: torch.device
    created: bool  # whether :func:`join` initialised the process group (and :func:`leave` ends it)


def _environment() -> tuple[int, int, int | None]:
    def number(name: str) -> int | None:
        text = os.environ.get(name)
        if text is None:
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"the environment variable {name}={text!r} is not an integer") from None

    rank, world, local = number("RANK"), number("WORLD_SIZE"), number("LOCAL_RANK")
    if world is None or world < 1 or rank is None or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a launch")
    return rank, world, local


def _device(name: str | None, local_rank: int | None) -> torch.device:
    """``--device`` under torchrun: ``cuda`` (and the default, when torch sees a GPU) is this process's
    own GPU, ``cuda:LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if name is not None and device.index is not None:
        raise ValueError(
            f"--device {name}: under torchrun give --device cuda; each process then takes the GPU of "
            "its local rank (cuda:LOCAL_RANK)"
        )
    if local_rank is None:
        raise ValueError(
            "--device cuda under a launch needs LOCAL_RANK in the environment (as torchrun sets)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} has no GPU of its own: {count} visible on this machine; start at "
            f"most {count} processes per machine (--nproc-per-node) or use --device cpu"
        )
    return torch.device("cuda", local_rank)


def join(device: str | None, timeout: float) -> Launch:
    """Joins the process group of a torchrun launch (unless one is initialised already): gloo on the
    CPU, NCCL on this process's GPU (``device`` as ``--device``; see :func:`_device`); every
    collective call is bounded by ``timeout`` seconds."""
    rank, world, local = _environment()
    where = _device(device, local)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except Exception as exc:  # a rendezvous that times out, a port in use, ...
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise ValueError(
                f"rank {rank} of {world} could not join the process group ({backend} at {address}): "
                f"{_one_line(exc)}"
            ) from exc
        created = True
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(
            f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not "
            f"the launch's (RANK={rank}, WORLD_SIZE={world})"
        )
    return Launch(rank, world, local, where, created)


def leave(launch: Launch) -> None:
    """Ends the process group if :func:`join` started it."""
    if launch.created and dist.is_initialized():
        dist.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


def _describe(exc: BaseException) -> str:
    """One line; for another rank's failure, which rank and what (the step it interrupted here is
    beside the point)."""
    text = _one_line(exc)
    if isinstance(exc, OtherRankError):
        _, sep, what = text.partition("): ")
        return f"stopped: rank {exc.rank} failed ({what})" if sep else text
    return text


def _shared(call: Callable[[], Any]) -> Any:
    """``call()``, whose exceptions every rank raises at once (a collective call): marked so, so that
    :func:`command` does not tell the other ranks again."""
    try:
        return call()
    except Exception as exc:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, _SHARED, True)
        raise


def _collective(compute: Callable[[], Any], what: str) -> list[Any]:
    """:func:`ddrs_ext.distributed.exchange`: every rank's ``compute()``, or an error on every rank."""
    return _shared(lambda: exchange(compute, what=what))


def _tell_the_others(exc: BaseException) -> None:
    """Joins the other ranks' next collective call with ``exc``, so that they stop too (bounded by the
    group's timeout; the others are then in :class:`ShardedResults`' exchanges, all of one kind)."""

    def fail():
        raise exc

    with contextlib.suppress(Exception):
        exchange(fail, what="this command")


def command(run: Callable[[Any], int]) -> Callable[[Any], int]:
    """Wraps a ``ddrs`` command's ``run(args)``: under torchrun it joins the process group first
    (``args.device`` becomes this process's device) and leaves it at the end; only rank 0 prints on
    stdout; an error on one rank reaches every rank, and errors are one line naming the rank
    (``ValueError``, which ``ddrs`` prints; an unexpected exception keeps its traceback). Without
    torchrun, ``run`` runs as it is."""

    @functools.wraps(run)
    def wrapper(args) -> int:
        if not launched():
            return run(args)
        launch = join(args.device, getattr(args, "dist_timeout", 1800.0))
        args.device = str(launch.device)
        _progress["merged"] = False
        try:
            with open(os.devnull, "w") as sink:
                with contextlib.redirect_stdout(sink if launch.rank else sys.stdout):
                    return run(args)
        except Exception as exc:
            shared = getattr(exc, _SHARED, False)
            if not shared and not _progress["merged"]:  # (after the merge, nobody would answer)
                traceback = exc.__traceback__
                _tell_the_others(exc)
                exc.with_traceback(traceback)
            if shared or isinstance(exc, (ValueError, OSError)):
                raise ValueError(f"rank {launch.rank} of {launch.world}: {_describe(exc)}") from exc
            raise
        finally:
            leave(launch)

    return wrapper


def sharded(args) -> bool:
    """Whether the command runs sharded: under torchrun, or to finish the rank files of ``--out``."""
    return launched() or bool(rank_files(args.out))


# ----------------------------------------------------------------------------- result files


def _weights_digest(model: Any) -> str:
    """A digest of a module's state_dict (names, dtypes, shapes, bytes); else the model's type."""
    if not isinstance(model, torch.nn.Module):
        return f"{type(model).__module__}.{type(model).__qualname__}"
    h = hashlib.blake2b(digest_size=8)
    for name, value in model.state_dict().items():
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"|{t.dtype}|{tuple(value.shape)}|".encode())
            try:
                h.update(t.view(torch.uint8).numpy().tobytes())
            except (RuntimeError, TypeError):  # a dtype numpy lacks: its text, which is exact enough
                h.update(repr(t.tolist()).encode())
    return h.hexdigest()


def _agreement(job, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the ranks must agree on: the settings file's settings (less the descriptive ones, which a
    resume does not compare either: e.g. a rank whose torch.compile fell back computes the same
    function), the model's weights and the labels of the selected inputs (by digest;
    ddrs_ext.distributed.agree compares them)."""
    labels = torch.tensor([job.labels[i] for i in job.selected], dtype=torch.int64)
    compared = {k: v for k, v in settings.items() if k not in DESCRIPTIVE_SETTINGS}
    return {**compared, "model weights": _weights_digest(job.model), "selected labels": labels}


def _agree(job, settings: Mapping[str, Any], seed: int) -> None:
    try:
        agree(_agreement(job, settings), seed=seed)
    except ValueError as exc:
        if "model weights (" not in str(exc):
            raise
        raise ValueError(
            f"{_one_line(exc)} (a --model built without --checkpoint must build the same weights in every "
            "process: seed its initialisation, or save the weights and pass them with --checkpoint)"
        ) from exc


class ShardedResults:
    """The result file of a sharded run (see the module's docstring), as :class:`ResultFile` is for
    one process: :attr:`todo` are this rank's inputs to compute, :meth:`write` keeps a row in this
    rank's file, :meth:`finish` (every rank) merges every rank's rows into ``path`` on rank 0, after
    which :attr:`done` holds the merged file's rows (on rank 0; empty elsewhere).

    ``order_step(before, rows) -> rows``: applied on rank 0 to the rows being appended (in idx order),
    ``before`` being the rows already in the file (e.g. the memory-based adjustment).
    ``file_options`` go to the :class:`ResultFile` of ``path``.
    """

    sharded = True

    def __init__(
        self,
        path: str | os.PathLike,
        job,
        columns: Sequence[str],
        settings: Mapping[str, Any],
        *,
        seed: int,
        order_step: Callable[[list[dict], list[dict]], list[dict]] | None = None,
        **file_options: Any,
    ) -> None:
        self.path, self.columns, self.settings = Path(path), tuple(columns), dict(settings)
        self.selected: list[int] = list(job.selected)
        self.order_step = order_step
        self.rank, self.world = rank_and_world_size()
        self.done: dict[int, dict] = {}
        self._own: ResultFile | None = None
        self._final: ResultFile | None = None
        self._others: dict[Path, list[dict]] = {}  # rank files of ranks >= world (an earlier launch's)
        _shared(lambda: _agree(job, self.settings, seed))
        try:
            outcomes = _collective(lambda: self._open(file_options), "opening the result files")
        except BaseException:
            self.close()
            raise
        final_done = set(outcomes[0][1])
        elsewhere = set().union(*(set(found) for found, _ in outcomes))
        self.already = sum(1 for i in self.selected if i in final_done or i in elsewhere)
        remaining = [i for i in self.selected if i not in final_done and i not in elsewhere]
        self.left = len(remaining)
        self.todo: list[int] = [remaining[p] for p in share(len(remaining)).tolist()]
        self.files = sum(len(found) > 0 for found, _ in outcomes) + len(self._others)

    def _open(self, file_options: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """Opens this rank's file (and, on rank 0, ``path`` and the rank files of ranks that this
        launch lacks); returns the inputs found in them and those in ``path``."""
        self._own = ResultFile(rank_file(self.path, self.rank), self.columns, self.settings)
        found = set(self._own.done)
        if self.rank != 0:
            return sorted(found), []
        self._final = ResultFile(self.path, self.columns, self.settings, **file_options)
        for k, other in rank_files(self.path).items():
            if k >= self.world:
                with ResultFile(other, self.columns, self.settings) as f:
                    self._others[other] = list(f.done.values())
                found.update(f.done)
        return sorted(found), list(self._final.done)

    def write(self, row: Mapping) -> None:
        """Keeps one row (as computed) in this rank's file."""
        self._own.write(row)

    def finish(self) -> None:
        """Every rank: hands this rank's rows to rank 0, which appends those ``path`` lacks in idx
        order (through ``order_step``); then deletes the rank files."""
        mine = list(self._own.done.values())
        for rows in self._others.values():
            mine.extend(rows)
        parts = _collective(lambda: mine, "handing the rows to rank 0")
        _collective(lambda: self._merge(parts) if self.rank == 0 else None, "merging the rows")
        _progress["merged"] = True
        self._own.close()
        try:
            remove_result_file(self._own.path)
            for other in self._others:
                remove_result_file(other)
        except OSError as exc:
            print(f"{self.path}: note: could not delete a rank file: {_one_line(exc)}", file=sys.stderr)
        if self.rank == 0:
            self.done = dict(self._final.done)

    def _merge(self, parts: list[list[dict]]) -> int:
        final = self._final
        pool: dict[int, dict] = {}
        for rows in parts:
            for row in rows:
                pool.setdefault(row["idx"], row)
        pending = [i for i in self.selected if i not in final.done]
        missing = [i for i in pending if i not in pool]
        if missing:  # cannot happen: every pending input is in some rank's share
            raise RuntimeError(f"no rank computed the rows of {len(missing)} input(s), e.g. idx {missing[0]}")
        rows = [pool[i] for i in pending]
        if self.order_step is not None and rows:
            rows = self.order_step(list(final.done.values()), rows)
        for row in rows:
            final.write(row)
        return len(rows)

    def close(self) -> None:
        for f in (self._own, self._final):
            if f is not None:
                f.close()

    def __enter__(self) -> ShardedResults:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
