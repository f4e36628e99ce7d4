"""The embedded dataset: scikit-learn's bundled digits (1797 8x8 images, 10 classes), no download."""

from __future__ import annotations

import torch


def load_digits_split(
    seed: int = 0, test_size: int = 497
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``: images (N, 1, 8, 8) float32 scaled to [0, 1] and
    int64 labels, shuffled by ``seed`` and split off ``test_size`` test images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if not 0 < test_size < len(y):
        raise ValueError(f"test_size must lie in (0, {len(y)}), got {test_size}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n = len(y) - test_size
    return (x[:n], y[:n]), (x[n:], y[n:])
