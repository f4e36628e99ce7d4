"""The plain-PyTorch ways of doing what ddrs_ext does, and the models the benchmarks certify.

Each baseline is the fastest plain version found on the benchmark machine, with
every buffer allocated once outside the timed region, so that a speedup is never
credited for avoiding allocator churn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
        self.buf = torch.empty((B * m, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.view = self.buf.view(B, m, *x.shape[1:])
        self.x = x.view(B, 1, *x.shape[1:])
        self.sigma = sigma.to(device=x.device, dtype=x.dtype).view(B, *([1] * x.dim()))

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

    def __init__(
        self, B: int, m: int, C: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        rows = B * m
        self.values = torch.empty(rows, dtype=dtype, device=device)
        self.cls = torch.empty(rows, dtype=torch.int64, device=device)
        self.flat = torch.empty(rows, dtype=torch.int64, device=device)
        self.base = torch.arange(B, dtype=torch.int64, device=device).repeat_interleave(m) * C
        self.ones = torch.ones(rows, dtype=torch.int64, device=device)

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> None:
        torch.max(logits, 1, out=(self.values, self.cls))
        torch.add(self.base, self.cls, out=self.flat)
        counts.view(-1).index_add_(0, self.flat, self.ones)


class PlainSoftVotes:
    """Adds each row's softmax, in float64, into ``prob_sum`` (B, C) at its input, and with tangents
    ``d`` also the forward-mode derivatives ``p * (d - <p, d>)`` into ``deriv_sum``: what
    ``ops.soft_votes_`` does, as ``softmax(dtype=float64)`` and ``index_add_`` (which on a GPU adds
    with atomics, so its sums are not reproducible to the last bit, unlike the op's)."""

    def __init__(self, B: int, m: int, device: torch.device | str = "cpu") -> None:
        self.index = torch.arange(B, device=device).repeat_interleave(m)

    def __call__(
        self,
        logits: torch.Tensor,
        prob_sum: torch.Tensor,
        d: torch.Tensor | None = None,
        deriv_sum: torch.Tensor | None = None,
    ) -> None:
        p = torch.softmax(logits, 1, dtype=torch.float64)
        prob_sum.index_add_(0, self.index, p)
        if d is not None:
            d = d.to(torch.float64)
            deriv_sum.index_add_(0, self.index, p * (d - (p * d).sum(1, keepdim=True)))


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
    chunks, inference mode throughout; all of it on ``x``'s device.
    """
    B, device = x.shape[0], x.device
    buf = torch.empty((min(batch_size, max(n0, n)), *x.shape[1:]), dtype=x.dtype, device=device)
    values = torch.empty(buf.shape[0], dtype=x.dtype, device=device)
    cls = torch.empty(buf.shape[0], dtype=torch.int64, device=device)
    counts = torch.zeros((B, num_classes), dtype=torch.int64, device=device)
    select = torch.zeros(num_classes, dtype=torch.int64, device=device)
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
    return PlainResult(prediction, radius, p_lower, counts.cpu())


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


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1-projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(depth: int = 110, num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016) that randomized-smoothing papers certify: depth 6k + 2
    (110: three stages of 18 basic blocks, 16/32/64 channels, 1.7 M parameters), on 3x32x32,
    randomly initialised (the speed of a forward pass does not depend on the weights), in eval mode."""
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6k + 2, got {depth}")
    k = (depth - 2) // 6
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(k):
            layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers).eval()


def sigmas(B: int) -> torch.Tensor:
    """Per-input noise levels spread over [0.12, 0.5] (float64, as certify keeps them)."""
    if B == 1:
        return torch.full((1,), 0.25, dtype=torch.float64)
    return torch.linspace(0.12, 0.5, B, dtype=torch.float64)


def digits(
    seed: int = 0, train: int = 1300
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits as ``(N, 1, 8, 8)`` float32 in [0, 1], shuffled, split train / test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:train], y[:train]), (x[train:], y[train:])


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Two 3x3 convolutions (8 and 16 channels, the second with stride 2) and a linear layer, on 1x8x8."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, num_classes),
    )


def train_noisy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, epochs: int, seed: int
) -> nn.Module:
    """Gaussian noise augmentation (Cohen et al.): Adam on CE(f(x + sigma eps), y). Returns the model in
    eval mode with its parameters frozen (as the published sigma optimisation freezes them)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            noisy = x[idx] + sigma * torch.randn(x[idx].shape, generator=g)
            loss = nn.functional.cross_entropy(model(noisy), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@dataclass
class PlainSigmaResult:
    sigma: torch.Tensor  # (B,) after the last iteration
    rows_forward: int  # rows passed forward through the model
    rows_backward: int  # rows passed backward through it


def plain_paper_sigma(
    model: nn.Module,
    x: torch.Tensor,
    sigma0: float,
    iterations: int = 900,
    lr: float = 0.04,
    num_samples: int = 100,
    clip: tuple[float, float] = (0.02, 0.98),
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> PlainSigmaResult:
    """Alfarra et al.'s published sigma optimisation (Algorithm 1), batched over inputs as their code does.

    Per iteration: fresh ``torch.randn`` noise for ``num_samples`` copies of every input,
    ``psi = mean softmax(f(x + sigma eps))``, ``R = sigma / 2 (icdf(clamp E_A) - icdf(clamp E_B))``
    with ``torch.distributions.Normal.icdf``, reverse-mode autograd through the model to
    ``dR/dsigma`` and the plain step ``sigma += lr * grad`` (sigma is left unbounded, as there).
    The repeated inputs and the noise buffer are allocated once; the model's parameters should
    be frozen (they are in the published code, and ``train_noisy`` freezes them), so the backward
    pass computes input gradients only. ``callback(t, sigma)`` sees sigma after iteration ``t``.
    """
    B, m = x.shape[0], num_samples
    base = x.repeat_interleave(m, 0)
    eps = torch.empty_like(base)
    view = (B * m,) + (1,) * (x.dim() - 1)
    normal = torch.distributions.Normal(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype))
    sigma = torch.full((B,), sigma0, dtype=x.dtype, requires_grad=True)
    for t in range(iterations):
        torch.randn(eps.shape, out=eps)
        noisy = torch.addcmul(base, sigma.repeat_interleave(m).view(view), eps)
        psi = model(noisy).softmax(1).view(B, m, -1).mean(1)
        top2 = psi.topk(2, dim=1).values.clamp(*clip)
        q = normal.icdf(top2)
        radius = sigma / 2 * (q[:, 0] - q[:, 1])
        (grad,) = torch.autograd.grad(radius.sum(), sigma)
        with torch.no_grad():
            sigma += lr * grad
        if callback is not None:
            callback(t, sigma.detach())
    rows = iterations * B * m
    return PlainSigmaResult(sigma.detach().clone(), rows, rows)


def plain_memory_adjust(
    x: torch.Tensor, prediction: torch.Tensor, radius: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-based certification (``CertificationMemory``'s rule) over a stream of queries, one at a time.

    For each query, abstentions (-1, radius 0) included: float64 L2 distances to every stored entry
    (``torch.cdist`` with the direct, difference-based kernel, which also measured faster here than
    ``vector_norm(stored - q, dim=1)``), ``gap = d - R`` with entries of its own label masked to
    inf, ``argmin`` (first on ties); inside a ball the answer becomes ``(c_j, -gap)``, otherwise
    the radius shrinks to ``min(R, gap)``; then the answer is stored. Stored rows live in buffers
    allocated once for the whole stream, on ``x``'s device; the answers are on the CPU.
    """
    Q = x.shape[0]
    flat = x.reshape(Q, -1).to(torch.float64)
    stored = torch.empty_like(flat)
    classes = torch.empty(Q, dtype=torch.int64, device=x.device)
    radii = torch.empty(Q, dtype=torch.float64, device=x.device)
    out_class, out_radius = prediction.clone(), radius.to(torch.float64, copy=True)
    n = 0
    for i in range(Q):
        c, r = int(prediction[i]), float(radius[i])
        if n:
            gap = torch.cdist(flat[i : i + 1], stored[:n], compute_mode="donot_use_mm_for_euclid_dist")[0]
            gap -= radii[:n]
            gap.masked_fill_(classes[:n] == c, math.inf)
            k = int(gap.argmin())
            g = float(gap[k])
            if g < 0:
                c, r = int(classes[k]), -g
            elif g < r:
                r = g
        stored[n], classes[n], radii[n] = flat[i], c, r
        n += 1
        out_class[i], out_radius[i] = c, r
    return out_class, out_radius


# --------------------------------------------------------------------------------- training


def digits_bn_cnn(num_classes: int = 10) -> nn.Module:
    """conv16-BN-ReLU-pool, conv32-ReLU, linear 64-ReLU, linear on 1x8x8 (BatchNorm, so that freezing
    it during the sigma ascent and SmoothAdv's attack matters); about 40 k parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    """What the published training scripts do around an attack or a sigma ascent: eval mode (BatchNorm
    uses, and does not update, its running statistics) and no parameter gradients; then back."""
    model.train(not frozen)
    for p in model.parameters():
        p.requires_grad_(not frozen)


def plain_noisy(x: torch.Tensor, sigma: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x_b + sigma_b * eps[b, i]`` for noise ``eps`` of shape (B, m, ...), as (B * m, ...) (the copies of
    input b are rows ``b*m ... b*m + m-1``). One fused op (``add`` with alpha for a float sigma,
    ``addcmul`` for a (B,) tensor), out of place so that gradients reach x."""
    B = x.shape[0]
    base = x.unsqueeze(1)
    if isinstance(sigma, torch.Tensor):
        out = torch.addcmul(base, sigma.view(B, *([1] * x.dim())), eps)
    else:
        out = torch.add(base, eps, alpha=sigma)
    return out.view(B * eps.shape[1], *x.shape[1:])


def plain_gaussian_augmentation_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float | torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Cohen et al.: mean cross-entropy of the noisy copies."""
    m = eps.shape[1]
    return nn.functional.cross_entropy(
        model(plain_noisy(x, sigma, eps)), y if m == 1 else y.repeat_interleave(m)
    )


_NORMAL = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))


def plain_macer_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor,
    eps: torch.Tensor,
    lam: float = 12.0,
    gamma: float = 8.0,
    beta: float = 16.0,
) -> torch.Tensor:
    """MACER's loss as its published ``macer_train`` writes it, with sigma per example where given: CE of
    the mean softmax, plus ``lam * sigma/2 * (gamma - (icdf(p1) - icdf(p2)))`` on the correctly classified
    examples with a finite margin below gamma (the icdf recomputed on those alone, so that no NaN
    reaches the gradient), p the mean softmax at inverse temperature beta; over the batch."""
    B, m = eps.shape[:2]
    logits = model(plain_noisy(x, sigma, eps)).view(B, m, -1)
    mean_softmax = nn.functional.softmax(logits, dim=2).mean(1)
    classification = nn.functional.nll_loss(torch.log(mean_softmax + 1e-10), y, reduction="sum")
    top2, which = nn.functional.softmax(beta * logits, dim=2).mean(1).topk(2)
    correct = which[:, 0] == y
    out0, out1 = top2[correct, 0], top2[correct, 1]
    margin = _NORMAL.icdf(out0) - _NORMAL.icdf(out1)
    keep = ~torch.isnan(margin) & ~torch.isinf(margin) & (margin.abs() <= gamma)
    hinge = gamma - (_NORMAL.icdf(out0[keep]) - _NORMAL.icdf(out1[keep]))
    scale = sigma[correct][keep] if isinstance(sigma, torch.Tensor) else sigma
    robustness = (scale / 2 * hinge).sum()
    return (classification + lam * robustness) / B


def plain_smoothadv_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor,
    eps: torch.Tensor,
    epsilon: float = 0.5,
    steps: int = 2,
    clamp: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """SmoothAdv's PGD-L2 on the soft smoothed classifier (one adversarial input per example, the same
    noise draws ``eps`` at every step): normalised-gradient steps of ``2 * epsilon / steps`` on
    ``-log mean_i softmax(f(x' + sigma eps_i))_y``, projection onto the epsilon ball, then the data range
    (ddrs_ext's order). Run it with the model frozen."""
    B, m = eps.shape[:2]
    step_size = 2.0 * epsilon / max(steps, 1)
    view = (B, *([1] * (x.dim() - 1)))
    adv = x.detach().clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = model(plain_noisy(adv, sigma, eps)).view(B, m, -1)
        mean_softmax = nn.functional.softmax(logits, dim=2).mean(1)
        loss = nn.functional.nll_loss(torch.log(mean_softmax.clamp_min(1e-20)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step_size * grad / grad.view(B, -1).norm(dim=1).clamp_min(1e-12).view(view)
            delta = adv - x
            delta *= (epsilon / delta.view(B, -1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(view)
            adv = (x + delta).clamp_(*clamp)
    return adv


def plain_smoothadv_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor,
    eps: torch.Tensor,
    epsilon: float = 0.5,
    steps: int = 2,
) -> torch.Tensor:
    """SmoothAdv's multi-noise training loss: the attack with the model frozen (as ``train_pgd.py``
    does), then the mean cross-entropy of the noisy adversarial copies, with the attack's noise."""
    _set_frozen(model, True)
    try:
        adv = plain_smoothadv_attack(model, x, y, sigma, eps, epsilon, steps)
    finally:
        _set_frozen(model, False)
    logits = model(plain_noisy(adv, sigma, eps))
    return nn.functional.cross_entropy(logits, y.repeat_interleave(eps.shape[1]))


def plain_sigma_ascent(
    model: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    steps: int = 3,
    lr: float = 0.04,
    clip: tuple[float, float] = (0.02, 0.98),
    sigma_range: tuple[float, float] = (1e-3, 10.0),
) -> torch.Tensor:
    """The published data-dependent training's sigma update: ``steps`` ascent steps on the surrogate radius
    ``sigma/2 (icdf(clip E_A) - icdf(clip E_B))``, fresh ``torch.randn`` noise into ``eps`` (B, m, ...)
    each step, ``dR/dsigma`` by reverse-mode autograd through the frozen model (eval mode, so
    BatchNorm's statistics stay put). sigma is kept inside ``sigma_range`` as ddrs_ext keeps it (the
    published code does not bound it). Returns the new sigma (B,), detached, x's dtype."""
    B, m = eps.shape[:2]
    sigma = sigma.to(x.dtype).clone().requires_grad_(True)
    _set_frozen(model, True)
    try:
        for _ in range(steps):
            torch.randn(eps.shape, out=eps)
            psi = model(plain_noisy(x, sigma, eps)).softmax(1).view(B, m, -1).mean(1)
            q = _NORMAL.icdf(psi.topk(2, dim=1).values.clamp(*clip))
            radius = sigma / 2 * (q[:, 0] - q[:, 1])
            (grad,) = torch.autograd.grad(radius.sum(), sigma)
            with torch.no_grad():
                sigma += lr * grad
                sigma.clamp_(*sigma_range)
    finally:
        _set_frozen(model, False)
    return sigma.detach()


PLAIN_LOSSES = {
    "gaussian": plain_gaussian_augmentation_loss,
    "macer": plain_macer_loss,
    "smoothadv": plain_smoothadv_loss,
}


class PlainTrainingStep:
    """One training step of a randomized-smoothing scheme in plain PyTorch on a minibatch ``(x, y, index)``.

    Data-dependent (``bank`` given, one sigma per training example): ``plain_sigma_ascent`` from the
    bank's values, written back; then the loss with those sigmas. Fixed: the loss with the float
    ``sigma``. Then ``zero_grad``, ``backward``, ``optimizer.step()``. The noise buffers (the loss's
    ``copies`` draws and the ascent's ``sigma_samples``) are allocated once, for minibatches of
    ``batch_shape``, and refilled by ``torch.randn(out=)``. Returns the loss, detached.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheme: str,
        batch_shape: tuple[int, ...],
        copies: int,
        sigma: float,
        bank: torch.Tensor | None = None,
        sigma_steps: int = 3,
        sigma_samples: int = 16,
        **loss_kwargs,
    ) -> None:
        self.model, self.optimizer, self.loss = model, optimizer, PLAIN_LOSSES[scheme]
        self.loss_kwargs, self.sigma, self.bank, self.sigma_steps = loss_kwargs, sigma, bank, sigma_steps
        B, *shape = batch_shape
        self.eps = torch.empty((B, copies, *shape))
        self.sigma_eps = torch.empty((B, sigma_samples, *shape)) if bank is not None else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma
        if self.bank is not None:
            sigma = plain_sigma_ascent(self.model, x, self.bank[index], self.sigma_eps, self.sigma_steps)
            self.bank[index] = sigma
        torch.randn(self.eps.shape, out=self.eps)
        loss = self.loss(self.model, x, y, sigma, self.eps, **self.loss_kwargs)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()
