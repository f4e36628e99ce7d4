"""Certify a small classifier on scikit-learn's bundled digits (8x8 images, 10 classes).

Trains a small MLP with Gaussian noise augmentation for a few seconds, then certifies
the test set with ddrs_ext.certify and prints certified accuracy at several L2 radii.
Runs offline on a CPU in well under a minute:

    python examples/certify_digits.py [--sigma 0.25] [--n 100000] [--count 200]
"""

from __future__ import annotations

import argparse
import time

import ddrs_ext  # before torch: then its OpenMP threads wait passively (docs/benchmarks.md)

# isort: split
import numpy as np
import torch
from sklearn.datasets import load_digits


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def small_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def train(model, x, y, sigma: float, epochs: int = 20) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            noisy = x[idx] + sigma * torch.randn_like(x[idx])  # Gaussian augmentation (Cohen et al.)
            loss = torch.nn.functional.cross_entropy(model(noisy), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--count", type=int, default=200, help="test images to certify")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = digits(args.seed)
    model = small_mlp()
    start = time.perf_counter()
    train(model, x_train, y_train, args.sigma, args.epochs)
    model.eval()
    print(f"trained a small MLP with noise sigma={args.sigma} in {time.perf_counter() - start:.1f} s")

    x, y = x_test[: args.count], y_test[: args.count]
    start = time.perf_counter()
    result = ddrs_ext.certify(
        model, x, args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=2000, seed=args.seed
    )
    elapsed = time.perf_counter() - start
    correct = (result.prediction == y).numpy()
    radius = result.radius.numpy()
    print(
        f"certified {len(y)} test images (n0={args.n0}, n={args.n}, alpha={args.alpha}) in {elapsed:.1f} s "
        f"({len(y) * (args.n0 + args.n) / elapsed:,.0f} noisy forward passes/s)"
    )
    print("| radius | " + " | ".join(f"{r:.2f}" for r in (0, 0.25, 0.5, 0.75, 1.0)) + " |")
    print("|---|" + "---|" * 5)
    accs = [np.mean(correct & (radius >= r)) for r in (0, 0.25, 0.5, 0.75, 1.0)]
    print("| certified accuracy | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    print(
        f"abstained: {int((result.prediction == ddrs_ext.ABSTAIN).sum())}, "
        f"average certified radius of correct predictions: {np.where(correct, radius, 0).mean():.3f}"
    )


if __name__ == "__main__":
    main()
