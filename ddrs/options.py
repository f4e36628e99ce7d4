"""What the ``ddrs`` commands' parsers share: the parser class (one-line errors, no abbreviations),
the help formatter, argument types, the file formats' help text, and the option groups of the
commands that read a model and data (certify, predict, optimize-sigma).

Imports neither torch nor ddrs_ext: ``ddrs --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from ddrs.docs_links import docs_page

__all__ = [
    "Parser",
    "HelpFormatter",
    "FORMATS",
    "DIST_TIMEOUT",
    "one_line",
    "number",
    "count",
    "non_negative_int",
    "positive",
    "non_negative",
    "probability",
    "seed",
    "set_command",
    "add_model_and_data",
    "check_paths",
    "check_repeated",
    "split_callable",
]

SEED_LIMIT = 2**64
# ddrs_ext.precision.COMPILE_MIN_ROWS (not imported: this module imports no torch)
COMPILE_MIN_ROWS = 2_000_000
COMPILE_CHOICES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
DIST_TIMEOUT = 1800.0  # seconds, --dist-timeout (torch's own default for gloo)


class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (a mistyped or foreign option such as ``--batc`` or one of
    torchrun's is an error, not silently some option it is a prefix of) whose errors are one line,
    ``ddrs certify: error: MESSAGE (see 'ddrs certify --help')``, instead of a usage dump."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        page = docs_page(message)
        where = f"'{self.prog} --help'" + (f" and {page}" if page else "")
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {where})\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks and shows defaults (other than None/False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def one_line(text: object) -> str:
    """``text`` on one line (its lines stripped and joined by spaces)."""
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def set_command(
    p: argparse.ArgumentParser, run: str, check, resumable: bool, uses_torch: bool = True
) -> None:
    """What ``ddrs.cli.main`` needs of a subcommand: ``run`` ("module:function", imported when it
    runs), a ``check`` of its arguments that needs no torch (or None), whether a rerun resumes it, and
    whether its work uses torch (then ddrs_ext is imported first, for its OpenMP wait policy)."""
    p.set_defaults(run=run, check=check, resumable=resumable, uses_torch=uses_torch, usage_error=p.error)


# ----------------------------------------------------------------------------- argument types


def number(kind, *, minimum=None, above=None, below=None, what=""):
    """An argparse type: ``kind(text)`` (finite for floats) within the bounds given."""

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


count = number(int, minimum=1, what="an integer")
non_negative_int = number(int, minimum=0, what="an integer")
positive = number(float, above=0, what="a number")
non_negative = number(float, minimum=0, what="a number")
probability = number(float, above=0, below=1, what="a number")
seed = number(int, minimum=0, below=SEED_LIMIT, what="an integer")


# ----------------------------------------------------------------------------- help text

FORMATS = """\
model (--model, --checkpoint):
  --model module:callable         a function or class that builds the model when called with no
  --model path/to/file.py:callable  arguments (the working directory is importable); with
                                  --checkpoint FILE: its weights, a state_dict or a dict holding one
                                  under "model", "state_dict" or "model_state_dict" (loaded with
                                  torch.load(weights_only=True); DataParallel's "module." prefix
                                  is dropped; Cohen et al.'s checkpoints: below)
  --model model.ts                a TorchScript file (torch.jit.save)
  --model model.pt2               a torch.export program (torch.export.save; export it with a
                                  dynamic batch dimension)
  --checkpoint FILE alone         a checkpoint of python -m ddrs.train_digits
  The model maps a batch of inputs (N, ...) to logits (N, C); C, the number of classes, is read
  from one forward pass. It runs in eval mode on --device.
  Cohen et al.'s checkpoints ({"arch", "state_dict"}, keys "1.module.conv1.weight", ...: their
  model is Sequential(NormalizeLayer, DataParallel(network)) and the NormalizeLayer has no
  weights) load into a --model that builds the bare network (keys "conv1.weight") or
  Sequential(your normalisation, network) (keys "1.conv1.weight"). ddrs feeds inputs in [0, 1]:
  a bare network must then normalise its inputs itself in forward().

data (--data):
  digits                          the embedded digits: inputs (N, 1, 8, 8) in [0, 1], 10 classes;
                                  --split test (497 images), validation (200) or train (1100), as
                                  ddrs_ext.data.load_digits_splits(seed=0)
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
  certify:         idx label predict radius correct time sigma samples   (predict -1: abstained;
                   samples: model evaluations spent on the input; --sigma-levels adds the
                   columns level radius_selector radius_classifier, level -1 and sigma nan
                   where the selector abstained)
  predict:         idx label predict correct time sigma          (predict -1: abstained)
  optimize-sigma:  idx label sigma surrogate time
  time is the wall time per input (h:mm:ss.ffffff); radii and sigmas are written exactly. The
  settings that determine the rows are kept in <out>.settings.json. Running the same command
  again resumes after the last complete row and gives the same rows as one uninterrupted run
  (noise depends only on --seed and each input's idx; not on --batch-size, --chunk or threads,
  so these may change between runs); a resume with other settings is refused.

Cohen et al.'s spellings --N0, --N and --batch are accepted for --n0, --n and --batch-size.
"""


# ----------------------------------------------------------------------------- model, data, run


class Repeatable(argparse.Action):
    """``--model`` / ``--checkpoint``: the first value in ``dest``, every value in ``dest + "s"``
    (``ddrs certify --sigma-levels`` takes one per level: an expert per sigma; other uses of a
    repeated option are refused by :func:`check_repeated`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        every = [*getattr(namespace, self.dest + "s", []), values]
        setattr(namespace, self.dest + "s", every)
        if len(every) == 1:
            setattr(namespace, self.dest, values)


def check_repeated(args: argparse.Namespace) -> None:
    """--model and --checkpoint once, except with --sigma-levels (once per level: an expert each)."""
    for option, values in (("--model", args.models), ("--checkpoint", args.checkpoints)):
        if len(values) > 1 and getattr(args, "sigma_levels", None) is None:
            raise ValueError(
                f"{option} given {len(values)} times; give it once (repeated only with --sigma-levels, "
                "once per level: one expert per sigma)"
            )


def split_callable(spec: str) -> tuple[str, str] | None:
    """``(module or .py file, attribute path)`` for ``module:callable`` / ``file.py:callable``, else None
    (a --model given as a file: TorchScript or .pt2)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not _CALLABLE.match(attr):
        return None
    if target.endswith(".py") or _CALLABLE.match(target):
        return target, attr
    return None


def _check_model_file(spec: str, option: str) -> None:
    parts = split_callable(spec)
    path = parts[0] if parts is not None else spec
    if (parts is None or path.endswith(".py")) and not os.path.exists(path):
        raise FileNotFoundError(f"{option}: {path}: no such file")


def _check_file(path: os.PathLike | str, option: str, directory: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path}{directory}")


def check_paths(args: argparse.Namespace) -> None:
    """The files and folders a command's arguments name (--out's folder, --model and --checkpoint
    files, --data, --sigma-file, the selector's), checked before torch is imported so that a wrong
    path answers at once, with the message the command would give later: ``FileNotFoundError`` or
    another ``OSError``, or ``ValueError`` for --out."""
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    if not out.parent.exists():
        raise ValueError(f"--out {out}: its folder {out.parent} does not exist")
    for spec in args.models:
        _check_model_file(spec, "--model")
    for checkpoint in args.checkpoints:
        _check_file(checkpoint, "--checkpoint", " is a folder, not a file")
    if args.data != "digits" and not os.path.exists(args.data):
        raise FileNotFoundError(f"--data: {args.data}: no such file or folder (or use --data digits)")
    if getattr(args, "sigma_file", None) is not None:
        _check_file(args.sigma_file, "--sigma-file", ": is a directory, not a result file")
    if getattr(args, "selector", None) is not None:
        _check_model_file(args.selector, "--selector")
    if getattr(args, "selector_checkpoint", None) is not None:
        _check_file(args.selector_checkpoint, "--selector-checkpoint", " is a folder, not a file")


def add_model_and_data(p: argparse.ArgumentParser) -> None:
    """The option groups of the commands that evaluate a model on data: model and data, selection,
    the run (--out, --seed, --device, batches), cheaper forward passes and several processes."""
    g = p.add_argument_group("model and data (formats below)")
    g.add_argument(
        "--model",
        metavar="SPEC",
        action=Repeatable,
        help="module:callable, file.py:callable, or a TorchScript/.pt2 file",
    )
    g.add_argument(
        "--checkpoint",
        metavar="FILE",
        action=Repeatable,
        help="weights for --model, or a train_digits checkpoint alone",
    )
    p.set_defaults(models=[], checkpoints=[], check_paths=check_paths)
    g.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="digits, a CIFAR-10 folder, a .pt file or an image folder",
    )
    g.add_argument(
        "--split",
        choices=("train", "validation", "test"),
        default=None,
        help="split of digits or CIFAR-10 (default: test; validation: digits only)",
    )
    g.add_argument(
        "--image-size",
        type=count,
        default=None,
        metavar="S",
        help="image folders: resize (shorter side round(S*256/224)) and centre-crop to SxS",
    )
    g.add_argument("--skip", type=count, default=1, metavar="K", help="take every K-th input (idx %% K == 0)")
    g.add_argument("--max", type=non_negative_int, default=None, metavar="M", help="only inputs with idx < M")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, type=Path, metavar="FILE", help="result file (created or resumed)")
    g.add_argument(
        "--seed", type=seed, default=0, help="noise seed; with each input's idx it fixes all noise"
    )
    g.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)",
    )
    g.add_argument(
        "--batch-size",
        "--batch",
        type=count,
        default=1000,
        metavar="ROWS",
        help="noisy copies per forward pass",
    )
    g.add_argument(
        "--chunk",
        type=count,
        default=None,
        metavar="INPUTS",
        help="inputs per library call; rows are written after each call (default: enough inputs to "
        "fill a forward pass, more while a call takes under 3 s)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_argument_group(
        "cheaper forward passes (ddrs_ext.Evaluated)",
        "--compile and --channels-last evaluate the same function (logits equal up to rounding): on by\n"
        'default where they pay, kept in the settings file under "evaluation", not compared on a resume.\n'
        "--autocast evaluates another function (bfloat16 or float16 arithmetic): never on by default; the\n"
        "certificates are then about the model evaluated that way (deploy it that way), and a resume must\n"
        "match it. Where torch cannot compile or autocast, the model is evaluated without it and a\n"
        "one-line note says so.",
    )
    g.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        metavar="MODE",
        help="torch.compile the model. auto: on the CPU, when the run evaluates at least "
        f"{COMPILE_MIN_ROWS:,} noisy copies (inputs x (n0 + n), ...), compile (mode default) and give "
        "a convolutional model channels-last weights, which measured faster overall on the digits; "
        "otherwise nothing. off: never. Or a torch.compile mode: default, reduce-overhead (CUDA "
        "graphs), max-autotune",
    )
    g.add_argument(
        "--autocast",
        choices=("bf16", "fp16"),
        default=None,
        help="evaluate the model under torch.autocast in bfloat16 or float16: faster where the CPU or GPU "
        "has those instructions (a note says when it has not) and another function (with --optimize: "
        "use --estimator score, forward-mode autograd does not run under autocast)",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="give the model its weights and 4-d inputs in channels-last memory format (--compile auto "
        "does so when it compiles a model with 4-d weights)",
    )
    g = p.add_argument_group(
        "several processes",
        "torchrun --nproc-per-node N -m ddrs -- COMMAND ... shares the inputs out over N processes\n"
        "(one GPU each with --device cuda) and merges their rows into --out in idx order; the -- stops\n"
        "torchrun from taking --n, --max, ... for abbreviations of its own options.",
    )
    g.add_argument(
        "--dist-timeout",
        type=positive,
        default=DIST_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others at a collective call (joining, "
        "agreeing on the settings, handing rows to rank 0) before it stops with an error; must exceed "
        "the time between the first and the last rank finishing its share",
    )
