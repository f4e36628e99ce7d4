"""The ``ddrs`` command line: certify a dataset with your model, optimise a sigma per input, analyse
result files, run a demo.

    ddrs certify --model mymodels:build --checkpoint model.pt --data cifar-10-batches-py \\
        --sigma 0.25 --skip 20 --out certify.tsv
    ddrs optimize-sigma --model mymodels:build --checkpoint model.pt --data data.pt --out sigma.tsv
    ddrs certify ... --sigma-file sigma.tsv --memory --out certify_dd.tsv

Every command writes one row per input as soon as it is done and resumes an interrupted run when
given the same command again. User errors end the command with a one-line message on stderr and
exit status 2; an interrupt (Ctrl-C) exits with 130.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

# Without --chunk, inputs per certify / optimize_sigma call grow until a call takes about this long.
_CHUNK_SECONDS = 3.0
_SEED_LIMIT = 2**64
_INDEX_LIMIT = 2**32


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks and shows defaults (other than None/False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------- argument types


def _number(kind, *, minimum=None, above=None, below=None, what=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what or 'a ' + kind.__name__}: {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_count = _number(int, minimum=1, what="an integer")
_non_negative_int = _number(int, minimum=0, what="an integer")
_positive = _number(float, above=0, what="a number")
_probability = _number(float, above=0, below=1, what="a number")
_seed = _number(int, minimum=0, below=_SEED_LIMIT, what="an integer")


# ----------------------------------------------------------------------------- the parser

_FORMATS = """\
model (--model, --checkpoint):
  --model module:callable         a function or class that builds the model when called with no
  --model path/to/file.py:callable  arguments (the working directory is importable); with
                                  --checkpoint FILE: its weights, a state_dict or a dict holding one
                                  under "model", "state_dict" or "model_state_dict" (loaded with
                                  torch.load(weights_only=True); a "module." prefix is dropped)
  --model model.ts                a TorchScript file (torch.jit.save)
  --model model.pt2               a torch.export program (torch.export.save; export it with a
                                  dynamic batch dimension)
  --checkpoint FILE alone         a checkpoint of python -m ddrs_ext.train_digits
  The model maps a batch of inputs (N, ...) to logits (N, C); C, the number of classes, is read
  from one forward pass. It runs in eval mode on --device.

data (--data):
  digits                          the embedded digits (8x8, 10 classes; --split test (497 images)
                                  or train (1300), as ddrs_ext.data.load_digits_split(seed=0))
  a CIFAR-10 folder               the "python version" (cifar-10-batches-py: data_batch_1..5,
                                  test_batch), --split test or train; images (N, 3, 32, 32) in [0, 1]
  a .pt file                      torch.save of (inputs, labels) or a dict with keys x/y,
                                  inputs/labels, images/targets, images/labels or data/targets;
                                  inputs float (N, ...) or uint8 (divided by 255), labels int (N,)
  an image folder                 one subfolder per class, numbered as torchvision's ImageFolder
                                  numbers them (read with Pillow), RGB scaled to [0, 1]; all of
                                  one size, or --image-size S: shorter side to round(S*256/224),
                                  then the central SxS (ImageNet: --image-size 224)
  Labels must lie in [0, C). Inputs are numbered 0..N-1 (idx); the model gets them as they are
  (do any normalisation inside the model).

selection:
  --skip k --max m                inputs with idx % k == 0 and idx < m, in idx order

output (--out): tab-separated text, one row per input as soon as it is done
  certify:         idx label predict radius correct time sigma   (predict -1: abstained)
  optimize-sigma:  idx label sigma surrogate time
  time is the wall time per input (h:mm:ss.ffffff); radii and sigmas are written exactly. The
  settings that determine the rows are kept in <out>.settings.json. Running the same command
  again resumes after the last complete row and gives the same rows as one uninterrupted run
  (noise depends only on --seed and each input's idx; not on --batch-size, --chunk or threads,
  so these may change between runs); a resume with other settings is refused.
"""

_CERTIFY_EPILOG = (
    _FORMATS
    + """
examples:
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --out digits.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --sigma 0.25 --skip 20 --n 100000 --device cuda --out cifar_025.tsv
  ddrs optimize-sigma --model mymodels:resnet110 --checkpoint ckpt.pth.tar \\
      --data cifar-10-batches-py --skip 20 --sigma0 0.12 --out sigma.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --skip 20 --sigma-file sigma.tsv --memory --out cifar_dd.tsv
  ddrs certify --model model.ts --data test.pt --optimize --sigma0 0.25 --max 100 --out dd.tsv
"""
)

_OPTIMIZE_EPILOG = (
    _FORMATS
    + """
examples:
  ddrs optimize-sigma --checkpoint digits.pt --data digits --out sigma.tsv
  ddrs optimize-sigma --model mymodels:resnet110 --checkpoint ckpt.pth.tar \\
      --data cifar-10-batches-py --skip 20 --paper --out sigma_paper.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --skip 20 --sigma-file sigma_paper.tsv --memory --out certify_paper.tsv
"""
)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (formats below)")
    g.add_argument(
        "--model", metavar="SPEC", help="module:callable, file.py:callable, or a TorchScript/.pt2 file"
    )
    g.add_argument(
        "--checkpoint", metavar="FILE", help="weights for --model, or a train_digits checkpoint alone"
    )
    g.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="digits, a CIFAR-10 folder, a .pt file or an image folder",
    )
    g.add_argument(
        "--split", choices=("train", "test"), default=None, help="split of digits or CIFAR-10 (default: test)"
    )
    g.add_argument(
        "--image-size",
        type=_count,
        default=None,
        metavar="S",
        help="image folders: resize (shorter side round(S*256/224)) and centre-crop to SxS",
    )
    g.add_argument(
        "--skip", type=_count, default=1, metavar="K", help="take every K-th input (idx %% K == 0)"
    )
    g.add_argument(
        "--max", type=_non_negative_int, default=None, metavar="M", help="only inputs with idx < M"
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, type=Path, metavar="FILE", help="result file (created or resumed)")
    g.add_argument(
        "--seed", type=_seed, default=0, help="noise seed; with each input's idx it fixes all noise"
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument(
        "--batch-size", type=_count, default=1000, metavar="ROWS", help="noisy copies per forward pass"
    )
    g.add_argument(
        "--chunk",
        type=_count,
        default=None,
        metavar="INPUTS",
        help="inputs per certify/optimize_sigma call (default: grown until a call takes about "
        f"{_CHUNK_SECONDS:g} s); rows are written after each call",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_sigma_options(p: argparse.ArgumentParser, title: str) -> None:
    from ddrs_ext.sigma import ESTIMATORS, PAPER_SETTINGS, RULES, SURROGATES

    d = _optimize_defaults()
    g = p.add_argument_group(title)
    g.add_argument("--sigma0", type=_positive, help="starting sigma (default 0.12, the paper's)")
    g.add_argument(
        "--paper",
        action="store_true",
        help="the published procedure, ddrs_ext.PAPER_SETTINGS ("
        + ", ".join(f"{k} {v}" for k, v in PAPER_SETTINGS.items()).replace("%", "%%")
        + "); options given explicitly override it",
    )
    g.add_argument(
        "--iterations", type=_non_negative_int, help=f"steps per input (default {d['iterations']})"
    )
    g.add_argument("--num-samples", type=_count, help=f"noise samples per step (default {d['num_samples']})")
    g.add_argument("--lr", type=_positive, help=f"ascent step size, --rule ascent (default {d['lr']})")
    g.add_argument("--estimator", choices=ESTIMATORS, help=f"derivative in sigma (default {d['estimator']})")
    g.add_argument("--rule", choices=tuple(RULES), help=f"update rule (default {d['rule']})")
    g.add_argument("--growth", type=_number(float, above=1), help=f"bisection factor (default {d['growth']})")
    g.add_argument(
        "--surrogate", choices=SURROGATES, help=f"radius surrogate maximised (default {d['surrogate']})"
    )
    g.add_argument(
        "--clip",
        nargs=2,
        type=_probability,
        metavar=("LOW", "HIGH"),
        help=f"clip of E_A, E_B (default {d['clip']})",
    )
    g.add_argument(
        "--sigma-range",
        nargs=2,
        type=_positive,
        metavar=("LOW", "HIGH"),
        help=f"sigma stays inside (default {d['sigma_range']})",
    )
    g.add_argument(
        "--no-keep-prediction",
        dest="keep_prediction",
        action="store_false",
        default=None,
        help="(bisection) let sigma move to where the top class changes or falls below 1/2",
    )
    g.add_argument("--probabilities", action="store_true", help="the model returns probabilities, not logits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddrs",
        description="Data Dependent Randomized Smoothing (Alfarra et al., UAI 2022) from the command line:\n"
        "certify a dataset with your model at a fixed sigma or a sigma per input, optimise those sigmas,\n"
        "analyse the result files. Run 'ddrs COMMAND --help' for a command's options, file formats\n"
        "and examples.",
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_external(sub, "demo", "ddrs_ext.demo", "train a small model on the embedded digits and certify it")

    p = sub.add_parser(
        "certify",
        help="certify a dataset with your model: a certified class and L2 radius per input",
        description="Certifies inputs of --data with the smoothed version of --model (Cohen et al.'s "
        "CERTIFY: n0 noisy copies\nselect a class, n fresh ones bound its probability at confidence "
        "1 - alpha; radius sigma * Phi^-1(p_lower)),\nwith a fixed sigma, a sigma per input from "
        "'ddrs optimize-sigma', or one optimised on the fly.\n--memory applies the paper's "
        "memory-based adjustment, which keeps per-input-sigma certificates sound.",
        epilog=_CERTIFY_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _add_common(p)
    g = p.add_argument_group("sigma (exactly one)").add_mutually_exclusive_group(required=True)
    g.add_argument("--sigma", type=_positive, help="one sigma for every input")
    g.add_argument(
        "--sigma-file", type=Path, metavar="FILE", help="a sigma per input from ddrs optimize-sigma"
    )
    g.add_argument("--optimize", action="store_true", help="optimise a sigma per input first (options below)")
    g = p.add_argument_group("certification")
    g.add_argument("--n0", type=_count, default=100, help="noisy copies that select the class")
    g.add_argument("--n", type=_count, default=100_000, help="noisy copies that estimate its probability")
    g.add_argument("--alpha", type=_probability, default=0.001, help="failure probability")
    g.add_argument(
        "--memory",
        action="store_true",
        help="memory-based certification (ddrs_ext.CertificationMemory, inputs in idx order)",
    )
    _add_sigma_options(p, "sigma optimisation (with --optimize)")
    p.set_defaults(run=run_certify)

    p = sub.add_parser(
        "optimize-sigma",
        help="optimise a sigma per input (the paper's Algorithm 1) for 'ddrs certify --sigma-file'",
        description="Chooses a sigma per input of --data by maximising a surrogate of its certified "
        "radius (ddrs_ext.optimize_sigma)\nand writes one row per input. 'surrogate' is the paper's "
        "surrogate radius "
        "sigma/2 (Phi^-1(E_A) - Phi^-1(E_B))\nat the final sigma, estimated by ddrs_ext.surrogate_radius "
        "from --surrogate-samples fresh noise samples.",
        epilog=_OPTIMIZE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _add_common(p)
    _add_sigma_options(p, "sigma optimisation")
    p.add_argument(
        "--surrogate-samples", type=_count, default=1000, help="noise samples for the 'surrogate' column"
    )
    p.set_defaults(run=run_optimize_sigma)

    _add_external(
        sub, "analyze", "ddrs_ext.analyze", "certified accuracy curves and tables from result files"
    )
    return parser


def _add_external(sub, name: str, module_name: str, summary: str) -> None:
    """A subcommand implemented by another module's ``add_arguments`` / ``run`` (skipped if absent)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return
        raise
    p = sub.add_parser(
        name,
        help=summary,
        description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(p)
    p.set_defaults(run=module.run)


# ----------------------------------------------------------------------------- main


def _message(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs ``ddrs`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"ddrs {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"ddrs {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- shared steps


# optimize_sigma's options that have a command-line flag of the same name (keep_prediction's is
# --no-keep-prediction).
_OPTIMIZE_OPTIONS = (
    "iterations",
    "num_samples",
    "lr",
    "estimator",
    "rule",
    "growth",
    "surrogate",
    "clip",
    "sigma_range",
)


def _optimize_defaults() -> dict:
    import inspect

    from ddrs_ext.sigma import optimize_sigma

    params = inspect.signature(optimize_sigma).parameters
    return {k: params[k].default for k in (*_OPTIMIZE_OPTIONS, "keep_prediction")}


def _optimize_options(args) -> dict:
    """optimize_sigma's keyword arguments: its defaults, then --paper's, then the ones given."""
    from ddrs_ext.sigma import PAPER_SETTINGS

    if args.sigma0 is None:
        args.sigma0 = 0.12
    options = _optimize_defaults()
    if args.paper:
        options.update(PAPER_SETTINGS)
    for key in options:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    options["clip"] = tuple(float(v) for v in options["clip"])
    options["sigma_range"] = tuple(float(v) for v in options["sigma_range"])
    if not options["clip"][0] < options["clip"][1]:
        raise ValueError(f"--clip: LOW must be below HIGH, got {options['clip']}")
    if not options["sigma_range"][0] <= args.sigma0 <= options["sigma_range"][1]:
        raise ValueError(f"--sigma0 {args.sigma0} lies outside --sigma-range {options['sigma_range']}")
    if options["estimator"] == "score" and options["num_samples"] < 2:
        raise ValueError("--num-samples must be >= 2 with --estimator score")
    options["probabilities"] = bool(args.probabilities)
    return options


class _Job:
    """What both commands share: the model, the data, the selected inputs, their labels, the classes."""

    def __init__(self, args) -> None:
        import torch

        from ddrs_ext.datasets import data_settings, image_settings, load_dataset
        from ddrs_ext.loading import load_model, model_settings, resolve_device

        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name")
        if not out.parent.exists():
            raise ValueError(f"--out {out}: its folder {out.parent} does not exist")
        self.device = resolve_device(args.device)
        self.model = load_model(args.model, args.checkpoint, self.device)
        self.data = load_dataset(args.data, args.split, args.image_size)
        n = len(self.data)
        if n > _INDEX_LIMIT:
            raise ValueError(f"--data has {n} inputs; at most 2**32 are supported")
        stop = n if args.max is None else min(n, args.max)
        self.selected = list(range(0, stop, args.skip))
        if not self.selected:
            raise ValueError(
                f"no inputs selected: --data has {n} inputs, --max {args.max}, --skip {args.skip}"
            )
        self.num_classes = self._probe()
        labels = self.data.labels[torch.as_tensor(self.selected)]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"input idx {self.selected[i]} has label {int(labels[i])}, outside [0, {self.num_classes}) "
                f"(the model has {self.num_classes} outputs); {int(bad.sum())} selected label(s) out of range"
            )
        self.labels = {i: int(v) for i, v in zip(self.selected, labels.tolist())}
        self.settings = {
            **model_settings(args.model, args.checkpoint),
            **data_settings(args.data, self.data),
            **image_settings(args.image_size),
            "num_classes": self.num_classes,
            "seed": args.seed,
            "skip": args.skip,
            "max": args.max,
        }

    def _probe(self) -> int:
        import torch

        x = self.data.inputs(self.selected[:1]).to(self.device)
        try:
            with torch.no_grad():
                out = self.model(x)
        except Exception as exc:
            raise ValueError(
                f"the model fails on one input of shape {tuple(x.shape)} from --data: {_message(exc)}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the model must return logits of shape (N, classes); for one input it returned {got}"
            )
        return int(out.shape[1])

    def inputs(self, index: list[int]):
        return self.data.inputs(index).to(self.device)


def _chunks(remaining: list[int], fixed: int | None):
    """Yields consecutive slices of ``remaining``; without ``fixed`` their length adapts to the time
    each took (the caller sends the seconds back)."""
    size, start = fixed or 1, 0
    while start < len(remaining):
        chunk = remaining[start : start + size]
        seconds = yield chunk
        start += len(chunk)
        if fixed is None and seconds is not None:
            per_input = max(seconds, 1e-6) / len(chunk)
            size = max(1, min(4 * size, int(_CHUNK_SECONDS / per_input)))


def _progress(args, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="input", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True
    )


def _run_chunks(args, job: _Job, out, desc: str, work) -> None:
    """Calls ``work(index) -> rows`` on chunks of the inputs not yet in ``out`` and writes the rows."""
    import torch

    remaining = [i for i in job.selected if i not in out.done]
    if not remaining:
        print(f"{args.out}: all {len(job.selected)} selected inputs are already done", file=sys.stderr)
        return
    bar = _progress(args, len(remaining), desc)
    try:
        chunks = _chunks(remaining, args.chunk)
        chunk = next(chunks)
        while True:
            start = time.perf_counter()
            index = torch.as_tensor(chunk, dtype=torch.int64)
            rows = work(index)
            per_input = (time.perf_counter() - start) / len(chunk)
            for row in rows:
                out.write({**row, "time": per_input})
            bar.update(len(chunk))
            try:
                chunk = chunks.send(per_input * len(chunk))
            except StopIteration:
                break
    finally:
        bar.close()


def _digest(values: dict[int, float]) -> str:
    text = "\n".join(f"{i}\t{values[i]!r}" for i in sorted(values))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_sigma_file(path: Path, job: _Job) -> dict[int, float]:
    from ddrs_ext.results import read_rows

    header, rows = read_rows(path)
    if "idx" not in header or "sigma" not in header:
        raise ValueError(f"--sigma-file {path}: no idx and sigma columns (header {' '.join(header)!r})")
    found = {row["idx"]: row for row in rows}
    missing = [i for i in job.selected if i not in found]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"--sigma-file {path} has no sigma for {len(missing)} selected input(s): idx {shown}; "
            "finish 'ddrs optimize-sigma' with the same --data/--skip/--max first"
        )
    sigma = {}
    for i in job.selected:
        row = found[i]
        if "label" in row and row["label"] != job.labels[i]:
            raise ValueError(
                f"--sigma-file {path}: idx {i} has label {row['label']}, --data has {job.labels[i]}; "
                "was it made for other data?"
            )
        s = row["sigma"]
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"--sigma-file {path}: idx {i} has sigma {s}; sigmas must be finite and > 0")
        sigma[i] = s
    return sigma


def _summary(path: Path, rows: list[dict]) -> str:
    if not rows:
        return f"{path}: no rows"
    correct = [r for r in rows if r["correct"]]
    acr = sum(r["radius"] for r in correct) / len(rows)
    return (
        f"{path}: {len(rows)} inputs, certified accuracy {len(correct) / len(rows):.3f} at radius 0, "
        f"average certified radius {acr:.4f}"
    )


# ----------------------------------------------------------------------------- commands


def run_certify(args: argparse.Namespace) -> int:
    import torch

    from ddrs_ext.certification import certify
    from ddrs_ext.memory import CertificationMemory
    from ddrs_ext.results import CERTIFY_COLUMNS, ResultFile, certify_rows
    from ddrs_ext.sigma import optimize_sigma

    optimize = None
    if args.optimize:
        optimize = _optimize_options(args)
    elif _sigma_options_given(args):
        raise ValueError("sigma optimisation options (--sigma0, --iterations, ...) need --optimize")
    job = _Job(args)
    fixed_sigma = sigma_of = None
    if args.sigma is not None:
        fixed_sigma = args.sigma
        sigma_setting = {"fixed": args.sigma}
    elif args.sigma_file is not None:
        sigma_of = _read_sigma_file(args.sigma_file, job)
        sigma_setting = {"file": os.path.abspath(args.sigma_file), "digest": _digest(sigma_of)}
    else:
        sigma_setting = {"optimize": {"sigma0": args.sigma0, **optimize}}
    settings = {
        "command": "certify",
        **job.settings,
        "sigma": sigma_setting,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "memory": bool(args.memory),
    }
    with ResultFile(args.out, CERTIFY_COLUMNS, settings) as out:
        memory = None
        if args.memory:
            memory = CertificationMemory()
            done = [row for row in out.done.values()]
            for start in range(0, len(done), 1024):  # the adjusted answers already given, in order
                part = done[start : start + 1024]
                memory.extend(
                    job.inputs([r["idx"] for r in part]),
                    torch.tensor([r["predict"] for r in part], dtype=torch.int64),
                    torch.tensor([r["radius"] for r in part], dtype=torch.float64),
                )

        def work(index):
            x = job.inputs(index.tolist())
            if fixed_sigma is not None:
                sigma = fixed_sigma
            elif sigma_of is not None:
                sigma = torch.tensor([sigma_of[i] for i in index.tolist()], dtype=torch.float64)
            else:
                sigma = optimize_sigma(
                    job.model,
                    x,
                    args.sigma0,
                    **optimize,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    index=index,
                )
            result = certify(
                job.model,
                x,
                sigma,
                n0=args.n0,
                n=args.n,
                alpha=args.alpha,
                batch_size=args.batch_size,
                num_classes=job.num_classes,
                seed=args.seed,
                index=index,
            )
            if memory is not None:
                result = memory.adjust_result(x, result)
            index = index.tolist()
            return certify_rows(result, index, [job.labels[i] for i in index])

        _run_chunks(args, job, out, "certify", work)
        print(_summary(args.out, [out.done[i] for i in job.selected if i in out.done]))
    return 0


def _sigma_options_given(args) -> bool:
    return (
        any(getattr(args, k) is not None for k in _OPTIMIZE_OPTIONS)
        or args.paper
        or args.probabilities
        or args.keep_prediction is not None
        or args.sigma0 is not None
    )


def run_optimize_sigma(args: argparse.Namespace) -> int:
    from ddrs_ext.results import SIGMA_COLUMNS, ResultFile
    from ddrs_ext.sigma import optimize_sigma, surrogate_radius

    options = _optimize_options(args)
    job = _Job(args)
    settings = {
        "command": "optimize-sigma",
        **job.settings,
        "sigma0": args.sigma0,
        **options,
        "surrogate_samples": args.surrogate_samples,
    }
    with ResultFile(args.out, SIGMA_COLUMNS, settings) as out:

        def work(index):
            x = job.inputs(index.tolist())
            sigma = optimize_sigma(
                job.model, x, args.sigma0, **options, batch_size=args.batch_size, seed=args.seed, index=index
            )
            surrogate = surrogate_radius(
                job.model,
                x,
                sigma,
                num_samples=args.surrogate_samples,
                clip=options["clip"],
                probabilities=options["probabilities"],
                batch_size=args.batch_size,
                seed=args.seed,
                index=index,
            )
            return [
                {"idx": i, "label": job.labels[i], "sigma": float(sigma[k]), "surrogate": float(surrogate[k])}
                for k, i in enumerate(index.tolist())
            ]

        _run_chunks(args, job, out, "optimize-sigma", work)
        rows = [out.done[i] for i in job.selected if i in out.done]
        if rows:
            mean_sigma = sum(r["sigma"] for r in rows) / len(rows)
            mean_surrogate = sum(r["surrogate"] for r in rows) / len(rows)
            print(
                f"{args.out}: {len(rows)} inputs, mean sigma {mean_sigma:.4f}, "
                f"mean surrogate {mean_surrogate:.4f}"
            )
    return 0
