"""``ddrs certify --noise uniform`` with --sigma-levels (a selector, --cascade, --confidence-routing,
--sequential) and ``ddrs train --selector-for ... --noise uniform`` (issue 20): rows equal the library's
L1 results with the same seed, the settings say the norm, and a rerun with the other noise is refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import fails, ok, run  # the command-line helpers the other CLI tests use
from test_cli_cascade import assert_cascade_rows, route_argv
from test_cli_cascade import experts as build_experts
from test_cli_dual import LEVELS, MODELS, TINY, assert_dual_rows, build, digits_test, dual_argv, rows

import ddrs_ext
from ddrs import analyze, selector
from ddrs.checkpoints import load_selector_checkpoint
from ddrs.results import read_results
from ddrs_ext.data import load_digits_split
from ddrs_ext.dual import level_radii, train_selector
from ddrs_ext.models import digits_cnn
from ddrs_ext.routing import ConfidenceSelector, certify_cascade

UNIFORM = ["--noise", "uniform"]


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "dualmodels.py"
    path.write_text(MODELS)
    return path


def settings_of(path) -> dict:
    return json.loads(open(f"{path}.settings.json").read())


def dual_library(models, count=12, **kw):
    x, _ = digits_test(count)
    return ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, LEVELS, selector_sigma=0.25, n0=16, n=64,
        alpha=0.001, seed=0, index=torch.arange(count), noise="uniform", **kw,
    )  # fmt: skip


def test_dual_l1_rows_equal_the_library_and_say_their_norm(capsys, models, tmp_path):
    out = tmp_path / "d.tsv"
    summary = ok(capsys, *dual_argv(models, *UNIFORM), "--batch-size", 50, "--chunk", 5, "--out", out)
    assert "average certified L1 radius" in summary and "the selector abstained on" in summary
    want = dual_library(models)
    assert want.norm == "l1"
    assert_dual_rows(out, want, digits_test(12)[1])
    levels = read_results(out)["level"]
    assert (levels >= 0).sum() >= 3 and len(
        set(levels.tolist()) - {-1}
    ) >= 2  # the comparison means something
    settings = settings_of(out)
    assert (settings["noise"], settings["norm"]) == ("uniform", "l1")
    assert settings["sigma"] == {"levels": LEVELS, "selector_sigma": 0.25}
    assert analyze.load(out).radius.tolist() == want.radius.tolist()
    # not the Gaussian file: another certificate, and the file refuses a rerun with the other noise
    ok(capsys, *dual_argv(models), "--out", tmp_path / "l2.tsv")
    assert settings_of(tmp_path / "l2.tsv")["norm"] == "l2"
    assert read_results(tmp_path / "l2.tsv")["radius"].tolist() != want.radius.tolist()
    message = fails(capsys, *dual_argv(models), "--out", out)
    assert "was made with --noise uniform (L1 radii)" in message
    # resumed after a kill, with other batching: the same rows
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:8]) + lines[8][:5])
    ok(capsys, *dual_argv(models, *UNIFORM), "--batch-size", 999, "--chunk", 2, "--out", out)
    ok(capsys, *dual_argv(models, *UNIFORM), "--out", tmp_path / "whole.tsv")
    assert rows(out) == rows(tmp_path / "whole.tsv")


def test_sequential_dual_l1_equals_the_library(capsys, models, tmp_path):
    out = tmp_path / "s.tsv"
    ok(capsys, *dual_argv(models, *UNIFORM, "--sequential", "--tolerance", 0.3), "--out", out)
    want = dual_library(models, sequential=True, tolerance=0.3)
    assert_dual_rows(out, want, digits_test(12)[1])
    assert settings_of(out)["norm"] == "l1"


def test_cascade_l1_rows_equal_the_library(capsys, models, tmp_path):
    argv = route_argv(models, "--cascade", "--cascade-threshold", 0.6, *UNIFORM)
    summary = ok(capsys, *argv, "--batch-size", 70, "--chunk", 5, "--out", tmp_path / "c.tsv")
    assert "the cascade answered at θ = 0.12: " in summary and "certified L1 radius" in summary
    x, y = digits_test(12)
    want = certify_cascade(
        build_experts(models), x, LEVELS, threshold=0.6, n0=16, n=200, seed=0, index=torch.arange(12),
        noise="uniform",
    )  # fmt: skip
    assert want.norm == "l1" and len(set(want.level.tolist())) >= 2
    assert_cascade_rows(tmp_path / "c.tsv", want, y)
    assert settings_of(tmp_path / "c.tsv")["norm"] == "l1"
    gaussian = certify_cascade(
        build_experts(models), x, LEVELS, threshold=0.6, n0=16, n=200, seed=0, index=torch.arange(12)
    )
    assert gaussian.radius.tolist() != want.radius.tolist()


def test_confidence_routing_l1_rows_equal_the_library(capsys, models, tmp_path):
    ok(capsys, *route_argv(models, "--confidence-routing", 0.9, 0.99, *UNIFORM), "--out", tmp_path / "r.tsv")
    x, y = digits_test(12)
    experts = build_experts(models)
    want = ddrs_ext.certify_dual(
        experts, ConfidenceSelector(experts, [0.9, 0.99]), x, LEVELS, selector_sigma=0.5, n0=16, n=200,
        seed=0, index=torch.arange(12), noise="uniform",
    )  # fmt: skip
    assert_dual_rows(tmp_path / "r.tsv", want, y)
    assert len(set(want.level.tolist())) >= 2 and settings_of(tmp_path / "r.tsv")["norm"] == "l1"


def test_train_a_uniform_noise_selector_and_certify_with_it(capsys, models, tmp_path):
    (x, _), _ = load_digits_split(0)
    with torch.no_grad():
        y = build(models, "classifier")(x[:60]).argmax(1)
    torch.save({"x": x[:60], "y": y}, tmp_path / "mine.pt")
    argv = ["train", "--selector-for", "--model", f"{models}:classifier", "--data", tmp_path / "mine.pt",
            "--sigma-levels", *LEVELS, "--label-n0", 8, "--label-n", 32, "--epochs", 1, "--batch-size", 32,
            *UNIFORM, "--out", tmp_path / "sel.pt"]  # fmt: skip
    code, printed, err = run(capsys, *argv)
    assert code == 0, err
    assert "the L1 radius at each of 3 levels" in printed and "labels: θ = 0.5 (level 3/3)" in printed
    net, checkpoint = load_selector_checkpoint(tmp_path / "sel.pt")
    assert checkpoint["noise"] == "uniform" and checkpoint["selector_sigma"] == 0.5
    # the library's recipe: labels from L1 radii, uniform augmentation at theta_e
    radii = level_radii(
        build(models, "classifier"), x[:60], y, LEVELS, n0=8, n=32, alpha=0.01, noise="uniform",
        seed=selector.derived_seed(0, selector._LABEL_KEY), index=torch.arange(60),
    )  # fmt: skip
    assert len(set(radii.argmax(1).tolist())) >= 2
    torch.manual_seed(0)
    want = digits_cnn(3)
    train_selector(
        want, x[:60], radii.argmax(1), selector_sigma=0.5, epochs=1, batch_size=32, lr=3e-3, noise="uniform",
        seed=selector.derived_seed(0, selector._TRAIN_KEY),
    )  # fmt: skip
    want.eval()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), want.state_dict().values()))
    # ddrs certify takes it alone, at its theta_e; with Gaussian noise it notes the mismatch
    cert = ["certify", "--model", f"{models}:classifier", "--selector-checkpoint", tmp_path / "sel.pt",
            "--data", "digits", "--max", 6, *TINY, "--sigma-levels", *LEVELS]  # fmt: skip
    ok(capsys, *cert, *UNIFORM, "--out", tmp_path / "d.tsv")
    xt, yt = digits_test(6)
    dual = ddrs_ext.certify_dual(
        build(models, "classifier"), net, xt, LEVELS, selector_sigma=0.5, n0=16, n=64, seed=0,
        index=torch.arange(6), noise="uniform",
    )  # fmt: skip
    assert_dual_rows(tmp_path / "d.tsv", dual, yt)
    code, _, err = run(capsys, *cert, "--no-progress", "--out", tmp_path / "g.tsv")
    assert code == 0 and "was trained with uniform noise" in err and "--noise gaussian" in err


def test_help_says_the_levels_are_half_widths():
    import argparse

    from ddrs.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["certify"]._actions}
    for dest in ("sigma_levels", "selector_sigma"):
        assert helps[dest].endswith("(--noise uniform: the cube's half-width theta)"), dest
