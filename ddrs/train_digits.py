"""``python -m ddrs.train_digits``: the same as ``ddrs train`` (:mod:`ddrs.commands.train`); train a
small CNN on the embedded digits data with a randomized-smoothing scheme, or a sigma selector for it.

    python -m ddrs.train_digits --scheme gaussian --sigma 0.25 --out fixed.pt
    python -m ddrs.train_digits --scheme macer --sigma 0.25 --data-dependent --out dd.pt

Kept under this name for scripts and torchrun (``torchrun -m ddrs.train_digits``); the names below
are those of :mod:`ddrs.checkpoints` (:func:`load_checkpoint`) and :mod:`ddrs.digits_training`.
"""

from __future__ import annotations

import sys

import ddrs_ext  # noqa: F401  (before torch: its OpenMP threads wait passively, ddrs_ext._threads)

# isort: split
from ddrs.checkpoints import BUILDER, FORMAT, load_checkpoint
from ddrs.commands.train import SCHEMES, build_parser, main
from ddrs.digits_training import noisy_accuracy, train

__all__ = [
    "BUILDER",
    "FORMAT",
    "SCHEMES",
    "build_parser",
    "load_checkpoint",
    "main",
    "noisy_accuracy",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
