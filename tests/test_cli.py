"""The ddrs command line, end to end in-process (and as subprocesses of the installed package, started
outside the checkout), with tiny models."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

import ddrs_ext
from ddrs import cli, input_sigma, job, sigma_options
from ddrs.commands import analyze as analyze_command
from ddrs.commands import certify as certify_command
from ddrs.commands import certify_run
from ddrs.commands import demo as demo_command
from ddrs.results import PREDICT_COLUMNS, SIGMA_COLUMNS, ResultFile, read_rows
from ddrs_ext.data import load_digits_split
from ddrs_ext.memory import CertificationMemory

ROOT = Path(__file__).resolve().parent.parent

MODELS = textwrap.dedent(
    """
    import math
    import os
    import time

    import torch


    class Tiny(torch.nn.Module):
        def __init__(self, classes=10, shape=(1, 8, 8), hidden=16):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.hidden = torch.nn.Linear(math.prod(shape), hidden)
            self.out = torch.nn.Linear(hidden, classes)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.sleep = float(os.environ.get("TINY_SLEEP", "0"))

        def forward(self, x):
            if self.sleep:
                time.sleep(self.sleep)
            return self.out(torch.relu(self.hidden(x.flatten(1))))


    class Abs(torch.nn.Module):
        # class 1 when |x_0| > 1/2: with a large sigma most inputs look like class 1, with a small
        # one inputs near 0 are class 0, so inputs certified at different sigmas can overlap.
        def forward(self, x):
            a = x.flatten(1)[:, 0].abs()
            return torch.stack([0.5 - a, a - 0.5], 1) * 10


    class Normalize(torch.nn.Module):
        # like Cohen et al.'s NormalizeLayer: constants as plain attributes, no weights
        def __init__(self):
            super().__init__()
            self.mean = 0.0

        def forward(self, x):
            return x - self.mean


    def build():
        return Tiny()


    def build_normalized():
        return torch.nn.Sequential(Normalize(), Tiny())


    def build5():
        return Tiny(classes=5)


    def build_cifar():
        return Tiny(shape=(3, 32, 32))


    def build_abs():
        return Abs()


    def broken():
        raise RuntimeError("no weights here")
    """
)

TINY = ["--n0", "16", "--n", "64"]
SIGMA_FAST = ["--iterations", "2", "--num-samples", "8"]


@pytest.fixture
def models(tmp_path) -> Path:
    path = tmp_path / "tinymodels.py"
    path.write_text(MODELS)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv, "--no-progress")
    assert code == 0, err
    return out


def fails(capsys, *argv) -> str:
    """Runs a command that must fail with a one-line message; returns the message."""
    code, _, err = run(capsys, *argv, "--no-progress")
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ddrs ") and ": error: " in lines[0], err
    return lines[0]


def rows(path, drop=("time",)) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in read_rows(path)[1]]


def digits_test(count):
    _, (x, y) = load_digits_split(seed=0)
    return x[:count], y[:count]


def load_builder(models: Path, name: str):
    from ddrs.loading import load_model

    return load_model(f"{models}:{name}", None, torch.device("cpu"))


# ----------------------------------------------------------------------------- certify


def test_certify_rows_match_the_library(capsys, models, tmp_path):
    out = tmp_path / "c.tsv"
    summary = ok(capsys, "certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.25,
                 "--max", 9, "--skip", 2, *TINY, "--out", out)  # fmt: skip
    assert "5 inputs" in summary
    header, got = read_rows(out)
    assert header == ("idx", "label", "predict", "radius", "correct", "time", "sigma", "samples")
    idx = torch.tensor([0, 2, 4, 6, 8])
    x, y = digits_test(9)
    model = load_builder(models, "build")
    want = ddrs_ext.certify(model, x[idx], 0.25, n0=16, n=64, seed=0, index=idx)
    assert [r["idx"] for r in got] == idx.tolist()
    assert [r["label"] for r in got] == y[idx].tolist()
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert [r["radius"] for r in got] == want.radius.tolist()  # exact
    assert [r["correct"] for r in got] == (want.prediction == y[idx]).long().tolist()
    assert all(r["sigma"] == 0.25 and r["time"] >= 0 and r["samples"] == 16 + 64 for r in got)


def test_batch_size_and_chunk_do_not_change_rows_and_resume_is_exact(capsys, models, tmp_path):
    common = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.5, "--max", 12, *TINY]
    ok(capsys, *common, "--batch-size", 7, "--chunk", 5, "--out", tmp_path / "a.tsv")
    ok(capsys, *common, "--batch-size", 1000, "--out", tmp_path / "b.tsv")
    assert rows(tmp_path / "a.tsv") == rows(tmp_path / "b.tsv")
    # cut after 4 rows and leave half a row, as a kill mid-write would; resume with other batching
    lines = (tmp_path / "a.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "a.tsv").write_text("".join(lines[:5]) + lines[5][:7])
    ok(capsys, *common, "--batch-size", 50, "--chunk", 3, "--out", tmp_path / "a.tsv")
    assert rows(tmp_path / "a.tsv") == rows(tmp_path / "b.tsv")
    assert "already done" in run(capsys, *common, "--out", tmp_path / "a.tsv")[2]
    code, _, err = run(capsys, *common, "--out", tmp_path / "c.tsv")  # with a progress bar
    assert code == 0 and "12/12" in err and "input/s" in err


def installed(tmp_path, **extra) -> dict:
    """Keyword arguments for a subprocess that runs the installed package: started in ``tmp_path``,
    outside the checkout, with no PYTHONPATH (so ``./ddrs_ext``'s uncompiled sources are not found).
    Fails at once, saying why, when the packages are not installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", **extra)
    found = subprocess.run(
        [sys.executable, "-c", "import ddrs.cli"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["?"])[-1]
        pytest.fail(f"the ddrs package is not installed (pip install the checkout): {last}")
    return {"cwd": tmp_path, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_subprocess_resumes_to_the_same_file(capsys, models, tmp_path, sig):
    common = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.5, "--max", 60, *TINY]
    out = tmp_path / "k.tsv"
    argv = [sys.executable, "-m", "ddrs", *map(str, common), "--chunk", "1", "--out", str(out)]
    # the child takes Ctrl-C's default action even where this test runs with SIGINT ignored (a job
    # started in the background by a non-interactive shell inherits SIG_IGN, and Python keeps it)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(argv, preexec_fn=default_sigint, **installed(tmp_path, TINY_SLEEP="0.2"))
    try:
        deadline = time.monotonic() + 300  # a cold start imports torch (and may compile the kernels)
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate(timeout=60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    done = len(read_rows(out)[1])
    assert 5 <= done < 60
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert err.strip().splitlines()[-1] == (
            "ddrs certify: interrupted; run the same command again to resume"
        ), err
        assert "Traceback" not in err
    code, _, err = run(capsys, *common, "--no-progress", "--out", out)
    assert code == 0 and f"resuming; {done} of 60 selected inputs already done, {60 - done} to go" in err
    ok(capsys, *common, "--out", tmp_path / "whole.tsv")
    assert rows(out) == rows(tmp_path / "whole.tsv")


def test_installed_commands_start_outside_the_checkout(tmp_path):
    """``python -m ddrs`` and ``python -m ddrs_ext`` (kept for torchrun -m ddrs_ext) are the same command,
    from the installed package."""
    for module in ("ddrs", "ddrs_ext"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], timeout=300, **installed(tmp_path))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: ddrs [-h] COMMAND ...")
    code = "import ddrs, ddrs_ext; print(ddrs.__file__); print(ddrs_ext.__file__)"
    done = subprocess.run([sys.executable, "-c", code], timeout=300, **installed(tmp_path))
    assert done.returncode == 0, done.stderr
    for line in done.stdout.split():
        assert not Path(line).is_relative_to(tmp_path)


def write_abs_data(tmp_path, n=24):
    x = torch.zeros(n, 1, 2)
    x[:, 0, 0] = torch.linspace(-0.3, 0.3, n)
    x[:, 0, 1] = torch.arange(n) * 1e-3
    y = (torch.arange(n) % 2).long()
    torch.save({"x": x, "y": y}, tmp_path / "abs.pt")
    with ResultFile(tmp_path / "sigma.tsv", ("idx", "sigma")) as f:
        for i in range(n):
            f.write({"idx": i, "sigma": 0.05 if i % 2 else 2.0})
    return tmp_path / "abs.pt", tmp_path / "sigma.tsv"


def test_memory_resume_equals_uninterrupted_run(capsys, models, tmp_path):
    data, sigma = write_abs_data(tmp_path)
    common = ["certify", "--model", f"{models}:build_abs", "--data", data, "--sigma-file", sigma, *TINY]
    ok(capsys, *common, "--no-memory", "--out", tmp_path / "plain.tsv")
    ok(capsys, *common, "--memory", "--out", tmp_path / "whole.tsv")
    plain, whole = rows(tmp_path / "plain.tsv"), rows(tmp_path / "whole.tsv")
    assert sum(p != w for p, w in zip(plain, whole)) >= 3  # the memory does change answers here
    ok(capsys, *common, "--memory", "--chunk", 4, "--out", tmp_path / "part.tsv")
    lines = (tmp_path / "part.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "part.tsv").write_text("".join(lines[:14]))  # as if killed after 13 rows
    ok(capsys, *common, "--memory", "--chunk", 3, "--out", tmp_path / "part.tsv")
    assert rows(tmp_path / "part.tsv") == whole


def test_memory_extend_restores_the_memory():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    prediction = torch.randint(0, 3, (40,), generator=g)
    radius = torch.rand(40, generator=g, dtype=torch.float64) * 2
    prediction[::7], radius[::7] = -1, 0.0
    whole = CertificationMemory()
    want_p, want_r = whole.adjust(x, prediction, radius)
    first = CertificationMemory()
    p1, r1 = first.adjust(x[:25], prediction[:25], radius[:25])
    rebuilt = CertificationMemory()
    rebuilt.extend(x[:25], p1, r1)
    assert len(rebuilt) == len(first) == 25  # every answer, abstentions included
    for key, value in first.state_dict().items():
        other = rebuilt.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    p2, r2 = rebuilt.adjust(x[25:], prediction[25:], radius[25:])
    assert torch.equal(torch.cat([p1, p2]), want_p) and torch.equal(torch.cat([r1, r2]), want_r)


def test_memory_extend_checks_like_adjust():
    memory = CertificationMemory()
    with pytest.raises(ValueError, match="abstains"):
        memory.extend(torch.zeros(1, 2), torch.tensor([-1]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="radius"):
        memory.extend(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([-0.5]))
    with pytest.raises(ValueError, match="shape"):
        memory.extend(torch.zeros(2, 2), torch.tensor([1]), torch.tensor([0.5]))
    memory.extend(torch.zeros(2, 2), torch.tensor([1, -1]), torch.tensor([0.5, 0.0]))
    assert len(memory) == 2
    with pytest.raises(ValueError, match="per-input shape"):
        memory.extend(torch.zeros(1, 3), torch.tensor([1]), torch.tensor([0.5]))


# ----------------------------------------------------------------------------- sigma


def test_optimize_sigma_rows_resume_and_certify_with_them(capsys, models, tmp_path):
    common = ["--model", f"{models}:build", "--data", "digits", "--max", 6]
    opt = ["optimize-sigma", *common, *SIGMA_FAST, "--surrogate-samples", 16]
    ok(capsys, *opt, "--out", tmp_path / "s.tsv")
    header, got = read_rows(tmp_path / "s.tsv")
    assert header == SIGMA_COLUMNS
    x, y = digits_test(6)
    model = load_builder(models, "build")
    idx = torch.arange(6)
    sigma = ddrs_ext.optimize_sigma(
        model, x, 0.12, iterations=2, num_samples=8, surrogate="certify", seed=0, index=idx
    )
    surrogate = ddrs_ext.surrogate_radius(model, x, sigma, num_samples=16, seed=0, index=idx)
    assert [r["sigma"] for r in got] == sigma.tolist()
    assert [r["surrogate"] for r in got] == surrogate.tolist()
    assert [r["label"] for r in got] == y.tolist()
    # resume after a cut
    lines = (tmp_path / "s.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "s2.tsv").write_text("".join(lines[:3]))
    (tmp_path / "s2.tsv.settings.json").write_text((tmp_path / "s.tsv.settings.json").read_text())
    ok(capsys, *opt, "--chunk", 2, "--out", tmp_path / "s2.tsv")
    assert rows(tmp_path / "s2.tsv") == rows(tmp_path / "s.tsv")
    # the sigma file into certify, and --optimize on the fly, give the same rows
    ok(capsys, "certify", *common, *TINY, "--sigma-file", tmp_path / "s.tsv", "--out", tmp_path / "c1.tsv")
    ok(capsys, "certify", *common, *TINY, "--optimize", *SIGMA_FAST, "--out", tmp_path / "c2.tsv")
    assert [r["sigma"] for r in rows(tmp_path / "c1.tsv")] == sigma.tolist()
    assert rows(tmp_path / "c1.tsv") == rows(tmp_path / "c2.tsv")


def test_paper_flag_and_explicit_options():
    args = cli.parse_args(
        ["optimize-sigma", "--data", "digits", "--out", "x", "--paper", "--iterations", "3"]
    )
    options = args.optimize_options
    assert options["iterations"] == 3 and options["rule"] == "ascent" and options["num_samples"] == 100
    assert options["surrogate"] == "paper" and options["estimator"] == "reparam"
    assert args.sigma0 == 0.12
    args = cli.parse_args(["optimize-sigma", "--data", "digits", "--out", "x", "--clip", "0.1", "0.9"])
    options = args.optimize_options
    assert (
        options["clip"] == (0.1, 0.9) and options["rule"] == "bisect" and options["keep_prediction"] is True
    )
    assert options["surrogate"] == "certify" and options["estimator"] == "reparam"  # the measured defaults
    # --paper --clip 0.001 0.999: the authors' run_optimization_dataset.py, PAPER_DATASET_SETTINGS
    args = cli.parse_args(
        ["optimize-sigma", "--data", "digits", "--out", "x", "--paper", "--clip", "0.001", "0.999"]
    )
    chosen = {k: args.optimize_options[k] for k in ddrs_ext.PAPER_DATASET_SETTINGS}
    assert chosen == ddrs_ext.PAPER_DATASET_SETTINGS and args.optimize_options["surrogate"] == "paper"


def test_the_parser_mirrors_the_library():
    """The names and defaults written out in ddrs.cli (so that --help needs no torch) are the library's."""
    from ddrs import analyze
    from ddrs_ext import sigma

    assert sigma_options.ESTIMATORS == sigma.ESTIMATORS and sigma_options.SURROGATES == sigma.SURROGATES
    assert set(sigma_options.RULES) == set(sigma.RULES)
    assert sigma_options.PAPER_SETTINGS == sigma.PAPER_SETTINGS == ddrs_ext.PAPER_SETTINGS
    params = inspect.signature(sigma.optimize_sigma).parameters
    assert sigma_options.LIBRARY_OPTIMIZE_DEFAULTS == {
        k: params[k].default for k in sigma_options.LIBRARY_OPTIMIZE_DEFAULTS
    }
    assert set(sigma_options.OPTIMIZE_DEFAULTS) | {"probabilities"} == set(params) - {
        "model", "x", "sigma0", "batch_size", "seed", "index", "progress", "callback"
    }  # fmt: skip
    assert analyze_command.ANALYZE_RADII == analyze.DEFAULT_RADII
    test_size = inspect.signature(load_digits_split).parameters["test_size"].default
    assert demo_command.DEMO_TEST_SIZE == test_size == len(load_digits_split()[1][1])
    from ddrs import selector
    from ddrs_ext import sequential

    assert certify_command.SEQUENTIAL_TOLERANCE == sequential.DEFAULT_TOLERANCE
    labels = selector.LABEL_SETTINGS
    assert (demo_command.DEMO_DEFAULTS["label_n0"], demo_command.DEMO_DEFAULTS["label_n"]) == (
        labels["n0"],
        labels["n"],
    )


def test_cohen_spellings_are_aliases_and_abbreviations_are_refused(capsys, models, tmp_path):
    common = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.5, "--max", 4]
    ok(capsys, *common, "--n0", 16, "--n", 64, "--batch-size", 50, "--out", tmp_path / "a.tsv")
    ok(capsys, *common, "--N0", 16, "--N", 64, "--batch", 50, "--out", tmp_path / "b.tsv")
    assert rows(tmp_path / "a.tsv") == rows(tmp_path / "b.tsv")
    base = ["certify", "--data", "digits", "--sigma", "0.5", "--out", "x.tsv"]
    for wrong in (["--batc", "5"], ["--num", "5"], ["--no-prog"], ["--sigma-f", "s.tsv"], ["--mem"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*base, *wrong])
        assert exit_.value.code == 2
        want = f"ddrs certify: error: unrecognized arguments: {' '.join(wrong)} (see 'ddrs certify --help')"
        assert capsys.readouterr().err == want + "\n"
    args = cli.parse_args([*base, "--n", "7", "--batch", "9"])  # exact names, not prefixes
    assert (args.n, args.n0, args.batch_size) == (7, 100, 9)
    for p in [cli.build_parser(), *_subparsers()]:
        assert p.allow_abbrev is False, p.prog


def _subparsers():
    import argparse

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.values())
    return []


# ----------------------------------------------------------------------------- models and data


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace/load are deprecated in torch 2.13
def test_checkpoint_torchscript_export_and_module_name_give_the_same_rows(
    capsys, models, tmp_path, monkeypatch
):
    common = ["--data", "digits", "--sigma", 0.1, "--max", 5, *TINY]
    ok(capsys, "certify", "--model", f"{models}:build", *common, "--out", tmp_path / "ref.tsv")
    model = load_builder(models, "build")
    x, _ = digits_test(2)
    torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    ok(capsys, "certify", "--model", tmp_path / "m.ts", *common, "--out", tmp_path / "ts.tsv")
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    ok(capsys, "certify", "--model", tmp_path / "m.pt2", *common, "--out", tmp_path / "pt2.tsv")
    # weights from a checkpoint into a model built with other weights, by module name
    name = f"tinymod_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(MODELS.replace("manual_seed(0)", "manual_seed(1)"))
    monkeypatch.chdir(tmp_path)
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, "ck.pt")
    ok(capsys, "certify", "--model", f"{name}:build", "--checkpoint", "ck.pt", *common, "--out", "ck.tsv")
    ok(capsys, "certify", "--model", f"{name}:build", *common, "--out", "other.tsv")
    reference = rows(tmp_path / "ref.tsv")
    for out in ("ts.tsv", "pt2.tsv", "ck.tsv"):
        assert rows(tmp_path / out) == reference, out
    assert rows(tmp_path / "other.tsv") != reference


def test_train_digits_checkpoint_alone(capsys, tmp_path):
    from ddrs import train_digits
    from ddrs_ext import models

    torch.manual_seed(0)
    net = models.digits_cnn()
    state = {"format": train_digits.FORMAT, "version": 1, "builder": train_digits.BUILDER,
             "model": net.state_dict(), "sigma_bank": None, "config": {}}  # fmt: skip
    torch.save(state, tmp_path / "d.pt")
    ok(capsys, "certify", "--checkpoint", tmp_path / "d.pt", "--data", "digits", "--split", "train",
       "--sigma", 0.25, "--max", 3, *TINY, "--out", tmp_path / "d.tsv")  # fmt: skip
    (x, _), _ = load_digits_split(seed=0)
    want = ddrs_ext.certify(net.eval(), x[:3], 0.25, n0=16, n=64, seed=0)
    assert [r["radius"] for r in rows(tmp_path / "d.tsv")] == want.radius.tolist()


def test_cifar10_folder_and_pt_file(capsys, models, tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 0, 9]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    common = ["--model", f"{models}:build_cifar", "--sigma", 0.5, *TINY]
    ok(capsys, "certify", *common, "--data", tmp_path / "cifar", "--out", tmp_path / "c.tsv")
    with open(folder / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(test[b"data"]).reshape(3, 3, 32, 32).float() / 255
    torch.save((x, torch.tensor([1, 0, 9])), tmp_path / "t.pt")
    ok(capsys, "certify", *common, "--data", tmp_path / "t.pt", "--out", tmp_path / "t.tsv")
    assert rows(tmp_path / "c.tsv") == rows(tmp_path / "t.tsv")
    assert [r["label"] for r in rows(tmp_path / "c.tsv")] == [1, 0, 9]


# ----------------------------------------------------------------------------- errors


COMMANDS = ("demo", "certify", "optimize-sigma", "predict", "analyze")


def test_help_says_what_each_command_does_in_plain_text(capsys):
    for argv in (["--help"], *([c, "--help"] for c in COMMANDS)):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        flat = " ".join(text.split())  # argparse wraps to the terminal's width
        assert "examples:" in text, argv
        for markup in ("``", ":mod:", ":func:", ":class:", ":data:", ":meth:", "%(default"):
            assert markup not in text, (argv, markup)
        if argv[0] in ("certify", "predict", "optimize-sigma"):
            assert "idx label predict radius correct time sigma" in text
            assert "cuda when torch sees a GPU, else cpu" in flat and "--N0" in flat
        if argv[0] in ("certify", "optimize-sigma"):
            assert "--paper gives the published procedure" in flat


def test_help_and_usage_errors_answer_before_torch_is_imported(tmp_path):
    """--help and argument errors never import torch, numpy or ddrs_ext (they took seconds)."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from ddrs import cli
        runs = [["--help"], ["certify", "--help"], ["demo", "--help"], ["certify", "--sigma", "x"],
                ["certify", "--data", "digits", "--sigma", "1", "--out", "o", "--batc", "2"],
                ["demo", "--sigma", "2", "--sigma-max", "1"], ["frobnicate"], [],
                ["certify", "--data", "d", "--sigma", "1", "--out", "o", "--radius", "1"],
                ["certify", "--data", "d", "--sigma-levels", "1", "0.5", "--selector", "m:f",
                 "--selector-sigma", "1", "--out", "o"],
                ["certify", "--data", "d", "--sigma", "1", "--model", "a:b", "--model", "c:d", "--out", "o"]]
        for argv in runs:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    cli.main(argv)
                except SystemExit as exit_:
                    assert exit_.code == (0 if "--help" in argv else 2), (argv, exit_.code)
                else:
                    raise AssertionError(argv)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "ddrs_ext"))
        print(heavy)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=300, **installed(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    argv = ["-X", "importtime", "-m", "ddrs", "certify", "--data", "x", "--out", "y", "--sigma", "-1"]
    done = subprocess.run([sys.executable, *argv], timeout=300, **installed(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    assert "ddrs.cli" in imported and not [m for m in imported if m.split(".")[0] in ("torch", "ddrs_ext")]
    errors = [line for line in lines if not line.startswith("import time:")]
    assert errors == [
        "ddrs certify: error: argument --sigma: must be > 0, got -1 (see 'ddrs certify --help')"
    ]


def test_the_library_does_not_import_the_application():
    for path in sorted((ROOT / "ddrs_ext").glob("*.py")):
        if path.name == "__main__.py":  # python -m ddrs_ext: the command line under the library's name
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "ddrs"], (path.name, names)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["certify", "--data", "digits", "--out", "x.tsv"],
            "one of the arguments --sigma --sigma-file --optimize",
        ),
        (
            ["certify", "--data", "digits", "--sigma", "0.2", "--optimize", "--out", "x.tsv"],
            "not allowed with",
        ),
        (["certify", "--data", "digits", "--sigma", "-1", "--out", "x.tsv"], "argument --sigma: must be > 0"),
        (["certify", "--data", "digits", "--sigma", "0.2", "--alpha", "2", "--out", "x.tsv"], "must be < 1"),
        (["certify", "--data", "digits", "--sigma", "0.2", "--skip", "0", "--out", "x.tsv"], "must be >= 1"),
        (["certify", "--data", "digits", "--sigma", "0.2"], "required: --out"),
        (
            ["certify", "--data", "digits", "--sigma", "0.2", "--sigma0", "0.3", "--out", "x"],
            "need --optimize",
        ),
        (["optimize-sigma", "--data", "digits", "--estimator", "magic", "--out", "x.tsv"], "invalid choice"),
        (["optimize-sigma", "--data", "digits", "--clip", "0.9", "0.1", "--out", "x"], "LOW must be below"),
        (["optimize-sigma", "--data", "digits", "--sigma0", "20", "--out", "x"], "outside --sigma-range"),
        (
            ["predict", "--data", "digits", "--sigma", "1", "--optimize", "--out", "x"],
            "unrecognized arguments: --optimize",
        ),
        (["analyze", "a.tsv", "--labels", "a", "b"], "--labels: 2 labels for 1 files"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    prog = "ddrs " + argv[0] if argv and argv[0] != "frobnicate" else "ddrs"
    assert err.startswith(f"{prog}: error: "), err
    # the --help hint, and the documentation page of the first option the message names that has one
    from ddrs.docs_links import docs_page

    page = docs_page(err.split(": error: ", 1)[1].rsplit(" (see ", 1)[0])
    assert err.endswith(f"(see '{prog} --help'" + (f" and {page})\n" if page else ")\n")), err


def test_ctrl_c_exits_130_without_a_traceback(capsys, monkeypatch, models, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)  # during start-up: quiet
    assert cli.main(["certify", "--help"]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.undo()
    monkeypatch.setattr(certify_run, "certify", interrupted)  # while certifying: how to resume
    argv = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.5, "--max", 3, *TINY]
    code, _, err = run(capsys, *argv, "--no-progress", "--out", tmp_path / "c.tsv")
    assert code == 130 and err == "ddrs certify: interrupted; run the same command again to resume\n"


def test_user_errors_are_one_line(capsys, models, tmp_path):
    m = ["--model", f"{models}:build"]
    c = ["certify", "--data", "digits", "--sigma", 0.25, "--max", 4, *TINY]
    out = ["--out", tmp_path / "o.tsv"]
    assert "cannot import" in fails(capsys, *c, "--model", "no_such_module_xyz:build", *out)
    assert "no attribute" in fails(capsys, *c, "--model", f"{models}:nothing", *out)
    assert "no weights here" in fails(capsys, *c, "--model", f"{models}:broken", *out)
    assert "no such file" in fails(capsys, *c, "--model", tmp_path / "missing.ts", *out)
    (tmp_path / "junk.ts").write_text("junk")
    assert "not a TorchScript" in fails(capsys, *c, "--model", tmp_path / "junk.ts", *out)
    assert "give --model" in fails(capsys, *c, *out)
    assert "no such file" in fails(capsys, *c, *m, "--checkpoint", tmp_path / "nope.pt", *out)
    assert "no such file" in fails(capsys, "certify", *m, "--data", tmp_path / "nope.pt", "--sigma", 1, *out)
    assert "CUDA is not available" in fails(capsys, *c, *m, "--device", "cuda", *out)
    assert "--split applies" in fails(capsys, *c, *m, "--data", models, "--split", "test", *out)
    assert "does not exist" in fails(capsys, *c, *m, "--out", tmp_path / "nofolder" / "o.tsv")
    # a checkpoint that does not fit
    bad = load_builder(models, "build5").state_dict()
    torch.save({"model": bad}, tmp_path / "bad.pt")
    msg = fails(capsys, *c, *m, "--checkpoint", tmp_path / "bad.pt", *out)
    assert "does not fit" in msg and "out.weight" in msg and "(5, 16)" in msg
    state = load_builder(models, "build").state_dict()
    state.pop("hidden.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad2.pt")
    msg = fails(capsys, *c, *m, "--checkpoint", tmp_path / "bad2.pt", *out)
    assert "missing keys hidden.bias" in msg and "unexpected keys extra.weight" in msg
    assert "train_digits" in fails(capsys, *c, "--checkpoint", tmp_path / "bad2.pt", *out)
    # labels outside the model's classes; a model that does not fit the data
    msg = fails(capsys, *c, "--model", f"{models}:build5", *out)
    assert "outside [0, 5)" in msg
    assert "fails on one input" in fails(capsys, *c, "--model", f"{models}:build_cifar", *out)
    # sigma file without every selected input
    with ResultFile(tmp_path / "s.tsv", ("idx", "sigma")) as f:
        for i in (0, 1, 3):
            f.write({"idx": i, "sigma": 0.3})
    msg = fails(
        capsys, "certify", *m, "--data", "digits", "--sigma-file", tmp_path / "s.tsv", "--max", 9, *out
    )
    assert "6 selected input(s): idx 2, 4, 5, 6, 7 and 1 more" in msg
    msg = fails(capsys, "certify", *m, "--data", "digits", "--sigma-file", tmp_path / "nope.tsv", *out)
    assert msg == f"ddrs certify: error: --sigma-file {tmp_path / 'nope.tsv'}: no such file"
    # settings changed on resume
    ok(capsys, *c, *m, *out)
    msg = fails(capsys, *c[:-1], "32", *m, *out)
    assert "other settings" in msg and "'n': 64" not in msg and "n: 64 then, 32 now" in msg
    assert not (tmp_path / "nofolder").exists()


def test_bad_data_files(capsys, models, tmp_path):
    c = ["certify", "--model", f"{models}:build", "--sigma", 0.25, *TINY, "--out", tmp_path / "o.tsv"]
    torch.save({"x": torch.zeros(3, 1, 8, 8), "y": torch.zeros(2, dtype=torch.long)}, tmp_path / "len.pt")
    assert "3 inputs but 2 labels" in fails(capsys, *c, "--data", tmp_path / "len.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a torch file")
    msg = fails(capsys, *c, "--data", tmp_path / "junk.pt")
    assert "junk.pt is a pickle that torch.load(weights_only=True) cannot read" in msg
    torch.save({"a": 1}, tmp_path / "keys.pt")
    assert "expected x/y" in fails(capsys, *c, "--data", tmp_path / "keys.pt")
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    assert "no image files" in fails(capsys, *c, "--data", folder)  # a class folder without images
    assert "--image-size applies to image folders" in fails(
        capsys, *c, "--data", "digits", "--image-size", "8"
    )


# ----------------------------------------------------------------------------- checkpoints


def cohen_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """A checkpoint as Cohen et al.'s train.py writes it: Sequential(NormalizeLayer, DataParallel(model))
    (the NormalizeLayer keeps its constants outside the state_dict), with arch, epoch and optimizer."""

    class NormalizeLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.means = torch.zeros(1)  # a plain attribute, as theirs

        def forward(self, x):
            return x - self.means

    wrapped = torch.nn.Sequential(NormalizeLayer(), torch.nn.DataParallel(model))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    state = {
        "epoch": 90,
        "arch": "tiny",
        "state_dict": wrapped.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    assert all(k.startswith("1.module.") for k in state["state_dict"])
    torch.save(state, path)


def test_cohen_checkpoints_load_into_the_bare_or_the_normalised_network(capsys, models, tmp_path):
    common = ["certify", "--data", "digits", "--sigma", 0.5, "--max", 4, *TINY, "--no-progress"]
    trained = load_builder(models, "build")
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-1)  # other weights than build() gives, so loading must happen
    cohen_checkpoint(trained, tmp_path / "cohen.pth.tar")
    ck = ["--checkpoint", tmp_path / "cohen.pth.tar"]
    code, _, err = run(capsys, *common, "--model", f"{models}:build", *ck, "--out", tmp_path / "bare.tsv")
    assert code == 0 and "keys 1.module.* loaded as *" in err and "must normalise them itself" in err, err
    code, _, err = run(
        capsys, *common, "--model", f"{models}:build_normalized", *ck, "--out", tmp_path / "seq.tsv"
    )
    assert code == 0 and "note" not in err, err  # 1.module.* -> 1.*: the model has its own layer 0
    want = ddrs_ext.certify(trained.eval(), digits_test(4)[0], 0.5, n0=16, n=64, seed=0)
    for name in ("bare.tsv", "seq.tsv"):
        assert [r["radius"] for r in rows(tmp_path / name)] == want.radius.tolist(), name
    from ddrs.loading import load_model

    for builder in ("build", "build_normalized"):
        loaded = load_model(f"{models}:{builder}", tmp_path / "cohen.pth.tar", torch.device("cpu"))
        x = digits_test(4)[0]
        assert torch.equal(loaded(x), trained(x)) and not torch.equal(
            loaded(x), load_builder(models, "build")(x)
        )
    # a checkpoint of another network names the checkpoint's arch
    msg = fails(capsys, *common[:-1], "--model", f"{models}:build5", *ck, "--out", tmp_path / "x.tsv")
    assert "does not fit the model (its keys 1.module.* read as *)" in msg and "arch: tiny" in msg


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in torch 2.13
def test_unreadable_checkpoints_say_what_the_file_is(capsys, models, tmp_path):
    import argparse

    c = ["certify", "--data", "digits", "--sigma", 0.25, "--max", 2, *TINY, "--out", tmp_path / "o.tsv"]
    m = ["--model", f"{models}:build"]
    good = tmp_path / "good.pt"
    torch.save(load_builder(models, "build").state_dict(), good)
    data = good.read_bytes()
    files = {
        "truncated.pt": data[: len(data) // 2],
        "end_missing.pt": data[:-30],
        "text.pt": b"epoch 3: loss 0.25\nthis is a log file, not weights\n",
        "random.pt": bytes(
            torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1)).tolist()
        ),
        "empty.pt": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {}}, tmp_path / "objects.pt")
    torch.jit.script(torch.nn.Linear(64, 10)).save(str(tmp_path / "scripted.pt"))
    expected = {
        "truncated.pt": "is truncated or damaged",
        "end_missing.pt": "is truncated or damaged",
        "text.pt": "is a text file",
        "random.pt": "is not a file written by torch.save (it starts with bytes",
        "empty.pt": "is empty",
        "objects.pt": "holds Python objects besides tensors and plain containers (argparse.Namespace)",
        "scripted.pt": "is a TorchScript model, not a file of weights: give it as --model",
    }
    for name, words in expected.items():
        msg = fails(capsys, *c, *m, "--checkpoint", tmp_path / name)
        assert msg.startswith(f"ddrs certify: error: --checkpoint {tmp_path / name} {words}"), msg
        assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
        assert len(msg) - len(str(tmp_path / name)) < 250, msg
        # the same file as --data: the same diagnosis under that option's name
        msg = fails(
            capsys, "certify", *m, "--sigma", 0.25, *TINY, "--data", tmp_path / name, "--out", tmp_path / "d"
        )
        assert msg.startswith(f"ddrs certify: error: --data {tmp_path / name} {words}"), msg
        assert "weights_only=False" not in msg
    # a checkpoint given as --model
    msg = fails(capsys, *c, "--model", good)
    assert msg == (
        f"ddrs certify: error: --model {good} is a checkpoint (a torch.save file of weights), not a model "
        f"file: give it as --checkpoint {good}, with --model module:callable naming the function that "
        "builds its network"
    )
    from ddrs import train_digits
    from ddrs_ext import models as library_models

    state = {"format": train_digits.FORMAT, "version": 1, "builder": train_digits.BUILDER,
             "model": library_models.digits_cnn().state_dict(), "sigma_bank": None, "config": {}}  # fmt: skip
    torch.save(state, tmp_path / "digits.pt")
    msg = fails(capsys, *c, "--model", tmp_path / "digits.pt")
    assert (
        "a checkpoint of python -m ddrs.train_digits" in msg
        and "--checkpoint" in msg
        and "without --model" in msg
    )
    msg = fails(capsys, *c, "--model", tmp_path / "text.pt")
    assert "is not a TorchScript file: it is a text file" in msg


# ----------------------------------------------------------------------------- predict


def test_predict_rows_match_the_library_and_resume(capsys, models, tmp_path):
    common = ["predict", "--model", f"{models}:build", "--data", "digits", "--max", 10, "--N", 64]
    summary = ok(capsys, *common, "--sigma", 0.25, "--chunk", 3, "--out", tmp_path / "p.tsv")
    assert "10 inputs, accuracy" in summary and "abstained" in summary
    header, got = read_rows(tmp_path / "p.tsv")
    assert header == PREDICT_COLUMNS == ("idx", "label", "predict", "correct", "time", "sigma")
    x, y = digits_test(10)
    want = ddrs_ext.predict(load_builder(models, "build"), x, 0.25, n=64, seed=0, index=torch.arange(10))
    assert [r["predict"] for r in got] == want.tolist()
    assert [r["correct"] for r in got] == (want == y).long().tolist()
    lines = (tmp_path / "p.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "p.tsv").write_text("".join(lines[:5]))
    code, _, err = run(capsys, *common, "--sigma", 0.25, "--no-progress", "--out", tmp_path / "p.tsv")
    assert code == 0 and "resuming; 4 of 10 selected inputs already done, 6 to go" in err
    assert rows(tmp_path / "p.tsv") == [{k: v for k, v in r.items() if k != "time"} for r in got]
    # a sigma per input from a file
    with ResultFile(tmp_path / "s.tsv", ("idx", "sigma")) as f:
        for i in range(10):
            f.write({"idx": i, "sigma": 0.1 + 0.05 * i})
    ok(capsys, *common, "--sigma-file", tmp_path / "s.tsv", "--out", tmp_path / "ps.tsv")
    sigma = torch.tensor([0.1 + 0.05 * i for i in range(10)], dtype=torch.float64)
    want = ddrs_ext.predict(load_builder(models, "build"), x, sigma, n=64, seed=0, index=torch.arange(10))
    assert [r["predict"] for r in rows(tmp_path / "ps.tsv")] == want.tolist()
    assert [r["sigma"] for r in rows(tmp_path / "ps.tsv")] == sigma.tolist()


# ----------------------------------------------------------------------------- chunks and devices


def plan(total, fixed=None, minimum=1, seconds_per_input=None, seconds=3.0):
    """The chunk sizes chunk_sizes gives when every input takes ``seconds_per_input``."""
    sizes, gen = [], job.chunk_sizes(total, fixed, minimum, seconds)
    size = next(gen)
    while True:
        sizes.append(size)
        try:
            size = gen.send(None if seconds_per_input is None else seconds_per_input * size)
        except StopIteration:
            return sizes


def test_chunk_planner():
    assert job.min_chunk(2000, 512) == 16  # 4 forward batches of sigma-optimisation rows
    assert job.min_chunk(1000, 100) == 40  # the paper's 100 samples per step
    assert job.min_chunk(1000, 100_000) == 1  # certification alone: one input fills many batches
    assert plan(10, fixed=4) == [4, 4, 2]
    # slow inputs (5 s each) go min_chunk at a time, not one at a time
    assert plan(100, minimum=16, seconds_per_input=5.0) == [16] * 6 + [4]
    # fast inputs grow at most fourfold per call towards 3 s a call
    assert plan(1000, minimum=2, seconds_per_input=0.01) == [2, 8, 32, 128, 300, 300, 230]
    assert plan(7, seconds_per_input=0.5) == [1, 4, 2]
    for total, minimum, per_input in ((1, 5, 1.0), (57, 3, 0.2), (1000, 1, 1e-9), (33, 40, 10.0)):
        sizes = plan(total, minimum=minimum, seconds_per_input=per_input)
        assert sum(sizes) == total and all(s >= 1 for s in sizes)
        assert all(s >= min(minimum, total - sum(sizes[:k])) for k, s in enumerate(sizes))


def test_automatic_chunks_fill_the_forward_batches(capsys, models, tmp_path, monkeypatch):
    calls = []
    real = input_sigma.optimize_sigma

    def spy(model, x, *args, **kwargs):
        calls.append(len(x))
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(input_sigma, "optimize_sigma", spy)
    argv = ["certify", "--model", f"{models}:build", "--data", "digits", "--max", 30, *TINY, "--optimize"]
    ok(capsys, *argv, *SIGMA_FAST, "--batch-size", 20, "--out", tmp_path / "o.tsv")
    assert calls[0] == job.min_chunk(20, 8) == 10  # 4 batches of 20 rows at 8 samples per input
    assert sum(calls) == 30


def test_device_defaults_to_cuda_when_there_is_a_gpu():
    from ddrs.loading import resolve_device

    assert cli.parse_args(["certify", "--data", "d", "--sigma", "1", "--out", "o"]).device is None
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cheaper_forward_options_certify_the_model_as_evaluated(capsys, models, tmp_path):
    """--autocast / --channels-last / --compile: the rows are certify's through ddrs_ext.Evaluated,
    the choice is part of the settings (a resume without it is refused), plain runs are unchanged."""
    out = tmp_path / "bf16.tsv"
    common = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.25, "--max", 6, *TINY]
    ok(capsys, *common, "--autocast", "bf16", "--channels-last", "--out", out)
    x, _ = digits_test(6)
    model = ddrs_ext.Evaluated(load_builder(models, "build"), autocast=torch.bfloat16, channels_last=True)
    want = ddrs_ext.certify(model, x, 0.25, n0=16, n=64, seed=0, index=torch.arange(6))
    got = rows(out)
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert [r["radius"] for r in got] == want.radius.tolist()
    settings = json.loads((tmp_path / "bf16.tsv.settings.json").read_text())
    assert settings["evaluated"] == {"autocast": "bf16"}  # the function: compared on a resume
    assert settings["evaluation"]["channels_last"] is True  # the same function: recorded
    assert "settings" in fails(capsys, *common, "--out", out)
    plain = tmp_path / "plain.tsv"
    ok(capsys, *common, "--out", plain)
    assert "evaluated" not in json.loads((tmp_path / "plain.tsv.settings.json").read_text())
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in (*common, "--autocast", "fp64", "--out", tmp_path / "x.tsv")])
    assert exit_.value.code == 2 and "argument --autocast: invalid choice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ddrs train


def test_ddrs_train_is_python_m_ddrs_train_digits(capsys, tmp_path):
    """``ddrs train`` trains what ``python -m ddrs.train_digits`` trains, with the same options (the
    same weights, sigma bank and stored settings), selector training included; its usage errors are
    ddrs's one-line errors."""
    from ddrs import train_digits
    from ddrs.checkpoints import load_selector_checkpoint

    argv = ["--data-dependent", "--epochs", "1", "--sigma-steps", "1", "--sigma-samples", "4", "--seed", "3"]
    assert cli.main(["train", *argv, "--out", str(tmp_path / "a.pt")]) == 0
    assert train_digits.main([*argv, "--out", str(tmp_path / "b.pt")]) == 0
    capsys.readouterr()
    model_a, bank_a, config_a = train_digits.load_checkpoint(tmp_path / "a.pt")
    model_b, bank_b, config_b = train_digits.load_checkpoint(tmp_path / "b.pt")
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(bank_a.sigma, bank_b.sigma) and bool((bank_a.sigma != 0.25).any())
    assert {k: v for k, v in config_a.items() if k != "out"} == {
        k: v for k, v in config_b.items() if k != "out"
    }
    assert set(config_a) == set(vars(train_digits.build_parser().parse_args([])))  # nothing of ddrs's own
    selector = ["--sigma-levels", "0.25", "0.5", "--selector-sigma", "0.5", "--epochs", "1"]
    selector += ["--label-n0", "4", "--label-n", "8", "--batch-size", "256"]
    for name, main in (("s1.pt", lambda a: cli.main(["train", *a])), ("s2.pt", train_digits.main)):
        assert main(["--selector-for", str(tmp_path / "a.pt"), *selector, "--out", str(tmp_path / name)]) == 0
    one, _ = load_selector_checkpoint(tmp_path / "s1.pt")
    two, _ = load_selector_checkpoint(tmp_path / "s2.pt")
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), name
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--sigma-levels", "0.25", "0.5", "--out", str(tmp_path / "x.pt")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "ddrs train: error: --sigma-levels and --selector-sigma are for --selector-for "
        "(see 'ddrs train --help' and docs/dual.md)\n"
    )
    assert cli.main(["train", "--selector-for", str(tmp_path / "no.pt"), *selector]) == 2
    assert (
        capsys.readouterr().err == f"ddrs train: error: --selector-for {tmp_path / 'no.pt'}: no such file\n"
    )
    assert not (tmp_path / "x.pt").exists()


def test_ddrs_train_help_and_usage_errors_answer_before_torch_is_imported(tmp_path):
    for argv, code in (
        (["train", "--help"], 0),
        (["train", "--epochs", "0"], 2),
        (["train", "--selector-sigma", "1"], 2),
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "ddrs", *argv], timeout=300, **installed(tmp_path)
        )
        assert done.returncode == code, done.stderr
        imported = [
            line.split("|")[-1].strip()
            for line in done.stderr.splitlines()
            if line.startswith("import time:")
        ]
        assert "ddrs.commands.train" in imported
        assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy", "ddrs_ext")], argv
        errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
        assert errors == ([] if code == 0 else [errors[0]]) and all(
            e.startswith("ddrs train: error: ") for e in errors
        )


# ----------------------------------------------------------------------------- the memory by default


def overlapping_balls(rows_: list[dict], x: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs of inputs certified for different classes whose balls overlap (||x_i - x_j|| < r_i + r_j):
    certificates that no single classifier can give together."""
    flat = x.flatten(1).to(torch.float64)
    found = []
    for a, ra in enumerate(rows_):
        for b in range(a + 1, len(rows_)):
            rb = rows_[b]
            if ra["predict"] < 0 or rb["predict"] < 0 or ra["predict"] == rb["predict"]:
                continue
            d = float((flat[ra["idx"]] - flat[rb["idx"]]).norm())
            if d < ra["radius"] + rb["radius"] - 1e-9:
                found.append((ra["idx"], rb["idx"]))
    return found


NO_MEMORY = "per-input sigma without memory: not a certificate of one classifier"


def test_a_sigma_per_input_goes_through_the_memory_by_default(capsys, models, tmp_path):
    """Nearby inputs certified at different sigmas (0.05 and 2) would claim overlapping balls of
    different classes; by default (no flag) the memory adjusts them, as --memory does. The negative
    control, --no-memory, does give overlapping balls, and the file, its summary and ddrs analyze
    say that they are not certificates of one classifier."""
    data, sigma = write_abs_data(tmp_path)
    x = torch.load(data)["x"]
    common = ["certify", "--model", f"{models}:build_abs", "--data", data, "--sigma-file", sigma, *TINY]
    out = ok(capsys, *common, "--out", tmp_path / "default.tsv")
    ok(capsys, *common, "--memory", "--out", tmp_path / "memory.tsv")
    nm_out = ok(capsys, *common, "--no-memory", "--out", tmp_path / "nm.tsv")
    default, raw = rows(tmp_path / "default.tsv"), rows(tmp_path / "nm.tsv")
    assert default == rows(tmp_path / "memory.tsv")
    assert overlapping_balls(default, x) == []
    overlaps = overlapping_balls(raw, x)  # the negative control: what the memory prevents
    assert len(overlaps) >= 3
    assert all(raw[i]["sigma"] != raw[j]["sigma"] for i, j in overlaps)
    assert sum(d != r for d, r in zip(default, raw)) >= 3
    # the summary says how many certificates the memory changed (of this run's: a resume counts its own)
    changed = [(d["predict"], d["radius"]) != (r["predict"], r["radius"]) for d, r in zip(default, raw)]
    assert f"the memory changed {sum(changed)} of the 24 certificates of this run" in out
    assert "the memory changed" not in nm_out
    lines = (tmp_path / "default.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "default.tsv").write_text("".join(lines[:11]))  # 10 rows done
    resumed = ok(capsys, *common, "--out", tmp_path / "default.tsv")
    assert f"the memory changed {sum(changed[10:])} of the 14 certificates of this run" in resumed
    assert rows(tmp_path / "default.tsv") == default
    assert "the memory changed" not in ok(capsys, *common, "--out", tmp_path / "default.tsv")  # nothing to do
    # settings: the memory recorded; the opt-out marked
    settings = json.loads((tmp_path / "default.tsv.settings.json").read_text())
    assert settings["memory"] is True and "notes" not in settings
    settings = json.loads((tmp_path / "nm.tsv.settings.json").read_text())
    assert settings["memory"] is False and settings["notes"] == [NO_MEMORY]
    # the run's summary
    assert NO_MEMORY not in out
    assert f"{tmp_path / 'nm.tsv'}: {NO_MEMORY}" in nm_out
    # ddrs analyze: the row labelled, the note printed (markdown and LaTeX)
    argv = ["analyze", tmp_path / "default.tsv", tmp_path / "nm.tsv", "--labels", "default", "nm"]
    code, table, _ = run(capsys, *argv)
    assert code == 0
    assert "| default | " in table and "| nm (per-input σ without memory) | " in table
    assert table.strip().splitlines()[-1] == f"note: nm: {NO_MEMORY}"
    assert table.count(NO_MEMORY) == 1
    code, latex, _ = run(capsys, *argv, "--latex")
    assert code == 0 and latex.strip().splitlines()[-1] == f"% note: nm: {NO_MEMORY}"
    assert "nm (per-input $\\sigma$ without memory)" in latex
    from ddrs import analyze

    assert analyze.load(tmp_path / "nm.tsv").notes and not analyze.load(tmp_path / "default.tsv").notes


def test_memory_options_parse(capsys):
    base = ["certify", "--data", "d", "--out", "o"]
    for extra, memory in (
        (["--sigma-file", "s.tsv"], True),
        (["--optimize"], True),
        (["--sigma", "1"], False),
        (["--sigma-file", "s.tsv", "--no-memory"], False),
        (["--optimize", "--memory"], True),
        (["--sigma", "1", "--memory"], True),  # as before: the memory at a fixed sigma, if asked for
        (["--sigma", "1", "--no-memory"], False),
        (["--sigma-levels", "1", "2", "--selector", "m:f", "--selector-sigma", "1"], False),
        (["--sigma-levels", "1", "2", "--selector", "m:f", "--selector-sigma", "1", "--no-memory"], False),
    ):
        assert cli.parse_args([*base, *extra]).memory is memory, extra
    with pytest.raises(SystemExit):
        cli.main([*base, "--sigma-file", "s.tsv", "--memory", "--no-memory"])
    assert "argument --no-memory: not allowed with argument --memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["certify", "--help"])
    assert "NOT certificates of one classifier" in " ".join(capsys.readouterr().out.split())


def test_files_of_earlier_versions_resume_with_their_meaning(capsys, models, tmp_path):
    """A per-input-sigma run started without the memory before it was the default (its settings
    lack "notes", memory false) resumes without the memory when rerun with the same command (no
    flag), with a note; it stays flagged. An explicit --memory is refused (other settings); a
    fixed-sigma file of that version resumes as ever."""
    data, sigma = write_abs_data(tmp_path)
    common = ["certify", "--model", f"{models}:build_abs", "--data", data, "--sigma-file", sigma, *TINY]
    ok(capsys, *common, "--no-memory", "--out", tmp_path / "whole.tsv")
    settings = json.loads((tmp_path / "whole.tsv.settings.json").read_text())
    del settings["notes"]  # as the earlier version wrote them
    old = json.dumps(settings, indent=1, sort_keys=True) + "\n"
    lines = (tmp_path / "whole.tsv").read_text().splitlines(keepends=True)
    for name in ("old.tsv", "old2.tsv"):
        (tmp_path / name).write_text("".join(lines[:9]))  # 8 rows done
        (tmp_path / f"{name}.settings.json").write_text(old)
    code, out, err = run(capsys, *common, "--no-progress", "--out", tmp_path / "old.tsv")
    assert code == 0, err
    assert f"ddrs certify: note: {tmp_path / 'old.tsv'} was started without the memory" in err
    assert "resuming; 8 of 24 selected inputs already done" in err
    assert rows(tmp_path / "old.tsv") == rows(tmp_path / "whole.tsv")  # no memory, as it was begun
    assert (tmp_path / "old.tsv.settings.json").read_text() == old  # left as it was
    assert NO_MEMORY in out
    from ddrs import analyze

    assert [s for _, s in analyze.load(tmp_path / "old.tsv").notes] == [NO_MEMORY]  # flagged all the same
    msg = fails(capsys, *common, "--memory", "--out", tmp_path / "old2.tsv")
    assert "was started with other settings (memory: False then, True now)" in msg
    # --no-memory given explicitly resumes it too, without the note
    code, _, err = run(capsys, *common, "--no-memory", "--no-progress", "--out", tmp_path / "old2.tsv")
    assert code == 0 and "was started without the memory" not in err
    assert rows(tmp_path / "old2.tsv") == rows(tmp_path / "whole.tsv")
    # a fixed-sigma file of that version (no memory, no notes) resumes as before
    fixed = ["certify", "--model", f"{models}:build_abs", "--data", data, "--sigma", 0.5, *TINY]
    ok(capsys, *fixed, "--out", tmp_path / "fixed.tsv")
    settings = json.loads((tmp_path / "fixed.tsv.settings.json").read_text())
    assert settings["memory"] is False and "notes" not in settings
    lines = (tmp_path / "fixed.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "fixed2.tsv").write_text("".join(lines[:5]))
    (tmp_path / "fixed2.tsv.settings.json").write_text((tmp_path / "fixed.tsv.settings.json").read_text())
    code, _, err = run(capsys, *fixed, "--no-progress", "--out", tmp_path / "fixed2.tsv")
    assert code == 0 and "note" not in err
    assert rows(tmp_path / "fixed2.tsv") == rows(tmp_path / "fixed.tsv")
    assert not analyze.load(tmp_path / "fixed.tsv").notes


def test_memory_files_of_the_earlier_rule_are_not_continued(capsys, models, tmp_path):
    """A --memory file records the memory's rule; one adjusted under the earlier rule (abstentions
    passed through and not stored; its settings lack "memory_rule") is refused on resume with a
    message that says why, since rebuilding the memory from its rows would mix two rules. Negative
    control: the same file with the current rule's marker resumes."""
    data, sigma = write_abs_data(tmp_path)
    common = ["certify", "--model", f"{models}:build_abs", "--data", data, "--sigma-file", sigma, *TINY]
    ok(capsys, *common, "--out", tmp_path / "whole.tsv")
    settings = json.loads((tmp_path / "whole.tsv.settings.json").read_text())
    assert settings["memory"] is True and settings["memory_rule"] == 2
    lines = (tmp_path / "whole.tsv").read_text().splitlines(keepends=True)
    old = dict(settings)
    del old["memory_rule"]
    for name, kept in (("old.tsv", old), ("current.tsv", settings)):
        (tmp_path / name).write_text("".join(lines[:9]))
        (tmp_path / f"{name}.settings.json").write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    msg = fails(capsys, *common, "--out", tmp_path / "old.tsv")
    assert "certified with the memory of an earlier ddrs version (rule 1" in msg and "another --out" in msg
    code, _, err = run(capsys, *common, "--no-progress", "--out", tmp_path / "current.tsv")
    assert code == 0, err
    assert rows(tmp_path / "current.tsv") == rows(tmp_path / "whole.tsv")


# ----------------------------------------------------------------------------- help examples, paths


def broken_continuations(epilog: str) -> list[str]:
    """The example lines of an epilog that show a command cut or glued wrong: a continuation line
    after a line that does not end in a backslash, or a line holding a run of spaces before an
    option (a backslash-newline inside the Python string joined two lines into one)."""
    examples = epilog.split("examples:\n", 1)[1] if "examples:\n" in epilog else ""
    broken, previous = [], ""
    for line in examples.splitlines():
        cut = line.startswith("      ") and line.strip() and not previous.rstrip().endswith("\\")
        if cut or re.search(r"\S {3,}--", line.strip()):
            broken.append(line.strip())
        previous = line
    return broken


def example_commands(epilog: str) -> list[str]:
    examples = epilog.split("examples:\n", 1)[1] if "examples:\n" in epilog else ""
    return [c.strip() for c in examples.replace("\\\n", " ").splitlines() if c.strip().startswith("ddrs ")]


def test_help_examples_are_whole_commands_that_parse():
    for p in _subparsers():
        if p.prog in ("ddrs certify", "ddrs predict", "ddrs optimize-sigma"):  # --data digits' format
            assert (
                "digits                          the embedded digits: inputs (N, 1, 8, 8) in [0, 1]"
                in p.epilog
            )
        assert broken_continuations(p.epilog or "") == [], p.prog
        commands = example_commands(p.epilog or "")
        assert commands, p.prog
        for command in commands:
            args = cli.parse_args(shlex.split(command)[1:])
            assert args.command in command.split()[1], command
    # the negative controls: an example as it was written (a backslash-newline in the string), and
    # a continuation line after a line without its backslash
    glued = """
examples:
  ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential --radius 0.5 \
      --n 100000 --out seq_r05.tsv
"""
    assert broken_continuations(glued) == [
        "ddrs certify --checkpoint digits.pt --data digits --sigma 0.25 --sequential --radius 0.5       "
        "--n 100000 --out seq_r05.tsv"
    ]
    cut = "examples:\n  ddrs certify --radius 0.5\n      --n 100000 --out b\n"
    assert broken_continuations(cut) == ["--n 100000 --out b"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--sigma", "1", "--out", "/nonexistent_dir/x.tsv"],
            "--out /nonexistent_dir/x.tsv: its folder /nonexistent_dir does not exist",
        ),
        (
            ["--sigma", "1", "--checkpoint", "no_such.pt", "--out", "x.tsv"],
            "--checkpoint no_such.pt: no such file",
        ),
        (["--sigma-file", "no_such.tsv", "--out", "x.tsv"], "--sigma-file no_such.tsv: no such file"),
    ],
)
def test_path_errors_answer_before_torch_is_imported(tmp_path, extra, message):
    argv = ["-X", "importtime", "-m", "ddrs", "certify", "--data", "digits", *extra]
    done = subprocess.run([sys.executable, *argv], timeout=300, **installed(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    assert "ddrs.cli" in imported and not [
        m for m in imported if m.split(".")[0] in ("torch", "numpy", "ddrs_ext")
    ]
    assert [line for line in lines if not line.startswith("import time:")] == [
        f"ddrs certify: error: {message}"
    ]


def test_help_and_errors_point_at_the_documentation(capsys):
    """Every page the command line names exists under docs/; each command's --help ends with its pages;
    a usage error about an option names the page that explains it (and only then)."""
    import re
    from pathlib import Path

    from ddrs import docs_links as options

    docs = Path(__file__).resolve().parent.parent / "docs"
    for page in set(options.DOCS_PAGES.values()) | {"index", "getting-started", "coming-from-the-authors"}:
        assert (docs / f"{page}.md").is_file(), page
    for command in ("certify", "optimize-sigma", "predict", "analyze", "train", "demo"):
        with pytest.raises(SystemExit):
            cli.parse_args([command, "--help"])
        text = capsys.readouterr().out
        named = re.findall(r"docs/([a-z0-9-]+)\.md", text.split("documentation (docs/")[-1])
        assert named and all((docs / f"{page}.md").is_file() for page in named), command
    with pytest.raises(SystemExit):
        argv = ["certify", "--radius", "0.5", "--sigma", "0.25", "--data", "digits", "--out", "x.tsv"]
        cli.parse_args(argv)
    assert "(see 'ddrs certify --help' and docs/sequential.md)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["demo", "--count", "0"])
    assert capsys.readouterr().err.rstrip().endswith("(see 'ddrs demo --help')")  # no page for --count
    assert options.docs_page("--memory files record the rule") == "docs/memory.md"
    assert options.docs_page("no option here") is None
