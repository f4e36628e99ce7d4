"""Memory-based certification: certified answers checked against the ones given before.

With a sigma chosen per input, each certificate is valid for the smoothed classifier *at that
sigma*, and two inputs certified at different sigmas can claim overlapping balls for different
classes. Alfarra et al. (UAI 2022) restore soundness by remembering the answers given and
adjusting every new answer so that it agrees with them.

The rule. Every answer is a label ``c`` (a class, or ``ABSTAIN`` treated as a label of its own)
with a radius ``R`` (0 for ``ABSTAIN``) in the memory's norm: L2 for the certificates of Gaussian
noise, L1 for those of uniform noise. A query ``(x, c, R)`` is compared with the stored entries
``j`` whose label differs from ``c``, through ``gap_j = d_j - R_j`` with ``d_j = ||x - x_j||`` in
float64. With ``m = min_j gap_j`` (the first ``j`` on ties):

- ``m < 0``: ``x`` lies inside ``j``'s ball (the most negative gap is the deepest ball) and the
  answer becomes ``(c_j, -m) = (c_j, R_j - d_j)``, whether the query certified another class or
  abstained;
- otherwise the answer is ``(c, min(R, m))``; an abstention stays ``(ABSTAIN, 0)``.

Every answer is stored, abstentions too (as balls of radius 0). By induction no two stored
entries of different labels overlap, ``d_ij >= R_i + R_j`` (the triangle inequality holds in
either norm): an answer taken from a ball lies inside that ball, and a shrunk radius stops at
every other ball. So the open balls of the answers never contradict each other, no answered point
lies inside the ball of another label, and all answers are those of one classifier: the stored
ball's label inside each ball.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any

import numpy as np
import torch

from ddrs_ext._validate import check_inputs
from ddrs_ext.certification import ABSTAIN, CertifyResult

__all__ = ["CertificationMemory"]

_FORMAT = "ddrs_ext.CertificationMemory"
# Version 2: abstentions are stored (label ABSTAIN, radius 0) and an abstaining query inside a
# stored ball takes that ball's class; the state names its norm. Version 1 (abstentions passed
# through, never stored; L2 only) is refused.
_VERSION = 2
_NORMS = {"l2": 2.0, "l1": 1.0}  # the norms a memory can hold, and their cdist p
_MIN_CAPACITY = 16
# Queries handled together: their (Q, Q) distances are computed on the memory's device.
_QUERY_BLOCK = 1024
# Upper bound, in float64 elements, on one (queries, stored entries) tile of distances.
_TILE_ELEMENTS = 1 << 21
# On the CPU, stored inputs are converted to float64 and compared in slices of about this many
# elements (2 MiB), so that a slice stays in cache while every query of a block is compared with it.
_SLICE_ELEMENTS = 1 << 18
# Elsewhere (a GPU) in slices of up to this many elements (128 MiB), to bound the float64 copy.
_DEVICE_SLICE_ELEMENTS = 1 << 24
# cdist's direct kernel computes each distance from the coordinate differences, so a pair's
# distance is accurate to float64 rounding and bitwise the same whichever batch it sits in.
# (||a||^2 + ||b||^2 - 2ab loses accuracy for nearby points far from the origin, and its
# rounding depends on the matrix-multiply blocking, i.e. on the batch.)
_DIRECT = "donot_use_mm_for_euclid_dist"


def _flat64(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D) float64; exact for every float dtype."""
    return (x.flatten(1) if x.dim() > 1 else x[:, None]).to(torch.float64)


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """L2 (or, with ``p=1``, L1) distances (len(a), len(b)) between rows of two float64 matrices.

    cdist computes an L1 distance from the coordinate differences too, so it is as batch-independent."""
    if p == 2.0:
        return torch.cdist(a, b, compute_mode=_DIRECT)
    return torch.cdist(a, b, p=p)


def _slice_rows(flat: torch.Tensor) -> int:
    """Rows of inputs like ``flat`` (B, D) compared in one go: a cache-sized slice on the CPU, a larger
    one elsewhere (fewer kernel launches). Results do not depend on it."""
    elements = _SLICE_ELEMENTS if flat.device.type == "cpu" else _DEVICE_SLICE_ELEMENTS
    return max(1, elements // max(flat.shape[1], 1))


def _to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """float64 host copies of small 1-d device tensors, moved in one transfer (one synchronisation)."""
    packed = torch.cat([t.to(torch.float64) for t in tensors]).cpu().numpy()
    ends = list(itertools.accumulate(t.numel() for t in tensors))
    return [packed[end - t.numel() : end] for t, end in zip(tensors, ends)]


def _earlier_pairs_within(
    flat: torch.Tensor, threshold: torch.Tensor, reach: torch.Tensor, p: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (i, k), k < i, of rows of ``flat`` (Q, D) with ``d_ik - reach < threshold[i]``.

    Returns ``(pairs, d)``: ``pairs`` (P, 2) int64 in row-major order (i, then k ascending) and
    their distances ``d`` (P,) float64, on ``flat``'s device. ``reach`` is a 0-d tensor.
    """
    q = flat.shape[0]
    distance = torch.empty((q, q), dtype=torch.float64, device=flat.device)
    step = _slice_rows(flat)
    for start in range(0, q, step):
        stop = min(start + step, q)
        # Only the lower triangle is read below; the rest of the columns [start, stop) is skipped.
        distance[start:, start:stop] = _pairwise_distances(flat[start:], flat[start:stop], p)
    near = ((distance - reach) < threshold[:, None]).tril_(-1)
    pairs = near.nonzero()
    return pairs, distance[pairs[:, 0], pairs[:, 1]]


class CertificationMemory:
    """Remembers the answers given and makes every later answer consistent with them.

    Each stored entry is an input ``x_j`` with its label ``c_j`` (a class, or ``ABSTAIN``) and
    radius ``R_j`` (0 for ``ABSTAIN``) in the memory's ``norm`` (L2 by default; L1 for the
    certificates of uniform noise), in query order. ``adjust`` compares every new answer
    ``(x, c, R)`` with the stored entries of *other* labels, at distances ``d_j = ||x - x_j||`` in
    that norm:

    - if ``x`` lies inside such a ball (``d_j < R_j``), the answer becomes ``(c_j, R_j - d_j)``
      for the deepest such ball (largest ``R_j - d_j``; ties: the earliest entry). This holds for
      an abstaining query too: inside a stored ball it takes that ball's class;
    - otherwise the radius shrinks to ``min(R, min_j (d_j - R_j))``; an abstaining query there
      (near a ball but not inside it, or on its boundary) stays ``(ABSTAIN, 0)``.

    Every adjusted answer is stored, abstentions included, as entries of radius 0 whose label
    ``ABSTAIN`` differs from every class: a later ball of a class then stops short of an
    abstained input, as it stops short of every other answered input of another label. Hence no
    two stored entries of different labels overlap: ``||x_i - x_j|| >= R_i + R_j`` whenever
    ``c_i != c_j``, up to the float64 rounding of distances and differences (a relative
    shortfall of a few ulps; the tests allow ``1e-12``). So every answer is a certificate of
    one classifier, the one that gives each stored ball's label inside it: its ball never meets
    the ball of another label, and no input that received an answer lies inside the ball of
    another label.

    Distances are computed in float64 on the memory's device (a GPU too); per block of queries
    only their gaps to the stored entries, and the few pairs of queries near enough to change
    each other's answers, come to the CPU, where the block is walked in query order. The stored
    inputs keep their dtype (promoted, exactly, when inputs of a wider float dtype arrive).

    The argument holds for any norm (it uses only the triangle inequality), so one memory serves L2
    certificates (Gaussian noise) or L1 certificates (uniform noise, ``norm="l1"``), but never both:
    :meth:`adjust_result` refuses a result of the other norm.

    Args:
        device: where stored inputs live and distances are computed; ``None`` takes the
            device of the first inputs. Later inputs are moved to it.
        norm: ``"l2"`` (default) or ``"l1"``, the norm of the radii this memory holds.
    """

    def __init__(self, device: torch.device | str | None = None, *, norm: str = "l2") -> None:
        if norm not in _NORMS:
            raise ValueError(
                f"norm must be one of {tuple(_NORMS)} (l2: Gaussian noise's certificates, l1: uniform "
                f"noise's), got {norm!r}"
            )
        self.norm = norm
        self._p = _NORMS[norm]
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(
                "device must be a torch.device, a string such as 'cpu' or 'cuda:0', or None, "
                f"got {type(device).__name__}"
            )
        self._device = None if device is None else torch.device(device)
        self._shape: tuple[int, ...] | None = None  # per-input shape, fixed by the first inputs
        self._x: torch.Tensor | None = None  # (capacity, *shape), rows [0, size) in use
        self._prediction: torch.Tensor | None = None  # (capacity,) int64
        self._radius: torch.Tensor | None = None  # (capacity,) float64
        self._size = 0

    def __len__(self) -> int:
        """The number of stored entries (every answer given, abstentions included)."""
        return self._size

    def __repr__(self) -> str:
        dtype = None if self._x is None else self._x.dtype
        return (
            f"CertificationMemory({self._size} entries, {self.norm} radii, input shape {self._shape}, "
            f"dtype {dtype}, device {self._device})"
        )

    # ----------------------------------------------------------------------------- adjusting

    @torch.no_grad()
    def adjust(
        self, x: torch.Tensor, prediction: torch.Tensor, radius: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjusts a batch of answers against the memory (the rule in the class docstring) and
        stores them, abstentions included.

        The ``B`` queries are processed in order: query ``i`` sees every entry stored before
        it, including those stored by queries ``< i`` of this call. Results equal those of
        ``B`` calls with one query each (bit for bit: every distance is computed the same way
        whichever batch it falls in).

        Args:
            x: ``(B, ...)`` floating-point inputs, all finite, with the per-input shape of the
                inputs this memory has seen.
            prediction: ``(B,)`` integer certified classes, ``ABSTAIN`` (-1) for abstentions.
            radius: ``(B,)`` certified radii in the memory's norm, finite and ``>= 0`` (0 where
                abstaining).

        Returns:
            ``(prediction, radius)``: the adjusted ``(B,)`` int64 classes and ``(B,)`` float64
            radii, on the CPU. An abstention comes back as ``(ABSTAIN, 0)`` unless its input lies
            inside a stored ball of a class, whose class and remaining depth it then takes.
        """
        x, prediction, radius = self._check_queries(x, prediction, radius)
        for start in range(0, prediction.shape[0], _QUERY_BLOCK):
            rows = slice(start, start + _QUERY_BLOCK)
            prediction[rows], radius[rows] = self._adjust_block(x[rows], prediction[rows], radius[rows])
        return prediction, radius

    @torch.no_grad()
    def extend(self, x: torch.Tensor, prediction: torch.Tensor, radius: torch.Tensor) -> None:
        """Stores answers that a memory already adjusted, as they are, without adjusting them.

        For rebuilding a memory from saved results (e.g. a result file being resumed): feeding
        every answer that :meth:`adjust` returned, abstentions included, in the order it returned
        them, restores the memory it had then exactly (``adjust`` stores each answer as it returns
        it), so later queries get the same answers as in one uninterrupted run. Answers that were
        never adjusted, or answers of an earlier ddrs_ext whose rule let an abstaining input inside
        a ball abstain, may break the guarantee that stored entries of different labels do not
        overlap; use :meth:`adjust` for those.

        Arguments as for :meth:`adjust` and checked the same way; every row is stored.
        """
        x, prediction, radius = self._check_queries(x, prediction, radius)
        self._append(x, prediction, radius)

    def adjust_result(self, x: torch.Tensor, result: CertifyResult) -> CertifyResult:
        """``adjust`` applied to a ``CertifyResult`` for the inputs ``x``.

        Returns a copy of ``result`` whose ``prediction`` and ``radius`` are the adjusted ones;
        ``p_lower``, ``counts``, ``sigma`` and ``seed`` are kept (the same tensors).
        """
        if not isinstance(result, CertifyResult):
            raise TypeError(
                "result must be the CertifyResult returned by ddrs_ext.certify, got "
                f"{type(result).__name__}; for plain tensors use adjust(x, prediction, radius)"
            )
        norm = getattr(result, "norm", "l2")
        if norm != self.norm:
            raise ValueError(
                f"this memory holds {self.norm} certificates but the result's radii are {norm} radii; "
                f"a memory holds one norm: use CertificationMemory(norm={norm!r}) for these"
            )
        prediction, radius = self.adjust(x, result.prediction, result.radius)
        return dataclasses.replace(result, prediction=prediction, radius=radius)

    def _adjust_block(
        self, x: torch.Tensor, prediction: torch.Tensor, radius: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjusts queries (abstentions included) in order, then stores them; returns their new answers.

        ``x`` is on the memory's device, ``prediction`` and ``radius`` on the CPU. Distances are
        computed on the device; only per-query gaps and the few pairs of queries that can change
        each other's answers come to the CPU, where the block is walked in query order.
        """
        flat = _flat64(x)
        device = flat.device
        own_class = prediction.to(device)
        own_radius = radius.to(device)
        gap, gap_class = self._smallest_gap_to_stored(flat, own_class)
        # An earlier query k of the block changes query i's answer only if d_ik - R_k' < min(gap_i, R_i),
        # R_k' being k's adjusted radius. R_k' is R_k, something smaller, or k's depth inside a ball:
        # a stored one (at most -gap_k) or an earlier query's (at most that query's R'). So every
        # R_k' <= reach = max over the block of R_k and -gap_k, and pairs with d_ik - reach >=
        # min(gap_i, R_i) cannot matter; d - R_k' >= d - reach in floating point too (rounding is
        # monotone), so leaving them out changes no bit.
        if flat.shape[0] > 1:
            reach = torch.maximum(own_radius.max(), (-gap).max())
            pairs, pair_distance = _earlier_pairs_within(flat, torch.minimum(gap, own_radius), reach, self._p)
            gap, gap_class, pair_i, pair_k, pair_distance = _to_host(
                gap, gap_class, pairs[:, 0], pairs[:, 1], pair_distance
            )
        else:
            gap, gap_class = _to_host(gap, gap_class)
            pair_i = pair_k = pair_distance = np.zeros(0)
        gap_class = gap_class.astype(np.int64)
        pair_i, pair_k = pair_i.astype(np.int64), pair_k.astype(np.int64)
        classes = prediction.numpy().copy()
        radii = radius.numpy().copy()
        # Queries with no such pair: their answers follow from the gap to the stored entries alone.
        alone = np.ones(classes.shape[0], dtype=bool)
        alone[pair_i] = False
        inside = alone & (gap < 0)  # inside the ball of an entry of another label (an abstention too)
        classes[inside], radii[inside] = gap_class[inside], -gap[inside]  # -(d - R) == R - d exactly
        shrink = alone & ~inside & (gap < radii)  # never an abstention: its radius is 0 <= gap
        radii[shrink] = gap[shrink]
        # The others in query order: a few numpy operations on the pairs of one query each.
        rows, first = np.unique(pair_i, return_index=True)
        for i, lo, hi in zip(rows.tolist(), first.tolist(), [*first[1:].tolist(), pair_i.shape[0]]):
            m, m_class = gap[i], gap_class[i]
            k = pair_k[lo:hi]  # ascending
            g = pair_distance[lo:hi] - radii[k]
            g[classes[k] == classes[i]] = math.inf
            j = int(g.argmin())  # first minimum: the earliest entry on ties
            if g[j] < m:  # strict: earlier (stored) entries win ties
                m, m_class = g[j], classes[k[j]]
            if m < 0:
                classes[i], radii[i] = m_class, -m
            elif m < radii[i]:
                radii[i] = m
        classes, radii = torch.from_numpy(classes), torch.from_numpy(radii)
        self._append(x, classes, radii)
        return classes, radii

    def _smallest_gap_to_stored(
        self, flat: torch.Tensor, own_class: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: min over stored entries of other labels of d - R (inf if none), and its label.

        ``own_class`` is on ``flat``'s device, as are the results."""
        q = flat.shape[0]
        best = torch.full((q,), math.inf, dtype=torch.float64, device=flat.device)
        best_class = torch.full((q,), ABSTAIN, dtype=torch.int64, device=flat.device)
        if self._size and q:
            step = max(1, min(_TILE_ELEMENTS // q, _slice_rows(flat)))
            for start in range(0, self._size, step):
                stop = min(start + step, self._size)
                points = _flat64(self._x[start:stop])
                classes = self._prediction[start:stop]
                gap = _pairwise_distances(flat, points, self._p) - self._radius[start:stop]
                gap.masked_fill_(classes[None, :] == own_class[:, None], math.inf)
                index = gap.argmin(dim=1)  # first minimum: the earliest entry on ties
                value = gap.gather(1, index[:, None])[:, 0]
                smaller = value < best  # strict: earlier tiles win ties
                best = torch.where(smaller, value, best)
                best_class = torch.where(smaller, classes[index], best_class)
        return best, best_class

    def _append(self, x: torch.Tensor, prediction: torch.Tensor, radius: torch.Tensor) -> None:
        """Stores rows of x (on the memory's device) with their answers (int64, float64, any device),
        growing the buffers by doubling."""
        n = x.shape[0]
        if n == 0:
            return
        need = self._size + n
        dtype = x.dtype if self._x is None else torch.promote_types(self._x.dtype, x.dtype)
        capacity = 0 if self._x is None else self._x.shape[0]
        if need > capacity or dtype != self._x.dtype:
            self._reallocate(max(need, 2 * capacity if need > capacity else capacity, _MIN_CAPACITY), dtype)
        self._x[self._size : need] = x  # exact: dtype is at least as wide as x's
        self._prediction[self._size : need] = prediction
        self._radius[self._size : need] = radius
        self._size = need

    def _reallocate(self, capacity: int, dtype: torch.dtype) -> None:
        x = torch.empty((capacity, *self._shape), dtype=dtype, device=self._device)
        prediction = torch.empty(capacity, dtype=torch.int64, device=self._device)
        radius = torch.empty(capacity, dtype=torch.float64, device=self._device)
        if self._size:
            x[: self._size] = self._x[: self._size]
            prediction[: self._size] = self._prediction[: self._size]
            radius[: self._size] = self._radius[: self._size]
        self._x, self._prediction, self._radius = x, prediction, radius

    # ----------------------------------------------------------------------------- checks

    def _check_queries(
        self, x: Any, prediction: Any, radius: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated (x on the memory's device, prediction int64 CPU copy, radius float64 CPU copy)."""
        x = check_inputs(x)
        batch = x.shape[0]
        shape = tuple(x.shape[1:])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"x must have per-input shape {self._shape}, the shape of the inputs this memory already "
                f"holds, got {shape} (x of shape {tuple(x.shape)}); use one memory per input shape"
            )
        prediction = _as_vector(prediction, "prediction", batch)
        if prediction.dtype.is_floating_point or prediction.is_complex() or prediction.dtype == torch.bool:
            raise TypeError(
                f"prediction must hold integer class indices, got dtype {prediction.dtype}; "
                "pass e.g. prediction.long()"
            )
        prediction = prediction.to(device="cpu", dtype=torch.int64, copy=True)
        bad = prediction < ABSTAIN
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"prediction must be a class index >= 0 or ABSTAIN ({ABSTAIN}); "
                f"input {i} has {int(prediction[i])}"
            )
        radius = _as_vector(radius, "radius", batch)
        if radius.is_complex() or radius.dtype == torch.bool:
            raise TypeError(f"radius must hold real numbers, got dtype {radius.dtype}")
        radius = radius.to(device="cpu", dtype=torch.float64, copy=True)
        ok = torch.isfinite(radius) & (radius >= 0)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"radius must be finite and >= 0 for every input; input {i} has {float(radius[i])}"
            )
        ghost = (prediction == ABSTAIN) & (radius > 0)
        if bool(ghost.any()):
            i = int(ghost.nonzero()[0, 0])
            raise ValueError(
                f"input {i} abstains (prediction {ABSTAIN}) but has radius {float(radius[i])}; an abstention "
                "certifies nothing, so its radius must be 0"
            )
        if self._device is None:
            self._device = x.device
        if self._shape is None:
            self._shape = shape
        return x.to(self._device), prediction, radius

    # ----------------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """The stored entries as a dict of plain values and tensors (copies, on the memory's device).

        Keys: ``format``, ``version`` (2: abstentions are stored), ``norm`` (``"l2"`` or ``"l1"``),
        ``input_shape`` (list or None), ``x`` (``(N, ...)`` in the stored dtype, or None when
        nothing is stored), ``prediction`` ((N,) int64, ``ABSTAIN`` for a stored abstention),
        ``radius`` ((N,) float64, 0 for an abstention).
        """
        n = self._size
        if self._x is None:
            x = None
            prediction = torch.zeros(0, dtype=torch.int64, device=self._device)
            radius = torch.zeros(0, dtype=torch.float64, device=self._device)
        else:
            x = self._x[:n].clone()
            prediction, radius = self._prediction[:n].clone(), self._radius[:n].clone()
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "norm": self.norm,
            "input_shape": None if self._shape is None else list(self._shape),
            "x": x,
            "prediction": prediction,
            "radius": radius,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replaces the memory's entries with those of ``state`` (from ``state_dict``).

        A state of version 1 (an earlier ddrs_ext, whose rule did not store abstentions and let an
        abstaining input inside a stored ball abstain) is refused with a ValueError: its answers do
        not carry the guarantee of this version's rule.

        The tensors go to this memory's device; a memory created with ``device=None`` takes
        the device of ``state``'s tensors. The state's norm must be this memory's
        (:meth:`load` makes a memory of the saved norm).
        """
        norm, shape, x, prediction, radius = _check_state(state)
        if norm != self.norm:
            raise ValueError(
                f"the state holds {norm} certificates but this memory holds {self.norm} ones; a memory holds "
                f"one norm: load it into CertificationMemory(norm={norm!r}) (CertificationMemory.load does)"
            )
        n = prediction.shape[0]
        if self._device is None and x is not None:
            self._device = x.device
        self._shape = shape
        self._x = self._prediction = self._radius = None
        self._size = 0
        if x is not None:
            self._reallocate(max(n, _MIN_CAPACITY), x.dtype)
            self._x[:n] = x
            self._prediction[:n] = prediction
            self._radius[:n] = radius
            self._size = n

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``state_dict()`` to ``path`` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = None) -> CertificationMemory:
        """Reads a memory written by ``save``; ``map_location`` as in ``torch.load``.

        The memory lives on the device its tensors are loaded to.
        """
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except OSError:
            raise
        except Exception as err:  # unpickling errors have many types; all mean "not ours"
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved CertificationMemory: torch.load failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        try:
            memory = cls(norm=_check_state(state)[0])
            memory.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)!r}: {err}") from None
        return memory


def _as_vector(value: Any, name: str, batch: int) -> torch.Tensor:
    """value as a detached (batch,) tensor, or a clear error."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name} must be a tensor of shape ({batch},), got {type(value).__name__}"
            ) from None
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},), one value per input of x, got shape {tuple(t.shape)}"
        )
    return t


def _check_state(
    state: Any,
) -> tuple[str, tuple[int, ...] | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(norm, input_shape, x, prediction, radius) of a state_dict, or a ValueError saying what is wrong."""
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        got = (
            f"a dict with keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
        )
        raise ValueError(
            "not a CertificationMemory state: expected the dict that CertificationMemory.state_dict() "
            f"returns (with format {_FORMAT!r}), got {got}"
        )
    version = state.get("version")
    if version == 1:
        raise ValueError(
            "this CertificationMemory state is version 1, written by an earlier ddrs_ext whose rule let "
            "an abstaining input abstain even inside a stored ball and did not store abstentions; its "
            "answers do not all agree with its balls, so it is not loaded. Rebuild the memory with this "
            "version: pass the unadjusted certify results, in their original order, to adjust()"
        )
    if version != _VERSION:
        raise ValueError(
            f"unknown CertificationMemory state version {version!r}; this ddrs_ext reads version "
            f"{_VERSION} (a newer ddrs_ext may have written it)"
        )

    def damaged(problem: str) -> ValueError:
        return ValueError(f"CertificationMemory state is damaged: {problem}")

    norm = state.get("norm", "l2")
    if norm not in _NORMS:
        raise damaged(f"norm is {norm!r}, not one of {sorted(_NORMS)}")

    missing = {"input_shape", "x", "prediction", "radius"} - state.keys()
    if missing:
        raise damaged(f"it lacks {sorted(missing)}")
    shape, x, prediction, radius = state["input_shape"], state["x"], state["prediction"], state["radius"]
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise damaged(f"input_shape is {shape!r}, not a list of sizes")
        shape = tuple(shape)
    for name, value, dtype in (("prediction", prediction, torch.int64), ("radius", radius, torch.float64)):
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
            raise damaged(f"{name} is not a 1-d {dtype} tensor")
    n = prediction.shape[0]
    if radius.shape[0] != n:
        raise damaged(f"{n} predictions but {radius.shape[0]} radii")
    if x is None:
        if n:
            raise damaged(f"{n} entries but no inputs x")
    elif (
        not isinstance(x, torch.Tensor)
        or not x.is_floating_point()
        or x.dim() < 1
        or x.shape[0] != n
        or tuple(x.shape[1:]) != shape
    ):
        raise damaged(f"x is not a float tensor of shape ({n}, *input_shape) with input_shape {shape}")
    if n and not bool((prediction >= ABSTAIN).all()):
        raise damaged(f"a stored class is below ABSTAIN ({ABSTAIN})")
    if n and not bool((torch.isfinite(radius) & (radius >= 0)).all()):
        raise damaged("a stored radius is negative or not finite")
    if n and bool(((prediction == ABSTAIN) & (radius != 0)).any()):
        raise damaged("a stored abstention has a radius other than 0")
    return norm, shape, x, prediction, radius
