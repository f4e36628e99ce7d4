"""Training a small CNN on the embedded digits data with a randomized-smoothing scheme, with a fixed
or a data-dependent noise level: the work of ``ddrs train`` (``python -m ddrs.train_digits``; its
options: :mod:`ddrs.commands.train`). The checkpoint (:mod:`ddrs.checkpoints`) holds the model's
state_dict, the builder of its architecture, the per-example sigma bank (data-dependent runs) and
the settings; :func:`ddrs.checkpoints.load_checkpoint` restores them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ddrs import distributed_run
from ddrs.checkpoints import BUILDER, FORMAT, build
from ddrs.sample_weights import check_positive_mass, draw_epoch, load_sample_weights, weights_digest
from ddrs_ext import training
from ddrs_ext.data import load_digits_split
from ddrs_ext.distributed import exchange, share
from ddrs_ext.precision import Evaluated

__all__ = ["noisy_accuracy", "train"]


def noisy_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    seed: int,
    noise: str = "gaussian",
) -> float:
    """Accuracy of the base model on one noisy copy of each input (a quick training signal); ``noise``
    "uniform": copies on the cube of half-width ``sigma``."""
    with training.frozen(model), torch.no_grad():
        noisy = training.noisy_copies(x, sigma, seed=seed, noise=noise)
        return float((model(noisy).argmax(1) == y).float().mean())


def train(args: argparse.Namespace, log=print, rows: torch.Tensor | None = None) -> dict:
    """Trains the model as ``args`` say and saves the checkpoint; returns it.

    Under torchrun (``torchrun --nproc-per-node N -m ddrs.train_digits ...``) the processes train one
    model with DistributedDataParallel (gloo on the CPU, NCCL with one GPU per process): each global
    minibatch of ``--batch-size`` examples is split over the ranks (rank r takes positions r, r + N,
    ...), the losses are weighted so that the averaged gradient is the whole minibatch's, the sigma
    steps run on each rank's own examples, the sigma bank is synchronised after every epoch, and
    rank 0 logs and saves the checkpoint (with its BatchNorm statistics, given to every rank first).

    ``rows`` (indices into the training split): train on those training examples only and save
    nothing (the checkpoint is returned; cross-fitted selector labels re-train experts so).

    ``--sample-weights FILE`` (:mod:`ddrs.sample_weights`): each epoch draws as many examples as the
    split has, with replacement, in proportion to the file's weights (with ``rows``, those rows'
    weights), under a ``torch.Generator`` seeded with ``--seed``; the checkpoint's config records the
    file, its column and a digest of its weights.
    """
    launch = None
    if distributed_run.launched():
        launch = distributed_run.join(getattr(args, "device", None), getattr(args, "dist_timeout", 1800.0))
    try:
        return _train(args, log, launch, rows)
    finally:
        if launch is not None:
            distributed_run.leave(launch)


def _train(
    args: argparse.Namespace, log, launch: distributed_run.Launch | None, rows: torch.Tensor | None = None
) -> dict:
    rank, world = (0, 1) if launch is None else (launch.rank, launch.world)
    device = launch.device if launch is not None else torch.device(getattr(args, "device", None) or "cpu")
    if rank != 0:
        log = _silent
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    weights = _sample_weights(args, len(y_train))
    full_digest = None if weights is None else weights_digest(weights)
    if rows is not None:
        x_train, y_train = x_train[rows], y_train[rows]
        if weights is not None:
            weights = weights[rows]
            check_positive_mass(weights, f"--sample-weights {args.sample_weights} on a cross-fitting fold")
    if len(y_train) < world:
        raise ValueError(f"{world} processes for {len(y_train)} training examples; start fewer")
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    model = build(BUILDER)().to(device)
    net = _evaluated(model, getattr(args, "compile", "off"), log)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    # --noise uniform: uniform augmentation (sigma is the half-width theta); checkpoints of earlier
    # versions have no "noise" in their config: Gaussian
    noise = getattr(args, "noise", "gaussian")
    bank = None
    if args.data_dependent:
        if args.sigma > args.sigma_max:
            raise ValueError(f"--sigma {args.sigma} exceeds --sigma-max {args.sigma_max}")
        bank = training.SigmaBank(len(y_train), args.sigma, sigma_range=(1e-3, args.sigma_max), device=device)
    # --sample-weights: each epoch's examples drawn with replacement, under a generator of their own
    order = None if weights is None else torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        total, seen = 0.0, 0
        for batch in _minibatches(len(y_train), args.batch_size, world, weights, order):
            index = batch if world == 1 else batch[share(len(batch))]
            x, y = x_train[index], y_train[index]
            sigma = args.sigma
            if bank is not None:
                sigma = training.update_sigma(
                    net,
                    bank,
                    x,
                    index,
                    steps=args.sigma_steps,
                    num_samples=args.sigma_samples,
                    lr=args.sigma_lr,
                    surrogate=args.sigma_surrogate,
                    estimator=args.sigma_estimator,
                    noise=noise,
                )
            if args.scheme == "gaussian" and noise == "uniform":
                loss = training.uniform_augmentation_loss(net, x, y, sigma, index=index)
            elif args.scheme == "gaussian":
                loss = training.gaussian_augmentation_loss(net, x, y, sigma, index=index)
            elif args.scheme == "macer":
                loss = training.macer_loss(
                    net,
                    x,
                    y,
                    sigma,
                    num_samples=args.macer_samples,
                    lam=args.macer_lambda,
                    gamma=args.macer_gamma,
                    beta=args.macer_beta,
                    index=index,
                )
            elif args.scheme == "consistency":
                loss = training.consistency_loss(
                    net,
                    x,
                    y,
                    sigma,
                    copies=getattr(args, "consistency_copies", 2),
                    lam=getattr(args, "consistency_lambda", 10.0),
                    eta=getattr(args, "consistency_eta", 0.5),
                    index=index,
                )
            else:
                eps = training.warmup(args.adv_epsilon, epoch, args.adv_warmup)
                loss = training.smoothadv_loss(
                    net,
                    x,
                    y,
                    sigma,
                    epsilon=eps,
                    steps=args.adv_steps,
                    num_samples=args.adv_samples,
                    index=index,
                )
            optimizer.zero_grad()
            if world > 1:  # DDP averages the ranks' gradients: weight each by its share of the minibatch
                (loss * (len(index) * world / len(batch))).backward()
            else:
                loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        if world > 1:
            if bank is not None:
                bank.synchronize()
            pairs = exchange(lambda pair=(total, seen): pair, what="train_digits")
            total, seen = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        if rank == 0:
            acc = noisy_accuracy(model, x_test, y_test, args.sigma, seed=args.seed, noise=noise)
            extra = f", bank sigma mean {bank.sigma.mean():.3f}" if bank is not None else ""
            scale = "theta" if noise == "uniform" else "sigma"
            log(
                f"epoch {epoch + 1}/{args.epochs}: loss {total / seen:.4f}, test accuracy under noise "
                f"{scale}={args.sigma} {acc:.3f}{extra} ({time.perf_counter() - start:.1f} s)"
            )
    model.eval().to(memory_format=torch.contiguous_format)  # --compile's channels-last weights, back
    if world > 1:  # DDP keeps the parameters equal, not BatchNorm's running statistics: rank 0's win
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    checkpoint = {
        "format": FORMAT,
        "version": 1,
        "builder": BUILDER,
        "model": _on_cpu(model.state_dict()),
        "sigma_bank": None if bank is None else _on_cpu(bank.state_dict()),
        "config": {k: _plain(v) for k, v in vars(args).items()},
    }
    if weights is not None:  # what re-training it (cross-fitted selector labels) checks the file against
        checkpoint["config"]["sample_weights_digest"] = full_digest

    def save() -> None:
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, args.out)

    if rows is not None:
        return checkpoint
    if world > 1:
        exchange(save, what="saving the checkpoint")  # a failure on rank 0 stops every rank
    else:
        save()
    log(f"saved {args.out}")
    return checkpoint


def _evaluated(model: torch.nn.Module, compile: str, log) -> torch.nn.Module:
    """The model as training evaluates it: itself, or with --compile MODE compiled with channels-last
    weights (ddrs_ext.Evaluated; a fallback is logged as a note)."""
    if compile == "off":
        return model
    model.to(memory_format=torch.channels_last)
    return Evaluated(
        model, channels_last=True, compile={"mode": compile}, notify=lambda text: log(f"note: {text}")
    )


def _sample_weights(args: argparse.Namespace, count: int) -> torch.Tensor | None:
    """--sample-weights' vector (None without it), checked against the digest a checkpoint recorded
    when ``args`` are a checkpoint's settings (re-trained for cross-fitted labels)."""
    path = getattr(args, "sample_weights", None)
    if path is None:
        return None
    weights = load_sample_weights(path, count, getattr(args, "sample_weights_column", None))
    recorded = getattr(args, "sample_weights_digest", None)
    if recorded is not None and recorded != weights_digest(weights):
        raise ValueError(
            f"--sample-weights {path} changed since the checkpoint was trained with it (its weights' digest "
            "differs): restore the file, or train the checkpoint again"
        )
    return weights


def _minibatches(
    total: int,
    batch_size: int,
    world: int,
    weights: torch.Tensor | None = None,
    order: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The epoch's minibatches of a random permutation, or with ``weights`` of ``total`` examples drawn
    with replacement in proportion to them under ``order`` (rank 0's, under torchrun); with several
    ranks a last minibatch smaller than the number of ranks joins the one before, so every rank has
    examples."""
    permutation = torch.randperm(total) if weights is None else draw_epoch(weights, order)
    if world > 1:
        permutation = exchange(lambda: permutation, what="train_digits")[0]
    batches = list(permutation.split(batch_size))
    if world > 1 and len(batches) > 1 and len(batches[-1]) < world:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _plain(value):
    """An option's value as a checkpoint stores it: paths as text (also inside lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _silent(*args, **kwargs) -> None:
    pass


def _on_cpu(state: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
