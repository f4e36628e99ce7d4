"""Certification and sigma optimisation spread over the ranks of a ``torch.distributed`` process group
(docs/distributed.md).

Every input's noise is keyed by ``(seed, index, sample)``, so an input gives the same result whichever
process certifies it. :func:`certify`, :func:`predict` and :func:`optimize_sigma` take the whole input
set on every rank, run the ordinary function on this rank's share and return the whole result, in
input order, on every rank: bit for bit what one process gives with the same ``seed`` and ``index``.

Shares are strided: of ``B`` inputs, rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``
(:func:`share`), so shares differ by at most one input and slow stretches of a dataset are spread over
all ranks. Ranks left without inputs (``W > B``) wait for the others and return the same result.

Before any work the ranks exchange their settings (:func:`agree`): a rank whose settings, inputs or
model differ from rank 0's makes every rank raise ``ValueError`` naming what differs, and the seed
(``seed=None``: drawn from rank 0's torch generator) is rank 0's. A rank whose work fails raises its
own exception after telling the others, which raise :class:`OtherRankError`. Every collective is
bounded by the process group's timeout (``init_process_group(timeout=...)``; torch's default is 30
minutes for gloo, 10 for NCCL): a rank that never arrives becomes an error, not a hang.

Without an initialised process group (or with one rank) everything runs in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddrs_ext import certification, rng
from ddrs_ext._validate import _module_of
from ddrs_ext.noise import UNIFORM, resolve_noise
from ddrs_ext.sigma import optimize_sigma as _optimize_sigma
from ddrs_ext.sigma import optimize_theta as _optimize_theta

__all__ = [
    "OtherRankError",
    "agree",
    "certify",
    "exchange",
    "gather",
    "optimize_sigma",
    "predict",
    "rank_and_world_size",
    "share",
]

# optimize_sigma's options that change nothing in its result (so ranks may differ in them)
_LOCAL_OPTIONS = frozenset({"batch_size", "progress", "callback"})


class OtherRankError(RuntimeError):
    """Raised on every rank when another rank's part of a collective call failed; ``rank`` is the
    lowest failing rank, whose own exception says more (it is raised there, and its type and message
    are repeated here)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group`` (default: the default group); ``(0, 1)`` without an
    initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def share(total: int, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The positions ``0 .. total - 1`` this rank handles: ``rank, rank + W, rank + 2W, ...`` (int64).

    Deterministic given ``total`` and the world size ``W``; over all ranks the shares partition the
    positions, and their sizes differ by at most one (ranks beyond ``total`` get none)."""
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    rank, world = rank_and_world_size(group)
    return torch.arange(rank, max(rank, int(total)), world, dtype=torch.int64)


@contextlib.contextmanager
def _object_device(group, hint: torch.device | None) -> Iterator[None]:
    """NCCL's object collectives stage their bytes on ``torch.cuda.current_device()``: make that the
    device this rank works on (``hint`` when it is a CUDA device), so two ranks never share a GPU."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower() and hint is not None and hint.type == "cuda":
        with torch.cuda.device(hint):
            yield
    else:
        yield


def exchange(
    compute: Callable[[], Any],
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    what: str = "ddrs_ext.distributed.exchange",
) -> list[Any]:
    """Runs ``compute()`` on this rank and returns every rank's value (picklable), in rank order.

    When ``compute`` raises on any rank, every rank raises after the exchange: that rank its own
    exception, the others :class:`OtherRankError` (``what`` names the step in its message), so no
    rank is left waiting in a later collective. One collective call (an object all-gather), bounded
    by the group's timeout; a timeout or a vanished rank raises ``RuntimeError``. ``device``: this
    rank's CUDA device under NCCL (default ``torch.cuda.current_device()``). Call it on every rank.
    """
    return _exchange(compute, group, torch.device(device) if device is not None else None, what)


def _exchange(compute: Callable[[], Any], group, hint: torch.device | None, what: str) -> list[Any]:
    try:
        value, error = compute(), None
    except Exception as exc:  # reported to the other ranks, then re-raised below
        value, error = None, exc
    _, world = rank_and_world_size(group)
    if world == 1:
        if error is not None:
            raise error
        return [value]
    outcome = ("ok", value) if error is None else ("error", f"{type(error).__name__}: {_one_line(error)}")
    outcomes: list[Any] = [None] * world
    try:
        with _object_device(group, hint):
            dist.all_gather_object(outcomes, outcome, group=group)
    except RuntimeError as exc:  # DistBackendError included: a timeout, or a rank that went away
        raise RuntimeError(
            f"{what}: a collective call failed; another rank stopped, or did not make the same call "
            f"within the process group's timeout ({_one_line(exc)})"
        ) from exc
    if error is not None:
        raise error
    failed = [(r, message) for r, (status, message) in enumerate(outcomes) if status == "error"]
    if failed:
        r, message = failed[0]
        raise OtherRankError(f"{what} failed on rank {r} (of {len(failed)} failing rank(s)): {message}", r)
    return [value for _, value in outcomes]


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= 300 else text[:297] + "..."


def _digest_tensor(t: torch.Tensor) -> str:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous().reshape(-1)
    h = hashlib.blake2b(f"{t.dtype}|{t.numel()}|".encode(), digest_size=12)
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def _normalise(value: Any) -> Any:
    """A setting as a plain, comparable, picklable value: tensors and arrays by shape and digest."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), _digest_tensor(value))
    if isinstance(value, np.ndarray):
        return _normalise(torch.from_numpy(np.ascontiguousarray(value)))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _normalise(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _model_digest(model: Callable) -> str:
    module = _module_of(model)
    if module is None:
        return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__name__)}"
    h = hashlib.blake2b(type(module).__qualname__.encode(), digest_size=12)
    for name, value in module.state_dict().items():
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(_digest_tensor(value).encode())
    return h.hexdigest()


def agree(
    settings: Mapping[str, Any],
    *,
    seed: int | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Checks that every rank of ``group`` passed the same ``settings`` and returns the seed they all use.

    ``settings``: the values that must agree across ranks (numbers, strings, tuples; tensors and arrays
    are compared by shape, dtype and a digest of their bytes). A difference makes every rank raise
    ``ValueError`` naming the settings and ranks that differ. ``seed``: an int, the same on every rank
    (it is one of the checked settings), or None on every rank: then each rank draws one from torch's
    default generator (so the generators stay in step) and rank 0's draw is used. ``device``: this
    rank's CUDA device under NCCL (default: ``torch.cuda.current_device()``); ignored otherwise.

    One collective call, bounded by the group's timeout. For one's own loop over :func:`share`.
    """
    return _agree(lambda: settings, seed, group, torch.device(device) if device is not None else None)


def _agree(settings: Callable[[], Mapping[str, Any]], seed, group, hint: torch.device | None) -> int:
    """:func:`agree`, with the settings computed inside the exchange: an error there reaches every rank."""

    def local():
        checked = {str(k): _normalise(v) for k, v in settings().items()}
        checked["seed"] = _normalise(seed)
        return checked, rng.resolve_seed(seed)

    outcomes = _exchange(local, group, hint, "ddrs_ext.distributed.agree")
    mine = outcomes[0][0]
    differences = []
    for r, (theirs, _) in enumerate(outcomes[1:], start=1):
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "<missing>") != theirs.get(key, "<missing>"):
                differences.append(
                    f"{key} (rank 0: {_show(mine.get(key))}, rank {r}: {_show(theirs.get(key))})"
                )
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        hint = ""
        if any(d.startswith("model (") for d in differences):
            hint = (
                " (after DistributedDataParallel training each rank keeps its own BatchNorm statistics: "
                "give every rank rank 0's model, e.g. load its checkpoint, or broadcast the buffers)"
            )
        raise ValueError(
            f"the ranks were given different settings: {shown}; every rank must pass the same{hint}"
        )
    return outcomes[0][1]


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value and value[0] == "tensor":
        return f"tensor of shape {value[1]}, {value[2]}, digest {value[3][:8]}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def gather(
    local: torch.Tensor,
    total: int,
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The rows of all ranks, in position order, on every rank (a CPU tensor).

    ``local``: this rank's rows, one per position of :func:`share` ``(total)``, in that order. Ranks
    without positions pass an empty tensor (any shape with 0 rows). ``device`` as for :func:`agree`.
    """

    def rows():
        positions = share(total, group=group)
        if not isinstance(local, torch.Tensor) or local.dim() < 1 or local.shape[0] != positions.numel():
            got = tuple(local.shape) if isinstance(local, torch.Tensor) else type(local).__name__
            raise ValueError(
                f"local must hold one row per position of this rank's share ({positions.numel()}), got {got}"
            )
        return local.detach().cpu()

    hint = torch.device(device) if device is not None else None
    parts = _exchange(rows, group, hint, "ddrs_ext.distributed.gather")
    return _assemble(parts, total)


def _assemble(parts: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Rows of every rank's share (rank order) -> rows in position order."""
    world = len(parts)
    filled = [p for p in parts if p.shape[0]]
    if not filled:
        return parts[0]
    out = torch.empty((total, *filled[0].shape[1:]), dtype=filled[0].dtype)
    for r, part in enumerate(parts):
        if part.shape[0]:
            out[r::world] = part
    return out


# ----------------------------------------------------------------------------- inputs


def _is_dataset(x: Any) -> bool:
    return not isinstance(x, torch.Tensor) and hasattr(x, "__getitem__") and hasattr(x, "__len__")


def _indices(x: Any, index) -> tuple[torch.Tensor, int]:
    """The dataset indices (noise streams) of every input, and the number of inputs."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 1:
            raise ValueError("x must have a batch dimension (B, ...), got a 0-d tensor")
        total = x.shape[0]
    elif _is_dataset(x):
        total = None
    else:
        raise TypeError(f"x must be a tensor (B, ...) or a dataset (len and [i]), got {type(x).__name__}")
    if index is None:
        total = total if total is not None else len(x)
        return torch.arange(total, dtype=torch.int64), total
    stream = torch.as_tensor(index)
    if stream.dtype == torch.bool or stream.is_floating_point() or stream.is_complex():
        raise TypeError(f"index must hold integers, got dtype {stream.dtype}")
    stream = stream.to(device="cpu", dtype=torch.int64).reshape(-1)
    if total is not None and stream.numel() != total:
        raise ValueError(f"index must have one entry per input ({total}), got {stream.numel()}")
    if total is None and stream.numel() and (int(stream.min()) < 0 or int(stream.max()) >= len(x)):
        raise ValueError(f"index entries must lie in [0, {len(x)}), the dataset's length")
    return stream, stream.numel()


def _item_input(item: Any, i: int) -> torch.Tensor:
    value = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"dataset item {i} must be a tensor or a tuple starting with one, got {type(value).__name__}"
        )
    return value


def _local_inputs(x: Any, positions: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        local = x.index_select(0, positions.to(x.device))
    elif positions.numel():
        local = torch.stack([_item_input(x[int(i)], int(i)) for i in index[positions].tolist()])
    else:
        local = torch.zeros(0)  # an idle rank of a dataset: the item shape is unknown, and unused
    return local if device is None else local.to(device)


def _local_per_input(value, positions: torch.Tensor, total: int, name: str):
    """``value`` (a number, or one entry per input) for this rank's positions."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.shape[0] != total:
            raise ValueError(
                f"{name} must be a number or hold one value per input ({total}), got {value.shape[0]}"
            )
        return value.index_select(0, positions.to(value.device))
    if isinstance(value, (np.ndarray, list, tuple)):
        return _local_per_input(torch.as_tensor(value), positions, total, name)
    return value


def _input_settings(x: Any, total: int, verify: bool) -> dict[str, Any]:
    if isinstance(x, torch.Tensor):
        shape = {"input shape": tuple(x.shape[1:]), "input dtype": str(x.dtype)}
        return {**shape, "inputs": _digest_tensor(x) if verify else total}
    return {"inputs": f"{type(x).__qualname__} of length {len(x)}"}


def _sharded(
    what: str,
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], Any],
    model: Callable,
    x: Any,
    index,
    seed: int | None,
    settings: dict[str, Any],
    device,
    group,
    verify: bool,
) -> tuple[list[Any], int, int]:
    """The common path: agree on settings and seed, run ``run(positions, local_x, local_index, seed,
    total)`` on this rank's share, and exchange the outcomes. Returns (every rank's value, the number
    of inputs, the seed)."""
    hint = torch.device(device) if device is not None else None
    if hint is None and isinstance(x, torch.Tensor) and x.device.type == "cuda":
        hint = x.device

    prepared: list[Any] = []  # filled inside agree's exchange, so a bad index or model reaches every rank

    def checked_settings() -> dict[str, Any]:
        stream, total = _indices(x, index)
        prepared.append((stream, total))
        return {
            "function": what,
            **settings,
            **_input_settings(x, total, verify),
            "index": stream,
            "model": _model_digest(model) if verify else type(model).__qualname__,
        }

    seed = _agree(checked_settings, seed, group, hint)
    stream, total = prepared[0]

    def work():  # everything a rank does between two collectives runs inside an exchange
        positions = share(total, group=group)
        local_x = _local_inputs(x, positions, stream, device)
        return run(positions, local_x, stream[positions], seed, total)

    return _exchange(work, group, hint, what), total, seed


def certify(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor | torch.utils.data.Dataset,
    sigma: float | torch.Tensor,
    *,
    index: torch.Tensor | Sequence[int] | None = None,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    verify: bool = True,
    noise: str = "gaussian",
) -> certification.CertifyResult:
    """:func:`ddrs_ext.certify` of all inputs, each rank certifying its :func:`share`; every rank gets
    the whole result (CPU tensors, input order), equal to one process's ``ddrs_ext.certify(model, x,
    sigma, index=index, seed=seed, ...)``. Call it on every rank of ``group`` with the same arguments.

    x: every input, a tensor ``(B, ...)``, or a dataset whose item ``i`` is an input tensor or a tuple
    starting with one (``(image, label)``); each rank then loads only its share. index: the inputs'
    noise streams, usually their dataset indices: default ``0 .. B-1`` for a tensor; for a dataset, the
    items to certify (default all) and their streams. sigma: a number or one value per input.
    device: where this rank's inputs go before certification (e.g. ``f"cuda:{local_rank}"``; default:
    where they are). seed: an int (the same on every rank) or None on every rank (rank 0 draws it).
    verify: also compare, across ranks, digests of the input tensor and the model's state_dict (one
    pass over their bytes); without it only the arguments, shapes and index are compared.
    noise: ``"gaussian"`` (L2 radii) or ``"uniform"`` (``sigma`` is the cube's half-width theta; L1 radii,
    ``result.norm == "l1"``), as for :func:`ddrs_ext.certify`; one of the settings the ranks agree on.
    """
    # arguments are checked by ddrs_ext.certify on every rank, after the ranks agree on them
    settings = {"n0": n0, "n": n, "alpha": alpha, "num_classes": num_classes, "sigma": sigma, "noise": noise}

    def run(positions, local_x, local_index, seed, total):
        local_sigma = _local_per_input(sigma, positions, total, "sigma")
        result = certification.certify(
            model,
            local_x,
            local_sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            num_classes=num_classes,
            seed=seed,
            index=local_index,
            noise=noise,
        )
        return {name: getattr(result, name) for name in _CERTIFY_FIELDS}

    parts, total, seed = _sharded("certify", run, model, x, index, seed, settings, device, group, verify)
    fields = {name: _assemble([p[name] for p in parts], total) for name in _CERTIFY_FIELDS}
    return certification.CertifyResult(**fields, seed=seed, norm=resolve_noise(noise).norm)


_CERTIFY_FIELDS = ("prediction", "radius", "p_lower", "counts", "sigma", "samples")


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor | torch.utils.data.Dataset,
    sigma: float | torch.Tensor,
    *,
    index: torch.Tensor | Sequence[int] | None = None,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    verify: bool = True,
    noise: str = "gaussian",
) -> torch.Tensor:
    """:func:`ddrs_ext.predict` of all inputs, sharded like :func:`certify` (whose arguments it shares,
    ``noise`` included); every rank gets the (B,) int64 predictions."""
    settings = {"n": n, "alpha": alpha, "num_classes": num_classes, "sigma": sigma, "noise": noise}

    def run(positions, local_x, local_index, seed, total):
        local_sigma = _local_per_input(sigma, positions, total, "sigma")
        return certification.predict(
            model,
            local_x,
            local_sigma,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            num_classes=num_classes,
            seed=seed,
            index=local_index,
            noise=noise,
        )

    parts, total, _ = _sharded("predict", run, model, x, index, seed, settings, device, group, verify)
    return _assemble(parts, total)


def optimize_sigma(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor | torch.utils.data.Dataset,
    sigma0: float | torch.Tensor,
    *,
    index: torch.Tensor | Sequence[int] | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    verify: bool = True,
    noise: str = "gaussian",
    **options: Any,
) -> torch.Tensor:
    """:func:`ddrs_ext.optimize_sigma` of all inputs, sharded like :func:`certify` (``x``, ``index``,
    ``seed``, ``device``, ``group``, ``verify`` as there); every rank gets the (B,) float64 sigmas.

    ``options`` are :func:`ddrs_ext.optimize_sigma`'s (iterations, lr, num_samples, estimator, rule,
    ...) and must agree across ranks, except ``batch_size``, ``progress`` and ``callback``, which change
    nothing in the result (a ``callback`` sees this rank's share only).

    ``noise="uniform"``: :func:`ddrs_ext.optimize_theta` instead (``sigma0`` is then the half-width
    theta0, ``options`` are its own, and the result holds a theta per input); ``noise`` is one of the
    settings the ranks agree on."""
    settings = {
        "sigma0": sigma0,
        "noise": noise,
        **{k: v for k, v in options.items() if k not in _LOCAL_OPTIONS},
    }

    def run(positions, local_x, local_index, seed, total):
        optimize = _optimize_theta if resolve_noise(noise) is UNIFORM else _optimize_sigma
        local_sigma0 = _local_per_input(sigma0, positions, total, "sigma0")
        return optimize(model, local_x, local_sigma0, seed=seed, index=local_index, **options)

    parts, total, _ = _sharded("optimize_sigma", run, model, x, index, seed, settings, device, group, verify)
    return _assemble(parts, total)
