"""Train a small CNN on the embedded digits data with a randomized-smoothing scheme, with a fixed
or a data-dependent noise level, and save a checkpoint that certification can load.

    python -m ddrs.train_digits --scheme gaussian --sigma 0.25 --out fixed.pt
    python -m ddrs.train_digits --scheme macer --sigma 0.25 --data-dependent --out dd.pt

The checkpoint holds the model's state_dict, the builder of its architecture, the per-example
sigma bank (data-dependent runs) and the settings; :func:`load_checkpoint` restores them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pickle
import sys
import time
from pathlib import Path

import torch

from ddrs import distributed_run
from ddrs.cli import Parser
from ddrs_ext import training
from ddrs_ext.data import load_digits_split
from ddrs_ext.distributed import exchange, share

SCHEMES = ("gaussian", "macer", "smoothadv")
BUILDER = "ddrs_ext.models:digits_cnn"
FORMAT = "ddrs_ext-checkpoint"


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ddrs.train_digits",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--scheme", choices=SCHEMES, default="gaussian", help="training scheme")
    p.add_argument("--sigma", type=_positive(float), default=0.25, help="fixed sigma, or sigma0 of the bank")
    p.add_argument("--data-dependent", action="store_true", help="a sigma per training example (the paper's)")
    p.add_argument("--epochs", type=_positive(int), default=15)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("digits_checkpoint.pt"), help="checkpoint file")
    g = p.add_argument_group("data-dependent sigma")
    g.add_argument("--sigma-steps", type=_positive(int), default=3, help="ascent steps per minibatch")
    g.add_argument("--sigma-samples", type=_positive(int), default=16, help="noise samples per step")
    g.add_argument("--sigma-lr", type=_positive(float), default=0.04)
    g.add_argument("--sigma-max", type=_positive(float), default=2.0, help="upper end of the bank's range")
    g.add_argument(
        "--sigma-surrogate", choices=("paper", "certify"), default="paper", help="surrogate the steps ascend"
    )
    g.add_argument(
        "--sigma-estimator",
        choices=("reparam", "score"),
        default="reparam",
        help="gradient of the steps: through the model (the paper's) or score function (forward passes only)",
    )
    g = p.add_argument_group("MACER")
    g.add_argument("--macer-samples", type=_positive(int), default=8)
    g.add_argument("--macer-lambda", type=_non_negative, default=12.0)
    g.add_argument("--macer-gamma", type=_non_negative, default=8.0)
    g.add_argument("--macer-beta", type=_non_negative, default=16.0)
    g = p.add_argument_group("SmoothAdv")
    g.add_argument("--adv-epsilon", type=_non_negative, default=0.5, help="L2 radius of the attack")
    g.add_argument("--adv-steps", type=_positive(int), default=2)
    g.add_argument("--adv-samples", type=_positive(int), default=4)
    g.add_argument("--adv-warmup", type=int, default=3, help="epochs over which epsilon ramps up")
    g = p.add_argument_group(
        "sigma selector for dual certification (ddrs.selector)",
        "uses --epochs, --batch-size, --lr, --seed and --out; the other options do not apply",
    )
    g.add_argument(
        "--selector-for",
        type=Path,
        metavar="CHECKPOINT",
        help="train a selector for the classifier of this checkpoint instead of a classifier: labels are "
        "the level of --sigma-levels where CERTIFY gives each training input the largest radius",
    )
    g.add_argument("--sigma-levels", nargs="+", type=_positive(float), metavar="S", help="increasing sigmas")
    g.add_argument("--selector-sigma", type=_positive(float), metavar="S", help="the selector's own sigma")
    g.add_argument("--label-n0", type=_positive(int), default=64, help="labels: selection samples per level")
    g.add_argument("--label-n", type=_positive(int), default=512, help="labels: estimation samples per level")
    return p


def noisy_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, seed: int
) -> float:
    """Accuracy of the base model on one noisy copy of each input (a quick training signal)."""
    with training.frozen(model), torch.no_grad():
        noisy = training.noisy_copies(x, sigma, seed=seed)
        return float((model(noisy).argmax(1) == y).float().mean())


def train(args: argparse.Namespace, log=print) -> dict:
    """Trains the model as ``args`` say and saves the checkpoint; returns it.

    Under torchrun (``torchrun --nproc-per-node N -m ddrs.train_digits ...``) the processes train one
    model with DistributedDataParallel (gloo on the CPU, NCCL with one GPU per process): each global
    minibatch of ``--batch-size`` examples is split over the ranks (rank r takes positions r, r + N,
    ...), the losses are weighted so that the averaged gradient is the whole minibatch's, the sigma
    steps run on each rank's own examples, the sigma bank is synchronised after every epoch, and
    rank 0 logs and saves the checkpoint (with its BatchNorm statistics, given to every rank first).
    """
    launch = None
    if distributed_run.launched():
        launch = distributed_run.join(getattr(args, "device", None), getattr(args, "dist_timeout", 1800.0))
    try:
        return _train(args, log, launch)
    finally:
        if launch is not None:
            distributed_run.leave(launch)


def _train(args: argparse.Namespace, log, launch: distributed_run.Launch | None) -> dict:
    rank, world = (0, 1) if launch is None else (launch.rank, launch.world)
    device = launch.device if launch is not None else torch.device(getattr(args, "device", None) or "cpu")
    if rank != 0:
        log = _silent
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    if len(y_train) < world:
        raise ValueError(f"{world} processes for {len(y_train)} training examples; start fewer")
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    model = _build(BUILDER)().to(device)
    net = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    bank = None
    if args.data_dependent:
        if args.sigma > args.sigma_max:
            raise ValueError(f"--sigma {args.sigma} exceeds --sigma-max {args.sigma_max}")
        bank = training.SigmaBank(len(y_train), args.sigma, sigma_range=(1e-3, args.sigma_max), device=device)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        total, seen = 0.0, 0
        for batch in _minibatches(len(y_train), args.batch_size, world):
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
                )
            if args.scheme == "gaussian":
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
            acc = noisy_accuracy(model, x_test, y_test, args.sigma, seed=args.seed)
            extra = f", bank sigma mean {bank.sigma.mean():.3f}" if bank is not None else ""
            log(
                f"epoch {epoch + 1}/{args.epochs}: loss {total / seen:.4f}, test accuracy under noise "
                f"sigma={args.sigma} {acc:.3f}{extra} ({time.perf_counter() - start:.1f} s)"
            )
    model.eval()
    if world > 1:  # DDP keeps the parameters equal, not BatchNorm's running statistics: rank 0's win
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    checkpoint = {
        "format": FORMAT,
        "version": 1,
        "builder": BUILDER,
        "model": _on_cpu(model.state_dict()),
        "sigma_bank": None if bank is None else _on_cpu(bank.state_dict()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    def save() -> None:
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, args.out)

    if world > 1:
        exchange(save, what="saving the checkpoint")  # a failure on rank 0 stops every rank
    else:
        save()
    log(f"saved {args.out}")
    return checkpoint


def _minibatches(total: int, batch_size: int, world: int) -> list[torch.Tensor]:
    """The epoch's minibatches of a random permutation (rank 0's, under torchrun); with several ranks a
    last minibatch smaller than the number of ranks joins the one before, so every rank has examples."""
    permutation = torch.randperm(total)
    if world > 1:
        permutation = exchange(lambda: permutation, what="train_digits")[0]
    batches = list(permutation.split(batch_size))
    if world > 1 and len(batches) > 1 and len(batches[-1]) < world:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _silent(*args, **kwargs) -> None:
    pass


def _on_cpu(state: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _build(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_checkpoint(path, map_location=None):
    """``(model in eval mode, SigmaBank or None, config dict)`` from a checkpoint of this script."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a ddrs_ext training checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ddrs_ext training checkpoint")
    if state.get("version") != 1:
        raise ValueError(f"{path}: unknown checkpoint version {state.get('version')!r}")
    model = _build(state["builder"])()
    model.load_state_dict(state["model"])
    model.eval()
    bank = None
    if state["sigma_bank"] is not None:
        sigma = state["sigma_bank"]["sigma"]
        lo, hi = float(sigma.min()), float(sigma.max())
        bank = training.SigmaBank(sigma.numel(), lo, sigma_range=(lo, max(lo, hi)))
        bank.load_state_dict(state["sigma_bank"])  # restores the values and the saved sigma_range
    return model, bank, state["config"]


def main(argv: list[str] | None = None) -> int:
    """``python -m ddrs.train_digits``: 0 when the checkpoint is written, 2 after a one-line error,
    130 after Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.selector_for is None and (args.sigma_levels is not None or args.selector_sigma is not None):
        parser.error("--sigma-levels and --selector-sigma are for --selector-for")
    try:
        if args.selector_for is not None:
            from ddrs.selector import train_from_args

            train_from_args(args)
        else:
            train(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
