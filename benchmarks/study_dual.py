"""Does a sound data-dependent sigma beat every fixed sigma on the digits? The dual certificate
(:func:`ddrs_ext.certify_dual`) against each expert alone, the oracle and two training-free routes.

    python benchmarks/study_dual.py                      # the chosen recipe, all 497 test digits
    python benchmarks/study_dual.py --split validation   # the same on the 200 validation digits
    python benchmarks/study_dual.py --quick              # seconds: proves that it runs

Everything is trained on the digits' training split (1100 images, ``ddrs_ext.data.load_digits_splits``);
every recipe choice was made on the validation split; the test split is certified once, with the
chosen recipe (the defaults below). Rows, all at failure probability ``alpha`` in total:

- ``expert sigma=s``: the expert of one level certified alone (CERTIFY at ``alpha``): fixed sigma.
- ``oracle``: each input's best expert, each certified at ``alpha / 2``: what a selector that always
  picks the right level, with a radius that never binds, would get. No selector can beat it.
- ``dual (learned selector)``: :func:`ddrs_ext.certify_dual` with a selector trained on radius labels
  (``alpha / 2`` for the selector, ``alpha / 2`` for the expert it picks).
- ``cascade``: :func:`ddrs_ext.routing.certify_cascade` (from the largest sigma down, sound radius).
- ``confidence routing``: ``certify_dual`` with :class:`ddrs_ext.routing.ConfidenceSelector`, the
  experts' own confidence as base selector (ACES-style).

Output: certified accuracy at radii 0, 0.25, ..., 2 for every row (curves first: the average
certified radius alone rewards the wrong things), then the ACR, then for the dual rows how often the
selector's radius was the smaller one and how much radius the choice of level lost against the oracle.
Checkpoints and certificates are cached under ``--cache`` (keyed by everything they depend on).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import ddrs_ext
from ddrs_ext import ABSTAIN, training
from ddrs_ext.data import load_digits_splits
from ddrs_ext.dual import (
    cross_fit_radii,
    default_selector_sigma,
    fold_assignment,
    level_radii,
    soft_level_labels,
    train_selector,
)
from ddrs_ext.models import digits_cnn
from ddrs_ext.routing import ConfidenceSelector, certify_cascade

RADII = tuple(0.25 * i for i in range(9))  # 0, 0.25, ..., 2
SCHEMES = ("gaussian", "consistency", "dd-gaussian", "dd-consistency")


@dataclass(frozen=True)
class Recipe:
    """Everything that makes the experts and the selector (chosen on the validation split)."""

    levels: tuple[float, ...] = (0.25, 0.5)
    expert_scheme: str = "consistency"  # SCHEMES: one scheme for every level's expert
    expert_lam: float | tuple[float, ...] = (10.0, 2.0)  # consistency's lambda, or one per level
    expert_eta: float = 0.5
    expert_epochs: int = 60
    expert_lr: float = 3e-3
    expert_batch: int = 64
    label_source: str = "crossfit"  # "crossfit" (held-out folds) or "train" (the final experts)
    folds: int = 5
    label_n0: int = 64
    label_n: int = 2000
    label_alpha: float = 0.01
    tau: float = 0.25
    level_weights: str | tuple[float, ...] | None = None  # None, "balanced" or one weight per level
    selector_sigma: float | None = None  # None: the largest level
    selector_lam: float = 20.0
    selector_eta: float = 0.5
    selector_copies: int = 2
    selector_epochs: int = 30
    selector_lr: float = 1e-3
    cascade_threshold: float = 0.5
    confidence_thresholds: tuple[float, ...] | None = (0.999,)  # one per level above the lowest
    train_count: int | None = None  # None: the whole training split (fewer: --quick only)
    specialize: float | None = 0.1  # tau of the specialists' sampling weights (None: generalists only)
    fixed_extra: tuple[float, ...] = (1.0,)  # more fixed-sigma experts certified alone (baselines only)

    @property
    def sigma_e(self) -> float:
        return default_selector_sigma(self.levels) if self.selector_sigma is None else self.selector_sigma


@dataclass(frozen=True)
class Evaluation:
    """What is certified and how."""

    split: str = "test"
    count: int | None = None  # None: the whole split
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    seed: int = 0
    batch_size: int = 10_000
    data_seed: int = 0


QUICK_RECIPE = dict(
    train_count=120,
    expert_epochs=1,
    folds=2,
    label_n0=16,
    label_n=32,
    selector_epochs=1,
)
QUICK_EVALUATION = dict(count=12, n0=16, n=100)


def _key(*parts) -> str:
    text = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Cache:
    """Files under one folder, named by what they depend on; ``None`` keeps nothing."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, make: Callable[[], object]):
        if self.root is None:
            return make()
        path = self.root / f"{name}.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        value = make()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)
        return value


# ---------------------------------------------------------------- training


def lam_of(recipe: Recipe, level: int) -> float:
    lam = recipe.expert_lam
    return float(lam[level]) if isinstance(lam, tuple) else float(lam)


def train_expert(
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    lam: float,
    recipe: Recipe,
    seed: int,
    weights: torch.Tensor | None = None,
) -> torch.nn.Module:
    """A digits CNN trained at ``sigma`` with ``recipe.expert_scheme`` (Adam, minibatches of a shuffled
    epoch; with ``weights``, each epoch draws its examples with replacement in proportion to them: a
    specialist for the inputs that the weights favour)."""
    torch.manual_seed(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.expert_lr)
    order = torch.Generator().manual_seed(seed)
    bank = None
    if recipe.expert_scheme.startswith("dd-"):
        # data-dependent training around the level: each example's sigma moves within [sigma / 2, 2 sigma]
        bank = training.SigmaBank(len(y), sigma, sigma_range=(sigma / 2, 2 * sigma))
    for _ in range(recipe.expert_epochs):
        model.train()
        if weights is None:
            epoch = torch.randperm(len(y), generator=order)
        else:
            epoch = torch.multinomial(weights.double(), len(y), replacement=True, generator=order)
        for index in epoch.split(recipe.expert_batch):
            xb, yb = x[index], y[index]
            s = sigma if bank is None else training.update_sigma(model, bank, xb, index, surrogate="certify")
            if recipe.expert_scheme.endswith("consistency"):
                loss = training.consistency_loss(
                    model, xb, yb, s, copies=2, lam=lam, eta=recipe.expert_eta, index=index
                )
            else:
                loss = training.gaussian_augmentation_loss(model, xb, yb, s, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def expert_fields(recipe: Recipe) -> dict:
    keys = ("expert_scheme", "expert_lam", "expert_eta", "expert_epochs", "train_count")
    return {k: getattr(recipe, k) for k in keys} | {
        "lr": recipe.expert_lr,
        "batch": recipe.expert_batch,
    }


def _digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.detach().cpu().double().numpy().tobytes()).hexdigest()[:16]


def experts_for(
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    cache: Cache,
    tag: str,
    seed: int,
    weights: torch.Tensor | None = None,
) -> list[torch.nn.Module]:
    """One expert per level, trained on (x, y); with ``weights`` (N, K), the experts above the lowest
    level are specialists trained on examples drawn in proportion to their column. Cached by everything
    they depend on."""
    out = []
    for k, sigma in enumerate(recipe.levels):
        w = None if weights is None or k == 0 else weights[:, k]
        fields = expert_fields(recipe) | {"expert_lam": lam_of(recipe, k)}
        name = f"expert_{_key(fields, sigma, tag, seed, _digest(w))}"

        def make(sigma=sigma, k=k, w=w):
            return train_expert(
                x, y, sigma, lam_of(recipe, k), recipe, seed + round(1000 * sigma), w
            ).state_dict()

        model = digits_cnn()
        model.load_state_dict(cache.get(name, make))
        out.append(model.eval())
    return out


# ---------------------------------------------------------------- certification helpers


def at_alpha(result: ddrs_ext.CertifyResult, alpha: float) -> ddrs_ext.CertifyResult:
    """``certify(..., alpha)`` of the same run at a smaller ``alpha`` (same seed, same counts): the
    Clopper-Pearson bound recomputed from the estimation counts (an input abstaining at the larger alpha
    abstains at the smaller one too)."""
    prediction = result.prediction.clone()
    ok = prediction != ABSTAIN
    rows = ok.nonzero()[:, 0]
    votes = result.counts[ok].gather(1, prediction[ok][:, None])[:, 0].numpy()
    n = result.counts[ok].sum(1).numpy()
    with np.errstate(invalid="ignore"):
        p_lower = np.where(votes > 0, stats.beta.ppf(alpha, votes, n - votes + 1), 0.0)
    good = torch.from_numpy(p_lower >= 0.5)
    radius = torch.zeros_like(result.radius)
    sigma = result.sigma[rows].numpy()
    radius[rows[good]] = torch.from_numpy(sigma[good.numpy()] * stats.norm.ppf(p_lower[good.numpy()]))
    prediction[rows[~good]] = ABSTAIN
    p_all = result.p_lower.clone()
    p_all[rows] = torch.from_numpy(p_lower)
    return dataclasses.replace(result, prediction=prediction, radius=radius, p_lower=p_all)


def correct_radius(prediction: torch.Tensor, radius: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per input: the certified radius when the certified class is the label, else -1."""
    ok = (prediction == y) & (prediction != ABSTAIN)
    return np.where(ok.numpy(), radius.numpy(), -1.0)


def curve(r: np.ndarray) -> list[float]:
    """Certified accuracy at RADII: the fraction of inputs certified correctly with radius >= r."""
    return [float((r >= radius).mean()) for radius in RADII]


def acr(r: np.ndarray) -> float:
    return float(np.maximum(r, 0.0).mean())


@dataclass
class Row:
    label: str
    radius: np.ndarray  # per input: certified radius of the true class, -1 if wrong or abstaining
    notes: list[str] = field(default_factory=list)


def dual_notes(dual, final: np.ndarray, oracle: np.ndarray, per_level: list[np.ndarray], levels) -> list[str]:
    """Where a dual certificate loses against the oracle, in radius per input (the three add up to the
    difference of their ACRs): inputs where the selector abstained, a level other than the input's best,
    and the selector's radius binding."""
    chose = (dual.level != ABSTAIN).numpy()
    certified = (dual.prediction != ABSTAIN).numpy()
    smaller = certified & (dual.radius_selector < dual.radius_classifier).numpy()
    picked = ", ".join(f"σ={s:g}: {int((dual.level == k).sum())}" for k, s in enumerate(levels))
    B = len(oracle)
    best = np.maximum(oracle, 0.0)
    at_chosen = np.stack(per_level, 1)[np.arange(B), np.where(chose, dual.level.numpy(), 0)]
    at_chosen = np.where(chose, np.maximum(at_chosen, 0.0), 0.0)
    got = np.maximum(final, 0.0)
    return [
        f"selector chose {picked}; abstained on {int((~chose).sum())} of {B}",
        f"selector's radius the smaller on {int(smaller.sum())} of {int(certified.sum())} certified inputs "
        f"({smaller.sum() / max(int(certified.sum()), 1):.3f})",
        f"radius lost against the oracle, per input: {float(np.where(chose, 0.0, best).mean()):.3f} where "
        f"the selector abstained, {float(np.where(chose, best - at_chosen, 0.0).mean()):.3f} to a level "
        f"other than the best, {float((at_chosen - got).mean()):.3f} to the selector's radius",
    ]


# ---------------------------------------------------------------- the study


def held_out_radii(
    x: torch.Tensor,
    y: torch.Tensor,
    experts,
    recipe: Recipe,
    cache: Cache,
    seed: int,
    weights: torch.Tensor | None,
    log,
) -> torch.Tensor:
    """The radius of every training input at every level: by experts trained without its fold
    (``label_source = "crossfit"``) or by the final experts (``"train"``)."""
    label_seed = (seed * 7919 + 17) % 2**63
    settings = dict(n0=recipe.label_n0, n=recipe.label_n, alpha=recipe.label_alpha, batch_size=10_000)
    key = _key(expert_fields(recipe), recipe.levels, settings, seed, _digest(weights))
    if recipe.label_source == "crossfit":
        part = fold_assignment(len(y), recipe.folds, label_seed)

        def fit(xs, ys, fold):
            w = None if weights is None else weights[part != fold]
            return experts_for(xs, ys, recipe, cache, f"fold{fold}of{recipe.folds}", seed + 1 + fold, w)

        radii = cache.get(
            f"radii_cf_{_key(key, recipe.folds)}",
            lambda: cross_fit_radii(
                fit, x, y, recipe.levels, folds=recipe.folds, seed=label_seed, **settings
            ),
        )
    elif recipe.label_source == "train":
        radii = cache.get(
            f"radii_tr_{key}",
            lambda: level_radii(
                experts, x, y, recipe.levels, seed=label_seed, index=torch.arange(len(y)), **settings
            ),
        )
    else:
        raise ValueError(f"label_source must be 'crossfit' or 'train', got {recipe.label_source!r}")
    best = radii.argmax(1)
    counts = torch.bincount(best[radii.max(1).values >= 0], minlength=len(recipe.levels)).tolist()
    log(f"label radii ({recipe.label_source}): best level counts {counts} of {len(y)} training inputs")
    return radii


def soft_labels(radii: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    weights = recipe.level_weights
    return soft_level_labels(
        radii, tau=recipe.tau, level_weights=list(weights) if isinstance(weights, tuple) else weights
    )


def train_recipe_selector(
    x, labels, recipe: Recipe, cache: Cache, seed: int, label_key: str
) -> tuple[torch.nn.Module, str]:
    fields = {
        k: getattr(recipe, k) for k in ("selector_lam", "selector_eta", "selector_copies", "selector_epochs")
    }
    name = f"selector_{_key(fields, recipe.selector_lr, recipe.sigma_e, label_key, seed)}"

    def make():
        torch.manual_seed(seed + 99)
        net = digits_cnn(len(recipe.levels))
        train_selector(
            net,
            x,
            labels,
            selector_sigma=recipe.sigma_e,
            epochs=recipe.selector_epochs,
            batch_size=64,
            lr=recipe.selector_lr,
            seed=seed + 98,
            copies=recipe.selector_copies,
            lam=recipe.selector_lam,
            eta=recipe.selector_eta,
        )
        return net.state_dict()

    net = digits_cnn(len(recipe.levels))
    net.load_state_dict(cache.get(name, make))
    return net.eval(), name


def model_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run(
    recipe: Recipe,
    evaluation: Evaluation,
    cache: Cache,
    log: Callable[[str], None] = print,
    routes: Sequence[str] = ("dual", "cascade", "confidence"),
    check_dual: bool = False,
) -> dict:
    """Trains (or loads) everything the recipe needs, certifies the split's inputs, returns the rows."""
    began = time.perf_counter()

    def stamp(message: str) -> None:
        log(f"[{time.perf_counter() - began:6.0f} s] {message}")

    splits = load_digits_splits(evaluation.data_seed)
    x_train, y_train = splits.train
    if recipe.train_count is not None:
        x_train, y_train = x_train[: recipe.train_count], y_train[: recipe.train_count]
    x, y = getattr(splits, evaluation.split)
    if evaluation.count is not None:
        x, y = x[: evaluation.count], y[: evaluation.count]
    levels = list(recipe.levels)
    alpha, half = evaluation.alpha, evaluation.alpha / 2
    seed = evaluation.seed
    common = dict(n0=evaluation.n0, n=evaluation.n, batch_size=evaluation.batch_size, seed=seed)
    eval_key = _key(
        evaluation.split, evaluation.count, evaluation.n0, evaluation.n, seed, evaluation.data_seed
    )

    def certified(model, sigma):
        name = f"cert_{_key(model_digest(model), sigma, eval_key, alpha)}"
        return cache.get(name, lambda: ddrs_ext.certify(model, x, sigma, alpha=alpha, **common))

    generalists = experts_for(x_train, y_train, recipe, cache, "train", 0)
    stamp(f"experts ready ({recipe.expert_scheme}, levels {levels})")
    rows = []
    for model, sigma in zip(generalists, levels):
        r = certified(model, sigma)
        rows.append(Row(f"expert σ={sigma:g} alone", correct_radius(r.prediction, r.radius, y)))
    extra = [s for s in recipe.fixed_extra if s not in levels]
    if extra:  # more fixed sigmas, trained as the generalists are: every fixed sigma is a baseline
        alike = dataclasses.replace(recipe, levels=tuple(extra), expert_lam=lam_of(recipe, len(levels) - 1))
        others = experts_for(x_train, y_train, alike, cache, "train", 0)
        for model, sigma in zip(others, extra):
            r = certified(model, sigma)
            rows.append(Row(f"expert σ={sigma:g} alone", correct_radius(r.prediction, r.radius, y)))
    experts, weights = generalists, None
    if recipe.specialize is not None:
        base = held_out_radii(x_train, y_train, generalists, recipe, cache, 0, None, log)
        weights = soft_level_labels(base, tau=recipe.specialize)
        experts = experts_for(x_train, y_train, recipe, cache, "train", 0, weights)
        stamp("specialists ready (levels above the lowest, trained on examples drawn by held-out labels)")
        for model, sigma in list(zip(experts, levels))[1:]:
            r = certified(model, sigma)
            rows.append(Row(f"specialist σ={sigma:g} alone", correct_radius(r.prediction, r.radius, y)))
    alone = [certified(model, sigma) for model, sigma in zip(experts, levels)]
    stamp("experts certified alone")
    at_half = [at_alpha(r, half) for r in alone]
    per_level = [correct_radius(r.prediction, r.radius, y) for r in at_half]
    oracle = np.max(np.stack(per_level, 1), 1)
    best = np.argmax(np.stack(per_level, 1), 1)
    oracle_row = Row("oracle (best level per input, α/2)", oracle)
    oracle_row.notes.append(
        "best level: "
        + ", ".join(f"σ={s:g}: {int(((best == k) & (oracle >= 0)).sum())}" for k, s in enumerate(levels))
    )
    rows.append(oracle_row)
    result = {"rows": rows, "baselines": len(rows) - 1}
    digests = [model_digest(m) for m in experts]

    if "dual" in routes:
        radii = held_out_radii(x_train, y_train, experts, recipe, cache, 0, weights, log)
        labels = soft_labels(radii, recipe)
        label_key = _key(_digest(labels), recipe.label_source, recipe.folds, recipe.label_n, digests)
        selector, selector_key = train_recipe_selector(x_train, labels, recipe, cache, 0, label_key)
        stamp(f"selector ready (σ_e = {recipe.sigma_e:g})")
        dual = cache.get(
            f"dual_{_key(selector_key, digests, eval_key, alpha)}",
            lambda: ddrs_ext.certify_dual(
                experts, selector, x, levels, selector_sigma=recipe.sigma_e, alpha=alpha, **common
            ),
        )
        if check_dual:  # the classifier's part is each expert's certify(seed) at alpha / 2
            for k in range(len(levels)):
                here = dual.level == k
                assert torch.equal(dual.classifier.counts[here], at_half[k].counts[here])
                assert torch.equal(dual.radius_classifier[here], at_half[k].radius[here])
        label = f"dual, learned selector (σ_e={recipe.sigma_e:g})"
        row = Row(label, correct_radius(dual.prediction, dual.radius, y))
        row.notes = dual_notes(dual, row.radius, oracle, per_level, levels)
        rows.append(row)
        result["dual"] = dual
        stamp("dual certified")

    if "cascade" in routes:
        name = f"cascade_{_key(digests, recipe.levels, recipe.cascade_threshold, eval_key, alpha)}"
        cascade = cache.get(
            name,
            lambda: certify_cascade(
                experts, x, levels, threshold=recipe.cascade_threshold, alpha=alpha, **common
            ),
        )
        row = Row(
            f"cascade (p0={recipe.cascade_threshold:g})",
            correct_radius(cascade.prediction, cascade.radius, y),
        )
        answered = ", ".join(f"σ={s:g}: {int((cascade.level == k).sum())}" for k, s in enumerate(levels))
        row.notes.append(f"answered at {answered}; abstained on {int((cascade.prediction == ABSTAIN).sum())}")
        rows.append(row)
        result["cascade"] = cascade
        stamp("cascade certified")

    if "confidence" in routes:
        thresholds = recipe.confidence_thresholds or tuple([0.999] * (len(levels) - 1))
        routing = ConfidenceSelector(experts, thresholds)
        name = f"conf_{_key(digests, recipe.levels, thresholds, recipe.sigma_e, eval_key, alpha)}"
        conf = cache.get(
            name,
            lambda: ddrs_ext.certify_dual(
                experts, routing, x, levels, selector_sigma=recipe.sigma_e, alpha=alpha, **common
            ),
        )
        row = Row(
            f"confidence routing (θ={','.join(f'{t:g}' for t in thresholds)}, σ_e={recipe.sigma_e:g})",
            correct_radius(conf.prediction, conf.radius, y),
        )
        row.notes = dual_notes(conf, row.radius, oracle, per_level, levels)
        rows.append(row)
        result["confidence"] = conf
        stamp("confidence routing certified")
    return result


def table(rows: Sequence[Row]) -> str:
    head = "| row | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR |"
    lines = [head, "|---|" + "---:|" * (len(RADII) + 1)]
    for row in rows:
        lines.append(
            f"| {row.label} | "
            + " | ".join(f"{v:.3f}" for v in curve(row.radius))
            + f" | {acr(row.radius):.3f} |"
        )
    return "\n".join(lines)


def verdict(rows: Sequence[Row], baselines: int) -> list[str]:
    """The issue's targets, read off the rows: each route's ACR against the best expert's (any expert
    certified alone), its certified accuracy at r >= 0.75 against the smallest level's expert, and
    within 0.03 of it at r = 0."""
    experts = rows[:baselines]
    best = max(experts, key=lambda r: acr(r.radius))
    smallest = experts[0]
    lines = []
    for row in rows[baselines:]:
        c, s = curve(row.radius), curve(smallest.radius)
        high = [i for i, r in enumerate(RADII) if r >= 0.75 and (c[i] > 0 or s[i] > 0)]
        above = bool(high) and all(c[i] > s[i] for i in high)
        if high:
            at_high = (
                f"{'above' if above else 'NOT above'} {smallest.label} at every radius where either "
                f"certifies ({', '.join(f'r={RADII[i]:g}: {c[i]:.3f} vs {s[i]:.3f}' for i in high)})"
            )
        else:
            at_high = f"neither it nor {smallest.label} certifies any input (NOT above)"
        lines.append(
            f"- {row.label}: ACR {acr(row.radius):.3f} vs best expert ({best.label}) {acr(best.radius):.3f} "
            f"({'above' if acr(row.radius) > acr(best.radius) else 'NOT above'}); at r >= 0.75 {at_high}; "
            f"at r = 0 {c[0]:.3f} vs {s[0]:.3f} ({'within' if c[0] >= s[0] - 0.03 else 'NOT within'} 0.03)"
        )
    return lines


def report(result: dict, recipe: Recipe, evaluation: Evaluation) -> str:
    rows = result["rows"]
    n_inputs = len(rows[0].radius)
    out = [
        f"digits {evaluation.split} split, {n_inputs} inputs; n0 = {evaluation.n0}, n = {evaluation.n}, "
        f"alpha = {evaluation.alpha} in total per row; seed {evaluation.seed}",
        f"recipe: {json.dumps(dataclasses.asdict(recipe))}",
        "",
        "Certified accuracy at radius r (inputs certified with their true class and radius >= r):",
        "",
        table(rows),
        "",
    ]
    for row in rows:
        for note in row.notes:
            out.append(f"- {row.label}: {note}")
    out += ["", "Targets:", *verdict(rows, result["baselines"])]
    return "\n".join(out)


def _levels(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _lams(text: str) -> float | tuple[float, ...]:
    values = _levels(text)
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny settings that run in seconds (CI)")
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--count", type=int, default=None, help="only the first COUNT inputs of the split")
    p.add_argument("--n", type=int, default=Evaluation.n)
    p.add_argument(
        "--cache", type=Path, default=Path("/tmp/ddrs_study_dual"), help="checkpoints and certificates"
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--routes", default="dual,cascade,confidence", help="comma-separated: dual, cascade, confidence"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) here")
    defaults = Recipe()
    g = p.add_argument_group("recipe (defaults: the one chosen on the validation split)")
    g.add_argument("--levels", type=_levels, default=defaults.levels, help="comma-separated sigmas")
    g.add_argument("--expert-scheme", choices=SCHEMES, default=defaults.expert_scheme)
    g.add_argument(
        "--expert-lam", type=_lams, default=defaults.expert_lam, help="one lambda, or one per level (comma)"
    )
    g.add_argument("--specialize", type=float, default=defaults.specialize, help="tau of the specialists")
    g.add_argument(
        "--fixed-extra", type=_levels, default=defaults.fixed_extra, help="more fixed sigmas, baselines only"
    )
    for name in (
        "expert_eta",
        "tau",
        "selector_lam",
        "selector_eta",
        "cascade_threshold",
        "selector_lr",
    ):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in ("expert_epochs", "folds", "label_n", "selector_copies", "selector_epochs"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    g.add_argument("--label-source", choices=("crossfit", "train"), default=defaults.label_source)
    g.add_argument("--level-weights", default=None, help="'balanced' or comma-separated weights")
    g.add_argument("--selector-sigma", type=float, default=None, help="default: the largest level")
    g.add_argument("--confidence-thresholds", type=_levels, default=None)
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    weights = args.level_weights
    if weights is not None and weights != "balanced":
        weights = _levels(weights)
    fields = {f.name for f in dataclasses.fields(Recipe)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["level_weights"] = weights
    recipe = Recipe(**values)
    if args.quick:
        recipe = dataclasses.replace(recipe, **QUICK_RECIPE)
    return recipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    recipe = recipe_from_args(args)
    evaluation = Evaluation(split=args.split, count=args.count, n=args.n)
    if args.quick:
        evaluation = dataclasses.replace(evaluation, **QUICK_EVALUATION)
    cache = Cache(None if args.no_cache else args.cache)
    routes = [r for r in args.routes.split(",") if r]
    result = run(
        recipe, evaluation, cache, log=lambda m: print(m, file=sys.stderr, flush=True), routes=routes
    )
    text = report(result, recipe, evaluation)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
