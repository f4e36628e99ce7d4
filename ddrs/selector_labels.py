"""What ``ddrs train --selector-for`` learns from: the models whose radii label the training inputs
(:func:`sources_from_args`: ``ddrs train`` checkpoints, one model or one expert per level, or your
own ``--model``/``--checkpoint`` on ``--data``) and the labels themselves (:func:`label_radii`,
:func:`crossfit_label_radii`, :func:`labels_from_radii`), computed with progress lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ddrs.checkpoints import build, is_classifier_checkpoint, load_checkpoint
from ddrs.weights import load_weights
from ddrs_ext.dual import cross_fit_radii, level_radii, soft_level_labels

__all__ = ["Sources", "crossfit_label_radii", "label_radii", "labels_from_radii", "sources_from_args"]

Log = Callable[[str], None]


@dataclass
class Sources:
    """The models (one, or one per level), the training inputs and labels they are certified on,
    what identifies them, and ``refit(rows, k)`` (expert k re-trained on the training rows ``rows``,
    for cross-fitting; None where that cannot be done)."""

    models: list[torch.nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    data_seed: int | None
    description: str
    refit: Callable[[torch.Tensor, int], torch.nn.Module] | None


def _train_checkpoint_sources(
    paths: Sequence[Path], log: Log, defaults: dict, noise: str = "gaussian"
) -> Sources:
    from ddrs.digits_training import train
    from ddrs_ext.data import load_digits_split

    models, configs = [], []
    for path in paths:
        content = load_weights(path, "--selector-for")  # a one-line diagnosis of a wrong file
        if not is_classifier_checkpoint(content):
            raise ValueError(
                f"--selector-for {path} is not a checkpoint of python -m ddrs.train_digits (ddrs train); "
                "for your own model give --selector-for with no checkpoint and --model/--checkpoint/--data"
            )
        model, _, config = load_checkpoint(path, map_location="cpu")
        trained = config.get("noise") or "gaussian"  # checkpoints without it are Gaussian
        if trained != noise:
            log(
                f"note: --selector-for {path} was trained with {trained} noise (ddrs train --noise "
                f"{trained}); this selector is labelled and trained with --noise {noise}"
            )
        models.append(model)
        configs.append(config)
    seeds = {int(c.get("seed", 0)) for c in configs}
    if len(seeds) > 1:
        raise ValueError(
            f"the --selector-for checkpoints were trained with different --seed ({sorted(seeds)}), so on "
            "different training splits of the digits: the selector needs one training split"
        )
    data_seed = seeds.pop()
    (x, y), _ = load_digits_split(data_seed)

    def refit(rows: torch.Tensor, k: int) -> torch.nn.Module:
        config = dict(configs[k])
        config.update(out=Path(config.get("out", "unused.pt")), selector_for=None)
        args = argparse.Namespace(**{**defaults, **config})
        checkpoint = train(args, log=lambda line: None, rows=rows)
        fresh = build(checkpoint["builder"])()
        fresh.load_state_dict(checkpoint["model"])
        return fresh.eval()

    where = f"digits training split of load_digits_split({data_seed})"
    return Sources(models, x, y, data_seed, where, refit)


def _own_sources(args: argparse.Namespace, levels: int, log: Log) -> Sources:
    from ddrs.datasets import _cifar_folder, load_dataset
    from ddrs.loading import load_classifier

    models, checkpoints = list(args.models), list(args.checkpoints)
    count = max(len(models), len(checkpoints))

    def pick(values: list, k: int):
        return None if not values else values[k] if len(values) == levels else values[0]

    specs = [(pick(models, k), pick(checkpoints, k)) for k in range(count if count > 1 else 1)]
    note = lambda text: log(f"note: {text}")  # noqa: E731
    loaded = [load_classifier(spec, checkpoint, torch.device("cpu"), note) for spec, checkpoint in specs]
    split = args.split
    if split is None and (args.data == "digits" or _cifar_folder(Path(args.data)) is not None):
        split = "train"
    data = load_dataset(args.data, split)
    x = data.inputs(range(len(data)))
    y = data.labels
    for model in loaded:
        try:
            with torch.no_grad():
                out = model(x[:1])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the model fails on one input of --data {args.data}: {first}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            raise ValueError(
                f"the model must return logits (N, classes); on one input it returned {out!r:.80}"
            )
        if int(y.max()) >= out.shape[1]:
            raise ValueError(
                f"--data {args.data} has labels up to {int(y.max())}, the model returns {out.shape[1]} logits"
            )
    return Sources(loaded, x, y, None, data.description, None)


def sources_from_args(args: argparse.Namespace, log: Log = print, defaults: dict | None = None) -> Sources:
    """The models and training data of ``ddrs train --selector-for`` (checks done by
    :func:`ddrs.selector_options.check_selector_training`). ``defaults``: ``ddrs train``'s option
    defaults, for the options a checkpoint's recorded settings predate when it is re-trained."""
    if args.selector_for:
        noise = getattr(args, "noise", "gaussian")
        return _train_checkpoint_sources(args.selector_for, log, dict(defaults or {}), noise)
    return _own_sources(args, len(args.sigma_levels), log)


def label_radii(
    models: Sequence[torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    levels: Sequence[float],
    *,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    log: Log = print,
    chunk: int = 256,
    noise: str = "gaussian",
) -> torch.Tensor:
    """:func:`ddrs_ext.dual.level_radii` of ``models`` (one, or one per level) on every input (input
    i's noise stream is i), computed level by level in chunks of ``chunk`` inputs with a progress line
    per chunk; the same radii as one call (certify's noise does not depend on the chunks). ``noise``:
    ``"uniform"`` for L1 radii at half-widths theta."""
    experts = list(models) if len(models) > 1 else [models[0]] * len(levels)
    N = x.shape[0]
    radii = torch.empty((N, len(levels)), dtype=torch.float64)
    scale = "θ" if noise == "uniform" else "σ"
    for k, (model, sigma) in enumerate(zip(experts, levels)):
        for start in range(0, N, chunk):
            rows = torch.arange(start, min(start + chunk, N))
            radii[rows, k] = level_radii(
                model, x[rows], y[rows], [sigma], n0=n0, n=n, alpha=alpha, seed=seed, index=rows, noise=noise
            )[:, 0]
            done = f"{int(rows[-1]) + 1}/{N} inputs"
            log(f"labels: {scale} = {sigma:g} (level {k + 1}/{len(levels)}): {done}")
    return radii


def crossfit_label_radii(
    sources: Sources,
    levels: Sequence[float],
    *,
    folds: int,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    log: Log = print,
    noise: str = "gaussian",
) -> torch.Tensor:
    """:func:`ddrs_ext.dual.cross_fit_radii`: every training input certified by the models re-trained
    (``sources.refit``) without its fold; a progress line per fold."""
    if sources.refit is None:
        raise ValueError("--label-source crossfit needs ddrs train checkpoints (re-trained per fold)")
    K = len(sources.models)
    N = sources.x.shape[0]

    def fit(x_rest, y_rest, fold):
        log(f"labels: fold {fold + 1}/{folds}: re-training {K} model(s) on {x_rest.shape[0]} of {N} inputs")
        rest = (_fold_parts(N, folds, seed) != fold).nonzero()[:, 0]
        models = [sources.refit(rest, k) for k in range(K)]
        log(f"labels: fold {fold + 1}/{folds}: certifying its {N - x_rest.shape[0]} held-out inputs")
        return models if K > 1 else models[0]

    return cross_fit_radii(
        fit, sources.x, sources.y, levels, folds=folds, n0=n0, n=n, alpha=alpha, seed=seed, noise=noise
    )


def _fold_parts(count: int, folds: int, seed: int) -> torch.Tensor:
    from ddrs_ext.dual import fold_assignment

    return fold_assignment(count, folds, seed)


def labels_from_radii(
    radii: torch.Tensor, *, soft: bool, tau: float, level_weights
) -> tuple[torch.Tensor, list[int]]:
    """``(labels, counts)``: the best level of each input (ties: the lowest), or with ``soft`` the soft
    labels of :func:`ddrs_ext.dual.soft_level_labels`; counts of the (arg)max level per level."""
    K = radii.shape[1]
    if soft:
        labels = soft_level_labels(radii, tau=tau, level_weights=level_weights)
        best = labels.argmax(1)
    else:
        labels = best = radii.argmax(1)
    return labels, torch.bincount(best, minlength=K).tolist()
