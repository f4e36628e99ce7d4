"""Smooth: a drop-in for the ``core.Smooth`` class that research code copies (Cohen et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import norm

from ddrs_ext import certification as _certify
from ddrs_ext import ops, rng, stats
from ddrs_ext._validate import check_alpha, check_count, check_inputs, evaluating
from ddrs_ext.precision import Evaluated

_HOOKS = ("_sample_noise", "_lower_confidence_bound")


def _check_sigma(sigma) -> float:
    if isinstance(sigma, torch.Tensor) and sigma.numel() == 1:
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
        raise TypeError(f"sigma must be a number >= 0, got {sigma!r}")
    value = float(sigma)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"sigma must be a finite number >= 0 (0: no noise, the base classifier), got {value}"
        )
    return value


class Smooth:
    """A smoothed classifier around ``base_classifier`` with Gaussian noise of level ``sigma``.

    Same constructor, methods, hooks and return values as the widely copied ``core.Smooth``:
    ``x`` is one input without a batch dimension, on the device of the model; the model is
    evaluated in eval mode (and, unlike ``core.Smooth``, every submodule's mode is restored
    afterwards). Noise comes from torch's default generator unless ``seed`` is given, so
    ``torch.manual_seed`` reproduces a run. Many inputs at once: :func:`ddrs_ext.certify` and
    :func:`ddrs_ext.predict`.

    Subclasses may override ``_sample_noise(x, num, batch_size)`` (class counts over ``num`` noisy
    copies) or ``_lower_confidence_bound(NA, N, alpha)``: ``certify`` and ``predict`` then run
    ``core.Smooth``'s algorithm through them. Otherwise they run the batched kernels.

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
    ) -> None:
        self.base_classifier = base_classifier
        self.num_classes = check_count(num_classes, "num_classes")
        self.sigma = _check_sigma(sigma)
        self.seed = seed
        self._drawn = 0  # noise samples _sample_noise has used so far under a fixed seed
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

    def _sampler(self, x: torch.Tensor, batch_size: int):
        sampler, seed = _certify._prepare(
            self._classifier, self._batch(x), self.sigma, batch_size, None, self.seed, None
        )
        sampler.max_classes = self.num_classes
        return sampler, seed

    def _hint_batch_dimension(self, exc: Exception, x) -> None:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1 and hasattr(exc, "add_note"):
            exc.add_note(
                f"ddrs_ext.Smooth takes one input without a batch dimension; x has shape {tuple(x.shape)}: "
                "if its leading 1 is a batch dimension, pass x[0] (core.Smooth's x.repeat accepted both)"
            )

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        """(predicted class, certified L2 radius), or (Smooth.ABSTAIN, 0.0)."""
        n0, n = check_count(n0, "n0"), check_count(n, "n")
        alpha = check_alpha(alpha)
        try:
            with evaluating(self._classifier):
                if self._uses_hooks():
                    return self._certify_with_hooks(x, n0, n, alpha, batch_size)
                sampler, seed = self._sampler(x, check_count(batch_size, "batch_size"))
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
        return c_hat, float(self.sigma * norm.ppf(p_lower))

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """The smoothed prediction, or Smooth.ABSTAIN when the top two classes are not separated."""
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        try:
            with evaluating(self._classifier):
                if self._uses_hooks():
                    counts = torch.as_tensor(
                        np.asarray(self._sample_noise(x, n, batch_size)), dtype=torch.int64
                    )
                else:
                    sampler, _ = self._sampler(x, check_count(batch_size, "batch_size"))
                    (counts,) = sampler.counts([_certify._Phase(rng.PHASE_PREDICT, n)])
                    counts = counts[0]
        except Exception as exc:
            self._hint_batch_dimension(exc, x)
            raise
        return int(_certify.predict_from_counts(counts[None], alpha)[0])

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        """Class counts (num_classes,) of the base classifier over ``num`` noisy copies of ``x``.

        Each call draws fresh noise: with a fixed ``seed``, consecutive calls take consecutive
        ranges of sample indices, so a selection and an estimation drawn by two calls are
        independent (and the whole sequence of calls is reproducible).
        """
        num = check_count(num, "num")
        batch_size = check_count(batch_size, "batch_size")
        with evaluating(self._classifier):
            if self.sigma == 0:  # no noise: every copy is x, so every vote is the base prediction
                counts = self._base_votes(x) * num
            else:
                sampler, _ = self._sampler(x, batch_size)
                (counts,) = sampler.counts([_certify._Phase(rng.PHASE_PREDICT + self._drawn, num)])
                if self.seed is not None:
                    self._drawn += num
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
