"""Small reference models for the embedded digits data."""

from __future__ import annotations

import torch


def digits_cnn(num_classes: int = 10) -> torch.nn.Module:
    """A small CNN for 1x8x8 inputs (about 40 k parameters, with BatchNorm)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, num_classes),
    )
