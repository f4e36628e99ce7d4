"""Data-dependent training (Alfarra et al., UAI 2022, section 5): a noise level per training example,
updated by a few surrogate-ascent steps each time the example is seen, inside three
randomized-smoothing training schemes.

The pieces drop into an ordinary training loop::

    data = DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True)
    bank = SigmaBank(len(train_set), sigma0=0.12)
    for x, y, index in data:
        sigma = update_sigma(model, bank, x, index)            # model frozen, BatchNorm untouched
        loss = gaussian_augmentation_loss(model, x, y, sigma, index=index)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

Noise comes from the fused kernel with autograd (gradients flow to the inputs; the noise is
regenerated from its key in backward rather than stored), keyed by dataset index and a seed
drawn from torch's generator per call, so ``torch.manual_seed`` reproduces a run.

For the l1 certificate (uniform noise on the cube of half-width theta) the same loop trains with
``update_sigma(..., noise="uniform")`` (a theta bank: :class:`SigmaBank` holds any noise scale) and
:func:`uniform_augmentation_loss`. MACER and SmoothAdv stay Gaussian: MACER's hinge is on the
Gaussian certificate's ``Phi^-1`` margin (its l1 counterpart, a hinge on ``theta * (p_y - p_2nd)``,
is another loss nobody has published or tested), and SmoothAdv's attack is an L2 PGD, matched to
the L2 ball; an l1 certificate would call for an l1 attack, a different algorithm.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ddrs_ext import ops, rng
from ddrs_ext._validate import check_count, check_inputs, check_sigma
from ddrs_ext.noise import UNIFORM, resolve_noise, scale_name
from ddrs_ext.sigma import _optimize

PHASE_TRAIN = 5 * rng.SAMPLE_SPACE  # training noise: a fresh seed per call, so one range suffices


class SigmaBank(torch.nn.Module):
    """One noise level per training example, indexed by dataset index.

    A module with a single buffer ``sigma`` (float64), so it moves with ``.to(device)`` and is
    saved and restored, with its ``sigma_range``, by ``state_dict()`` / ``load_state_dict()``
    (e.g. in a checkpoint beside the model's). It stays float64 whatever ``.to(dtype)``, ``.float()``
    or ``.half()`` it is given (directly or through a parent module): a device move applies, a dtype
    change does not. An index repeated within one ``update`` keeps one of its values.

    Reading it works as for a tensor of its values, and every read is a copy, so nothing done to the
    result changes the bank:

    - ``bank.mean()``, ``bank.min()``, ``bank.max()``, ``bank.std()``, ``bank.sum()``, ``bank.median()``
      (with the tensor methods' arguments; ``bank.mean().item()`` or ``float(bank.mean())`` for a log line);
    - ``bank[index]`` with an int, a slice, or integers of any shape (dataset indices in
      ``[0, len(bank))``; negative ones are refused, not counted from the end);
    - ``len(bank)``, ``iter(bank)``, ``bank.numel()``, ``bank.tensor()`` (all values);
    - any ``torch`` function given the bank in place of a tensor (``torch.quantile(bank, 0.9)``,
      ``torch.histc(bank)``, ``torch.log(bank)``), and a tensor's methods and operators given it as an
      argument (``x * bank``), through ``__torch_function__``; ``torch.as_tensor(bank)``,
      ``torch.tensor(bank)`` and ``torch.from_dlpack(bank)`` (through DLPack) and ``numpy.asarray(bank)``.

    Writing goes only through :meth:`update` (or :func:`update_sigma`, which calls it), which checks
    the values against ``sigma_range`` and records what changed for :meth:`synchronize`:
    ``bank[index] = values``, ``bank += ...`` and the like, an in-place torch function on the bank
    (``torch.relu_(bank)``, ``torch.nn.init.uniform_(bank)``) or ``out=bank`` raise a TypeError. (The
    buffer ``bank.sigma`` itself is the live storage: read it, never write it.)

    Under DistributedDataParallel every rank keeps a whole bank and updates the examples of its own
    minibatches; :meth:`synchronize` (a collective call) then hands every rank's updates to every
    rank. The bank remembers which entries :meth:`update` changed since the last synchronisation
    (one flag per example, not saved).
    """

    def __init__(
        self,
        num_examples: int,
        sigma0: float,
        *,
        sigma_range: tuple[float, float] = (1e-3, 10.0),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        num_examples = check_count(num_examples, "num_examples")
        sigma0 = float(check_sigma(sigma0, 1, torch.device("cpu"), name="sigma0")[0])
        lo, hi = sigma_range
        if not (0 < lo <= sigma0 <= hi < math.inf):
            raise ValueError(f"sigma_range must satisfy 0 < low <= sigma0 <= high < inf, got {sigma_range}")
        self.sigma_range = (float(lo), float(hi))
        self.register_buffer("sigma", torch.full((num_examples,), sigma0, dtype=torch.float64, device=device))
        # which entries update() changed since the last synchronize(): not a buffer (the bank's only
        # buffer is sigma), so it follows sigma's device lazily (_flags)
        self._changed = torch.zeros(num_examples, dtype=torch.bool, device=device)

    def _index(self, index) -> torch.Tensor:
        index = torch.as_tensor(index, device=self.sigma.device)
        if index.dtype == torch.bool or index.is_floating_point():
            raise TypeError(f"index must hold integers, got dtype {index.dtype}")
        index = index.long().reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.sigma.numel()):
            raise ValueError(f"index entries must lie in [0, {self.sigma.numel()}), the bank's size")
        return index

    def _read_index(self, key) -> torch.Tensor | slice:
        """A slice as it is, or ``key`` as a validated integer tensor of its own shape."""
        if isinstance(key, slice):
            return key
        if isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], slice):
            return key[0]
        shape = torch.as_tensor(key).shape
        return self._index(key).reshape(shape)

    def __getitem__(self, key) -> torch.Tensor:
        """A copy of the values at ``key``: an int (0-dim result), a slice, or dataset indices (any shape)."""
        return self.sigma[self._read_index(key)].clone()

    def __setitem__(self, key, values) -> None:
        raise TypeError(
            "a SigmaBank is written only through bank.update(index, values), which checks the values "
            "against sigma_range (update_sigma() already writes its new sigma back, so a line such as "
            "`bank[index] = sigma` after it can simply go)"
        )

    def __len__(self) -> int:
        return self.sigma.numel()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensor())

    def numel(self) -> int:
        """The number of examples."""
        return self.sigma.numel()

    def tensor(self) -> torch.Tensor:
        """A copy of all values: (num_examples,) float64 on the bank's device."""
        return self.sigma.clone()

    # reductions return new tensors (no view of the buffer), so they read the buffer without a copy
    def mean(self, *args, **kwargs) -> torch.Tensor:
        """``Tensor.mean`` of the values."""
        return self.sigma.mean(*args, **kwargs)

    def min(self, *args, **kwargs):
        """``Tensor.min`` of the values."""
        return self.sigma.min(*args, **kwargs)

    def max(self, *args, **kwargs):
        """``Tensor.max`` of the values."""
        return self.sigma.max(*args, **kwargs)

    def std(self, *args, **kwargs) -> torch.Tensor:
        """``Tensor.std`` of the values."""
        return self.sigma.std(*args, **kwargs)

    def sum(self, *args, **kwargs) -> torch.Tensor:
        """``Tensor.sum`` of the values."""
        return self.sigma.sum(*args, **kwargs)

    def median(self, *args, **kwargs):
        """``Tensor.median`` of the values."""
        return self.sigma.median(*args, **kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Torch functions read a bank as a copy of its values; writing to one is refused."""
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_DUNDERS
        target = args[0] if args else next(iter(kwargs.values()), None)  # what an in-place function writes
        if (in_place and isinstance(target, SigmaBank)) or _holds_bank(kwargs.get("out")):
            raise TypeError(
                f"{name}() would write to a SigmaBank; it is written only through bank.update(index, "
                "values), which checks the values against sigma_range (bank.tensor() is a copy to change)"
            )
        return func(*_read_banks(args), **_read_banks(kwargs))

    def __array__(self, dtype=None, copy=None):
        values = self.sigma.detach().cpu().numpy().copy()
        return values if dtype is None else values.astype(dtype, copy=False)

    def __dlpack__(self, *args, **kwargs):
        return self.tensor().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.sigma.__dlpack_device__()

    def _apply(self, fn, recurse=True):
        # .to(device) applies; a dtype change (.to(torch.float32), .half(), a parent's .float()) does not:
        # the bank stays float64, and its values are never rounded through a narrower type on the way
        def keep_float64(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                out = t.to(out.device)
            return out

        return super()._apply(keep_float64, recurse)

    def _refuse_in_place(self, other):
        raise TypeError(
            "a SigmaBank is written only through bank.update(index, values), which checks the values against "
            "sigma_range; for arithmetic on its values use bank.tensor() (a copy)"
        )

    __iadd__ = __isub__ = __imul__ = __itruediv__ = __ifloordiv__ = __imod__ = __ipow__ = _refuse_in_place

    def update(self, index, values: torch.Tensor) -> None:
        """Writes ``values`` (one per index, finite, inside ``sigma_range``) back to the bank."""
        index = self._index(index)
        values = torch.as_tensor(values, dtype=torch.float64, device=self.sigma.device).reshape(-1)
        if values.shape != index.shape:
            raise ValueError(
                f"update needs one value per index: {index.numel()} indices, {values.numel()} values"
            )
        lo, hi = self.sigma_range
        if not bool((torch.isfinite(values) & (values >= lo) & (values <= hi)).all()):
            raise ValueError(f"sigma values must be finite and inside sigma_range {self.sigma_range}")
        self.sigma[index] = values
        self._flags()[index] = True

    def _flags(self) -> torch.Tensor:
        if self._changed.device != self.sigma.device:
            self._changed = self._changed.to(self.sigma.device)
        return self._changed

    def synchronize(self, group: dist.ProcessGroup | None = None) -> int:
        """Makes the banks of all ranks of ``group`` (default: the default process group) equal: every
        rank receives the entries the others changed through :meth:`update` since the last call.

        Call it on every rank at the same point: at least after each epoch (a ``DistributedSampler``
        hands each example to one rank per epoch, and to another in the next) and before saving a
        checkpoint; every step costs little more (16 bytes per changed entry and rank). An entry that
        several ranks changed (a ``DistributedSampler`` pads an uneven epoch with a few repeats)
        takes the value of the highest of those ranks. Without an initialised process group (or with
        one rank) it only forgets what changed. Returns the number of distinct entries changed over
        all ranks.

        Three collective calls, bounded by the group's timeout. The banks must have been equal at the
        previous synchronisation (created alike or loaded from one checkpoint); a size or content
        mismatch afterwards is an error on every rank, not a silent divergence.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            changed = int(self._flags().sum())
            self._flags().zero_()
            return changed
        world = dist.get_world_size(group)
        comm = _comm_device(group, self.sigma.device)
        index = self._flags().nonzero().flatten()
        # (index, sigma's bits) per changed entry: one int64 tensor carries both exactly
        mine = torch.stack([index, self.sigma[index].view(torch.int64)]).to(comm)
        sizes = [torch.zeros(2, dtype=torch.int64, device=comm) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([mine.shape[1], self.sigma.numel()], device=comm), group=group)
        lengths = [int(s[0]) for s in sizes]
        if len({int(s[1]) for s in sizes}) > 1:
            raise ValueError(
                "the sigma banks of the ranks have different sizes "
                f"({', '.join(str(int(s[1])) for s in sizes)} by rank); create them alike on every rank"
            )
        longest = max(lengths)
        padded = torch.zeros(2, longest, dtype=torch.int64, device=comm)
        padded[:, : mine.shape[1]] = mine
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        merged = torch.cat([p[:, :k] for p, k in zip(parts, lengths)], dim=1).to(self.sigma.device)
        index, bits = merged[0], merged[1]
        # entries changed on several ranks: the last occurrence (highest rank) wins, deterministically
        order = torch.arange(index.numel(), device=index.device)
        last = torch.full((self.sigma.numel(),), -1, dtype=torch.int64, device=index.device)
        last.scatter_reduce_(0, index, order, reduce="amax")
        winners = last[last >= 0]
        self.sigma[index[winners]] = bits[winners].view(torch.float64)
        self._flags().zero_()
        sums = [torch.zeros(2, dtype=torch.int64, device=comm) for _ in range(world)]
        dist.all_gather(sums, _checksum(self.sigma).to(comm), group=group)
        if any(not torch.equal(s, sums[0]) for s in sums):
            differ = [r for r, s in enumerate(sums) if not torch.equal(s, sums[0])]
            raise RuntimeError(
                f"the sigma banks of ranks {differ} differ from rank 0's after synchronize: they differed "
                "before it; create the banks alike (or load one checkpoint) on every rank and change them "
                "only through update() / update_sigma()"
            )
        return int(winners.numel())

    def get_extra_state(self) -> dict:
        return {"sigma_range": self.sigma_range}

    def set_extra_state(self, state: dict) -> None:
        self.sigma_range = tuple(float(v) for v in state["sigma_range"])
        self._flags().zero_()  # a loaded bank is the new common starting point

    def extra_repr(self) -> str:
        return f"num_examples={self.sigma.numel()}, sigma_range={self.sigma_range}"


_IN_PLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor")
) | {"__ilshift__", "__irshift__", "__setitem__", "__set__", "__delitem__"}


def _holds_bank(value) -> bool:
    if isinstance(value, SigmaBank):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_bank(v) for v in value)
    return False


def _read_banks(value):
    """``value`` with every SigmaBank in it (in lists, tuples and dicts) replaced by a copy of its values."""
    if isinstance(value, SigmaBank):
        return value.tensor()
    if isinstance(value, tuple):
        return tuple(_read_banks(v) for v in value)
    if isinstance(value, list):
        return [_read_banks(v) for v in value]
    if isinstance(value, dict):
        return {k: _read_banks(v) for k, v in value.items()}
    return value


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a collective of ``group`` takes its tensors: a CUDA device under NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checksum(values: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of the bit patterns of ``values`` (plain and position-weighted, wrapping): equal
    for equal tensors, and for different ones equal only by a coincidence nobody meets."""
    bits = values.view(torch.int64)
    weights = torch.arange(1, 2 * bits.numel(), 2, dtype=torch.int64, device=bits.device)
    return torch.stack([bits.sum(), (bits * weights).sum()])


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that each item also carries its index: ``(*item, index)``."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)


def unwrap_ddp(model):
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model`` itself.

    Sigma steps and SmoothAdv's attack evaluate the model without training it, so they run on the
    inner module: no DDP hooks or collectives (which a different number of forward batches per rank
    would leave waiting), and forward-mode autograd works (DDP with ``find_unused_parameters=True``
    wraps outputs in a function without a forward-mode derivative). The parameters are the same.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (BatchNorm uses and keeps its running statistics, dropout is off) and no
    parameter gradients, restored on exit."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, wanted in grads.items():
            p.requires_grad_(wanted)


def update_sigma(
    model: torch.nn.Module,
    bank: SigmaBank,
    x: torch.Tensor,
    index: torch.Tensor | Sequence[int],
    *,
    steps: int = 3,
    num_samples: int = 16,
    lr: float = 0.04,
    estimator: str = "reparam",
    rule: str = "ascent",
    surrogate: str = "paper",
    clip: tuple[float, float] | None = None,
    batch_size: int = 4096,
    seed: int | None = None,
    noise: str = "gaussian",
    probabilities: bool = False,
    return_radius: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A few surrogate-ascent steps for each example of the minibatch, from the bank's values,
    with the model frozen and its BatchNorm statistics untouched; written back to the bank.

    Returns the new sigma (x's dtype on x's device, ready for the losses). The step rule, estimator
    and surrogate are those of :func:`ddrs_ext.optimize_sigma`; the paper uses a few plain ascent
    steps on its surrogate here (the defaults); ``clip`` None is its (0.02, 0.98). A
    ``DistributedDataParallel`` model is stepped through its inner module (:func:`unwrap_ddp`); the
    bank is this rank's, to be merged with the other ranks' by :meth:`SigmaBank.synchronize`.

    probabilities: the model returns class probabilities (its ``forward`` ends in softmax), as for
    :func:`ddrs_ext.optimize_sigma`: outputs of the other kind are refused with a ValueError.

    return_radius: returns ``(sigma, radius)`` instead, ``radius`` (float64, (B,), on x's device) the
    surrogate radius the last step measured, at the sigma that step started from and with that step's
    noise (the authors' ``get_sigma(..., ret_radius=True)`` returns the same quantity); it costs
    nothing extra. It is not re-measured at the returned sigma (:func:`ddrs_ext.surrogate_radius` does
    that, from fresh noise). With ``steps=0`` it is the surrogate at the bank's values, measured with
    the noise a first step would draw (one forward pass of ``num_samples`` copies per example).

    ``noise="uniform"``: the bank holds half-widths theta and the steps are :func:`ddrs_ext.optimize_theta`'s
    (``estimator="reparam"`` only, ``clip`` must stay None), for training with
    :func:`uniform_augmentation_loss`; the radius is then ``theta * (E_A - E_B)`` (or ``theta * (2 E_A - 1)``
    with ``surrogate="certify"``).
    """
    if not isinstance(return_radius, bool):
        raise TypeError(f"return_radius must be a bool, got {return_radius!r}")
    family = resolve_noise(noise)
    model = unwrap_ddp(model)
    index = bank._index(index)
    if index.numel() != x.shape[0]:
        raise ValueError(f"index must have one entry per example ({x.shape[0]}), got {index.numel()}")
    lo, hi = bank.sigma_range
    start = bank.sigma[index]
    if family is not UNIFORM and clip is None:
        clip = (0.02, 0.98)
    with frozen(model):
        sigma = _optimize(
            family,
            model,
            x,
            start,
            iterations=steps,
            num_samples=num_samples,
            lr=lr,
            estimator=estimator,
            rule=rule,
            growth=2.0,
            clip=clip,
            sigma_range=(lo, hi),
            surrogate=surrogate,
            keep_prediction=False,
            probabilities=probabilities,
            batch_size=batch_size,
            seed=seed,
            index=index.cpu(),
            progress=False,
            callback=None,
            return_radius=return_radius,
        )
    if return_radius:
        sigma, radius = sigma
    bank.update(index, sigma)
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    return (sigma, radius.to(x.device)) if return_radius else sigma


def _as_sigma(sigma, x: torch.Tensor, name: str = "sigma") -> torch.Tensor:
    if isinstance(sigma, torch.Tensor) and sigma.requires_grad:
        raise ValueError(
            f"{name} must not require grad here; detach it (the losses train the model, not {name})"
        )
    return check_sigma(sigma, x.shape[0], x.device, name=name).to(x.dtype)


def noisy_copies(
    x: torch.Tensor,
    sigma,
    *,
    copies: int = 1,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str = "gaussian",
) -> torch.Tensor:
    """``copies`` noisy copies of every input, ``x[b] + sigma[b] * eps``, shape ``(B * copies, ...)``
    (the copies of input b are rows ``b * copies ... b * copies + copies - 1``).

    Differentiable with respect to x. ``seed=None`` draws a fresh seed from torch's generator;
    ``index`` (e.g. dataset indices) picks each input's noise stream. ``noise="uniform"``: ``eps`` is
    uniform on ``[-1, 1]^D`` and ``sigma`` the cube's half-width theta.
    """
    family = resolve_noise(noise)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    copies = check_count(copies, "copies")
    sigma = _as_sigma(sigma, x, scale_name(family))
    stream = rng.resolve_streams(index, x.shape[0], x.device)
    seed = rng.resolve_seed(seed)
    if family is UNIFORM:
        return ops.perturb_uniform(x, sigma, stream, seed, PHASE_TRAIN, copies)
    out, _ = ops.perturb_gaussian(x, sigma, stream, seed, PHASE_TRAIN, copies)
    return out


def _check_labels(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError("y must be an integer tensor of class labels")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    return y.long()


def gaussian_augmentation_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma,
    *,
    copies: int = 1,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gaussian data augmentation (Cohen et al. 2019): mean cross-entropy over ``copies`` noisy
    copies of every input, each input with its own sigma."""
    y = _check_labels(y, x)
    noisy = noisy_copies(x, sigma, copies=copies, seed=seed, index=index)
    return F.cross_entropy(model(noisy), y.repeat_interleave(copies))


def uniform_augmentation_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    theta,
    *,
    copies: int = 1,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gaussian augmentation's twin for the l1 certificate: mean cross-entropy over ``copies`` copies
    ``x + theta * u``, ``u`` uniform on ``[-1, 1]^D``, each input with its own half-width ``theta``
    (the training of Yang et al. 2020 for uniform smoothing, with a theta per input for the
    data-dependent scheme)."""
    y = _check_labels(y, x)
    noisy = noisy_copies(x, theta, copies=copies, seed=seed, index=index, noise="uniform")
    return F.cross_entropy(model(noisy), y.repeat_interleave(copies))


def macer_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma,
    *,
    num_samples: int = 16,
    lam: float = 12.0,
    gamma: float = 8.0,
    beta: float = 16.0,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """MACER (Zhai et al., ICLR 2020), the original loss, with a sigma per input.

    Over ``num_samples`` noisy copies of each input: the cross-entropy of the mean softmax, plus,
    on the examples whose mean softmax at inverse temperature ``beta`` ranks the label first,
    ``lam * sigma_i / 2 * max(gamma - (Phi^-1(p_y) - Phi^-1(p_2nd)), 0)`` with ``p`` that
    tempered mean softmax; averaged over the batch. (The published DDRS code alters this hinge;
    this is MACER's own.)
    """
    y = _check_labels(y, x)
    num_samples = check_count(num_samples, "num_samples")
    lam, gamma, beta = (
        _check_weight(v, name) for name, v in (("lam", lam), ("gamma", gamma), ("beta", beta))
    )
    sig = _as_sigma(sigma, x)
    B = x.shape[0]
    logits = model(noisy_copies(x, sig, copies=num_samples, seed=seed, index=index))
    logits = logits.reshape(B, num_samples, -1)
    mean_softmax = F.softmax(logits, dim=2).mean(1)
    classification = F.nll_loss(torch.log(mean_softmax + 1e-10), y, reduction="sum")
    tempered = F.softmax(beta * logits, dim=2).mean(1)
    top2, which = tempered.topk(2, dim=1)
    # Correctly classified; a probability of exactly 0 or 1 would make the margin infinite (and its
    # gradient NaN), and such examples lie beyond the hinge anyway, so they add nothing (as in MACER).
    keep = (which[:, 0] == y) & (top2[:, 1] > 0) & (top2[:, 0] < 1)
    margin = torch.special.ndtri(top2[keep, 0]) - torch.special.ndtri(top2[keep, 1])
    hinge = torch.clamp(gamma - margin, min=0)
    robustness = (sig[keep] / 2 * hinge).sum()
    return (classification + lam * robustness) / B


def _check_weight(value, name: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def consistency_penalty(logits: torch.Tensor, *, lam: float = 10.0, eta: float = 0.5) -> torch.Tensor:
    """The consistency regulariser of Jeong & Shin (NeurIPS 2020) for logits of shape ``(B, m, C)``
    (``m`` >= 1 noisy copies of each of ``B`` inputs), averaged over the inputs:
    ``lam * 1/m sum_i KL(pbar || p_i) + eta * H(pbar)``, with ``p_i`` the softmax of copy ``i`` and
    ``pbar`` their mean. Gradients flow through ``pbar`` as well as through each ``p_i``.
    """
    lam, eta = _check_weight(lam, "lam"), _check_weight(eta, "eta")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            "logits must be a floating-point tensor of shape (inputs, copies, classes), got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    log_p = F.log_softmax(logits, dim=2)
    # log of the mean softmax, computed in log space so that a class no copy believes in stays finite
    log_mean = torch.logsumexp(log_p, dim=1) - math.log(logits.shape[1])
    mean = log_mean.exp()
    kl = (mean[:, None, :] * (log_mean[:, None, :] - log_p)).sum(2).mean(1)
    entropy = -(mean * log_mean).sum(1)
    return (lam * kl + eta * entropy).mean()


def consistency_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma,
    *,
    copies: int = 2,
    lam: float = 10.0,
    eta: float = 0.5,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gaussian augmentation with consistency regularisation (Jeong & Shin, "Consistency
    regularization for certified robustness of smoothed classifiers", NeurIPS 2020), a sigma per input.

    Over ``copies`` (their ``m``) noisy copies ``x_b + sigma_b * eps_i`` of every input, with ``p_i``
    the softmax of copy ``i`` and ``pbar`` the mean of the ``p_i``:
    ``1/m sum_i CE(p_i, y_b) + lam * 1/m sum_i KL(pbar || p_i) + eta * H(pbar)``, averaged over the
    batch (:func:`consistency_penalty` is the regulariser alone). The paper uses ``m = 2`` and
    ``eta = 0.5`` throughout, and ``lam`` = 20 on MNIST, 10 or 20 on CIFAR-10, 5 or 10 on ImageNet.
    """
    y = _check_labels(y, x)
    copies = check_count(copies, "copies")
    lam, eta = _check_weight(lam, "lam"), _check_weight(eta, "eta")
    B = x.shape[0]
    logits = model(noisy_copies(x, sigma, copies=copies, seed=seed, index=index))
    classification = F.cross_entropy(logits, y.repeat_interleave(copies))
    return classification + consistency_penalty(logits.reshape(B, copies, -1), lam=lam, eta=eta)


def smoothadv_attack(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma,
    *,
    epsilon: float = 0.5,
    steps: int = 2,
    num_samples: int = 4,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """SmoothAdv's attack (Salman et al., NeurIPS 2019): L2 PGD on the soft smoothed classifier.

    Maximises ``-log(mean_i softmax(f(x' + sigma eps_i))_y)`` over ``||x' - x||_2 <= epsilon`` with
    ``steps`` normalised-gradient steps of ``step_size`` (default ``2 * epsilon / steps``) and the same
    ``num_samples`` noise draws at every step (``seed``, ``index``); ``clamp`` keeps ``x'`` in the data
    range. Returns ``x'`` (detached). The model is run as it is (call it in eval mode to attack the
    deployed network, as SmoothAdv does); a ``DistributedDataParallel`` model through its inner module.
    """
    model = unwrap_ddp(model)
    y = _check_labels(y, x)
    x = check_inputs(x)
    steps = check_count(steps, "steps", minimum=0)
    num_samples = check_count(num_samples, "num_samples")
    if not (isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if step_size is None:
        step_size = 2.0 * epsilon / max(steps, 1)
    if not (math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
    sig = _as_sigma(sigma, x)
    seed = rng.resolve_seed(seed)
    B = x.shape[0]
    adv = x.detach().clone()
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():  # the attack needs gradients even inside a caller's no_grad
            loss = smoothed_cross_entropy(model, adv, y, sig, num_samples=num_samples, seed=seed, index=index)
            (grad,) = torch.autograd.grad(loss * B, adv)
        norm = grad.reshape(B, -1).norm(dim=1).clamp_min(1e-12)
        with torch.no_grad():
            adv = adv + step_size * grad / norm.view(B, *([1] * (x.dim() - 1)))
            delta = adv - x
            scale = (epsilon / delta.reshape(B, -1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            adv = x + delta * scale.view(B, *([1] * (x.dim() - 1)))
            if clamp is not None:
                adv = adv.clamp(*clamp)
    return adv.detach()


def smoothed_cross_entropy(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma,
    *,
    num_samples: int,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """``mean_b -log(mean_i softmax(f(x_b + sigma_b eps_i))_{y_b})``: the loss of the soft smoothed
    classifier that SmoothAdv attacks."""
    y = _check_labels(y, x)
    num_samples = check_count(num_samples, "num_samples")
    B = x.shape[0]
    logits = model(noisy_copies(x, sigma, copies=num_samples, seed=seed, index=index))
    mean_softmax = F.softmax(logits.reshape(B, num_samples, -1), dim=2).mean(1)
    return F.nll_loss(torch.log(mean_softmax.clamp_min(1e-20)), y)


def smoothadv_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma,
    *,
    epsilon: float = 0.5,
    steps: int = 2,
    num_samples: int = 4,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """SmoothAdv training loss: attack with :func:`smoothadv_attack` (model frozen, in eval mode),
    then the mean cross-entropy on the noisy adversarial copies, using the same noise draws as
    the attack (SmoothAdv's multi-noise training). ``epsilon`` is where a warm-up goes: pass
    :func:`warmup` of it per epoch."""
    seed = rng.resolve_seed(seed)
    with frozen(model):
        adv = smoothadv_attack(
            model,
            x,
            y,
            sigma,
            epsilon=epsilon,
            steps=steps,
            num_samples=num_samples,
            step_size=step_size,
            clamp=clamp,
            seed=seed,
            index=index,
        )
    noisy = noisy_copies(adv, sigma, copies=num_samples, seed=seed, index=index)
    return F.cross_entropy(model(noisy), _check_labels(y, x).repeat_interleave(num_samples))


def warmup(value: float, epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up: ``value * min(1, (epoch + 1) / warmup_epochs)`` (SmoothAdv ramps epsilon)."""
    if warmup_epochs <= 0:
        return value
    return value * min(1.0, (epoch + 1) / warmup_epochs)
