"""Data-dependent certification end to end on scikit-learn's bundled digits.

Trains a small CNN with Gaussian noise augmentation, then certifies the test images three
ways and prints certified accuracy at several L2 radii:
  fixed sigma (the training sigma for every input);
  data-dependent sigma (optimize_sigma per input, then certify with it), with the paper's
  surrogate and with the one that matches CERTIFY's radius;
  each data-dependent result also passed through CertificationMemory (the paper's memory-based fix).

    python examples/data_dependent_digits.py [--count 200] [--n 10000]
"""

from __future__ import annotations

import argparse
import time

import ddrs_ext  # before torch: then its OpenMP threads wait passively (docs/benchmarks.md)

# isort: split
import numpy as np
import torch
from sklearn.datasets import load_digits

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (x[order[:1300]], y[order[:1300]]), (x[order[1300:]], y[order[1300:]])


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 16, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def train(model, x, y, sigma: float, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            noisy = x[idx] + sigma * torch.randn_like(x[idx])
            loss = torch.nn.functional.cross_entropy(model(noisy), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def row(name, prediction, radius, y) -> str:
    correct = (prediction == y).numpy()
    accs = [np.mean(correct & (radius.numpy() >= r)) for r in RADII]
    acr = np.where(correct, radius.numpy(), 0).mean()
    return f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {acr:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--sigma", type=float, default=0.25, help="training sigma and the fixed sigma")
    parser.add_argument("--count", type=int, default=200, help="test images to certify")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = digits(args.seed)
    model = small_cnn()
    start = time.perf_counter()
    train(model, x_train, y_train, args.sigma, args.epochs)
    model.eval()
    print(f"trained a small CNN with noise sigma={args.sigma} in {time.perf_counter() - start:.1f} s")

    x, y = x_test[: args.count], y_test[: args.count]
    kw = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch_size=2000)
    fixed = ddrs_ext.certify(model, x, args.sigma, seed=args.seed + 1, **kw)

    rows = [row(f"fixed {args.sigma}", fixed.prediction, fixed.radius, y)]
    for surrogate in ("paper", "certify"):
        start = time.perf_counter()
        sigma = ddrs_ext.optimize_sigma(
            model, x, args.sigma, surrogate=surrogate, seed=args.seed + 2, batch_size=2000
        )
        print(
            f"optimised sigma ({surrogate} surrogate) for {len(y)} inputs "
            f"in {time.perf_counter() - start:.1f} s "
            f"(median {sigma.median():.3f}, range {sigma.min():.3f}-{sigma.max():.3f})"
        )
        dd = ddrs_ext.certify(model, x, sigma, seed=args.seed + 1, **kw)
        adjusted = ddrs_ext.CertificationMemory().adjust_result(x, dd)
        rows.append(row(f"data-dependent, {surrogate} surrogate", dd.prediction, dd.radius, y))
        rows.append(
            row(f"data-dependent, {surrogate} surrogate + memory", adjusted.prediction, adjusted.radius, y)
        )

    print(
        f"\ncertified accuracy at L2 radius (n0={args.n0}, n={args.n}, alpha={args.alpha}); ACR: average "
        "certified radius of correct predictions"
    )
    print("| sigma | " + " | ".join(f"{r:.2f}" for r in RADII) + " | ACR |")
    print("|---|" + "---|" * (len(RADII) + 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
