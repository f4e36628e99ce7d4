"""Sigma selectors for dual certification (:func:`ddrs_ext.certify_dual`): the work of ``ddrs train
--selector-for`` (:mod:`ddrs.commands.train`; its selector options: :mod:`ddrs.selector_options`).

A selector has one output per sigma level: ``ddrs_ext.models.digits_cnn(K)`` by default, or one that
``--selector-model`` builds. Its training labels come from the radius CERTIFY gives each training
input's true class at each level (:mod:`ddrs.selector_labels`; ``n0 = 64``, ``n = 512``, ``alpha =
0.01`` by default), by one classifier or one expert per level (``ddrs train`` checkpoints, or your own
``--model`` on ``--data``), on the models' own training inputs or held out (``--label-source
crossfit``): the best level, or soft labels (``--soft-labels``). It is trained at ``selector_sigma``
(default: the largest level), the noise it is certified with (:func:`ddrs_ext.dual.train_selector`,
optionally with the consistency term), and saved as a checkpoint (:mod:`ddrs.checkpoints`, version 2)
that ``ddrs certify --selector-checkpoint`` loads alone. With ``--noise uniform`` the levels and
``selector_sigma`` are half-widths theta, the labels come from L1 radii and the selector is trained
with uniform augmentation (for ``ddrs certify --noise uniform --sigma-levels``); the checkpoint
records its noise:

    python -m ddrs.train_digits --selector-for dd.pt --sigma-levels 0.25 0.5 1 \\
        --selector-sigma 0.5 --out selector.pt
    ddrs certify --checkpoint dd.pt --selector-checkpoint selector.pt --data digits \\
        --sigma-levels 0.25 0.5 1 --selector-sigma 0.5 --out dual.tsv

The noise of the labels and of the training is drawn under keys derived from the seed, so it is
independent of the noise of any later certification (which uses the seed itself, and
:func:`ddrs_ext.dual.selector_seed` of it): a selector trained on noise draws that the classifier's
certificate reuses could pick levels where those draws happen to be lucky.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ddrs.checkpoints import (
    BUILDER,
    is_selector_checkpoint,
    load_selector_checkpoint,
)
from ddrs.checkpoints import SELECTOR_FORMAT as FORMAT
from ddrs_ext.data import load_digits_split
from ddrs_ext.dual import best_level, check_sigma_levels, default_selector_sigma, train_selector

__all__ = [
    "FORMAT",
    "LABEL_SETTINGS",
    "demo_levels",
    "derived_seed",
    "fingerprint",
    "selector_labels",
    "train_digits_selector",
    "train_from_args",
    "train_level_selector",
    "load_selector_checkpoint",
    "is_selector_checkpoint",
]

#: best_level's settings for the training labels (samples per level and confidence).
LABEL_SETTINGS = {"n0": 64, "n": 512, "alpha": 0.01}
_LABEL_KEY, _TRAIN_KEY = 0x1AB31, 0x7EA1


def derived_seed(seed: int, key: int) -> int:
    """A seed for another purpose than ``seed``'s (a splitmix64 step of ``seed ^ key``), so that the two
    noise streams are independent."""
    z = (seed ^ key) & 0xFFFFFFFFFFFFFFFF
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # below 2**63: any seed argument accepts it


def demo_levels(sigma: float, sigma_max: float, factors: Sequence[float] = (1, 2, 4)) -> list[float]:
    """``sigma * factors`` capped at ``sigma_max``, without repeats (0.25, 0.5, 1 for 0.25 and 1)."""
    return sorted({min(sigma * f, sigma_max) for f in factors})


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of a model's state_dict (what identifies the classifier a selector was trained for)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def selector_labels(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_levels: Sequence[float],
    *,
    seed: int,
    n0: int = LABEL_SETTINGS["n0"],
    n: int = LABEL_SETTINGS["n"],
    alpha: float = LABEL_SETTINGS["alpha"],
    batch_size: int = 2000,
) -> torch.Tensor:
    """The level (index into ``sigma_levels``) of each training input whose CERTIFY radius for its
    true class is largest (:func:`ddrs_ext.dual.best_level`); the inputs are numbered 0..N-1 (their
    noise streams) and the noise is keyed by ``derived_seed(seed, ...)``, not by ``seed``."""
    return best_level(
        classifier,
        x,
        y,
        sigma_levels,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=batch_size,
        seed=derived_seed(seed, _LABEL_KEY),
        index=torch.arange(x.shape[0]),
    )


def train_digits_selector(
    classifier: torch.nn.Module,
    sigma_levels: Sequence[float],
    selector_sigma: float | None,
    out: str | os.PathLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    data_seed: int,
    label_n0: int = LABEL_SETTINGS["n0"],
    label_n: int = LABEL_SETTINGS["n"],
    label_alpha: float = LABEL_SETTINGS["alpha"],
    config: Mapping | None = None,
    log: Callable[[str], None] = print,
    experts: Sequence[torch.nn.Module] | None = None,
    **training: Any,
) -> dict:
    """Trains a selector for ``classifier`` (or for ``experts``, one per level; then ``classifier`` is
    ignored and may be None) on the digits' training split (``load_digits_split(data_seed)``, the
    classifier's), saves its checkpoint at ``out`` and returns it. Labels: :func:`selector_labels`
    (or soft labels, ``training``: see :func:`train_level_selector`); model:
    ``digits_cnn(len(sigma_levels))`` initialised under ``torch.manual_seed(seed)``; training:
    :func:`ddrs_ext.dual.train_selector` with ``epochs``, ``batch_size``, ``lr``; ``selector_sigma``
    None: the largest level. ``config`` (JSON-able) is stored in the checkpoint beside the settings."""
    from ddrs.selector_labels import Sources

    (x_train, y_train), _ = load_digits_split(data_seed)
    models = list(experts) if experts is not None else [classifier]
    sources = Sources(models, x_train, y_train, data_seed, f"load_digits_split({data_seed})", None)
    return train_level_selector(
        sources,
        sigma_levels,
        selector_sigma,
        out,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        label_n0=label_n0,
        label_n=label_n,
        label_alpha=label_alpha,
        config=config,
        log=log,
        **training,
    )


def train_level_selector(
    sources,
    sigma_levels: Sequence[float],
    selector_sigma: float | None,
    out: str | os.PathLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    label_n0: int = LABEL_SETTINGS["n0"],
    label_n: int = LABEL_SETTINGS["n"],
    label_alpha: float = LABEL_SETTINGS["alpha"],
    label_source: str = "train",
    folds: int = 5,
    soft_labels: bool = False,
    tau: float = 0.25,
    level_weights: str | Sequence[float] | None = None,
    selector_lam: float = 0.0,
    selector_eta: float = 0.0,
    selector_copies: int = 1,
    selector_model: str | None = None,
    config: Mapping | None = None,
    log: Callable[[str], None] = print,
    noise: str = "gaussian",
    save_labels: str | os.PathLike | None = None,
) -> dict:
    """Trains a selector on ``sources`` (:class:`ddrs.selector_labels.Sources`: one model or one
    expert per level, and the training inputs), saves its checkpoint (version 2) at ``out``.

    Labels: every input certified at every level (:func:`ddrs.selector_labels.label_radii`, input i
    as noise stream i, under ``derived_seed(seed, ...)``), by the models themselves
    (``label_source="train"``) or by models re-trained without the input's fold (``"crossfit"``,
    ``folds``); then the best level (ties: the lowest), or with ``soft_labels`` the labels of
    :func:`ddrs_ext.dual.soft_level_labels` (``tau``, ``level_weights``). The selector is
    ``digits_cnn(K)``, or built by ``selector_model`` (``module:callable``), under
    ``torch.manual_seed(seed)``, and trained by :func:`ddrs_ext.dual.train_selector` at
    ``selector_sigma`` (None: the largest level) with ``selector_copies``, ``selector_lam``,
    ``selector_eta``. ``noise="uniform"``: the levels and ``selector_sigma`` are half-widths theta, the
    labels L1 radii and the augmentation uniform (the checkpoint's ``"noise"`` says so; checkpoints
    without it are Gaussian).

    ``save_labels``: write the labels there instead (:func:`ddrs.sample_weights.save_labels`, as an
    ``(N, K)`` table: one-hot rows without ``soft_labels``) and return ``{"labels", "radii",
    "settings"}``; no selector is trained."""
    from ddrs.selector_labels import crossfit_label_radii, label_radii, labels_from_radii

    levels = check_sigma_levels(sigma_levels).tolist()
    K = len(levels)
    if len(sources.models) not in (1, K):
        raise ValueError(f"give one model or one expert per level ({K}), got {len(sources.models)}")
    selector_sigma = default_selector_sigma(levels) if selector_sigma is None else float(selector_sigma)
    x_train, y_train = sources.x, sources.y
    for model in sources.models:
        model.eval()
    label_seed = derived_seed(seed, _LABEL_KEY)
    settings = dict(n0=label_n0, n=label_n, alpha=label_alpha, seed=label_seed, log=log, noise=noise)
    norm = "L1 " if noise == "uniform" else ""
    log(
        f"selector labels ({label_source}): the {norm}radius at each of {K} levels "
        f"({', '.join(f'{v:g}' for v in levels)}) of {len(y_train)} training inputs (CERTIFY, "
        f"n0 = {label_n0}, n = {label_n}, alpha = {label_alpha})"
    )
    if label_source == "crossfit":
        radii = crossfit_label_radii(sources, levels, folds=folds, **settings)
    elif label_source == "train":
        radii = label_radii(sources.models, x_train, y_train, levels, **settings)
    else:
        raise ValueError(f"label_source must be 'train' or 'crossfit', got {label_source!r}")
    labels, counts = labels_from_radii(radii, soft=soft_labels, tau=tau, level_weights=level_weights)
    scale = "θ" if noise == "uniform" else "σ"
    log("labels per level: " + ", ".join(f"{scale} = {v:g}: {c}" for v, c in zip(levels, counts)))
    prints = [fingerprint(m) for m in sources.models]
    if save_labels is not None:
        from ddrs.sample_weights import save_labels as write_labels

        table = labels if soft_labels else torch.nn.functional.one_hot(labels, K)
        settings = {
            "sigma_levels": [float(v) for v in levels],
            "noise": noise,
            "label_source": label_source,
            "folds": int(folds) if label_source == "crossfit" else None,
            "soft_labels": bool(soft_labels),
            "tau": float(tau) if soft_labels else None,
            "level_weights": level_weights
            if level_weights is None or isinstance(level_weights, str)
            else [float(w) for w in level_weights],
            "label_n0": label_n0,
            "label_n": label_n,
            "label_alpha": label_alpha,
            "seed": seed,
            "data_seed": sources.data_seed,
            "fingerprints": prints,
        }
        write_labels(save_labels, table, settings)
        log(f"saved the labels at {save_labels} (no selector trained)")
        return {"labels": table.double(), "radii": radii, "settings": settings}
    torch.manual_seed(seed)
    selector = _fresh_selector(selector_model, K, x_train)
    losses = train_selector(
        selector,
        x_train,
        labels,
        selector_sigma=selector_sigma,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=derived_seed(seed, _TRAIN_KEY),
        copies=selector_copies,
        lam=selector_lam,
        eta=selector_eta,
        noise=noise,
    )
    selector.eval()
    for epoch, loss in enumerate(losses, start=1):
        log(f"selector epoch {epoch}/{len(losses)}: loss {loss:.4f}")
    identity = {"classifier_fingerprint": prints[0]} if len(prints) == 1 else {"expert_fingerprints": prints}
    checkpoint = {
        "format": FORMAT,
        "version": 2,
        "builder": BUILDER if selector_model is None else selector_model,
        "num_levels": K,
        "model": selector.state_dict(),
        "sigma_levels": [float(v) for v in levels],
        "selector_sigma": float(selector_sigma),
        "noise": noise,
        "label_counts": counts,
        "losses": [float(v) for v in losses],
        "expert_fingerprints": prints if len(prints) > 1 else None,
        "label_source": label_source,
        "folds": int(folds) if label_source == "crossfit" else None,
        "tau": float(tau) if soft_labels else None,
        "level_weights": level_weights
        if level_weights is None or isinstance(level_weights, str)
        else [float(w) for w in level_weights],
        "selector_lam": float(selector_lam),
        "selector_eta": float(selector_eta),
        "selector_copies": int(selector_copies),
        "config": {
            **dict(config or {}),
            **identity,
            "label_n0": label_n0,
            "label_n": label_n,
            "label_alpha": label_alpha,
            "data_seed": sources.data_seed,
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    log(f"saved {out}")
    return checkpoint


def _fresh_selector(spec: str | None, levels: int, x: torch.Tensor) -> torch.nn.Module:
    """``digits_cnn(levels)``, or the selector ``spec`` builds; checked on one training input."""
    from ddrs_ext.models import digits_cnn

    if spec is None:
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"the default selector (ddrs_ext.models.digits_cnn) takes 1x8x8 inputs, the training inputs "
                f"are {'x'.join(map(str, x.shape[1:]))}: give --selector-model module:callable that builds "
                f"a selector with {levels} outputs for them"
            )
        return digits_cnn(levels)
    from ddrs.loading import load_classifier

    selector = load_classifier(spec, None, torch.device("cpu"))
    if not isinstance(selector, torch.nn.Module) or not any(True for _ in selector.parameters()):
        raise ValueError(f"--selector-model {spec} must build a torch.nn.Module with parameters to train")
    try:
        with torch.no_grad():
            out = selector.eval()(x[:1])
    except Exception as exc:
        raise ValueError(f"--selector-model {spec} fails on one training input: {str(exc)[:200]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, levels):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"--selector-model {spec} must return one logit per level ({levels}), returned {got}"
        )
    return selector


def train_from_args(
    args: argparse.Namespace, log: Callable[[str], None] = print, defaults: Mapping | None = None
) -> dict:
    """``ddrs train --selector-for ...`` (``python -m ddrs.train_digits``): a selector for the classifier
    of a ``ddrs train`` checkpoint, for one such expert per level, or for your own ``--model`` on
    ``--data``; labels from --label-n0 and --label-n samples per level (``--label-source``,
    ``--soft-labels``, ...), trained with the run's --epochs, --batch-size, --lr and --seed, saved at
    --out; with --save-labels FILE the labels alone, written there. ``defaults``: ``ddrs train``'s
    option defaults (for re-training checkpoints whose settings predate an option, with
    ``--label-source crossfit``)."""
    from ddrs.digits_training import _plain
    from ddrs.loading import model_settings
    from ddrs.selector_labels import sources_from_args
    from ddrs.selector_options import DEFAULT_FOLDS, DEFAULT_TAU, check_selector_training, parse_level_weights

    check_selector_training(args)
    levels = check_sigma_levels(args.sigma_levels).tolist()
    spec = None if args.selector_model is None else model_settings(args.selector_model, None)["model"]
    sources = sources_from_args(args, log, None if defaults is None else dict(defaults))
    config = {k: _plain(v) for k, v in vars(args).items()}
    return train_level_selector(
        sources,
        levels,
        args.selector_sigma,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        label_n0=args.label_n0,
        label_n=args.label_n,
        label_source=args.label_source,
        folds=DEFAULT_FOLDS if args.folds is None else args.folds,
        soft_labels=args.soft_labels,
        tau=DEFAULT_TAU if args.tau is None else args.tau,
        level_weights=parse_level_weights(args.level_weights, len(levels)),
        selector_lam=args.selector_lambda,
        selector_eta=args.selector_eta,
        selector_copies=args.selector_copies,
        selector_model=spec,
        config=config,
        log=log,
        noise=getattr(args, "noise", "gaussian"),
        save_labels=getattr(args, "save_labels", None),
    )
