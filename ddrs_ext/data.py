"""The embedded dataset: scikit-learn's bundled digits (1797 8x8 images, 10 classes), no download.

The images are shuffled once by ``seed`` and cut into three disjoint parts, always the same for a
given seed: ``test`` (the last ``test_size``), ``validation`` (the ``validation_size`` before them)
and ``train`` (the rest). Models are trained on ``train``; every setting of a procedure (noise
levels, step counts, selectors, ...) is chosen on ``validation``; ``test`` is certified once, with
the chosen settings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Images in the test split (the same 497 images whatever ``validation_size`` is).
TEST_SIZE = 497
#: Images carved from the training data to choose settings on.
VALIDATION_SIZE = 200

Split = tuple[torch.Tensor, torch.Tensor]


class DigitsSplits(NamedTuple):
    """The three splits, each ``(x, y)``: images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64."""

    train: Split
    validation: Split
    test: Split


def load_digits_splits(
    seed: int = 0, test_size: int = TEST_SIZE, validation_size: int = VALIDATION_SIZE
) -> DigitsSplits:
    """The digits shuffled by ``seed`` and cut into train, validation and test splits (disjoint).

    With the defaults: 1100 training, 200 validation and 497 test images.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if not 0 < test_size < len(y):
        raise ValueError(f"test_size must lie in (0, {len(y)}), got {test_size}")
    if not 0 <= validation_size < len(y) - test_size:
        raise ValueError(
            f"validation_size must lie in [0, {len(y) - test_size}) (what the test split leaves), "
            f"got {validation_size}"
        )
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = len(y) - test_size
    n_train = n_test - validation_size
    return DigitsSplits(
        train=(x[:n_train], y[:n_train]),
        validation=(x[n_train:n_test], y[n_train:n_test]),
        test=(x[n_test:], y[n_test:]),
    )


def load_digits_split(
    seed: int = 0, test_size: int = TEST_SIZE, validation_size: int = VALIDATION_SIZE
) -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))`` of :func:`load_digits_splits`: the training images
    exclude the ``validation_size`` validation images (pass 0 to train on all of them)."""
    splits = load_digits_splits(seed, test_size, validation_size)
    return splits.train, splits.test
