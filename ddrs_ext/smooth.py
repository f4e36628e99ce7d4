"""Smooth: a drop-in for the ``core.Smooth`` class that research code copies (Cohen et al. 2019)."""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable

import numpy as np
import torch

from ddrs_ext import certification as _certify
from ddrs_ext import ops, rng, stats
from ddrs_ext._validate import check_alpha, check_count, check_inputs, evaluating
from ddrs_ext.noise import resolve_noise, scale_name
from ddrs_ext.precision import Evaluated

_HOOKS = ("_sample_noise", "_lower_confidence_bound")


def _check_sigma(sigma, name: str = "sigma") -> float:
    if isinstance(sigma, torch.Tensor) and sigma.numel() == 1:
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number >= 0, got {sigma!r}")
    value = float(sigma)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{name} must be a finite number >= 0 (0: no noise, the base classifier), got {value}"
        )
    return value


class Smooth:
    """A smoothed classifier around ``base_classifier`` with Gaussian noise of level ``sigma``.

    Same constructor, methods, hooks and return values as the widely copied ``core.Smooth``:
    ``x`` is one input without a batch dimension, on the device of the model; the model is
    evaluated in eval mode (and, unlike ``core.Smooth``, every submodule's mode is restored
    afterwards). Many inputs at once: :func:`ddrs_ext.certify` and :func:`ddrs_ext.predict`.

    Noise. Every call draws fresh noise, independent of every other call's, whether on other
    inputs or on the same input again. With ``seed=None`` each call takes a new seed from torch's
    default generator (so ``torch.manual_seed`` reproduces a run). With ``seed=s`` the calls are
    counted: the ``k``-th call (``k = 0, 1, ...``; ``certify``, ``predict``, and ``_sample_noise``
    called on its own) draws from noise stream ``k`` of seed ``s``, so a new ``Smooth`` with the same
    seed, given the same sequence of calls, gives the same answers, whatever the batch sizes. The
    ``k``-th call ``certify(x, n0, n, alpha, batch_size)`` is ``ddrs_ext.certify(model, x[None],
    sigma, n0=n0, n=n, alpha=alpha, seed=s, index=[k])``: certifying a data set in order with one
    ``Smooth`` gives exactly what one ``ddrs_ext.certify`` call on all of it gives.

    ``index=i`` (keyword, for ``certify`` and ``predict``) pins a call to stream ``i`` instead, e.g.
    an input's index in its data set: its answer then does not depend on the calls before it (a
    resumed or reordered run gives the same answers). Pinned calls do not advance the count, so pass
    ``index`` on every call or on none: a pinned ``index=k`` and the ``k``-th counted call share
    their noise.

    Subclasses may override ``_sample_noise(x, num, batch_size)`` (class counts over ``num`` noisy
    copies) or ``_lower_confidence_bound(NA, N, alpha)``: ``certify`` and ``predict`` then run
    ``core.Smooth``'s algorithm through them. Otherwise they run the batched kernels. Inside a
    ``certify`` or ``predict`` call the default ``_sample_noise`` draws consecutive, disjoint ranges
    of that call's stream (a selection and an estimation are independent).

    ``sigma = 0`` is the base classifier itself (its one prediction counted ``num`` times; radius 0),
    and ``num_classes`` may exceed the model's number of outputs (the extra classes get no votes),
    both as in ``core.Smooth``.

    ``compile`` and ``autocast`` (keyword-only, ddrs_ext's own): evaluate the base classifier as
    :class:`ddrs_ext.Evaluated` does, compiled by ``torch.compile`` (``True`` or a dict of its
    arguments; the same function, faster for long runs) and/or under ``torch.autocast`` to
    ``torch.bfloat16`` or ``torch.float16`` (a different function: the certificate is then about the
    classifier evaluated that way, so deploy it so). ``Smooth(model, C, sigma, compile=True)``
    samples what ``Smooth(Evaluated(model, compile=True), C, sigma)`` samples; ``base_classifier``
    stays the model given.

    ``noise="uniform"`` smooths with uniform noise on the cube of half-width ``sigma`` instead (the
    l1 certificate of the ``ddsmoothing`` package's ``L1Certificate``): ``certify`` then returns an
    L1 radius, ``sigma * (2 pA_lower - 1)``.
    """

    ABSTAIN = _certify.ABSTAIN

    def __init__(
        self,
        base_classifier: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int,
        sigma: float,
        *,
        seed: int | None = None,
        compile: bool | dict = False,
        autocast: torch.dtype | None = None,
        noise: str = "gaussian",
    ) -> None:
        self.base_classifier = base_classifier
        self.num_classes = check_count(num_classes, "num_classes")
        self.noise = resolve_noise(noise)
        self.sigma = _check_sigma(sigma, scale_name(self.noise))
        self.seed = seed
        self._calls = 0  # noise streams taken so far under a fixed seed: one per call
        self._active: list[int] | None = None  # [stream, samples drawn] of the call in progress
        self._evaluation = None
        self._evaluated = None
        if compile is not False or autocast is not None:
            self._evaluation = {"compile": compile, "autocast": autocast}
            self._evaluated = Evaluated(base_classifier, **self._evaluation)  # checks the options

    @property
    def _classifier(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The base classifier as it is evaluated (with ``compile``/``autocast``: through Evaluated)."""
        if self._evaluation is None:
            return self.base_classifier
        if self._evaluated is None or self._evaluated.model is not self.base_classifier:
            self._evaluated = Evaluated(self.base_classifier, **self._evaluation)
        return self._evaluated

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"x must be a torch.Tensor (one input, no batch dimension), got {type(x).__name__}"
            )
        return x.unsqueeze(0)

    def _uses_hooks(self) -> bool:
        return self.sigma == 0 or any(getattr(type(self), h) is not getattr(Smooth, h) for h in _HOOKS)

    def _take_stream(self, index) -> int:
        """The noise stream of a new call: ``index`` if given, else the next one under a fixed seed
        (0 with ``seed=None``, whose every call draws a fresh seed)."""
        if index is not None:
            if isinstance(index, bool):
                raise TypeError("index must be an int (a noise stream id), got a bool")
            try:
                stream = operator.index(index)
            except TypeError:
                raise TypeError(
                    f"index must be an int (a noise stream id), got {type(index).__name__}"
                ) from None
            if not 0 <= stream < rng.MAX_STREAM:
                raise ValueError(f"index must lie in [0, 2**32), got {stream}")
            return stream
        if self.seed is None:
            return 0
        if self._calls >= rng.MAX_STREAM:
            raise RuntimeError(
                "this Smooth has used all 2**32 noise streams of its seed; "
                "create a new Smooth with another seed"
            )
        self._calls += 1
        return self._calls - 1

    @contextlib.contextmanager
    def _call(self, index):
        """One certify or predict call: its stream, and the samples the default ``_sample_noise``
        has drawn from it so far."""
        self._active = [self._take_stream(index), 0]
        try:
            yield self._active[0]
        finally:
            self._active = None

    def _sampler(self, x: torch.Tensor, batch_size: int, stream: int):
        sampler, seed = _certify._prepare(
            self._classifier,
            self._batch(x),
            self.sigma,
            batch_size,
            None,
            self.seed,
            [stream],
            self.noise,
        )
        sampler.max_classes = self.num_classes
        return sampler, seed

    def _hint_batch_dimension(self, exc: Exception, x) -> None:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1 and hasattr(exc, "add_note"):
            exc.add_note(
                f"ddrs_ext.Smooth takes one input without a batch dimension; x has shape {tuple(x.shape)}: "
                "if its leading 1 is a batch dimension, pass x[0] (core.Smooth's x.repeat accepted both)"
            )

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *, index: int | None = None
    ) -> tuple[int, float]:
        """(predicted class, certified radius: L2 for Gaussian noise, L1 for uniform noise), or
        (Smooth.ABSTAIN, 0.0).

        ``index``: the noise stream of this call (see the class docstring); by default the next one.
        """
        n0, n = check_count(n0, "n0"), check_count(n, "n")
        alpha = check_alpha(alpha)
        try:
            with evaluating(self._classifier), self._call(index) as stream:
                if self._uses_hooks():
                    return self._certify_with_hooks(x, n0, n, alpha, batch_size)
                sampler, seed = self._sampler(x, check_count(batch_size, "batch_size"), stream)
                result = _certify.certify_with(sampler, seed, n0, n, alpha)
        except Exception as exc:
            self._hint_batch_dimension(exc, x)
            raise
        prediction = int(result.prediction[0])
        if prediction == self.ABSTAIN:
            return self.ABSTAIN, 0.0
        return prediction, float(result.radius[0])

    def _certify_with_hooks(self, x, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        # core.Smooth's CERTIFY, step by step, through the (possibly overridden) hooks
        counts_selection = np.asarray(self._sample_noise(x, n0, batch_size))
        c_hat = int(counts_selection.argmax())
        counts_estimation = np.asarray(self._sample_noise(x, n, batch_size))
        n_a = int(counts_estimation[c_hat])
        p_lower = float(self._lower_confidence_bound(n_a, n, alpha))
        if p_lower < 0.5:
            return self.ABSTAIN, 0.0
        return c_hat, float(self.noise.radius(np.asarray([p_lower]), np.asarray([self.sigma]))[0])

    def predict(
        self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, index: int | None = None
    ) -> int:
        """The smoothed prediction, or Smooth.ABSTAIN when the top two classes are not separated.

        ``index``: the noise stream of this call (see the class docstring); by default the next one.
        """
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        try:
            with evaluating(self._classifier), self._call(index) as stream:
                if self._uses_hooks():
                    counts = torch.as_tensor(
                        np.asarray(self._sample_noise(x, n, batch_size)), dtype=torch.int64
                    )
                else:
                    sampler, _ = self._sampler(x, check_count(batch_size, "batch_size"), stream)
                    (counts,) = sampler.counts([_certify._Phase(rng.PHASE_PREDICT, n)])
                    counts = counts[0]
        except Exception as exc:
            self._hint_batch_dimension(exc, x)
            raise
        return int(_certify.predict_from_counts(counts[None], alpha)[0])

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        """Class counts (num_classes,) of the base classifier over ``num`` noisy copies of ``x``.

        Each call draws fresh noise. Inside a ``certify`` or ``predict`` call it takes the next
        ``num`` samples of that call's stream, so a selection and an estimation drawn by two calls
        are independent; called on its own it is a call of its own and takes the next stream. With
        a fixed ``seed`` the whole sequence of calls is reproducible.
        """
        num = check_count(num, "num")
        batch_size = check_count(batch_size, "batch_size")
        if self._active is None:
            stream, drawn = self._take_stream(None), 0
        else:
            stream, drawn = self._active
            self._active[1] += num
        with evaluating(self._classifier):
            if self.sigma == 0:  # no noise: every copy is x, so every vote is the base prediction
                counts = self._base_votes(x) * num
            else:
                sampler, _ = self._sampler(x, batch_size, stream)
                (counts,) = sampler.counts([_certify._Phase(rng.PHASE_PREDICT + drawn, num)])
        out = np.zeros(self.num_classes, dtype=np.int64)
        out[: counts.shape[1]] = counts[0].numpy()
        return out

    def _base_votes(self, x: torch.Tensor) -> torch.Tensor:
        """The base classifier's one vote on x itself, as counts (1, C)."""
        xb = check_inputs(self._batch(x))
        sampler = _certify.VoteSampler(self._classifier, xb, None, None, 0, 1, None)
        sampler.max_classes = self.num_classes
        with torch.inference_mode():
            logits = sampler._check_logits(self._classifier(xb), 1)
            counts = torch.zeros((1, logits.shape[1]), dtype=torch.int64, device=logits.device)
            ops.count_votes_(logits, 0, 1, counts)
        return counts.cpu()

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        """Counts of each class index in ``arr`` as an int array of ``length`` (core.Smooth's helper)."""
        arr = np.asarray(arr, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= length):
            raise ValueError(f"class indices must lie in [0, {length}), got {arr.min()}..{arr.max()}")
        return np.bincount(arr, minlength=length).astype(np.int64)

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:  # noqa: N803 (core's names)
        """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion NA / N."""
        return float(stats.clopper_pearson_lower(np.asarray([NA]), N, alpha)[0])
