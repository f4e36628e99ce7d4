"""The plain-PyTorch ways of doing what ddrs_ext does, and the models the benchmarks certify.

Each baseline is the fastest plain version found on the benchmark machine, with
every buffer allocated once outside the timed region, so that a speedup is never
credited for avoiding allocator churn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import beta, norm
from torch import nn


class PlainNoise:
    """``m`` copies ``x_b + sigma_b * eps`` of each of ``B`` inputs into a reused buffer.

    ``torch.randn(out=buf)`` then a single fused ``addcmul`` over broadcast views
    (x and sigma expanded, nothing repeated). Precomputing a repeated x, or
    ``mul_`` then ``add_``, or ``normal_`` per input, all measured the same or
    slower; ``randn`` alone takes over 90% of the time (see ``randn_only``).
    """

    def __init__(self, x: torch.Tensor, sigma: torch.Tensor, m: int) -> None:
        B = x.shape[0]
        self.m = m
        self.buf = torch.empty((B * m, *x.shape[1:]), dtype=x.dtype)
        self.view = self.buf.view(B, m, *x.shape[1:])
        self.x = x.view(B, 1, *x.shape[1:])
        self.sigma = sigma.to(x.dtype).view(B, *([1] * x.dim()))

    def __call__(self) -> torch.Tensor:
        torch.randn(self.buf.shape, out=self.buf)
        torch.addcmul(self.x, self.view, self.sigma, out=self.view)
        return self.buf

    def randn_only(self) -> torch.Tensor:
        return torch.randn(self.buf.shape, out=self.buf)


class PlainVotes:
    """Adds the argmax votes of ``(B * m, C)`` logits into ``counts`` (B, C), reusing every buffer.

    ``torch.max(dim=1, out=...)`` gives the argmax faster than ``argmax(1)`` on
    CPU (about 25% here); the flat index ``b * C + cls`` goes through a
    precomputed ``b * C`` column into ``index_add_`` (``bincount`` is as fast but
    allocates its result).
    """

    def __init__(self, B: int, m: int, C: int) -> None:
        rows = B * m
        self.values = torch.empty(rows)
        self.cls = torch.empty(rows, dtype=torch.int64)
        self.flat = torch.empty(rows, dtype=torch.int64)
        self.base = torch.arange(B, dtype=torch.int64).repeat_interleave(m) * C
        self.ones = torch.ones(rows, dtype=torch.int64)

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> None:
        torch.max(logits, 1, out=(self.values, self.cls))
        torch.add(self.base, self.cls, out=self.flat)
        counts.view(-1).index_add_(0, self.flat, self.ones)


@dataclass
class PlainResult:
    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor


def plain_certify(
    model: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    num_classes: int,
) -> PlainResult:
    """Cohen et al.'s CERTIFY, one input at a time, as a careful user would write it today.

    Per input and phase: chunks of ``batch_size`` rows of ``randn(out=buf)``
    turned into ``x + sigma * noise`` by one fused ``torch.add(alpha=sigma)``,
    the forward pass, the argmax (``max(dim=1)``) and a ``bincount``; then
    Clopper-Pearson through ``scipy.stats.beta.ppf``. One input buffer for all
    chunks, inference mode throughout.
    """
    B = x.shape[0]
    buf = torch.empty((min(batch_size, max(n0, n)), *x.shape[1:]), dtype=x.dtype)
    values = torch.empty(buf.shape[0], dtype=x.dtype)
    cls = torch.empty(buf.shape[0], dtype=torch.int64)
    counts = torch.zeros((B, num_classes), dtype=torch.int64)
    select = torch.zeros(num_classes, dtype=torch.int64)
    prediction = torch.full((B,), -1, dtype=torch.int64)
    radius = torch.zeros(B, dtype=torch.float64)
    p_lower = torch.zeros(B, dtype=torch.float64)

    def sample(xb: torch.Tensor, s: float, num: int, into: torch.Tensor) -> None:
        left = num
        while left:
            rows = min(buf.shape[0], left)
            batch = buf[:rows]
            torch.randn(batch.shape, out=batch)
            torch.add(xb, batch, alpha=s, out=batch)
            torch.max(model(batch), 1, out=(values[:rows], cls[:rows]))
            into.add_(torch.bincount(cls[:rows], minlength=num_classes))
            left -= rows

    with torch.inference_mode():
        for b in range(B):
            s = float(sigma[b])
            select.zero_()
            sample(x[b], s, n0, select)
            guess = int(select.argmax())
            sample(x[b], s, n, counts[b])
            n_a = int(counts[b, guess])
            p = float(beta.ppf(alpha, n_a, n - n_a + 1)) if n_a > 0 else 0.0
            p_lower[b] = p
            if p >= 0.5:
                prediction[b] = guess
                radius[b] = s * float(norm.ppf(p))
    return PlainResult(prediction, radius, p_lower, counts)


def forward_floor(model: nn.Module, buf: torch.Tensor, total_rows: int) -> int:
    """The model's forward passes alone over ``total_rows`` rows, in chunks of ``len(buf)``."""
    batches = 0
    with torch.inference_mode():
        left = total_rows
        while left:
            rows = min(buf.shape[0], left)
            model(buf[:rows])
            left -= rows
            batches += 1
    return batches


def tiny_linear(side: int = 8, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, num_classes)).eval()


def small_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, num_classes),
    ).eval()


def sigmas(B: int) -> torch.Tensor:
    """Per-input noise levels spread over [0.12, 0.5] (float64, as certify keeps them)."""
    if B == 1:
        return torch.full((1,), 0.25, dtype=torch.float64)
    return torch.linspace(0.12, 0.5, B, dtype=torch.float64)
