"""The command line's choice of evaluation (issue 23): --compile auto by default (compiled where the
run is long enough to repay it, recorded but not compared on a resume), --autocast on request
(compared), one-line notes where torch cannot do what was asked, and Cohen's spellings.

torch.compile is replaced by a stand-in here (no C++ compilation; tests/test_evaluated.py has one
that compiles for real)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import torch

from ddrs import cli, job, options
from ddrs.results import read_rows
from ddrs_ext import precision
from ddrs_ext.data import load_digits_splits

MODELS = textwrap.dedent(
    """
    import torch


    def build():
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
        )
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return model
    """
)
SMALL = ["--n0", "16", "--n", "64", "--batch-size", "50"]


@pytest.fixture
def common(tmp_path) -> list:
    path = tmp_path / "cnnmodels.py"
    path.write_text(MODELS)
    return ["certify", "--model", f"{path}:build", "--data", "digits", "--sigma", 0.25, "--max", 6]


@pytest.fixture
def compiled(monkeypatch) -> list:
    """torch.compile replaced by a stand-in that records its calls and evaluates the model eagerly."""
    calls: list = []

    def stand_in(model, **options):
        calls.append(options)
        return model

    monkeypatch.setattr(torch, "compile", stand_in)
    return calls


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in (*argv, "--no-progress")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    return err


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_rows(path)[1]]


def settings(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".settings.json").read_text())


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": note: " in line]


def test_auto_leaves_a_short_run_uncompiled(capsys, common, compiled, tmp_path):
    out = tmp_path / "short.tsv"
    err = ok(capsys, *common, *SMALL, "--out", out)
    assert compiled == [] and notes(err) == []
    assert settings(out)["evaluation"] == {
        "compile": "off",
        "channels_last": False,
        "auto": True,
        "forward_rows": 6 * (16 + 64),
    }
    assert "evaluated" not in settings(out)


def test_auto_compiles_a_long_run_with_the_same_rows(capsys, common, compiled, monkeypatch, tmp_path):
    plain = tmp_path / "plain.tsv"
    ok(capsys, *common, *SMALL, "--compile", "off", "--out", plain)
    monkeypatch.setattr(precision, "COMPILE_MIN_ROWS", 6 * (16 + 64))  # this run is "long"
    out = tmp_path / "long.tsv"
    err = ok(capsys, *common, *SMALL, "--out", out)
    assert compiled == [{"mode": "default"}]
    assert notes(err) == [
        "ddrs certify: note: compiling the model (torch.compile, mode default and channels-last, "
        "480 forward rows)"
    ]
    evaluation = {"compile": "default", "channels_last": True, "auto": True, "forward_rows": 480}
    assert settings(out)["evaluation"] == evaluation
    evaluation = {"compile": "off", "channels_last": False, "auto": False, "forward_rows": 480}
    assert settings(plain)["evaluation"] == evaluation
    assert rows(out) == rows(plain)


def test_a_model_that_does_not_compile_is_noted_in_one_line(capsys, common, monkeypatch, tmp_path):
    def broken(model, **options):
        def call(x):
            raise RuntimeError("InductorError: CppCompileError\ng++: command not found")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    plain = tmp_path / "plain.tsv"
    ok(capsys, *common, *SMALL, "--out", plain)
    out = tmp_path / "fallback.tsv"
    err = ok(capsys, *common, *SMALL, "--compile", "default", "--out", out)
    assert "Traceback" not in err
    said = notes(err)
    assert len(said) == 2 and said[0].endswith("compiling the model (torch.compile, mode default)")
    assert said[1].startswith("ddrs certify: note: torch.compile could not compile the model (RuntimeError")
    assert said[1].endswith("it is evaluated uncompiled (the same function)")
    record = settings(out)["evaluation"]
    assert record["compile"] == "off" and record["fallback"].startswith("torch.compile could not compile")
    assert rows(out) == rows(plain)


def test_compile_is_not_compared_on_a_resume(capsys, common, compiled, tmp_path):
    """Started uncompiled, resumed compiled: accepted, and the file is the uninterrupted run's."""
    whole = tmp_path / "whole.tsv"
    ok(capsys, *common, *SMALL, "--out", whole)
    out = tmp_path / "resumed.tsv"
    ok(capsys, *common[:-1], 3, *SMALL, "--out", out)  # --max 3: half the inputs
    settings_path = out.with_name(out.name + ".settings.json")
    first = json.loads(settings_path.read_text())
    first["max"] = 6  # as if interrupted after three inputs
    settings_path.write_text(json.dumps(first))
    err = ok(capsys, *common, *SMALL, "--compile", "default", "--out", out)
    assert "resuming; 3 of 6 selected inputs already done" in err and compiled == [{"mode": "default"}]
    assert rows(out) == rows(whole)


@pytest.mark.parametrize(
    "earlier", [{"evaluated": {"compile": "default"}}, {"evaluated": {"channels_last": True}}, {}]
)
def test_files_of_earlier_versions_resume(capsys, common, tmp_path, earlier):
    """Before --compile auto the settings had no "evaluation"; --compile and --channels-last, when
    given, were in "evaluated" (compared then)."""
    out = tmp_path / "old.tsv"
    ok(capsys, *common, *SMALL, "--out", out)
    path = out.with_name(out.name + ".settings.json")
    old = {k: v for k, v in settings(out).items() if k != "evaluation"}
    path.write_text(json.dumps({**old, **earlier}))
    err = ok(capsys, *common, *SMALL, "--out", out)
    assert "all 6 selected inputs are already done" in err


def test_autocast_is_compared_on_a_resume(capsys, common, tmp_path):
    # negative control of the two tests above: a setting that changes the function is compared
    out = tmp_path / "bf16.tsv"
    ok(capsys, *common, *SMALL, "--autocast", "bf16", "--out", out)
    assert settings(out)["evaluated"] == {"autocast": "bf16"}
    code, _, err = run(capsys, *common, *SMALL, "--out", out)
    assert code == 2 and "other settings (evaluated: {'autocast': 'bf16'} then, None now)" in err


def test_autocast_that_torch_refuses_is_noted_and_not_recorded(capsys, common, monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: False)
    plain = tmp_path / "plain.tsv"
    ok(capsys, *common, *SMALL, "--out", plain)
    out = tmp_path / "fp16.tsv"
    err = ok(capsys, *common, *SMALL, "--autocast", "fp16", "--out", out)
    (said,) = notes(err)
    assert said.startswith("ddrs certify: note: torch cannot autocast to float16 on cpu")
    assert "evaluated" not in settings(out)  # what was certified: the model in float32
    assert rows(out) == rows(plain)


def test_cohens_spellings_take_the_same_choice(capsys, common, compiled, tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    ok(capsys, *common, "--N0", 16, "--N", 64, "--batch", 50, "--compile", "default", "--out", a)
    ok(capsys, *common, *SMALL, "--out", b)
    assert compiled == [{"mode": "default"}] and rows(a) == rows(b)


def test_predict_and_optimize_sigma_take_the_choice(capsys, common, compiled, tmp_path):
    base = [a for a in common[1:] if a != "--sigma" and a != 0.25]
    out = tmp_path / "p.tsv"
    ok(capsys, "predict", *base, "--sigma", 0.25, "--n", 64, "--compile", "default", "--out", out)
    assert settings(out)["evaluation"]["compile"] == "default"
    out = tmp_path / "s.tsv"
    sigma = ["--iterations", 2, "--num-samples", 8, "--surrogate-samples", 16, "--estimator", "score"]
    ok(capsys, "optimize-sigma", *base, *sigma, "--out", out)
    assert settings(out)["evaluation"]["forward_rows"] == 6 * (2 * 8 + 16)
    assert settings(out)["evaluation"]["compile"] == "off"
    assert len(compiled) == 1


def test_bad_compile_mode(capsys, common, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in (*common, "--compile", "fast", "--out", tmp_path / "x.tsv")])
    assert exit_.value.code == 2 and "argument --compile: invalid choice: 'fast'" in capsys.readouterr().err


def _args(command: str, **kw) -> argparse.Namespace:
    base = dict(command=command, n0=100, n=10_000, alpha=0.001, sequential=False, optimize_options=None)
    return argparse.Namespace(**{**base, **kw})


def test_forward_rows_per_input():
    assert job.forward_rows_per_input(_args("certify")) == 10_100
    assert job.forward_rows_per_input(_args("predict")) == 10_000
    sequential = job.forward_rows_per_input(_args("certify", n=100_000, sequential=True))
    assert 100 < sequential < 1000  # selection and the first round
    score = {"estimator": "score", "iterations": 16, "num_samples": 512}
    assert job.forward_rows_per_input(_args("certify", optimize_options=score)) == 10_100 + 16 * 512
    reparam = {**score, "estimator": "reparam"}  # runs uncompiled: not counted
    assert job.forward_rows_per_input(_args("certify", optimize_options=reparam)) == 10_100
    assert job.forward_rows_per_input(
        _args("optimize-sigma", optimize_options=score, surrogate_samples=1000)
    ) == (16 * 512 + 1000)


def test_the_threshold_is_the_librarys():
    assert options.COMPILE_MIN_ROWS == precision.COMPILE_MIN_ROWS
    rows, cpu = precision.COMPILE_MIN_ROWS, torch.device("cpu")
    auto = argparse.Namespace(compile="auto", channels_last=False)
    assert job.evaluation_choice(auto, rows, cpu, True) == {
        "compile": "default",
        "channels_last": True,
        "auto": True,
        "forward_rows": rows,
    }
    assert not job.evaluation_choice(auto, rows, cpu, False)["channels_last"]  # no 4-d weights
    assert job.evaluation_choice(auto, rows - 1, cpu, True)["compile"] == "off"
    assert not job.evaluation_choice(auto, rows - 1, cpu, True)["channels_last"]
    assert job.evaluation_choice(auto, rows, torch.device("cuda"), True)["compile"] == "off"
    given = argparse.Namespace(compile="max-autotune", channels_last=False)
    assert job.evaluation_choice(given, 1, cpu, True) == {
        "compile": "max-autotune",
        "channels_last": False,
        "auto": False,
        "forward_rows": 1,
    }


def test_a_model_that_fails_channels_last_is_evaluated_contiguous(capsys, compiled, monkeypatch, tmp_path):
    """--compile auto's channels-last must not break a model that views its activations (as many do)."""
    path = tmp_path / "viewmodels.py"
    path.write_text(
        MODELS
        + textwrap.dedent(
            """

            class Views(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.net = build()

                def forward(self, x):
                    h = self.net[1](self.net[0](x))
                    return self.net[3](h.view(h.shape[0], -1))
            """
        )
    )
    monkeypatch.setattr(precision, "COMPILE_MIN_ROWS", 1)
    base = ["certify", "--model", f"{path}:Views", "--data", "digits", "--sigma", 0.25, "--max", 6, *SMALL]
    out = tmp_path / "views.tsv"
    err = ok(capsys, *base, "--out", out)
    said = notes(err)
    assert len(said) == 2 and "the model fails with channels-last weights and inputs (" in said[1]
    assert said[1].endswith("it is evaluated in the contiguous format")
    assert settings(out)["evaluation"]["channels_last"] is False
    plain = tmp_path / "plain.tsv"
    ok(capsys, *base, "--compile", "off", "--out", plain)
    assert rows(out) == rows(plain)
    # negative control: asked for explicitly, channels-last that fails is an error
    code, _, err = run(capsys, *base, "--channels-last", "--compile", "off", "--out", tmp_path / "x.tsv")
    assert code == 2 and "the model fails when evaluated with --channels-last: " in err


# ----------------------------------------------------------------------------- ddrs train


def test_train_compiles_on_request_and_saves_contiguous_weights(capsys, compiled, tmp_path):
    from ddrs.checkpoints import load_checkpoint

    plain, fast = tmp_path / "plain.pt", tmp_path / "fast.pt"
    base = ["train", "--epochs", 1, "--batch-size", 256]
    assert cli.main([str(a) for a in (*base, "--out", plain)]) == 0
    assert compiled == []  # off by default
    assert cli.main([str(a) for a in (*base, "--compile", "default", "--out", fast)]) == 0
    assert compiled == [{"mode": "default"}]
    capsys.readouterr()
    state = torch.load(fast, weights_only=True)
    assert state["config"]["compile"] == "default"
    assert all(t.is_contiguous() for t in state["model"].values())
    a, _, _ = load_checkpoint(plain)
    b, _, _ = load_checkpoint(fast)
    x, _ = load_digits_splits(seed=0).test
    with torch.no_grad():
        # channels-last convolutions round differently (and Adam magnifies the rounding in the bias
        # before BatchNorm, whose gradient is nil): the same training, up to rounding, in function
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-2)


def test_dual_certification_evaluates_the_selector_as_the_model(capsys, common, compiled, tmp_path):
    path = Path(common[2].rpartition(":")[0])
    path.write_text(
        MODELS
        + textwrap.dedent(
            """

            def selector():
                torch.manual_seed(1)
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
            """
        )
    )
    dual = ["--sigma-levels", 0.25, 0.5, 1, "--selector", f"{path}:selector", "--selector-sigma", 0.5]
    base = [a for a in common if a not in ("--sigma", 0.25)]
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    ok(capsys, *base, *SMALL, *dual, "--compile", "default", "--out", a)
    assert compiled == [{"mode": "default"}, {"mode": "default"}]  # the model, then the selector
    ok(capsys, *base, *SMALL, *dual, "--compile", "off", "--out", b)
    assert repr(rows(a)) == repr(rows(b))  # sigma is nan where the selector abstained
