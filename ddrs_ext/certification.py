"""certify and predict (Cohen et al. 2019) for many inputs at once, each with its own sigma."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddrs_ext import ops, rng, stats
from ddrs_ext._validate import (
    check_alpha,
    check_count,
    check_inputs,
    check_logits,
    check_model,
    check_num_classes,
    check_sigma,
    evaluating,
)
from ddrs_ext.noise import Noise, resolve_noise, scale_name

#: The class returned where the smoothed classifier abstains (no certificate; radius 0).
ABSTAIN = -1


@dataclass
class CertifyResult:
    """Per-input certification results (all tensors on the CPU).

    prediction: (B,) int64, the certified class or ``ABSTAIN`` (-1).
    radius: (B,) float64, the certified radius in the norm ``norm`` (0 when abstaining).
    p_lower: (B,) float64, the (1 - alpha) lower confidence bound on the top class's probability.
    counts: (B, C) int64, the estimation-phase vote counts.
    sigma: (B,) float64, the noise level each input was certified with (Gaussian noise's sigma, or
        uniform noise's half-width theta).
    seed: the seed that generated the noise (pass it back to reproduce the run).
    samples: (B,) int64, model evaluations spent on each input (selection included);
        ``n0 + n`` for :func:`certify` (``n`` with ``labels``), fewer for sequential certification
        that stops early.
    norm: the norm ``radius`` is in: ``"l2"`` (Gaussian noise) or ``"l1"`` (uniform noise).
    bound_alpha: (B,) float64, the Clopper-Pearson level at which ``p_lower`` was computed from
        ``counts`` (the votes for the certified class among ``counts.sum(1)`` samples): ``alpha`` for
        :func:`certify`, the stopping round's share of ``alpha`` for
        :func:`ddrs_ext.certify_sequential`. Clopper-Pearson recomputed from ``counts`` is a valid
        bound at this level only. None where not recorded.
    labels: (B,) int64, the true labels of an evaluation run (``labels=...``): ``prediction`` is then
        the label or ``ABSTAIN``, never another class, and certifies "correct within radius"; None
        when ``prediction`` is the smoothed classifier's own class.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor
    sigma: torch.Tensor
    seed: int
    samples: torch.Tensor | None = None
    norm: str = "l2"
    bound_alpha: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def plan_chunks(num_inputs: int, samples: Sequence[int], batch_size: int):
    """Cuts the virtual batch of every phase (``num_inputs * samples[k]`` rows each, one after the
    other) into forward batches of at most ``batch_size`` rows.

    Returns per batch ``(rows, [(phase, first row within the phase, rows, offset in the batch)])``.
    """
    batches, segments, filled = [], [], 0
    for k, m in enumerate(samples):
        row0, total = 0, num_inputs * m
        while row0 < total:
            take = min(batch_size - filled, total - row0)
            segments.append((k, row0, take, filled))
            filled += take
            row0 += take
            if filled == batch_size:
                batches.append((filled, segments))
                segments, filled = [], 0
    if filled:
        batches.append((filled, segments))
    return batches


@dataclass
class _Phase:
    sample_offset: int
    samples: int  # per input


class VoteSampler:
    """Runs a model over noisy copies of many inputs, packed into forward batches.

    The copies of all inputs and phases form one virtual batch that is cut into
    chunks of ``batch_size`` rows; a chunk may hold the end of one input's
    samples and the start of the next. One input buffer is reused for every chunk.
    ``noise`` is the family (``"gaussian"``: ``sigma`` is its standard deviation; ``"uniform"``:
    ``sigma`` is the half-width theta of the cube).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        sigma: torch.Tensor,
        stream: torch.Tensor,
        seed: int,
        batch_size: int,
        num_classes: int | None,
        noise: str | Noise = "gaussian",
    ) -> None:
        self.model, self.x, self.sigma, self.stream, self.seed = model, x, sigma, stream, seed
        self.noise = resolve_noise(noise)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.max_classes: int | None = None  # Smooth: num_classes may exceed the model's outputs
        self._buffer: torch.Tensor | None = None

    def _check_logits(self, logits, rows: int) -> torch.Tensor:
        self.num_classes = check_logits(logits, rows, self.num_classes)
        if self.max_classes is not None and self.num_classes > self.max_classes:
            raise ValueError(
                f"num_classes is {self.max_classes} but the model returned {self.num_classes} classes; "
                "pass at least the model's number of outputs as num_classes"
            )
        return logits

    def counts(self, phases: Sequence[_Phase], inputs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hard vote counts per phase, (B, C), or (len(inputs), C) for a subset ``inputs`` (indices
        into x) whose copies alone fill the forward batches."""
        x, sigma, stream = self.x, self.sigma, self.stream
        if inputs is not None:
            where = inputs.to(x.device)
            x, sigma, stream = x[where], sigma[where], stream[where]
        B = x.shape[0]
        results: list[torch.Tensor | None] = [None] * len(phases)
        if B == 0:
            return [torch.zeros((0, self.num_classes or 0), dtype=torch.int64) for _ in phases]
        chunks = plan_chunks(B, [p.samples for p in phases], self.batch_size)
        rows_max = max(rows for rows, _ in chunks)
        if self._buffer is None or self._buffer.shape[0] < rows_max:
            self._buffer = torch.empty((rows_max, *x.shape[1:]), dtype=x.dtype, device=x.device)
        perturb, vote = self.noise.perturb_out, torch.ops.ddrs_ext.count_votes_
        seed = ops.as_signed64(self.seed)
        with torch.inference_mode(), evaluating(self.model):
            for rows, segments in chunks:
                batch = self._buffer[:rows]
                for k, row0, seg, off in segments:
                    phase = phases[k]
                    out = batch if seg == rows else batch[off : off + seg]
                    perturb(x, sigma, stream, seed, phase.sample_offset, phase.samples, row0, out)
                logits = self._check_logits(self.model(batch), rows)
                for k, row0, seg, off in segments:
                    if results[k] is None:
                        results[k] = torch.zeros(
                            (B, self.num_classes), dtype=torch.int64, device=logits.device
                        )
                    part = logits if seg == rows else logits[off : off + seg]
                    vote(part, row0, phases[k].samples, results[k])
        return [r.cpu() for r in results]


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu":
        return
    key = torch._C._dispatch_key_for_device(x.device.type)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ddrs_ext::perturb_gaussian_out", key):
        raise ValueError(
            f"ddrs_ext has no {key} kernels in this build, so x must be on the CPU or a CUDA device; "
            "for CUDA, reinstall next to a CUDA build of torch and the CUDA toolkit (docs/building.md)"
        )


def check_sampling_args(model, x, sigma, batch_size, seed, index, sigma_name: str = "sigma"):
    """The checks every sampling procedure shares: returns (x, sigma, batch_size, seed, stream)."""
    check_model(model)
    if isinstance(x, torch.Tensor):
        _check_device(x)
    x = check_inputs(x).contiguous()
    sigma = check_sigma(sigma, x.shape[0], x.device, name=sigma_name)
    batch_size = check_count(batch_size, "batch_size")
    seed = rng.resolve_seed(seed)
    stream = rng.resolve_streams(index, x.shape[0], x.device)
    return x, sigma, batch_size, seed, stream


def check_labels(labels, num_inputs: int, num_classes: int | None) -> torch.Tensor:
    """True labels for evaluation mode: (B,) int64 on the CPU, each in [0, num_classes) when known."""
    if isinstance(labels, bool):
        raise TypeError("labels must be a sequence of class indices, one per input, got a bool")
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"labels must be a sequence of class indices, one per input, got {type(labels).__name__}"
        ) from None
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must hold integer class indices, got dtype {y.dtype}")
    if y.dim() > 1:
        raise ValueError(
            f"labels must be 1-d, one entry per input ({num_inputs}), got shape {tuple(y.shape)}"
        )
    y = y.detach().to(device="cpu", dtype=torch.int64).reshape(-1)
    if y.shape[0] != num_inputs:
        raise ValueError(f"labels must have one entry per input ({num_inputs}), got {y.shape[0]}")
    if num_inputs and int(y.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(y.min())}")
    if num_inputs and num_classes is not None and int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes = {num_classes}), got {int(y.max())}")
    return y


def _prepare(model, x, sigma, batch_size, num_classes, seed, index, noise="gaussian"):
    noise = resolve_noise(noise)
    x, sigma, batch_size, seed, stream = check_sampling_args(
        model, x, sigma, batch_size, seed, index, scale_name(noise)
    )
    num_classes = check_num_classes(num_classes)
    return VoteSampler(model, x, sigma, stream, seed, batch_size, num_classes, noise), seed


def certify(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str = "gaussian",
    labels: torch.Tensor | Sequence[int] | None = None,
) -> CertifyResult:
    """Certifies every input of ``x`` (shape ``(B, ...)``) under Gaussian noise of its own ``sigma``
    (or, with ``noise="uniform"``, uniform noise on a cube of half-width ``sigma``).

    For each input: the class with most votes among ``n0`` noisy copies is the
    candidate; ``n`` fresh copies bound its probability from below at confidence
    ``1 - alpha`` (Clopper-Pearson); below 1/2 the input abstains, otherwise its
    certified L2 radius is ``sigma * Phi^-1(p_lower)``. Copies of many inputs share
    each forward batch of ``batch_size`` rows. ``seed`` (None: drawn from torch's
    generator) and ``index`` (per-input noise stream ids, default ``0..B-1``)
    determine the noise; nothing else does, so results do not depend on
    ``batch_size`` or threads. An ``nn.Module`` (or a bound method of one) is evaluated in eval
    mode, as ``core.Smooth`` does, and every submodule's mode is restored afterwards; a plain
    function is called as it is.

    ``labels`` (evaluation mode): one true label per input. Certified accuracy only asks whether the
    smoothed classifier returns the label within r, so selection is skipped (``n0`` is not used, and
    ``samples`` is ``n``) and the ``n`` samples bound the LABEL's probability: ``prediction`` is the
    label or ``ABSTAIN`` (never another class; the result's ``labels`` is set), a sound certificate
    that the smoothed classifier returns the label everywhere within ``radius``. An input
    misclassified by the smoothed classifier abstains. Use it to evaluate a labelled test set.

    ``noise="uniform"`` certifies L1 radii: each noisy copy is ``x + sigma * u`` with ``u`` uniform on
    ``[-1, 1]^D`` (``sigma`` is then the cube's half-width theta), and the radius is
    ``sigma * (2 p_lower - 1)`` (Yang et al. 2020); ``result.norm`` says ``"l1"``. Everything else,
    abstention below 1/2 included, is as above.
    """
    n0 = check_count(n0, "n0")
    n = check_count(n, "n")
    alpha = check_alpha(alpha)
    sampler, seed = _prepare(model, x, sigma, batch_size, num_classes, seed, index, noise)
    if labels is not None:
        labels = check_labels(labels, sampler.x.shape[0], sampler.num_classes)
    return certify_with(sampler, seed, n0, n, alpha, labels=labels)


def certify_with(
    sampler: VoteSampler, seed: int, n0: int, n: int, alpha: float, labels: torch.Tensor | None = None
) -> CertifyResult:
    """CERTIFY's selection, estimation and statistics over a prepared sampler (arguments checked); with
    ``labels``, no selection: the estimation bounds each label's probability."""
    if labels is None:
        select, estimate = sampler.counts([_Phase(rng.PHASE_SELECTION, n0), _Phase(rng.PHASE_ESTIMATION, n)])
        guess = select.argmax(dim=1) if select.shape[1] else torch.zeros(0, dtype=torch.int64)
        spent = n0 + n
    else:
        (estimate,) = sampler.counts([_Phase(rng.PHASE_ESTIMATION, n)])
        if labels.numel() and int(labels.max()) >= estimate.shape[1]:
            raise ValueError(
                f"labels must lie in [0, {estimate.shape[1]}) (the model returned {estimate.shape[1]} "
                f"classes), got {int(labels.max())}"
            )
        guess, spent = labels, n
    n_a = estimate.gather(1, guess[:, None])[:, 0].numpy() if estimate.shape[0] else np.zeros(0)
    p_lower = stats.clopper_pearson_lower(n_a, n, alpha)
    sig = sampler.sigma.cpu().numpy()
    radius = sampler.noise.radius(p_lower, sig)
    certified = p_lower >= 0.5
    prediction = torch.where(torch.from_numpy(certified), guess, torch.full_like(guess, ABSTAIN))
    return CertifyResult(
        prediction=prediction,
        radius=torch.from_numpy(radius),
        p_lower=torch.from_numpy(np.asarray(p_lower, dtype=np.float64)),
        counts=estimate,
        sigma=torch.from_numpy(sig),
        seed=seed,
        samples=torch.full((len(sig),), spent, dtype=torch.int64),
        norm=sampler.noise.norm,
        bound_alpha=torch.full((len(sig),), alpha, dtype=torch.float64),
        labels=labels,
    )


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str = "gaussian",
) -> torch.Tensor:
    """The smoothed classifier's prediction per input, or ``ABSTAIN`` (-1).

    Counts votes over ``n`` noisy copies and abstains unless a two-sided binomial
    test rejects, at level ``alpha``, that the top two classes are equally likely;
    the returned class is then wrong with probability at most ``alpha``. ``noise`` as for
    :func:`certify` (the smoothed classifier of Gaussian or of uniform noise).
    """
    n = check_count(n, "n")
    alpha = check_alpha(alpha)
    sampler, _ = _prepare(model, x, sigma, batch_size, num_classes, seed, index, noise)
    (counts,) = sampler.counts([_Phase(rng.PHASE_PREDICT, n)])
    return predict_from_counts(counts, alpha)


def predict_from_counts(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """PREDICT's decision per row of class counts (B, C): the top class, or ABSTAIN unless a
    two-sided binomial test rejects at level alpha that the top two classes are equally likely."""
    if counts.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    top, pvalue = stats.top_two_pvalue(counts.numpy())
    return torch.from_numpy(np.where(pvalue <= alpha, top, ABSTAIN).astype(np.int64))
