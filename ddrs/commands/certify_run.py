"""The work of ``ddrs certify`` (its options and checks: :mod:`ddrs.commands.certify`): CERTIFY
(ddrs_ext.certify), with --sequential ddrs_ext.certify_sequential, with --sigma-levels
ddrs_ext.certify_dual, and --memory's adjustment (ddrs_ext.CertificationMemory) in idx order."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ddrs import distributed_run
from ddrs.checkpoints import is_selector_checkpoint
from ddrs.input_sigma import Sigma
from ddrs.job import Job, is_sharded, message, open_results, run_chunks
from ddrs.loading import load_model, model_settings
from ddrs.noise_settings import (
    check_resumed_noise,
    check_sigma_file_noise,
    noise_settings,
    note_checkpoint_noise,
)
from ddrs.result_notes import PER_INPUT_WITHOUT_MEMORY, certificate_notes, radii_of_interest, resumed_settings
from ddrs.results import CERTIFY_COLUMNS, DUAL_COLUMNS, LATER_CERTIFY_COLUMNS, certify_rows
from ddrs.route_options import route_of
from ddrs.routes_run import Cascade, cascade_summary, confidence_selector, resolve_selector_sigma
from ddrs.sequential_options import (
    check_sequential_rule,
    labels_kwargs,
    sequential_kwargs,
    sequential_settings,
)
from ddrs.weights import load_weights
from ddrs_ext.certification import ABSTAIN, certify
from ddrs_ext.dual import certify_dual
from ddrs_ext.memory import CertificationMemory
from ddrs_ext.sequential import certify_sequential, round_schedule

__all__ = ["run"]


class _Changes:
    """How many certificates the memory changed (class or radius), of how many it saw, in this run."""

    def __init__(self) -> None:
        self.changed = self.seen = 0

    def count(
        self, before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        differs = (before[0].cpu() != after[0].cpu()) | (before[1].cpu() != after[1].cpu())
        self.changed += int(differs.sum())
        self.seen += len(differs)


def _memory_step(job: Job, changes: _Changes, norm: str) -> Callable[[list[dict], list[dict]], list[dict]]:
    """The memory-based adjustment as a step over rows: the memory rebuilt from the rows already in
    the file (as they were adjusted), then the new rows adjusted in idx order, as one process adjusts
    them (CertificationMemory gives the same answers whatever the blocks); ``changes`` counts what
    it changed; ``norm``: the radii's norm (l1 for uniform noise)."""

    def step(before: list[dict], rows: list[dict]) -> list[dict]:
        memory = CertificationMemory(norm=norm)
        for start in range(0, len(before), 1024):
            part = before[start : start + 1024]
            memory.extend(
                job.inputs([r["idx"] for r in part]),
                torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                torch.tensor([r["radius"] for r in part], dtype=torch.float64),
            )
        adjusted = []
        for start in range(0, len(rows), 1024):
            part = rows[start : start + 1024]
            raw = (
                torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                torch.tensor([r["radius"] for r in part], dtype=torch.float64),
            )
            prediction, radius = memory.adjust(
                job.inputs([r["idx"] for r in part]), raw[0].clone(), raw[1].clone()
            )
            changes.count(raw, (prediction, radius))
            for k, row in enumerate(part):
                p = int(prediction[k])
                correct = int(p == job.labels[row["idx"]])
                adjusted.append({**row, "predict": p, "radius": float(radius[k]), "correct": correct})
        return adjusted

    return step


def _certify_summary(
    path: Path,
    rows: list[dict],
    radii: tuple[float, ...] | None = None,
    norm: str = "l2",
    levels: list[float] | None = None,
) -> str:
    """One line: certified accuracy at radius 0 and the ACR, or with ``radii`` (the radii of interest
    of a sequential run) the certified accuracy at those radii alone; model evaluations; the dual
    certificate's selector or the cascade's levels (``levels``). L1 radii (uniform noise) are called so,
    and the levels theta."""
    if not rows:
        return f"{path}: no rows"
    if norm == "l1":
        text = _certify_summary(path, rows, radii, levels=levels).replace(" radius", " L1 radius")
        return text.replace("σ = ", "θ = ")
    correct = [r for r in rows if r["correct"]]
    if radii is not None and len(radii) == 1:
        at = sum(r["radius"] >= radii[0] for r in correct) / len(rows)
        text = (
            f"{path}: {len(rows)} inputs, certified accuracy {at:.3f} at radius {radii[0]:g} (radius mode: "
            "certified at that radius or not; no other radius, no average certified radius)"
        )
    elif radii is not None:
        at = ", ".join(
            f"{sum(r['radius'] >= v for r in correct) / len(rows):.3f} at r = {v:g}" for v in radii
        )
        text = (
            f"{path}: {len(rows)} inputs, certified accuracy {at} (radii of interest: only these "
            "radii are meaningful; no average certified radius)"
        )
    else:
        acr = sum(r["radius"] for r in correct) / len(rows)
        text = (
            f"{path}: {len(rows)} inputs, certified accuracy {len(correct) / len(rows):.3f} at radius 0, "
            f"average certified radius {acr:.4f}"
        )
    if all("samples" in r for r in rows):
        text += f", {sum(r['samples'] for r in rows) / len(rows):.0f} model evaluations per input"
    if all("radius_above" in r for r in rows):
        text += cascade_summary(rows, levels or [])
    elif all("level" in r for r in rows):
        chose = [r for r in rows if r["level"] != ABSTAIN]
        smaller = sum(r["radius_selector"] < r["radius_classifier"] for r in chose if r["predict"] != ABSTAIN)
        text += (
            f"; the selector abstained on {len(rows) - len(chose)}, its radius was the smaller on {smaller}"
        )
    return text


class _Certifier:
    """What ``ddrs certify`` computes per chunk of inputs: CERTIFY (ddrs_ext.certify), with
    --sequential ddrs_ext.certify_sequential, with --sigma-levels ddrs_ext.certify_dual; and what
    that adds to the result file (columns, settings). Plain CERTIFY adds no setting, so that files
    of earlier versions resume."""

    def __init__(self, args: argparse.Namespace, job: Job) -> None:
        self.args, self.job = args, job
        self.levels = getattr(args, "sigma_levels", None)
        self.cascade = None
        self.sequential = bool(getattr(args, "sequential", False))
        self.settings: dict = sequential_settings(args)  # --sequential's radii, --labels
        self.columns, self.later = CERTIFY_COLUMNS, LATER_CERTIFY_COLUMNS
        if self.levels is not None:
            self._setup_dual()
            return
        self.sigma_of = Sigma(args, job)
        self.sigma_setting = self.sigma_of.setting
        rows = args.n
        if self.sequential:
            self.later = ()
            rows = round_schedule(args.n, args.alpha).ends[0]  # every input runs the first round
        self.rows_per_input = min(rows, self.sigma_of.rows_per_input or rows)

    def _setup_dual(self) -> None:
        args, job = self.args, self.job
        note = lambda text: print(f"ddrs certify: note: {text}", file=sys.stderr)  # noqa: E731
        K = len(self.levels)
        experts = _expert_specs(args, K)
        self.model = job.model
        if len(experts) > 1:
            self.model = [job.model] + [
                job.evaluate(load_model(spec, checkpoint, job.device, note))
                for spec, checkpoint in experts[1:]
            ]
            self.settings["experts"] = [model_settings(spec, checkpoint) for spec, checkpoint in experts]
        self.rows_per_input = args.n
        if route_of(args) == "cascade":
            self.cascade = Cascade(args, self.model)  # passes --noise on
            self.sigma_setting, self.columns, self.later = (
                self.cascade.sigma_setting,
                self.cascade.columns,
                (),
            )
            return
        args.selector_sigma = resolve_selector_sigma(args)
        if route_of(args) == "confidence":
            self.selector = confidence_selector(args, self.model)
            self.settings["selector"] = {"confidence_routing": list(args.confidence_routing)}
        else:
            self._load_selector(note)
            self.settings["selector"] = model_settings(args.selector, args.selector_checkpoint)
        self.alpha_selector = args.alpha / 2 if args.alpha_selector is None else args.alpha_selector
        self.sigma_setting = {"levels": list(self.levels), "selector_sigma": args.selector_sigma}
        self.settings["alpha_selector"] = self.alpha_selector
        self.columns, self.later = DUAL_COLUMNS, ()

    def _load_selector(self, note: Callable[[str], None]) -> None:
        args, job = self.args, self.job
        self.selector = load_model(args.selector, args.selector_checkpoint, job.device, note, role="selector")
        x = job.inputs(job.selected[:1])
        try:
            with torch.no_grad():
                out = self.selector(x)
        except Exception as exc:
            raise ValueError(f"--selector fails on one input from --data: {message(exc)}") from None
        K = len(self.levels)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != K:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the selector must return one logit per sigma level ({K} levels: --sigma-levels "
                f"{' '.join(f'{v:g}' for v in self.levels)}); for one input it returned {got}"
            )
        self._note_trained_levels(note)
        self.selector = job.evaluate(self.selector)  # as the model is (compiled at its first call)

    def _note_trained_levels(self, note: Callable[[str], None]) -> None:
        """A note when a selector checkpoint of ddrs train was trained for other levels."""
        args = self.args
        if args.selector is not None or args.selector_checkpoint is None:
            return
        content = load_weights(args.selector_checkpoint, "--selector-checkpoint")
        if not is_selector_checkpoint(content):
            return
        noise = content.get("noise") or "gaussian"  # selector checkpoints without it are Gaussian
        if noise != args.noise:
            note(
                f"--selector-checkpoint {args.selector_checkpoint} was trained with {noise} noise (ddrs "
                f"train --selector-for ... --noise {noise}); this run smooths it with --noise {args.noise}"
            )
        trained = (list(content["sigma_levels"]), content["selector_sigma"])
        if trained != (list(self.levels), args.selector_sigma):
            note(
                f"--selector-checkpoint {args.selector_checkpoint} was trained for --sigma-levels "
                f"{' '.join(f'{v:g}' for v in trained[0])} --selector-sigma {trained[1]:g}; this run uses "
                f"{' '.join(f'{v:g}' for v in self.levels)} and {args.selector_sigma:g}"
            )

    def __call__(self, x: torch.Tensor, index: torch.Tensor):
        args, job = self.args, self.job
        common = dict(batch_size=args.batch_size, num_classes=job.num_classes, seed=args.seed, index=index)
        if self.cascade is not None:
            return self.cascade(x, index, common)
        if self.levels is not None:
            return certify_dual(
                self.model,
                self.selector,
                x,
                self.levels,
                selector_sigma=args.selector_sigma,
                n0=args.n0,
                n=args.n,
                alpha=args.alpha,
                alpha_selector=self.alpha_selector,
                **({"sequential": True, **sequential_kwargs(args)} if self.sequential else {}),
                noise=args.noise,
                **common,
            )
        sigma = self.sigma_of(x, index)
        common.update(labels_kwargs(args, torch.tensor([job.labels[i] for i in index.tolist()])))
        if self.sequential:
            return certify_sequential(
                job.model,
                x,
                sigma,
                n0=args.n0,
                n_max=args.n,
                alpha=args.alpha,
                **sequential_kwargs(args),
                noise=args.noise,
                **common,
            )
        return certify(
            job.model, x, sigma, n0=args.n0, n=args.n, alpha=args.alpha, noise=args.noise, **common
        )


def _expert_specs(args: argparse.Namespace, levels: int) -> list[tuple[str | None, str | None]]:
    """``(--model, --checkpoint)`` of each expert: one pair, or one per level when either option is
    repeated (ddrs.commands.certify checked the counts: each once, or once per level)."""
    models, checkpoints = list(args.models), list(args.checkpoints)
    count = max(len(models), len(checkpoints), 1)
    if count == 1:
        return [(args.model, args.checkpoint)]

    def pick(values: list, k: int):
        return None if not values else values[k] if len(values) == levels else values[0]

    return [(pick(models, k), pick(checkpoints, k)) for k in range(levels)]


#: The memory's rule the rows of a --memory file were adjusted under (its settings' "memory_rule").
#: 2: an abstention is an answer too (adopted inside a stored ball of a class, and stored); files
#: without the key were adjusted under rule 1 (abstentions passed through, not stored), and their rows
#: cannot be continued under rule 2: rebuilding the memory from them would mix the two rules.
MEMORY_RULE = 2


def _check_memory_rule(args: argparse.Namespace) -> None:
    """Refuses to resume a --memory file whose rows were adjusted under an earlier memory rule."""
    if not args.memory:
        return
    before = resumed_settings(args.out)
    if before is not None and before.get("memory") is True and before.get("memory_rule") != MEMORY_RULE:
        raise ValueError(
            f"{args.out} was certified with the memory of an earlier ddrs version (rule "
            f"{before.get('memory_rule', 1)}: abstentions were neither adopted inside stored balls nor "
            f"stored; now rule {MEMORY_RULE}); its rows cannot be continued under the current rule: "
            "certify into another --out (or delete the file to start it again)"
        )


def _earlier_memory_choice(args: argparse.Namespace) -> None:
    """A rerun that resumes a file certified at a sigma per input without the memory, started
    before the memory was the default, resumes it without the memory (what the file holds), with a
    note, unless --memory or --no-memory was given (then the settings must match, as ever)."""
    if getattr(args, "memory_given", True) or not args.memory:
        return
    before = resumed_settings(args.out)
    if (
        before is not None
        and before.get("memory") is False
        and PER_INPUT_WITHOUT_MEMORY in certificate_notes(before)
    ):
        args.memory = False
        print(
            f"ddrs certify: note: {args.out} was started without the memory (before it was the default "
            "for a sigma per input); resuming it so: its radii are not certificates of one classifier "
            "(use another --out for a run with the memory)",
            file=sys.stderr,
        )


@distributed_run.command
def run(args: argparse.Namespace) -> int:
    check_resumed_noise(args)
    check_sigma_file_noise(args)
    _earlier_memory_choice(args)
    _check_memory_rule(args)
    check_sequential_rule(args)
    job = Job(args)
    note_checkpoint_noise(args, job.note)
    method = _Certifier(args, job)
    settings = {
        "command": "certify",
        **job.settings,
        "sigma": method.sigma_setting,
        **noise_settings(args),
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "memory": bool(args.memory),
        **({"memory_rule": MEMORY_RULE} if args.memory else {}),
        **method.settings,
    }
    notes = certificate_notes(settings)
    if notes:  # described for a reader; not compared on a resume (ddrs.results.DESCRIPTIVE_SETTINGS)
        settings["notes"] = [sentence for _, sentence in notes]
    changes = _Changes()
    norm = noise_settings(args)["norm"]
    step = _memory_step(job, changes, norm) if args.memory else None
    with open_results(args, job, method.columns, settings, order_step=step, later=method.later) as out:
        memory = None
        if args.memory and not is_sharded(out):  # sharded: adjusted in the merge
            memory = CertificationMemory(norm=norm)
            done = list(out.done.values())
            for start in range(0, len(done), 1024):  # the adjusted answers already given, in order
                part = done[start : start + 1024]
                memory.extend(
                    job.inputs([r["idx"] for r in part]),
                    torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                    torch.tensor([r["radius"] for r in part], dtype=torch.float64),
                )

        def work(index: torch.Tensor) -> list[dict]:
            x = job.inputs(index.tolist())
            result = method(x, index)
            if memory is not None:
                raw = (result.prediction.clone(), result.radius.clone())
                result = memory.adjust_result(x, result)
                changes.count(raw, (result.prediction, result.radius))
            index = index.tolist()
            return certify_rows(result, index, [job.labels[i] for i in index])

        run_chunks(args, job, out, method.rows_per_input, work)
        done = [out.done[i] for i in job.selected if i in out.done]
        summary = _certify_summary(
            args.out, done, radii_of_interest(settings), norm, getattr(args, "sigma_levels", None)
        )
        if args.memory and changes.seen:
            summary += (
                f"; the memory changed {changes.changed} of the {changes.seen} certificates of this run"
            )
        print(summary)
        for _, sentence in notes:
            print(f"{args.out}: {sentence}")
    return 0
