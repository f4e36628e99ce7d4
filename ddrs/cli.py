"""The ddrs command line: certify a dataset with your model, optimise a sigma per input, predict,
analyse result files, run a demo.

    ddrs certify --model mymodels:build --checkpoint model.pt --data cifar-10-batches-py \\
        --sigma 0.25 --skip 20 --out certify.tsv
    ddrs optimize-sigma --model mymodels:build --checkpoint model.pt --data data.pt --out sigma.tsv
    ddrs certify ... --sigma-file sigma.tsv --memory --out certify_dd.tsv

Every command writes one row per input as soon as it is done and resumes an interrupted run when
given the same command again. User errors end the command with a one-line message on stderr and
exit status 2; an interrupt (Ctrl-C) exits with 130.

This module builds the parser and checks the arguments without importing torch or ddrs_ext, so that
--help and argument errors answer at once; a command's work (ddrs.commands, ddrs.demo, ddrs.analyze)
is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "parse_args"]

_SEED_LIMIT = 2**64

# ddrs_ext.sigma's names and optimize_sigma's defaults, written out so that the parser is built
# without importing torch (tests/test_cli.py holds them equal to the library's).
ESTIMATORS = ("reparam", "score")
RULES = ("ascent", "bisect")
SURROGATES = ("paper", "certify")
PAPER_SETTINGS = {
    "iterations": 900,
    "lr": 0.04,
    "num_samples": 100,
    "estimator": "reparam",
    "rule": "ascent",
    "clip": (0.02, 0.98),
}
LIBRARY_OPTIMIZE_DEFAULTS = {
    "iterations": 16,
    "num_samples": 512,
    "lr": 0.04,
    "estimator": "reparam",
    "rule": "bisect",
    "growth": 2.0,
    "surrogate": "paper",
    "clip": (0.02, 0.98),
    "sigma_range": (1e-3, 10.0),
    "keep_prediction": True,
}
# The command line's own choice, from measurements on the digits (README, "Which --optimize
# defaults"): the surrogate that matches CERTIFY's radius certified more than the paper's for both of
# the demo's models (ACR +0.04 to +0.10); the reparameterisation gradient certified a little more
# than the score estimator (+0.004, +0.018) for a small share of a certification's time, so it
# stays. --paper gives the published procedure.
OPTIMIZE_DEFAULTS = {**LIBRARY_OPTIMIZE_DEFAULTS, "surrogate": "certify"}
SIGMA0 = 0.12  # the paper's starting sigma (its CIFAR-10 models' smallest training sigma)
DIST_TIMEOUT = 1800.0  # seconds, --dist-timeout (torch's own default for gloo)
SEQUENTIAL_TOLERANCE = 0.1  # ddrs_ext.sequential.DEFAULT_TOLERANCE

# ddrs demo: the full run and --quick's tiny one (explicit options win over either)
DEMO_TEST_SIZE = 497  # the embedded digits' test split (ddrs_ext.data.load_digits_split's default)
DEMO_DEFAULTS = {
    "epochs": 15,
    "count": DEMO_TEST_SIZE,
    "n0": 100,
    "n": 10_000,
    "sigma_samples": 512,
    "sigma_iterations": 16,
    "label_n0": 64,  # ddrs.selector.LABEL_SETTINGS
    "label_n": 512,
}
DEMO_QUICK = {
    "epochs": 1,
    "count": 20,
    "n0": 20,
    "n": 200,
    "sigma_samples": 64,
    "sigma_iterations": 4,
    "label_n0": 8,
    "label_n": 32,
}

ANALYZE_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)  # ddrs.analyze.DEFAULT_RADII


class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (a mistyped or foreign option such as ``--batc`` or one of
    torchrun's is an error, not silently some option it is a prefix of) whose errors are one line,
    ``ddrs certify: error: MESSAGE (see 'ddrs certify --help')``, instead of a usage dump."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks and shows defaults (other than None/False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _one_line(text: object) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


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
_non_negative = _number(float, minimum=0, what="a number")
_probability = _number(float, above=0, below=1, what="a number")
_seed = _number(int, minimum=0, below=_SEED_LIMIT, what="an integer")


# ----------------------------------------------------------------------------- help texts

_FORMATS = """\
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

_CERTIFY_EXAMPLES = """
examples:
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --out digits.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --sigma 0.25 --skip 20 --n 100000 --out cifar_025.tsv
  ddrs optimize-sigma --model mymodels:resnet110 --checkpoint ckpt.pth.tar \\
      --data cifar-10-batches-py --skip 20 --sigma0 0.12 --out sigma.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --skip 20 --sigma-file sigma.tsv --memory --out cifar_dd.tsv
  ddrs certify --model model.ts --data test.pt --optimize --sigma0 0.25 --max 100 --out dd.tsv
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential --out seq.tsv
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential --radius 0.5 \
      --n 100000 --out seq_r05.tsv
  ddrs certify --checkpoint dd.pt --selector-checkpoint selector.pt --data digits \
      --sigma-levels 0.25 0.5 1 --selector-sigma 0.5 --out dual.tsv
"""

_OPTIMIZE_EXAMPLES = """
examples:
  ddrs optimize-sigma --checkpoint digits.pt --data digits --out sigma.tsv
  ddrs optimize-sigma --model mymodels:resnet110 --checkpoint ckpt.pth.tar \\
      --data cifar-10-batches-py --skip 20 --paper --out sigma_paper.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --skip 20 --sigma-file sigma_paper.tsv --memory --out certify_paper.tsv
"""

_PREDICT_EXAMPLES = """
examples:
  ddrs predict --checkpoint digits.pt --data digits --sigma 0.25 --out digits_predict.tsv
  ddrs predict --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --sigma 0.25 --skip 20 --N 100000 --out cifar_predict.tsv
"""

_OPTIMIZE_WHY = """\
Defaults of the sigma optimisation: 16 bisection steps of 512 noise samples from --sigma0, with the
reparameterisation gradient (through the model), on the surrogate that matches CERTIFY's radius,
sigma * Phi^-1(E_A), not the paper's. On the digits demo's two models that surrogate certified more
(average certified radius +0.04 and +0.10) and the reparameterisation gradient a little more than
the score estimator (+0.004, +0.018), which needs forward passes only and is several times faster
(README: "Which --optimize defaults"). --paper gives the published procedure instead (900 plain
ascent steps of 100 samples, the paper's surrogate, the reparameterisation gradient).
"""


# ----------------------------------------------------------------------------- options


class _Repeatable(argparse.Action):
    """``--model`` / ``--checkpoint``: the first value in ``dest``, every value in ``dest + "s"``
    (``ddrs certify --sigma-levels`` takes one per level: an expert per sigma; other uses of a
    repeated option are refused by :func:`_check_repeated`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        every = [*getattr(namespace, self.dest + "s", []), values]
        setattr(namespace, self.dest + "s", every)
        if len(every) == 1:
            setattr(namespace, self.dest, values)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (formats below)")
    g.add_argument(
        "--model",
        metavar="SPEC",
        action=_Repeatable,
        help="module:callable, file.py:callable, or a TorchScript/.pt2 file",
    )
    g.add_argument(
        "--checkpoint",
        metavar="FILE",
        action=_Repeatable,
        help="weights for --model, or a train_digits checkpoint alone",
    )
    p.set_defaults(models=[], checkpoints=[])
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
    g.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)",
    )
    g.add_argument(
        "--batch-size",
        "--batch",
        type=_count,
        default=1000,
        metavar="ROWS",
        help="noisy copies per forward pass",
    )
    g.add_argument(
        "--chunk",
        type=_count,
        default=None,
        metavar="INPUTS",
        help="inputs per library call; rows are written after each call (default: enough inputs to "
        "fill a forward pass, more while a call takes under 3 s)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_argument_group(
        "cheaper forward passes",
        "The model is then certified as evaluated that way: deploy it that way (ddrs_ext.Evaluated).",
    )
    g.add_argument(
        "--autocast",
        choices=("bf16", "fp16"),
        default=None,
        help="evaluate the model under torch.autocast in bfloat16 or float16 (with --optimize: use "
        "--estimator score, forward-mode autograd does not run under autocast)",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="give the model its weights and 4-d inputs in channels-last memory format",
    )
    g.add_argument(
        "--compile",
        choices=("default", "reduce-overhead", "max-autotune"),
        default=None,
        metavar="MODE",
        help="torch.compile the model with this mode (reduce-overhead: CUDA graphs); "
        "one of default, reduce-overhead, max-autotune",
    )
    g = p.add_argument_group(
        "several processes",
        "torchrun --nproc-per-node N -m ddrs -- COMMAND ... shares the inputs out over N processes\n"
        "(one GPU each with --device cuda) and merges their rows into --out in idx order; the -- stops\n"
        "torchrun from taking --n, --max, ... for abbreviations of its own options.",
    )
    g.add_argument(
        "--dist-timeout",
        type=_positive,
        default=DIST_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others at a collective call (joining, "
        "agreeing on the settings, handing rows to rank 0) before it stops with an error; must exceed "
        "the time between the first and the last rank finishing its share",
    )


def _add_sigma_choice(p: argparse.ArgumentParser, optimize: bool) -> None:
    g = p.add_argument_group("sigma (exactly one)").add_mutually_exclusive_group(required=True)
    g.add_argument("--sigma", type=_positive, help="one sigma for every input")
    g.add_argument(
        "--sigma-file", type=Path, metavar="FILE", help="a sigma per input from ddrs optimize-sigma"
    )
    if optimize:
        g.add_argument(
            "--optimize", action="store_true", help="optimise a sigma per input first (options below)"
        )
        g.add_argument(
            "--sigma-levels",
            nargs="+",
            type=_positive,
            metavar="S",
            help="dual certification: a smoothed --selector picks one of these sigmas (increasing) per "
            "input and certifies its choice (options below)",
        )


def _add_sigma_options(p: argparse.ArgumentParser, title: str) -> None:
    d = OPTIMIZE_DEFAULTS
    g = p.add_argument_group(title)
    g.add_argument("--sigma0", type=_positive, help=f"starting sigma (default {SIGMA0:g}, the paper's)")
    g.add_argument(
        "--paper",
        action="store_true",
        help="the published procedure as the authors' OptimzeSigma.py runs it, ddrs_ext.PAPER_SETTINGS ("
        + ", ".join(f"{k} {v}" for k, v in PAPER_SETTINGS.items())
        + ", surrogate paper); options given explicitly override it (--paper --clip 0.001 0.999 is "
        "their run_optimization_dataset.py, ddrs_ext.PAPER_DATASET_SETTINGS)",
    )
    g.add_argument(
        "--iterations", type=_non_negative_int, help=f"steps per input (default {d['iterations']})"
    )
    g.add_argument("--num-samples", type=_count, help=f"noise samples per step (default {d['num_samples']})")
    g.add_argument("--lr", type=_positive, help=f"ascent step size, --rule ascent (default {d['lr']})")
    g.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help=f"derivative in sigma: reparam (through the model, the paper's) or score (forward passes "
        f"only, several times faster) (default {d['estimator']})",
    )
    g.add_argument("--rule", choices=RULES, help=f"update rule (default {d['rule']})")
    g.add_argument("--growth", type=_number(float, above=1), help=f"bisection factor (default {d['growth']})")
    g.add_argument(
        "--surrogate",
        choices=SURROGATES,
        help="radius surrogate maximised: certify, sigma * Phi^-1(E_A), or paper, "
        f"sigma/2 (Phi^-1(E_A) - Phi^-1(E_B)) (default {d['surrogate']})",
    )
    g.add_argument(
        "--clip",
        nargs=2,
        type=_probability,
        metavar=("LOW", "HIGH"),
        help=f"clip of E_A, E_B (default {d['clip'][0]} {d['clip'][1]})",
    )
    g.add_argument(
        "--sigma-range",
        nargs=2,
        type=_positive,
        metavar=("LOW", "HIGH"),
        help=f"sigma stays inside (default {d['sigma_range'][0]:g} {d['sigma_range'][1]:g})",
    )
    g.add_argument(
        "--no-keep-prediction",
        dest="keep_prediction",
        action="store_false",
        default=None,
        help="(bisection) let sigma move to where the top class changes or falls below 1/2",
    )
    g.add_argument("--probabilities", action="store_true", help="the model returns probabilities, not logits")


def _add_sequential_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "sequential certification (ddrs_ext.certify_sequential)",
        "--n is then the most estimation samples an input may use; the column samples says how many\n"
        "model evaluations each input took (selection included).",
    )
    g.add_argument(
        "--sequential",
        action="store_true",
        help="estimate in rounds of doubling size and stop each input as soon as its certificate is "
        "settled, with a bound valid at every round at once: the same kind of certificate from fewer "
        "model evaluations (column samples)",
    )
    m = g.add_mutually_exclusive_group()
    m.add_argument(
        "--radius",
        type=_non_negative,
        metavar="R",
        help="stop an input as soon as radius R is certified or out of reach (default: curve mode, "
        "the largest radius it can get, within --tolerance)",
    )
    m.add_argument(
        "--tolerance",
        type=_non_negative,
        metavar="T",
        help="curve mode: stop an input once its radius can grow by at most this fraction before --n "
        f"(default {SEQUENTIAL_TOLERANCE:g}; 0: run every input that can still certify to --n)",
    )


def _add_selector_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "dual certification (--sigma-levels: ddrs_ext.certify_dual; sound without --memory)",
        "A selector model with one output per sigma level, smoothed at --selector-sigma, picks each\n"
        "input's level and certifies a radius within which its choice is constant; the model is then\n"
        "certified at the chosen level (--n0, --n); the radius is the smaller of the two, and the\n"
        "selector's abstentions abstain. --model/--checkpoint may be given once per level (in level\n"
        "order): one expert per level. A selector for the digits: python -m ddrs.train_digits\n"
        "--selector-for CHECKPOINT.",
    )
    g.add_argument(
        "--selector",
        metavar="SPEC",
        help="the selector, given as --model is (module:callable, file.py:callable, TorchScript/.pt2)",
    )
    g.add_argument(
        "--selector-checkpoint",
        metavar="FILE",
        help="weights for --selector, or alone a selector checkpoint of python -m ddrs.train_digits "
        "--selector-for",
    )
    g.add_argument("--selector-sigma", type=_positive, metavar="S", help="the selector's own fixed sigma")
    g.add_argument(
        "--alpha-selector",
        type=_probability,
        metavar="A",
        help="the selector's share of --alpha (default: half of it); the model gets the rest",
    )


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


def optimize_options(args: argparse.Namespace) -> dict:
    """optimize_sigma's keyword arguments: the command line's defaults, then --paper's (the published
    procedure, on the paper's surrogate), then the ones given. Sets ``args.sigma0`` when unset."""
    if args.sigma0 is None:
        args.sigma0 = SIGMA0
    options = dict(OPTIMIZE_DEFAULTS)
    if args.paper:
        options.update(PAPER_SETTINGS, surrogate="paper")
    for key in (*_OPTIMIZE_OPTIONS, "keep_prediction"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    options["clip"] = tuple(float(v) for v in options["clip"])
    options["sigma_range"] = tuple(float(v) for v in options["sigma_range"])
    if not options["clip"][0] < options["clip"][1]:
        raise ValueError(f"--clip: LOW must be below HIGH, got {options['clip'][0]} {options['clip'][1]}")
    if not options["sigma_range"][0] <= options["sigma_range"][1]:
        raise ValueError("--sigma-range: LOW must not exceed HIGH")
    if not options["sigma_range"][0] <= args.sigma0 <= options["sigma_range"][1]:
        low, high = options["sigma_range"]
        raise ValueError(f"--sigma0 {args.sigma0:g} lies outside --sigma-range {low:g} {high:g}")
    if options["estimator"] == "score" and options["num_samples"] < 2:
        raise ValueError("--num-samples must be >= 2 with --estimator score")
    options["probabilities"] = bool(args.probabilities)
    return options


def _sigma_options_given(args: argparse.Namespace) -> bool:
    return (
        any(getattr(args, k) is not None for k in _OPTIMIZE_OPTIONS)
        or args.paper
        or args.probabilities
        or args.keep_prediction is not None
        or args.sigma0 is not None
    )


def _check_certify(args: argparse.Namespace) -> None:
    args.optimize_options = None
    if args.optimize:
        args.optimize_options = optimize_options(args)
    elif _sigma_options_given(args):
        raise ValueError("sigma optimisation options (--sigma0, --iterations, ...) need --optimize")
    _check_sequential(args)
    _check_dual(args)


def _check_repeated(args: argparse.Namespace) -> None:
    """--model and --checkpoint once, except with --sigma-levels (once per level: an expert each)."""
    for option, values in (("--model", args.models), ("--checkpoint", args.checkpoints)):
        if len(values) > 1 and getattr(args, "sigma_levels", None) is None:
            raise ValueError(
                f"{option} given {len(values)} times; give it once (repeated only with --sigma-levels, "
                "once per level: one expert per sigma)"
            )


def _check_sequential(args: argparse.Namespace) -> None:
    if not args.sequential:
        if args.radius is not None or args.tolerance is not None:
            raise ValueError("--radius and --tolerance need --sequential")
        return
    if args.sigma_levels is not None:
        raise ValueError(
            "--sequential does not apply to --sigma-levels (dual certification runs CERTIFY for the "
            "selector and the model)"
        )
    if args.radius is None and args.tolerance is None:
        args.tolerance = SEQUENTIAL_TOLERANCE


def _check_dual(args: argparse.Namespace) -> None:
    """--sigma-levels with its selector options, and one expert per level if --model repeats."""
    options = ("selector", "selector_checkpoint", "selector_sigma", "alpha_selector")
    if args.sigma_levels is None:
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for dual certification, with --sigma-levels")
        return
    levels = args.sigma_levels
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(
            f"--sigma-levels must be strictly increasing, got {' '.join(f'{v:g}' for v in levels)}"
        )
    if args.selector is None and args.selector_checkpoint is None:
        raise ValueError("--sigma-levels needs a selector: --selector SPEC and/or --selector-checkpoint FILE")
    if args.selector_sigma is None:
        raise ValueError("--sigma-levels needs --selector-sigma (the selector's own sigma)")
    if args.alpha_selector is not None and not args.alpha_selector < args.alpha:
        raise ValueError(
            f"--alpha-selector {args.alpha_selector:g} must be below --alpha {args.alpha:g} "
            "(the model gets the rest)"
        )
    if args.memory:
        raise ValueError(
            "--memory does not apply to --sigma-levels: the dual certificate is sound on its own"
        )
    K, m, c = len(levels), len(args.models), len(args.checkpoints)
    if max(m, c) > 1 and (max(m, c) != K or m not in (0, 1, K) or c not in (0, 1, K) or (m, c) == (K, 1)):
        raise ValueError(
            f"one expert per level: give --model and/or --checkpoint once, or once per level ({K} levels); "
            f"got {m} --model and {c} --checkpoint"
        )


def _check_optimize_sigma(args: argparse.Namespace) -> None:
    args.optimize_options = optimize_options(args)


def _check_demo(args: argparse.Namespace) -> None:
    """Fills the options left unset from the defaults (or --quick's) and checks them together."""
    for name, value in (DEMO_QUICK if args.quick else DEMO_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.count > DEMO_TEST_SIZE:
        raise ValueError(f"--count must lie in 1..{DEMO_TEST_SIZE} (the test split's size), got {args.count}")
    if args.sigma > args.sigma_max:
        raise ValueError(f"--sigma {args.sigma:g} exceeds --sigma-max {args.sigma_max:g}")


def _check_analyze(args: argparse.Namespace) -> None:
    if args.labels is not None and len(args.labels) != len(args.files):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.files)} files")
    if args.max_radius == 0:
        raise ValueError("--max-radius must be > 0")


# ----------------------------------------------------------------------------- the parser


def _command(p: argparse.ArgumentParser, run: str, check, resumable: bool) -> None:
    """What ``main`` needs of a subcommand: ``run`` ("module:function", imported when it runs), a
    ``check`` of its arguments that needs no torch (or None), whether a rerun resumes it."""
    p.set_defaults(run=run, check=check, resumable=resumable, usage_error=p.error)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train two small models on the embedded digits, certify them: fixed vs data-dependent sigma",
        description="""\
Fixed against data-dependent noise levels, end to end on the embedded digits data (no download).

Trains two small CNNs on the digits (one with Gaussian augmentation at a fixed sigma, one with a
data-dependent sigma per training example: the paper's scheme, ascending the surrogate that
matches CERTIFY's radius, sigma capped at --sigma-max), optimises a sigma for every test input,
certifies the test set with each model and each choice of sigma (with and without the
memory-based adjustment that keeps per-input certificates sound), and prints certified accuracy
at several radii and the average certified radius, then whether data-dependent sigma helps.
Two more rows: the fixed-sigma model certified sequentially (certify_sequential, curve mode:
the model evaluations it saves are shown in a second table), and the data-dependent model with a
dual certificate (certify_dual: a selector, trained on the labels best_level gives the training
inputs, picks sigma among sigma*1, 2, 4 capped at --sigma-max, certified at selector sigma
2*sigma; alpha split in halves). About 7 minutes on 2 CPU cores with the defaults, and about 2
more for those two rows; --quick runs tiny settings in well under a minute.

Everything goes into the --out folder (default ddrs_demo, in the current folder): the
checkpoints (two models and the selector), one result file per table row (the tab-separated
format 'ddrs analyze' reads), table.md and curves.png. A re-run over the same folder resumes:
it reuses checkpoints trained with the same settings and skips inputs already certified, and
refuses (with an error) a folder started with other settings; --fresh deletes the demo's files
there first.""",
        epilog="examples:\n  ddrs demo\n  ddrs demo --quick --out /tmp/ddrs_demo\n"
        "  ddrs demo --count 200 --seed 1 --sigma 0.5 --sigma-max 2 --out ddrs_demo_s05\n",
        formatter_class=_HelpFormatter,
    )
    full, quick = DEMO_DEFAULTS, DEMO_QUICK

    def preset(name: str) -> str:
        return f"(default {full[name]}; --quick: {quick[name]})"

    p.add_argument("--out", type=Path, default=Path("ddrs_demo"), help="output folder")
    p.add_argument(
        "--fresh", action="store_true", help="delete the demo's files in --out first instead of resuming"
    )
    p.add_argument("--quick", action="store_true", help="tiny settings: a whole run in seconds")
    p.add_argument("--sigma", type=_positive, default=0.25, help="fixed sigma, and sigma0")
    p.add_argument(
        "--sigma-max",
        type=_positive,
        default=1.0,
        help="upper end of every per-input sigma, in training and at test",
    )
    p.add_argument("--epochs", type=_count, help=f"training epochs of each model {preset('epochs')}")
    p.add_argument(
        "--count", type=_count, help=f"test inputs to certify, the first of the test split {preset('count')}"
    )
    p.add_argument("--n0", "--N0", type=_count, help=f"selection samples per input {preset('n0')}")
    p.add_argument("--n", "--N", type=_count, help=f"estimation samples per input {preset('n')}")
    p.add_argument("--alpha", type=_probability, default=0.001, help="failure probability")
    p.add_argument(
        "--sigma-samples",
        type=_count,
        help=f"noise samples per step of the test-time sigma optimisation {preset('sigma_samples')}",
    )
    p.add_argument(
        "--sigma-iterations",
        type=_count,
        help=f"steps of the test-time sigma optimisation {preset('sigma_iterations')}",
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="score",
        help="gradient estimator of the test-time sigma optimisation",
    )
    p.add_argument(
        "--label-n0",
        type=_count,
        help=f"selection samples per level of the selector's training labels {preset('label_n0')}",
    )
    p.add_argument(
        "--label-n",
        type=_count,
        help=f"estimation samples per level of the selector's training labels {preset('label_n')}",
    )
    p.add_argument(
        "--seed",
        type=_number(int, minimum=0, below=2**32, what="an integer"),
        default=0,
        help="data split, training and noise",
    )
    p.add_argument("--batch-size", "--batch", type=_count, default=2000, help="rows per forward pass")
    _command(p, run="ddrs.demo:run", check=_check_demo, resumable=True)


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="certified accuracy curves and tables from result files",
        description="""\
Certified accuracy and average certified radius of certification result files, as tables and plots.

Reads the tab-separated result files that ddrs certify writes (and Cohen et al.'s, which lack the
sigma column). Certified accuracy at radius r is the fraction of rows with correct == 1 and
radius >= r (an abstention is never correct); the average certified radius (ACR) is the mean of
radius * correct over all rows.""",
        epilog="examples:\n"
        '  ddrs analyze fixed.tsv dd.tsv --labels "fixed sigma" "data-dependent" --plot curves.png\n'
        "  ddrs analyze results/*.tsv --radii 0 0.5 1 1.5 2 --latex --output table.tex\n",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="certification result files")
    p.add_argument(
        "--labels", nargs="+", metavar="LABEL", help="one row label per file (default: the file names' stems)"
    )
    p.add_argument(
        "--radii",
        nargs="+",
        type=_non_negative,
        default=list(ANALYZE_RADII),
        metavar="R",
        help="radii of the table's columns (default: " + " ".join(f"{r:g}" for r in ANALYZE_RADII) + ")",
    )
    p.add_argument("--latex", action="store_true", help="print a LaTeX (booktabs) table, not markdown")
    p.add_argument(
        "--output",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="also write the table to FILE: LaTeX if it ends in .tex, markdown otherwise (repeatable)",
    )
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a plot of certified accuracy vs radius")
    p.add_argument("--max-radius", type=_non_negative, help="right end of the plot's radius axis")
    p.add_argument("--title", help="the plot's title")
    _command(p, run="ddrs.analyze:run", check=_check_analyze, resumable=False)


def build_parser() -> argparse.ArgumentParser:
    """The ``ddrs`` parser (imports neither torch nor ddrs_ext)."""
    parser = Parser(
        prog="ddrs",
        description="Data Dependent Randomized Smoothing (Alfarra et al., UAI 2022) from the command line:\n"
        "certify a dataset with your model at a fixed sigma or a sigma per input, optimise those sigmas,\n"
        "predict, analyse the result files. Run 'ddrs COMMAND --help' for a command's options, file\n"
        "formats and examples.",
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_demo(sub)

    p = sub.add_parser(
        "certify",
        help="certify a dataset with your model: a certified class and L2 radius per input",
        description="Certifies inputs of --data with the smoothed version of --model (Cohen et al.'s "
        "CERTIFY: n0 noisy copies\nselect a class, n fresh ones bound its probability at confidence "
        "1 - alpha; radius sigma * Phi^-1(p_lower)),\nwith a fixed sigma, a sigma per input from "
        "'ddrs optimize-sigma', or one optimised on the fly.\n--memory applies the paper's "
        "memory-based adjustment, which keeps per-input-sigma certificates sound.\n--sequential "
        "stops each input as soon as its certificate is settled (fewer model evaluations).\n"
        "--sigma-levels: dual certification, a certified selector picks the sigma (sound without a "
        "memory).",
        epilog=_FORMATS + "\n" + _OPTIMIZE_WHY + _CERTIFY_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    _add_common(p)
    _add_sigma_choice(p, optimize=True)
    g = p.add_argument_group("certification")
    g.add_argument("--n0", "--N0", type=_count, default=100, help="noisy copies that select the class")
    g.add_argument(
        "--n", "--N", type=_count, default=100_000, help="noisy copies that estimate its probability"
    )
    g.add_argument("--alpha", type=_probability, default=0.001, help="failure probability")
    g.add_argument(
        "--memory",
        action="store_true",
        help="memory-based certification (ddrs_ext.CertificationMemory, inputs in idx order)",
    )
    _add_sequential_options(p)
    _add_selector_options(p)
    _add_sigma_options(p, "sigma optimisation (with --optimize)")
    _command(p, run="ddrs.commands:run_certify", check=_check_certify, resumable=True)

    p = sub.add_parser(
        "optimize-sigma",
        help="optimise a sigma per input (the paper's Algorithm 1) for 'ddrs certify --sigma-file'",
        description="Chooses a sigma per input of --data by maximising a surrogate of its certified "
        "radius (ddrs_ext.optimize_sigma)\nand writes one row per input. The 'surrogate' column is the "
        "paper's surrogate radius sigma/2 (Phi^-1(E_A) - Phi^-1(E_B))\nat the final sigma, estimated by "
        "ddrs_ext.surrogate_radius from --surrogate-samples fresh noise samples.",
        epilog=_FORMATS + "\n" + _OPTIMIZE_WHY + _OPTIMIZE_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    _add_common(p)
    _add_sigma_options(p, "sigma optimisation")
    p.add_argument(
        "--surrogate-samples", type=_count, default=1000, help="noise samples for the 'surrogate' column"
    )
    _command(p, run="ddrs.commands:run_optimize_sigma", check=_check_optimize_sigma, resumable=True)

    p = sub.add_parser(
        "predict",
        help="the smoothed classifier's prediction per input (Cohen et al.'s PREDICT), or an abstention",
        description="Predicts the class of every input of --data with the smoothed version of --model "
        "(Cohen et al.'s PREDICT:\nthe top class among n noisy copies, or an abstention (-1) when a "
        "binomial test of the top two counts\ncannot tell them apart at level alpha; a returned class is "
        "wrong with probability at most alpha).",
        epilog=_FORMATS + _PREDICT_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    _add_common(p)
    _add_sigma_choice(p, optimize=False)
    g = p.add_argument_group("prediction")
    g.add_argument("--n", "--N", type=_count, default=100_000, help="noisy copies per input")
    g.add_argument("--alpha", type=_probability, default=0.001, help="failure probability")
    _command(p, run="ddrs.commands:run_predict", check=None, resumable=True)

    _add_analyze(sub)
    return parser


# ----------------------------------------------------------------------------- main


def _message(exc: BaseException) -> str:
    return _one_line(exc) or type(exc).__name__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``ddrs``'s arguments, checked (the checks that need no torch) and with defaults filled in: what
    a command's ``run`` receives. A usage error exits (``SystemExit(2)``) after a one-line message."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m ddrs -- certify ...: a separator that reached us
        argv = argv[1:]
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, which names the command and its --help
        args.usage_error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if hasattr(args, "models"):
            _check_repeated(args)
        if args.check is not None:
            args.check(args)
    except ValueError as exc:
        args.usage_error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs ``ddrs`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Argument errors raise ``SystemExit(2)`` after a one-line message, as argparse does; so does
    ``--help`` (``SystemExit(0)``). Ctrl-C exits with 130 and no traceback, at any point.
    """
    command, started = "ddrs", False
    try:
        args = parse_args(argv)
        command = f"ddrs {args.command}"
        module, _, name = args.run.partition(":")
        run = getattr(importlib.import_module(module), name)  # torch and ddrs_ext load here
        started = True
        return int(run(args) or 0)
    except KeyboardInterrupt:
        if started:
            hint = "; run the same command again to resume" if args.resumable else ""
            print(f"{command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{command}: error: {_message(exc)}", file=sys.stderr)
        return 2
