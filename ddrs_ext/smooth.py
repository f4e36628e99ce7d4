"""Smooth: a drop-in for the ``core.Smooth`` class that research code copies (Cohen et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ddrs_ext import certification as _certify
from ddrs_ext import rng


class Smooth:
    """A smoothed classifier around ``base_classifier`` with Gaussian noise of level ``sigma``.

    Same constructor, methods and return values as the widely copied
    ``core.Smooth``: ``x`` is one input without a batch dimension, on the device
    of the model. Noise comes from torch's default generator unless ``seed`` is
    given, so ``torch.manual_seed`` reproduces a run. Many inputs at once:
    :func:`ddrs_ext.certify` and :func:`ddrs_ext.predict`.
    """

    ABSTAIN = _certify.ABSTAIN

    def __init__(
        self,
        base_classifier: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int,
        sigma: float,
        *,
        seed: int | None = None,
    ) -> None:
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.seed = seed

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"x must be a torch.Tensor (one input, no batch dimension), got {type(x).__name__}"
            )
        return x.unsqueeze(0)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        """(predicted class, certified L2 radius), or (Smooth.ABSTAIN, 0.0)."""
        result = _certify.certify(
            self.base_classifier,
            self._batch(x),
            self.sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            num_classes=self.num_classes,
            seed=self.seed,
        )
        prediction = int(result.prediction[0])
        if prediction == self.ABSTAIN:
            return self.ABSTAIN, 0.0
        return prediction, float(result.radius[0])

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """The smoothed prediction, or Smooth.ABSTAIN when the top two classes are not separated."""
        return int(
            _certify.predict(
                self.base_classifier,
                self._batch(x),
                self.sigma,
                n=n,
                alpha=alpha,
                batch_size=batch_size,
                num_classes=self.num_classes,
                seed=self.seed,
            )[0]
        )

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        """Class counts (num_classes,) of the base classifier over ``num`` noisy copies of ``x``."""
        sampler, _ = _certify._prepare(
            self.base_classifier, self._batch(x), self.sigma, batch_size, self.num_classes, self.seed, None
        )
        (counts,) = sampler.counts([_certify._Phase(rng.PHASE_PREDICT, _certify.check_count(num, "num"))])
        return counts[0].numpy()
