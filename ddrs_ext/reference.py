"""Slow, plain-PyTorch references for every kernel: the oracle the tests hold the kernels to.

They follow the RNG contract literally (docs/mathematics.md, "Random numbers") with int64 tensor
arithmetic for Philox and float32 IEEE operations for Box-Muller, in the
same order as csrc/philox.h, so the kernels must match them bit for bit.
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = (c.to(torch.int64) & _MASK for c in counter)
    k0, k1 = key
    for _ in range(10):
        p0 = c0 * 0xD2511F53  # < 2^64 as unsigned; int64 wraps but the bit pattern is exact
        p1 = c2 * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _MASK, p0 & _MASK
        hi1, lo1 = (p1 >> 32) & _MASK, p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _MASK
        k1 = (k1 + 0xBB67AE85) & _MASK
    return [c0, c1, c2, c3]


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    bits = u.view(torch.int32).to(torch.int64) & _MASK
    ix = (bits + (0x3F800000 - 0x3F3504F3)) & _MASK
    e = ((ix >> 23) - 127).to(torch.float32)
    m = (((ix & 0x007FFFFF) + 0x3F3504F3) & _MASK).to(torch.int32).view(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = _f32(1 / 9)
    for coef in (1 / 7, 1 / 5, 1 / 3):
        series = _f32(coef) + s2 * series
    series = 1.0 + s2 * series
    ln2_hi, ln2_lo = _f32(0.693145751953125), _f32(1.42860682030941723212e-6)
    return (e * ln2_hi + (2.0 * s) * series) + e * ln2_lo


def _sincos_turns(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = b >> 8
    k = (v + (1 << 21)) >> 22
    f = (v - k * (1 << 22)).to(torch.float32) * _f32(2.0**-22)
    f2 = f * f
    s = _f32(0.000160441184787159560)
    for coef in (-0.00468175413531868810, 0.0796926262461670451, -0.645964097506246254, 1.57079632679489662):
        s = _f32(coef) + f2 * s
    s = f * s
    c = _f32(-0.0000252020423730606054)
    for coef in (0.000919260274839426020, -0.0208634807633529609, 0.253669507901048014, -1.23370055013616983):
        c = _f32(coef) + f2 * c
    c = 1.0 + f2 * c
    q = k & 3
    odd = (q & 1) == 1
    x, y = torch.where(odd, s, c), torch.where(odd, c, s)
    x = torch.where((q == 1) | (q == 2), -x, x)
    y = torch.where(q >= 2, -y, y)
    return x, y


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals (float32) from two int64 tensors of uint32 words."""
    u1 = (a >> 1).to(torch.float32) * _f32(2.0**-31) + _f32(2.0**-32)
    # Correctly rounded float32 sqrt (torch's float32 kernel may be off by an ulp).
    r = torch.sqrt((-2.0 * _log_unit(u1)).to(torch.float64)).to(torch.float32)
    c, s = _sincos_turns(b)
    return r * c, r * s


def gaussian(seed: int, stream: torch.Tensor, sample: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """Standard normals (float32) for broadcastable int64 tensors of stream, sample and element ids."""
    stream, sample, element = torch.broadcast_tensors(stream, sample, element)
    key = (seed & _MASK, (seed >> 32) & _MASK)
    block = element >> 2
    words = philox4x32_10((block, sample & _MASK, (sample >> 32) & _MASK, stream), key)
    z0, z1 = box_muller(words[0], words[1])
    z2, z3 = box_muller(words[2], words[3])
    lane = element & 3
    return torch.where(lane == 0, z0, torch.where(lane == 1, z1, torch.where(lane == 2, z2, z3)))


def perturb_gaussian(x, sigma, stream, seed, sample_offset, samples_per_input, row_start=0, num_rows=None):
    """Reference for ops.perturb_gaussian: returns (out, sq_norm)."""
    B = x.shape[0]
    if num_rows is None:
        num_rows = B * samples_per_input - row_start
    D = x[0].numel() if B else 0
    g = torch.arange(row_start, row_start + num_rows, dtype=torch.int64)
    b = g // samples_per_input
    sample = sample_offset + g % samples_per_input
    j = torch.arange(D, dtype=torch.int64)
    z = gaussian(seed, stream.cpu()[b][:, None], sample[:, None], j[None, :])
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.reshape(B, D).cpu().to(opmath)[b]
    sig = sigma.cpu().to(torch.float64).to(opmath)[b][:, None]
    out = (xf + sig * z.to(opmath)).to(x.dtype).reshape(num_rows, *x.shape[1:])
    sq = (z.to(torch.float64) ** 2).sum(1)
    return out, sq


UNIFORM_KEY_TWEAK = 0xB7E151628AED2A6A
_MASK64 = 0xFFFFFFFFFFFFFFFF


def uniform_key(seed: int) -> tuple[int, int]:
    """The Philox key of the uniform noise for ``seed``: a splitmix64 step of ``seed ^ UNIFORM_KEY_TWEAK``
    (csrc/uniform.h), as (low word, high word)."""
    z = ((seed ^ UNIFORM_KEY_TWEAK) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z & _MASK, z >> 32


def uniform_from_words(w: torch.Tensor) -> torch.Tensor:
    """Philox words (int64 tensors of uint32 values) to uniforms on [-1, 1] (float32):
    ``(2 * (w >> 8) - (2**24 - 1)) * 2**-24``, the midpoints of 2**24 equal cells."""
    odd = ((w >> 8) << 1) - 0xFFFFFF
    return odd.to(torch.float32) * _f32(2.0**-24)


def uniform(seed: int, stream: torch.Tensor, sample: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """Uniforms on [-1, 1] (float32) for broadcastable int64 tensors of stream, sample and element ids."""
    stream, sample, element = torch.broadcast_tensors(stream, sample, element)
    words = philox4x32_10((element >> 2, sample & _MASK, (sample >> 32) & _MASK, stream), uniform_key(seed))
    lane = element & 3
    w = torch.where(
        lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3]))
    )
    return uniform_from_words(w)


def perturb_uniform(x, theta, stream, seed, sample_offset, samples_per_input, row_start=0, num_rows=None):
    """Reference for ops.perturb_uniform: ``x[b] + theta[b] * u`` for the rows of the virtual batch."""
    B = x.shape[0]
    if num_rows is None:
        num_rows = B * samples_per_input - row_start
    D = x[0].numel() if B else 0
    g = torch.arange(row_start, row_start + num_rows, dtype=torch.int64)
    b = g // samples_per_input
    sample = sample_offset + g % samples_per_input
    j = torch.arange(D, dtype=torch.int64)
    u = uniform(seed, stream.cpu()[b][:, None], sample[:, None], j[None, :])
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.reshape(B, D).cpu().to(opmath)[b]
    th = theta.cpu().to(torch.float64).to(opmath)[b][:, None]
    return (xf + th * u.to(opmath)).to(x.dtype).reshape(num_rows, *x.shape[1:])


def count_votes(logits, row_start, samples_per_input, num_inputs):
    """Reference for ops.count_votes (raises ValueError on a NaN logit; +-Inf are ordered values)."""
    logits = logits.cpu()
    if torch.isnan(logits).any():
        raise ValueError("NaN logit")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cls = logits.to(acc).argmax(1)  # first maximum on ties
    b = (row_start + torch.arange(logits.shape[0])) // samples_per_input
    counts = torch.zeros(num_inputs, logits.shape[1], dtype=torch.int64)
    counts.index_put_((b, cls), torch.ones_like(cls), accumulate=True)
    return counts


def soft_votes(
    logits,
    row_start,
    samples_per_input,
    num_inputs,
    *,
    dlogits=None,
    sq_norm=None,
    dim=0,
    probabilities=False,
):
    """Reference for ops.soft_votes_ from zero: returns (prob_sum, deriv_sum, score_total) in float64.

    Raises ValueError on a row the kernel refuses: with logits, NaN, +Inf or a row of only -Inf
    (-Inf is a class of probability 0, whose tangent is ignored); with probabilities, any non-finite
    value; a non-finite tangent of a finite value."""
    logits = logits.cpu().double()
    b = (row_start + torch.arange(logits.shape[0])) // samples_per_input
    if probabilities:
        bad = ~torch.isfinite(logits).all(1)
    else:
        bad = (torch.isnan(logits) | (logits == math.inf)).any(1) | (logits == -math.inf).all(1)
    if dlogits is not None:
        d = dlogits.cpu().double()
        bad |= (~torch.isfinite(d) & (logits != -math.inf)).any(1)
    if bool(bad.any()):
        raise ValueError(f"soft_votes: row {int(bad.nonzero()[0, 0])} has no softmax")
    p = logits if probabilities else torch.softmax(logits, dim=1)
    C = logits.shape[1]
    prob_sum = torch.zeros(num_inputs, C, dtype=torch.float64).index_add_(0, b, p)
    deriv = score_total = None
    if dlogits is not None:
        d = torch.where(logits == -math.inf, 0.0, d)
        dp = d if probabilities else p * (d - (p * d).sum(1, keepdim=True))
        deriv = torch.zeros(num_inputs, C, dtype=torch.float64).index_add_(0, b, dp)
    elif sq_norm is not None:
        s = sq_norm.cpu().double() - dim
        deriv = torch.zeros(num_inputs, C, dtype=torch.float64).index_add_(0, b, p * s[:, None])
        score_total = torch.zeros(num_inputs, dtype=torch.float64).index_add_(0, b, s)
    return prob_sum, deriv, score_total


def surrogate_radius(sigma, e_a, e_b, clip=(0.02, 0.98)):
    """R(sigma) = sigma / 2 * (Phi^-1(clip E_A) - Phi^-1(clip E_B)) with torch ops (autograd-able)."""
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    )
    qa = normal.icdf(e_a.clamp(*clip))
    qb = normal.icdf(e_b.clamp(*clip))
    return sigma / 2 * (qa - qb)
