"""The l1 certificate on the bundled digits: fixed theta against data-dependent theta.

Uniform noise on the cube of half-width theta, radii in the L1 norm. Settings are chosen on the
validation split (200 images carved from the training data) and the test split (497 images) is
certified once, with the chosen settings:

    # theta0 for the fixed-theta model, then the models and surrogates at the chosen theta0
    python benchmarks/l1_digits.py validation --theta0 0.25 0.5 1 --models fixed --surrogate
    python benchmarks/l1_digits.py validation --theta0 T
    python benchmarks/l1_digits.py test --theta0 T

Models: ``digits_cnn`` trained 15 epochs (Adam 3e-3, batch 64, as ``ddrs.train_digits``) on the 1 100
training images with uniform augmentation: a fixed-theta model at theta0, and a data-dependent model
(a theta per training example from theta0, three ascent steps of 16 samples per minibatch on the
training surrogate, theta in [0.001, 4 theta0]). Test-time theta per input: ``optimize_theta`` from
theta0 in [0.001, 4 theta0] (16 bisection steps of 512 samples, or ``PAPER_L1_SETTINGS``), then CERTIFY
(n0 = 100, n = 10 000, alpha = 0.001) and one ``CertificationMemory(norm="l1")`` per row in index
order, which makes per-input-theta certificates sound. Checkpoints are cached in ``--out``, and each
row's per-input radii saved there (``.npy``, -1 where an input is not certified correctly).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import ddrs_ext
from ddrs_ext import CertificationMemory, certify, optimize_theta, training
from ddrs_ext.data import load_digits_splits
from ddrs_ext.models import digits_cnn

RADII = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
N0, N, ALPHA = 100, 10_000, 0.001


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def train(x, y, theta0: float, data_dependent: bool, surrogate: str, seed: int, epochs: int = 15):
    torch.manual_seed(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    bank = training.SigmaBank(len(y), theta0, sigma_range=(1e-3, 4 * theta0)) if data_dependent else None
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(y)).split(64):
            xb, yb = x[index], y[index]
            theta = theta0
            if bank is not None:
                theta = training.update_sigma(
                    model,
                    bank,
                    xb,
                    index,
                    steps=3,
                    num_samples=16,
                    lr=0.04,
                    surrogate=surrogate,
                    noise="uniform",
                )
            loss = training.uniform_augmentation_loss(model, xb, yb, theta, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def cached_model(out: Path, x, y, theta0, data_dependent, surrogate, seed):
    name = f"{'dd_' + surrogate if data_dependent else 'fixed'}_theta{theta0:g}_seed{seed}.pt"
    path = out / name
    model = digits_cnn()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model
    start = time.perf_counter()
    model = train(x, y, theta0, data_dependent, surrogate, seed)
    torch.save(model.state_dict(), path)
    log(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return model


def certify_row(model, x, y, theta, index, memory: bool, seed: int):
    result = certify(
        model, x, theta, n0=N0, n=N, alpha=ALPHA, batch_size=4000, seed=seed, index=index, noise="uniform"
    )
    changed = 0
    if memory:
        before = result.prediction.clone(), result.radius.clone()
        result = CertificationMemory(norm="l1").adjust_result(x, result)
        changed = int(((result.prediction != before[0]) | (result.radius != before[1])).sum())
    correct = (result.prediction == y).numpy()  # an abstention (-1) is never correct
    # -1 marks an input that is not certified correctly; certified ones have radius >= 0
    return np.where(correct, result.radius.numpy(), -1.0), changed, result


def table_row(name: str, radius: np.ndarray) -> str:
    """Certified accuracy at each r (certified correctly with radius >= r) and the ACR."""
    cells = [f"{float((radius >= r).mean()):.3f}" for r in RADII]
    return f"| {name} | " + " | ".join(cells) + f" | {acr(radius):.3f} |"


def acr(radius: np.ndarray) -> float:
    return float(np.maximum(radius, 0.0).mean())


def header() -> str:
    head = ["result", *(f"r = {r:g}" for r in RADII), "ACR"]
    return "| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1)


def paired(a: np.ndarray, b: np.ndarray) -> str:
    d = np.maximum(a, 0.0) - np.maximum(b, 0.0)
    return f"{d.mean():+.3f} ± {d.std(ddof=1) / math.sqrt(len(d)):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split", choices=("validation", "test"))
    p.add_argument("--theta0", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument(
        "--models",
        nargs="+",
        choices=("fixed", "dd-certify", "dd-paper"),
        default=["fixed", "dd-certify", "dd-paper"],
        help="fixed-theta model; data-dependent models trained on the certify / paper surrogate",
    )
    p.add_argument("--surrogate", nargs="*", default=["certify", "paper"], help="test-time surrogates")
    p.add_argument(
        "--paper-preset", action="store_true", help="also PAPER_L1_SETTINGS (slow: 900 x 100 samples)"
    )
    p.add_argument("--max", type=int, default=None, help="only the first N inputs of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("l1_digits_runs"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits(args.seed)
    x_train, y_train = splits.train
    x, y = getattr(splits, args.split)
    if args.max is not None:
        x, y = x[: args.max], y[: args.max]
    index = torch.arange(len(y))
    log(
        f"ddrs_ext {ddrs_ext.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.split} split: {len(y)} inputs"
    )
    rows, radii = [], {}

    def add(key, name, radius, changed=None):
        radii[key] = radius
        slug = "_".join(str(k) for k in key).replace(" ", "-").replace("(", "").replace(")", "")
        np.save(
            args.out / f"{args.split}_{slug}.npy", radius
        )  # per input: radius, -1 if not certified correctly
        rows.append(table_row(name, radius))
        note = f" (memory changed {changed})" if changed is not None else ""
        log(rows[-1] + note)

    for theta0 in args.theta0:
        models = {}
        for which in args.models:
            if which == "fixed":
                models["fixed-θ model"] = cached_model(
                    args.out, x_train, y_train, theta0, False, "", args.seed
                )
            else:
                s = which.removeprefix("dd-")
                models[f"data-dependent model ({s} surrogate in training)"] = cached_model(
                    args.out, x_train, y_train, theta0, True, s, args.seed
                )
        for label, model in models.items():
            radius, _, _ = certify_row(model, x, y, theta0, index, False, args.seed)
            base = f"{label}, θ0 = {theta0:g}"
            add((theta0, label, "fixed"), f"{base}, θ = {theta0:g} for every input", radius)
            options = {f"{s} surrogate": dict(surrogate=s) for s in args.surrogate}
            if args.paper_preset:
                options["PAPER_L1_SETTINGS"] = dict(ddrs_ext.PAPER_L1_SETTINGS)
            for what, kw in options.items():
                start = time.perf_counter()
                theta = optimize_theta(
                    model,
                    x,
                    theta0,
                    sigma_range=(1e-3, 4 * theta0),
                    seed=args.seed,
                    index=index,
                    batch_size=4096,
                    **kw,
                )
                spent = time.perf_counter() - start
                radius, changed, _ = certify_row(model, x, y, theta, index, True, args.seed)
                capped = int((theta >= 4 * theta0 * (1 - 1e-9)).sum())
                add((theta0, label, what), f"{base}, θ per input ({what}) + memory", radius, changed)
                log(f"   θ mean {float(theta.mean()):.3f}, at the cap {capped}, optimised in {spent:.0f} s")
    print()
    print(
        f"Certified accuracy at L1 radius r and ACR, digits {args.split} split ({len(y)} inputs; "
        f"n0 = {N0}, n = {N}, alpha = {ALPHA}; seed {args.seed})."
    )
    print()
    print(header())
    print("\n".join(rows))
    print()
    for (theta0, label, what), radius in radii.items():
        if what == "fixed":
            continue
        fixed_radius = radii[(theta0, label, "fixed")]
        print(
            f"- {label}, θ0 = {theta0:g}, θ per input ({what}): ACR {acr(radius):.3f} vs "
            f"{acr(fixed_radius):.3f} at θ0 for every input ({paired(radius, fixed_radius)} paired s.e.)"
        )
    for theta0 in args.theta0:
        for label in {k[1] for k in radii if k[0] == theta0}:
            c, q = (
                radii.get((theta0, label, "certify surrogate")),
                radii.get((theta0, label, "paper surrogate")),
            )
            if c is not None and q is not None:
                print(f"- {label}, θ0 = {theta0:g}: certify surrogate vs paper surrogate, ACR {paired(c, q)}")


if __name__ == "__main__":
    main()
