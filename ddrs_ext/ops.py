"""Typed wrappers over the torch.ops.ddrs_ext kernels, with their fake (meta) kernels.

Each op works on a *virtual batch* of ``B * samples_per_input`` rows: row
``g = b * samples_per_input + k`` belongs to input ``b`` and holds noise sample
``sample_offset + k`` of that input's stream. Ops take a ``row_start`` so that
one virtual batch can be processed in chunks of any size with identical results.
"""

from __future__ import annotations

import torch

from ddrs_ext import _loader

_loader.load()
_ops = torch.ops.ddrs_ext


def as_signed64(seed: int) -> int:
    """The op schema carries int64; seeds are unsigned 64-bit keys."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def perturb_gaussian(
    x: torch.Tensor,
    sigma: torch.Tensor,
    stream: torch.Tensor,
    seed: int,
    sample_offset: int,
    samples_per_input: int,
    row_start: int = 0,
    num_rows: int | None = None,
    with_sq_norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies ``x[b] + sigma[b] * eps`` for rows ``[row_start, row_start + num_rows)``.

    Returns ``(out, sq_norm)``: ``out`` has shape ``(num_rows, *x.shape[1:])`` and
    x's dtype; ``sq_norm`` holds ``||eps||^2`` per row in float64 (empty unless
    ``with_sq_norm``). ``eps`` depends only on ``(seed, stream[b], sample index, element)``.
    """
    if num_rows is None:
        num_rows = x.shape[0] * samples_per_input - row_start
    return _ops.perturb_gaussian(
        x,
        sigma,
        stream,
        as_signed64(seed),
        sample_offset,
        samples_per_input,
        row_start,
        num_rows,
        with_sq_norm,
    )


def perturb_gaussian_out(
    x: torch.Tensor,
    sigma: torch.Tensor,
    stream: torch.Tensor,
    seed: int,
    sample_offset: int,
    samples_per_input: int,
    row_start: int,
    out: torch.Tensor,
    sq_norm: torch.Tensor | None = None,
) -> None:
    """Like :func:`perturb_gaussian`, writing ``out.shape[0]`` rows into a reused buffer."""
    _ops.perturb_gaussian_out(
        x, sigma, stream, as_signed64(seed), sample_offset, samples_per_input, row_start, out, sq_norm
    )


def perturb_uniform(
    x: torch.Tensor,
    theta: torch.Tensor,
    stream: torch.Tensor,
    seed: int,
    sample_offset: int,
    samples_per_input: int,
    row_start: int = 0,
    num_rows: int | None = None,
) -> torch.Tensor:
    """Noisy copies ``x[b] + theta[b] * u``, ``u`` uniform on ``[-1, 1]^D``, for rows
    ``[row_start, row_start + num_rows)`` of the virtual batch (shape ``(num_rows, *x.shape[1:])``,
    x's dtype): the noise of the l1 certificate.

    ``u`` depends only on ``(seed, stream[b], sample index, element)`` and comes from the same
    counters as :func:`perturb_gaussian`'s noise under another Philox key derived from ``seed``,
    so the two families are independent even under one seed.
    """
    if num_rows is None:
        num_rows = x.shape[0] * samples_per_input - row_start
    return _ops.perturb_uniform(
        x, theta, stream, as_signed64(seed), sample_offset, samples_per_input, row_start, num_rows
    )


def perturb_uniform_out(
    x: torch.Tensor,
    theta: torch.Tensor,
    stream: torch.Tensor,
    seed: int,
    sample_offset: int,
    samples_per_input: int,
    row_start: int,
    out: torch.Tensor,
) -> None:
    """Like :func:`perturb_uniform`, writing ``out.shape[0]`` rows into a reused buffer."""
    _ops.perturb_uniform_out(
        x, theta, stream, as_signed64(seed), sample_offset, samples_per_input, row_start, out
    )


def count_votes(
    logits: torch.Tensor, row_start: int, samples_per_input: int, num_inputs: int
) -> torch.Tensor:
    """Per-input class counts ``(num_inputs, C)`` int64 of the rows' argmax classes."""
    return _ops.count_votes(logits, row_start, samples_per_input, num_inputs)


def count_votes_(logits: torch.Tensor, row_start: int, samples_per_input: int, counts: torch.Tensor) -> None:
    """Adds the rows' votes into ``counts`` (a running total, int64, ``(B, C)``)."""
    _ops.count_votes_(logits, row_start, samples_per_input, counts)


@torch.library.register_fake("ddrs_ext::perturb_gaussian")
def _perturb_gaussian_fake(
    x, sigma, stream, seed, sample_offset, samples_per_input, row_start, num_rows, with_sq_norm
):
    torch._check(num_rows >= 0)
    out = x.new_empty((num_rows, *x.shape[1:]))
    sq = x.new_empty((num_rows if with_sq_norm else 0,), dtype=torch.float64)
    return out, sq


@torch.library.register_fake("ddrs_ext::perturb_gaussian_out")
def _perturb_gaussian_out_fake(
    x, sigma, stream, seed, sample_offset, samples_per_input, row_start, out, sq_norm
):
    return None


@torch.library.register_fake("ddrs_ext::perturb_uniform")
def _perturb_uniform_fake(x, theta, stream, seed, sample_offset, samples_per_input, row_start, num_rows):
    torch._check(num_rows >= 0)
    return x.new_empty((num_rows, *x.shape[1:]))


@torch.library.register_fake("ddrs_ext::perturb_uniform_out")
def _perturb_uniform_out_fake(x, theta, stream, seed, sample_offset, samples_per_input, row_start, out):
    return None


@torch.library.register_fake("ddrs_ext::count_votes")
def _count_votes_fake(logits, row_start, samples_per_input, num_inputs):
    return logits.new_empty((num_inputs, logits.shape[1]), dtype=torch.int64)


@torch.library.register_fake("ddrs_ext::count_votes_")
def _count_votes__fake(logits, row_start, samples_per_input, counts):
    return None


def philox4x32_10(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Raw Philox4x32-10 output words (N, 4) int64 for counters (N, 4) and key ``seed``."""
    return _ops.philox4x32_10(counters, as_signed64(seed))


@torch.library.register_fake("ddrs_ext::philox4x32_10")
def _philox_fake(counters, seed):
    return torch.empty_like(counters)


def soft_votes_(
    logits: torch.Tensor,
    row_start: int,
    samples_per_input: int,
    prob_sum: torch.Tensor,
    *,
    dlogits: torch.Tensor | None = None,
    sq_norm: torch.Tensor | None = None,
    dim: int = 0,
    probabilities: bool = False,
    deriv_sum: torch.Tensor | None = None,
    score_total: torch.Tensor | None = None,
) -> None:
    """Adds each row's class probabilities (softmax of ``logits``, or ``logits`` themselves when
    ``probabilities``) into ``prob_sum[input]`` (float64, in row order).

    With ``deriv_sum`` also adds either their forward-mode derivatives along the tangents
    ``dlogits`` or their score-function weights ``p * (sq_norm - dim)``; ``score_total``
    collects ``sq_norm - dim`` per input.
    """
    _ops.soft_votes_(
        logits,
        dlogits,
        sq_norm,
        row_start,
        samples_per_input,
        dim,
        probabilities,
        prob_sum,
        deriv_sum,
        score_total,
    )


def sigma_step(
    sigma: torch.Tensor,
    top2: torch.Tensor,
    dtop2: torch.Tensor,
    bracket: torch.Tensor,
    *,
    beyond: torch.Tensor | None = None,
    lr: float,
    clip: tuple[float, float],
    sigma_range: tuple[float, float],
    rule: int,
    growth: float,
    gap: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sigma update for every input: returns (new sigma, surrogate radius, d radius / d sigma).

    ``beyond`` (bool, (B,)) marks inputs whose sigma the bisection rule must treat as past the
    optimum whatever the gradient says. ``gap`` 0: the Gaussian surrogate
    ``sigma / 2 * (Phi^-1(E_A) - Phi^-1(E_B))``; 1: uniform noise's ``theta * (E_A - E_B)`` (``clip``
    may then reach 0 and 1, i.e. no clip)."""
    return _ops.sigma_step(
        sigma,
        top2,
        dtop2,
        bracket,
        beyond,
        lr,
        clip[0],
        clip[1],
        sigma_range[0],
        sigma_range[1],
        rule,
        growth,
        gap,
    )


@torch.library.register_fake("ddrs_ext::soft_votes_")
def _soft_votes_fake(
    logits,
    dlogits,
    sq_norm,
    row_start,
    samples_per_input,
    dim,
    probabilities,
    prob_sum,
    deriv_sum,
    score_total,
):
    return None


@torch.library.register_fake("ddrs_ext::sigma_step")
def _sigma_step_fake(
    sigma, top2, dtop2, bracket, beyond, lr, clip_lo, clip_hi, sigma_min, sigma_max, rule, growth, gap=0
):
    return torch.empty_like(sigma), torch.empty_like(sigma), torch.empty_like(sigma)


# ---------------------------------------------------------------- autograd for the noise op
# out = x[b] + sigma[b] * eps: d out / d x[b] = 1 for every copy of input b, d out / d sigma[b] = eps.
# eps is not stored: backward regenerates it from its key (seed, stream, sample, element).


def _save_key(ctx, x, scale, stream, seed, sample_offset, samples_per_input, row_start, num_rows) -> None:
    ctx.save_for_backward(stream)
    ctx.key = (seed, sample_offset, samples_per_input, row_start, num_rows)
    ctx.x_meta = (x.shape, x.dtype, x.device)
    ctx.sigma_dtype = scale.dtype


def _noise_backward(ctx, grad_out, unit_noise) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``out = x[b] + scale[b] * e`` with respect to ``x`` and ``scale``; ``unit_noise``
    regenerates ``e`` (the op at ``x = 0``, ``scale = 1``) from the key :func:`_save_key` kept."""
    (stream,) = ctx.saved_tensors
    seed, sample_offset, m, row_start, num_rows = ctx.key
    shape, dtype, device = ctx.x_meta
    B = shape[0]
    owner = torch.arange(row_start, row_start + num_rows, device=device) // m
    grad_x = grad_scale = None
    if ctx.needs_input_grad[0]:
        flat = grad_out.reshape(num_rows, -1)
        grad_x = torch.zeros((B, flat.shape[1]), dtype=flat.dtype, device=device).index_add_(0, owner, flat)
        grad_x = grad_x.reshape(shape).to(dtype)
    if ctx.needs_input_grad[1]:
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        ones = torch.ones(B, dtype=torch.float64, device=device)
        e = unit_noise(zeros, ones, stream, seed, sample_offset, m, row_start, num_rows)
        per_row = (grad_out.reshape(num_rows, -1).double() * e.reshape(num_rows, -1).double()).sum(1)
        grad_scale = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, owner, per_row)
        grad_scale = grad_scale.to(ctx.sigma_dtype)
    return grad_x, grad_scale


def _perturb_setup_context(ctx, inputs, output):
    _save_key(ctx, *inputs[:8])  # the last input, return_sq, has no gradient
    ctx.mark_non_differentiable(output[1])


def _unit_gaussian(*key) -> torch.Tensor:
    return torch.ops.ddrs_ext.perturb_gaussian(*key, False)[0]


def _perturb_backward(ctx, grad_out, grad_sq):
    return (*_noise_backward(ctx, grad_out, _unit_gaussian), None, None, None, None, None, None, None)


torch.library.register_autograd(
    "ddrs_ext::perturb_gaussian", _perturb_backward, setup_context=_perturb_setup_context
)


# out = x[b] + theta[b] * u: the same, with u regenerated from its key by the uniform op.


def _perturb_uniform_setup_context(ctx, inputs, output):
    _save_key(ctx, *inputs)


def _perturb_uniform_backward(ctx, grad_out):
    grads = _noise_backward(ctx, grad_out, torch.ops.ddrs_ext.perturb_uniform)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd(
    "ddrs_ext::perturb_uniform", _perturb_uniform_backward, setup_context=_perturb_uniform_setup_context
)
