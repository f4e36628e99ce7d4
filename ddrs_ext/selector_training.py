"""Training the selector of :func:`ddrs_ext.certify_dual`: its labels and its training loop.

A selector learns, per input, which sigma level certifies it best. Its labels come from certifying
training inputs at every level (:func:`level_radii`): the best level (:func:`best_level`), soft labels
over the levels (:func:`soft_level_labels`), or radii from experts that never trained on the input
(:func:`cross_fit_radii`, :func:`fold_assignment`). :func:`train_selector` then trains it under the noise
it will be certified with, by default at the largest level (:func:`default_selector_sigma`).
Every name here is importable from :mod:`ddrs_ext.dual` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ddrs_ext import rng
from ddrs_ext._validate import Model, _check_positive, _experts, check_count, check_inputs, check_sigma_levels
from ddrs_ext.certification import certify
from ddrs_ext.noise import Noise, resolve_noise, scale_name


def level_radii(
    model: Model | Sequence[Model],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels,
    *,
    n0: int = 64,
    n: int = 512,
    alpha: float = 0.01,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str | Noise = "gaussian",
) -> torch.Tensor:
    """The CERTIFY radius of the true class ``y`` of every input at every level, shape ``(N, K)``
    float64: column k certifies ``model`` (or ``model[k]``, one expert per level) at
    ``sigma_levels[k]`` with ``n0``, ``n``, ``alpha``, ``seed`` and ``index`` (the noise of
    ``certify(model_k, x, sigma_k, seed=seed, index=index)``). An input certified wrongly or abstaining at
    a level gets -1 there. The raw material of selector labels (:func:`best_level`,
    :func:`soft_level_labels`). ``noise="uniform"``: the levels are half-widths theta and the radii L1
    radii ``theta * (2 p_lower - 1)`` (labels for a selector of L1 dual certification)."""
    family = resolve_noise(noise)
    levels = check_sigma_levels(sigma_levels)
    experts = _experts(model, levels.numel())
    x = check_inputs(x)
    y = torch.as_tensor(y, dtype=torch.int64).cpu().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per input ({x.shape[0]}), got {y.shape[0]}")
    seed = rng.resolve_seed(seed)
    radii = torch.empty((x.shape[0], levels.numel()), dtype=torch.float64)
    for k, (expert, sigma) in enumerate(zip(experts, levels.tolist())):
        r = certify(
            expert,
            x,
            sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            seed=seed,
            index=index,
            noise=family,
        )
        radii[:, k] = torch.where(r.prediction == y, r.radius, torch.full_like(r.radius, -1.0))
    return radii


def best_level(
    model: Model | Sequence[Model],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels,
    *,
    n0: int = 64,
    n: int = 512,
    alpha: float = 0.01,
    batch_size: int = 1000,
    seed: int | None = None,
    index: torch.Tensor | Sequence[int] | None = None,
    noise: str | Noise = "gaussian",
) -> torch.Tensor:
    """Selector training labels: per input, the level whose CERTIFY radius for the true class ``y``
    is largest (:func:`level_radii`: certified at every level with ``n0``, ``n``, ``alpha``, by one
    model or by one expert per level; an input certified wrongly or abstaining at a level counts as
    radius -1 there; ties go to the lowest level). ``noise`` as for :func:`level_radii` (``"uniform"``:
    the largest L1 radius)."""
    radii = level_radii(
        model,
        x,
        y,
        sigma_levels,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=batch_size,
        seed=seed,
        index=index,
        noise=noise,
    )
    return radii.argmax(1) if radii.numel() else torch.zeros(radii.shape[0], dtype=torch.int64)


_BALANCE_STEPS = 500


def soft_level_labels(
    radii: torch.Tensor,
    *,
    tau: float = 0.25,
    level_weights: Sequence[float] | torch.Tensor | str | None = None,
) -> torch.Tensor:
    """Soft selector labels from :func:`level_radii`: per input, ``q_k`` proportional to
    ``w_k * exp(R_k / tau)`` (rows sum to 1; float32, shape ``(N, K)``).

    ``tau`` (> 0) sets how sharply the labels prefer the level with the largest radius (towards 0,
    :func:`best_level`'s one-hot labels). ``level_weights``: None (all 1), K positive numbers, or
    ``"balanced"``: the weights (found by iterative proportional fitting) under which every level
    carries the same total label mass, ``mean_x q_k(x) = 1/K`` (levels that win rarely are not drowned
    by the rest).
    """
    radii = torch.as_tensor(radii, dtype=torch.float64).detach().cpu()
    if radii.dim() != 2 or radii.shape[1] == 0:
        raise ValueError(f"radii must have shape (inputs, levels), got {tuple(radii.shape)}")
    if not bool(torch.isfinite(radii).all()):
        raise ValueError("radii must be finite (level_radii gives -1 where a level is wrong or abstains)")
    tau = _check_positive(tau, "tau")
    K = radii.shape[1]
    logits = radii / tau
    if level_weights is None:
        return torch.softmax(logits, 1).float()
    if isinstance(level_weights, str):
        if level_weights != "balanced":
            raise ValueError(
                f"level_weights must be None, 'balanced' or {K} positive numbers, got {level_weights!r}"
            )
        # iterative proportional fitting: rescale each level's weight until the mean labels are all 1/K
        if radii.shape[0] == 0:
            return torch.zeros((0, K), dtype=torch.float32)
        log_w = torch.zeros(K, dtype=torch.float64)
        for _ in range(_BALANCE_STEPS):
            mass = torch.softmax(logits + log_w[None, :], 1).mean(0)
            if not bool((mass > 0).all()):
                raise ValueError(
                    "level_weights='balanced': a level gets no label mass at all at this tau (its labels "
                    "underflow); raise tau or pass explicit weights"
                )
            if float((mass * K - 1).abs().max()) < 1e-6:
                break
            log_w = log_w - (mass * K).log()
        weights = (log_w - log_w.max()).exp()
    else:
        try:
            weights = torch.as_tensor(level_weights, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"level_weights must be None, 'balanced' or {K} positive numbers") from None
        if weights.shape != (K,) or not bool((torch.isfinite(weights) & (weights > 0)).all()):
            raise ValueError(
                f"level_weights must be {K} finite numbers > 0 (one per level), got {weights.tolist()}"
            )
    return torch.softmax(logits + weights.log()[None, :], 1).float()


def fold_assignment(count: int, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. folds-1) of each of ``count`` inputs in :func:`cross_fit_radii` with ``seed``: a
    permutation drawn from ``seed`` dealt round-robin, so the folds differ in size by at most one."""
    count, folds = check_count(count, "count", minimum=0), check_count(folds, "folds", minimum=1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(rng.resolve_seed(seed)))
    part = torch.empty(count, dtype=torch.int64)
    part[order] = torch.arange(count) % folds
    return part


def cross_fit_radii(
    fit: Callable[[torch.Tensor, torch.Tensor, int], Model | Sequence[Model]],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels,
    *,
    folds: int = 5,
    n0: int = 64,
    n: int = 512,
    alpha: float = 0.01,
    batch_size: int = 1000,
    seed: int | None = None,
    noise: str | Noise = "gaussian",
) -> torch.Tensor:
    """:func:`level_radii` of every input by experts that never trained on it (cross-fitting).

    The inputs are dealt into ``folds`` parts (:func:`fold_assignment` with ``seed``); for each part j,
    ``fit(x_rest, y_rest, j)`` trains and returns a model (or one expert per level) on the other parts,
    which then certifies part j. Experts certify the inputs they trained on with larger radii than
    unseen ones, mostly at large sigma, so labels from their own training inputs teach a selector to
    pick large levels too often; held-out radii look like those of test inputs. Input i's noise stream
    is i (``index``), keyed by ``seed``. Returns ``(N, K)`` radii, -1 where wrong or abstaining.
    ``noise`` as for :func:`level_radii` (``"uniform"``: L1 radii at half-widths theta).
    """
    family = resolve_noise(noise)
    x = check_inputs(x)
    y = torch.as_tensor(y, dtype=torch.int64).cpu().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per input ({x.shape[0]}), got {y.shape[0]}")
    folds = check_count(folds, "folds", minimum=2)
    if folds > x.shape[0]:
        raise ValueError(f"folds ({folds}) must not exceed the number of inputs ({x.shape[0]})")
    if not callable(fit):
        raise TypeError("fit must be a callable fit(x, y, fold) returning a model or one model per level")
    levels = check_sigma_levels(sigma_levels)
    seed = rng.resolve_seed(seed)
    part = fold_assignment(x.shape[0], folds, seed)
    radii = torch.empty((x.shape[0], levels.numel()), dtype=torch.float64)
    for j in range(folds):
        held = (part == j).nonzero()[:, 0]
        rest = (part != j).nonzero()[:, 0]
        model = fit(x[rest.to(x.device)], y[rest].to(y.device), j)
        radii[held] = level_radii(
            model,
            x[held.to(x.device)],
            y[held],
            levels,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=batch_size,
            seed=seed,
            index=held,
            noise=family,
        )
    return radii


def default_selector_sigma(sigma_levels) -> float:
    """The selector's noise level when none is given: the largest level. A selector smoothed at a smaller
    sigma than the classifier it routes to certifies smaller radii than that classifier can, so its
    radius, not the classifier's, would bound the certificate of the inputs it sends to large levels."""
    return float(check_sigma_levels(sigma_levels).max())


def _selector_targets(labels, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(targets on x's device, soft): int labels (N,) or soft labels (N, K), checked and normalised."""
    labels = torch.as_tensor(labels).detach()
    if labels.dim() == 0 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have one entry per input ({x.shape[0]}; a row of soft labels per input), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dim() == 2 and labels.is_floating_point():
        if not bool((torch.isfinite(labels) & (labels >= 0)).all()) or not bool((labels.sum(1) > 0).all()):
            raise ValueError("soft labels must be finite, >= 0, with a positive sum in every row")
        soft = labels.to(device=x.device, dtype=torch.float32)
        return soft / soft.sum(1, keepdim=True), True
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
        raise TypeError(
            "labels must be level indices (an integer tensor of shape (N,)) or soft labels (a float tensor "
            f"of shape (N, K)), got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    return labels.to(device=x.device, dtype=torch.int64), False


def train_selector(
    selector: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    selector_sigma: float | None = None,
    sigma_levels: Sequence[float] | torch.Tensor | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int | None = None,
    copies: int = 1,
    lam: float = 0.0,
    eta: float = 0.0,
    noise: str | Noise = "gaussian",
) -> list[float]:
    """Trains ``selector`` to predict ``labels`` under Gaussian augmentation at ``selector_sigma``, the
    noise it will be certified with (``noise="uniform"``: uniform augmentation on the cube of half-width
    ``selector_sigma``, for ``certify_dual(..., noise="uniform")``).

    ``labels``: level indices (N,) (:func:`best_level`, or :func:`~ddrs_ext.dual.nearest_level` of
    :func:`ddrs_ext.optimize_sigma`'s result on each training input), trained with cross-entropy, or soft
    labels (N, K) (:func:`soft_level_labels`; rows are normalised), trained with the cross-entropy against
    them. ``selector_sigma`` defaults to :func:`default_selector_sigma` of ``sigma_levels`` (the largest
    level); pass one of the two. Each input is seen as ``copies`` noisy copies per step; ``lam`` and
    ``eta`` add :func:`ddrs_ext.training.consistency_penalty` over those copies (``lam > 0`` needs
    ``copies >= 2``), which makes the smoothed selector's vote, and so its certified radius, larger.
    Adam, shuffled minibatches; ``seed`` (None: drawn from torch's generator) fixes the order and the
    noise (with integer labels, ``copies = 1`` and no penalty, exactly the noise of earlier versions). The
    selector's mode is restored afterwards. Returns the mean loss of every epoch.
    """
    from ddrs_ext.training import consistency_penalty, noisy_copies

    family = resolve_noise(noise)
    x = check_inputs(x)
    targets, soft = _selector_targets(labels, x)
    if selector_sigma is None:
        if sigma_levels is None:
            raise ValueError(
                "pass selector_sigma, or sigma_levels to smooth the selector at the largest level"
            )
        selector_sigma = default_selector_sigma(sigma_levels)
    selector_sigma = _check_positive(selector_sigma, scale_name(family, "selector_sigma"))
    epochs, batch_size = check_count(epochs, "epochs", minimum=0), check_count(batch_size, "batch_size")
    copies = check_count(copies, "copies")
    lr = _check_positive(lr, "lr")
    for name, value in (("lam", lam), ("eta", eta)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if lam > 0 and copies < 2:
        raise ValueError(
            "lam > 0 (the consistency term) compares noisy copies of each input: pass copies >= 2"
        )
    seed = rng.resolve_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(selector.parameters(), lr=lr)
    was_training = selector.training
    selector.train()
    losses = []
    checked = False
    try:
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=order_gen).to(x.device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                rows = order[start : start + batch_size]
                noisy = noisy_copies(
                    x[rows],
                    selector_sigma,
                    copies=copies,
                    seed=(seed + epoch + 1) % 2**64,
                    index=rows.cpu(),
                    noise=family,
                )
                logits = selector(noisy)
                if not checked:
                    _check_selector_output(logits, targets, soft)
                    checked = True
                target = targets[rows].repeat_interleave(copies, 0)
                if soft:
                    loss = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
                else:
                    loss = torch.nn.functional.cross_entropy(logits, target)
                if lam > 0 or eta > 0:
                    loss = loss + consistency_penalty(
                        logits.reshape(rows.numel(), copies, -1), lam=lam, eta=eta
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * rows.numel()
            losses.append(total / max(x.shape[0], 1))
    finally:
        selector.train(was_training)
    return losses


def _check_selector_output(logits, targets: torch.Tensor, soft: bool) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("the selector must return logits of shape (batch, levels)")
    K = logits.shape[1]
    if soft and targets.shape[1] != K:
        raise ValueError(
            f"the soft labels have {targets.shape[1]} levels but the selector returns {K} logits"
        )
    if not soft and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= K):
        raise ValueError(f"labels must be level indices in [0, {K}) (the selector returns {K} logits)")
