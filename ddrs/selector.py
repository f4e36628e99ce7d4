"""Sigma selectors for dual certification (:func:`ddrs_ext.certify_dual`) on the embedded digits.

The work of ``ddrs train --selector-for`` (:mod:`ddrs.commands.train`). A selector is a small CNN
with one output per sigma level. Its training labels come from a trained classifier: for each
training input, the level at which CERTIFY gives the classifier's true class the largest radius
(:func:`ddrs_ext.dual.best_level`, with ``n0 = 64``, ``n = 512``, ``alpha = 0.01`` by default). It
is trained with Gaussian augmentation at ``selector_sigma``, the noise it is certified with
(:func:`ddrs_ext.dual.train_selector`), and saved as a checkpoint (:mod:`ddrs.checkpoints`) that
``ddrs certify --selector-checkpoint`` loads alone:

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

import torch

from ddrs.checkpoints import (
    BUILDER,
    is_classifier_checkpoint,
    is_selector_checkpoint,
    load_checkpoint,
    load_selector_checkpoint,
)
from ddrs.checkpoints import SELECTOR_FORMAT as FORMAT
from ddrs.loading import load_weights
from ddrs_ext.data import load_digits_split
from ddrs_ext.dual import best_level, check_sigma_levels, train_selector

__all__ = [
    "FORMAT",
    "LABEL_SETTINGS",
    "demo_levels",
    "derived_seed",
    "fingerprint",
    "selector_labels",
    "train_digits_selector",
    "train_from_args",
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
    selector_sigma: float,
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
) -> dict:
    """Trains a selector for ``classifier`` on the digits' training split
    (``load_digits_split(data_seed)``, the classifier's), saves its checkpoint at ``out`` and returns
    it. Labels: :func:`selector_labels`; model: ``digits_cnn(len(sigma_levels))`` initialised under
    ``torch.manual_seed(seed)``; training: :func:`ddrs_ext.dual.train_selector` with ``epochs``,
    ``batch_size``, ``lr``. ``config`` (JSON-able) is stored in the checkpoint beside the settings."""
    from ddrs_ext.models import digits_cnn

    levels = check_sigma_levels(sigma_levels).tolist()
    (x_train, y_train), _ = load_digits_split(data_seed)
    classifier.eval()
    log(
        f"selector labels: the best of {len(levels)} levels ({', '.join(f'{v:g}' for v in levels)}) for "
        f"{len(y_train)} training inputs (CERTIFY, n0 = {label_n0}, n = {label_n}, alpha = {label_alpha})"
    )
    labels = selector_labels(
        classifier, x_train, y_train, levels, seed=seed, n0=label_n0, n=label_n, alpha=label_alpha
    )
    counts = torch.bincount(labels, minlength=len(levels)).tolist()
    log("labels per level: " + ", ".join(f"σ = {v:g}: {c}" for v, c in zip(levels, counts)))
    torch.manual_seed(seed)
    selector = digits_cnn(len(levels))
    losses = train_selector(
        selector,
        x_train,
        labels,
        selector_sigma=selector_sigma,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=derived_seed(seed, _TRAIN_KEY),
    )
    selector.eval()
    for epoch, loss in enumerate(losses, start=1):
        log(f"selector epoch {epoch}/{len(losses)}: loss {loss:.4f}")
    checkpoint = {
        "format": FORMAT,
        "version": 1,
        "builder": BUILDER,
        "num_levels": len(levels),
        "model": selector.state_dict(),
        "sigma_levels": [float(v) for v in levels],
        "selector_sigma": float(selector_sigma),
        "label_counts": counts,
        "losses": [float(v) for v in losses],
        "config": {
            **dict(config or {}),
            "classifier_fingerprint": fingerprint(classifier),
            "label_n0": label_n0,
            "label_n": label_n,
            "label_alpha": label_alpha,
            "data_seed": data_seed,
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    log(f"saved {out}")
    return checkpoint


def train_from_args(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """``python -m ddrs.train_digits --selector-for CLASSIFIER ...``: a selector for the classifier of
    that train_digits checkpoint, on its training split, with the run's --epochs, --batch-size, --lr
    and --seed, labels from --label-n0 and --label-n samples per level, saved at --out."""
    if args.sigma_levels is None or args.selector_sigma is None:
        raise ValueError("--selector-for needs --sigma-levels and --selector-sigma")
    check_sigma_levels(args.sigma_levels)
    content = load_weights(args.selector_for, "--selector-for")  # a one-line diagnosis of a wrong file
    if not is_classifier_checkpoint(content):
        raise ValueError(
            f"--selector-for {args.selector_for} is not a checkpoint of python -m ddrs.train_digits"
        )
    classifier, _, classifier_config = load_checkpoint(args.selector_for, map_location="cpu")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return train_digits_selector(
        classifier,
        args.sigma_levels,
        args.selector_sigma,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        data_seed=int(classifier_config.get("seed", args.seed)),
        label_n0=args.label_n0,
        label_n=args.label_n,
        config=config,
        log=log,
    )
