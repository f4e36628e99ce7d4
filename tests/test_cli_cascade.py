"""ddrs certify's training-free routes (--cascade: ddrs_ext.routing.certify_cascade; --confidence-routing:
ddrs_ext.routing.ConfidenceSelector under ddrs_ext.certify_dual) and the default --selector-sigma: rows
equal the library's with the same seed, resumption, option errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_cli import fails, ok  # the command-line helpers the other CLI tests use
from test_cli_dual import MODELS, assert_dual_rows, build, cut, digits_test, rows

import ddrs_ext
from ddrs import cli, selector
from ddrs.checkpoints import BUILDER, SELECTOR_FORMAT, load_selector_checkpoint
from ddrs.results import CASCADE_COLUMNS, read_results, read_rows
from ddrs_ext.routing import ConfidenceSelector, certify_cascade

LEVELS = [0.12, 0.25, 0.5]
EXPERTS = ["classifier", "expert1", "expert2"]


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "dualmodels.py"
    path.write_text(MODELS)
    return path


def route_argv(models, *extra, count=12):
    experts = [a for name in EXPERTS for a in ("--model", f"{models}:{name}")]
    return ["certify", *experts, "--data", "digits", "--max", count, "--n0", 16, "--n", 200,
            "--sigma-levels", *LEVELS, *extra]  # fmt: skip


def experts(models):
    return [build(models, name) for name in EXPERTS]


def assert_cascade_rows(path, want, y):
    got = read_results(path)
    for column in ("predict", "radius", "level", "radius_level", "radius_above", "stopped", "samples"):
        assert got[column].tolist() == getattr(want, "prediction" if column == "predict" else column).tolist()
    assert got["correct"].tolist() == (want.prediction == y).long().tolist()
    sigma = got["sigma"].tolist()
    assert [math.isnan(s) for s in sigma] == (want.level == -1).tolist()


@pytest.mark.parametrize(
    "extra, library",
    [
        ([], {}),
        (["--cascade-threshold", "0.6", "--alpha-levels", "0.0002", "0.0003", "0.0005"],
         {"threshold": 0.6, "alpha_levels": [0.0002, 0.0003, 0.0005]}),
    ],
)  # fmt: skip
def test_cascade_rows_equal_the_library_and_resume(capsys, models, tmp_path, extra, library):
    argv = route_argv(models, "--cascade", *extra)
    summary = ok(capsys, *argv, "--batch-size", 70, "--chunk", 5, "--out", tmp_path / "c.tsv")
    assert "the cascade answered at σ = 0.12: " in summary and "abstention radius was the smaller" in summary
    assert read_rows(tmp_path / "c.tsv")[0] == CASCADE_COLUMNS
    x, y = digits_test(12)
    want = certify_cascade(
        experts(models), x, LEVELS, n0=16, n=200, seed=0, index=torch.arange(12), **library
    )
    assert_cascade_rows(tmp_path / "c.tsv", want, y)
    assert len(set(want.level.tolist())) >= 2  # the comparison means something: several levels answer
    settings = json.loads((tmp_path / "c.tsv.settings.json").read_text())
    assert settings["sigma"] == {
        "levels": LEVELS,
        "route": "cascade",
        "cascade_threshold": library.get("threshold", 0.5),
        "alpha_levels": list(want.alpha_levels),
    }
    # resumed after a kill, with other batching: the same file as one run
    ok(capsys, *argv, "--out", tmp_path / "whole.tsv")
    cut(tmp_path / "c.tsv", 7)
    ok(capsys, *argv, "--batch-size", 1000, "--chunk", 3, "--out", tmp_path / "c.tsv")
    assert rows(tmp_path / "c.tsv") == rows(tmp_path / "whole.tsv")
    # another threshold is another run
    msg = fails(
        capsys, *route_argv(models, "--cascade", "--cascade-threshold", 0.7), "--out", tmp_path / "c.tsv"
    )
    assert "cascade_threshold" in msg


def test_cascade_with_one_model_for_every_level(capsys, models, tmp_path):
    argv = ["certify", "--model", f"{models}:classifier", "--data", "digits", "--max", 6, "--n0", 16,
            "--n", 200, "--sigma-levels", *LEVELS, "--cascade"]  # fmt: skip
    ok(capsys, *argv, "--out", tmp_path / "one.tsv")
    x, y = digits_test(6)
    want = certify_cascade(
        build(models, "classifier"), x, LEVELS, n0=16, n=200, seed=0, index=torch.arange(6)
    )
    assert_cascade_rows(tmp_path / "one.tsv", want, y)


def test_confidence_routing_rows_equal_the_library(capsys, models, tmp_path):
    argv = route_argv(models, "--confidence-routing", 0.9, 0.99)
    summary = ok(capsys, *argv, "--out", tmp_path / "r.tsv")
    assert "the selector abstained on" in summary
    x, y = digits_test(12)
    route = ConfidenceSelector(experts(models), [0.9, 0.99])
    want = ddrs_ext.certify_dual(
        experts(models), route, x, LEVELS, selector_sigma=0.5, n0=16, n=200, seed=0, index=torch.arange(12)
    )  # the selector sigma: the largest level by default
    assert_dual_rows(tmp_path / "r.tsv", want, y)
    assert len(set(want.level.tolist())) >= 2
    settings = json.loads((tmp_path / "r.tsv.settings.json").read_text())
    assert settings["selector"] == {"confidence_routing": [0.9, 0.99]}
    assert settings["sigma"] == {"levels": LEVELS, "selector_sigma": 0.5}
    # with --selector-sigma
    ok(capsys, *argv, "--selector-sigma", 0.25, "--out", tmp_path / "s.tsv")
    want = ddrs_ext.certify_dual(
        experts(models), route, x, LEVELS, selector_sigma=0.25, n0=16, n=200, seed=0, index=torch.arange(12)
    )
    assert_dual_rows(tmp_path / "s.tsv", want, y)


def test_selector_sigma_defaults_to_the_largest_level_or_the_checkpoints(capsys, models, tmp_path):
    argv = ["certify", "--model", f"{models}:classifier", "--selector", f"{models}:selector", "--data",
            "digits", "--max", 6, "--n0", 16, "--n", 64, "--sigma-levels", *LEVELS]  # fmt: skip
    ok(capsys, *argv, "--out", tmp_path / "d.tsv")
    x, y = digits_test(6)
    want = ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, LEVELS, selector_sigma=max(LEVELS),
        n0=16, n=64, seed=0, index=torch.arange(6),
    )  # fmt: skip
    assert_dual_rows(tmp_path / "d.tsv", want, y)
    # a selector checkpoint of ddrs train of the first format (version 1) alone: its recorded sigma
    from ddrs_ext.models import digits_cnn

    torch.manual_seed(1)
    net = digits_cnn(3).eval()
    old = {"format": SELECTOR_FORMAT, "version": 1, "builder": BUILDER, "num_levels": 3,
           "model": net.state_dict(), "sigma_levels": LEVELS, "selector_sigma": 0.25,
           "label_counts": [1, 1, 1], "losses": [1.0],
           "config": {"classifier_fingerprint": "x", "label_n0": 64, "label_n": 512, "label_alpha": 0.01,
                      "data_seed": 0}}  # fmt: skip
    torch.save(old, tmp_path / "old.pt")
    loaded, content = load_selector_checkpoint(tmp_path / "old.pt")
    assert content["version"] == 1 and torch.equal(loaded(x), net(x))
    argv = ["certify", "--model", f"{models}:classifier", "--selector-checkpoint", tmp_path / "old.pt",
            "--data", "digits", "--max", 6, "--n0", 16, "--n", 64, "--sigma-levels", *LEVELS]  # fmt: skip
    ok(capsys, *argv, "--out", tmp_path / "old.tsv")
    want = ddrs_ext.certify_dual(
        build(models, "classifier"), net, x, LEVELS, selector_sigma=0.25, n0=16, n=64, seed=0,
        index=torch.arange(6),
    )  # fmt: skip
    assert_dual_rows(tmp_path / "old.tsv", want, y)
    assert json.loads((tmp_path / "old.tsv.settings.json").read_text())["sigma"]["selector_sigma"] == 0.25
    # an unknown version is refused with one line
    torch.save({**old, "version": 9}, tmp_path / "v9.pt")
    msg = fails(capsys, *argv[:4], tmp_path / "v9.pt", *argv[5:], "--out", tmp_path / "v9.tsv")
    assert "unknown selector checkpoint version 9" in msg
    assert selector.FORMAT == SELECTOR_FORMAT


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sigma", "1", "--cascade"], "--cascade needs --sigma-levels"),
        (["--sigma", "1", "--confidence-routing", "0.9"], "--confidence-routing needs --sigma-levels"),
        (["--sigma", "1", "--cascade-threshold", "0.6"], "are for --cascade"),
        (["--sigma-levels", "1", "2", "--selector", "m:f", "--alpha-levels", "0.1", "0.1"], "for --cascade"),
        (["--sigma-levels", "1", "2", "--cascade", "--selector", "m:f"], "routes without a selector"),
        (["--sigma-levels", "1", "2", "--cascade", "--selector-sigma", "1"], "do not apply to --cascade"),
        (["--sigma-levels", "1", "2", "--cascade", "--confidence-routing", "0.9"], "give one"),
        (["--sigma-levels", "1", "2", "--cascade", "--cascade-threshold", "0.4"], "must be >= 0.5"),
        (["--sigma-levels", "1", "2", "--cascade", "--cascade-threshold", "1"], "must be < 1"),
        (["--sigma-levels", "1", "2", "--cascade", "--alpha-levels", "0.0005"], "one value per level (2)"),
        (["--sigma-levels", "1", "2", "--cascade", "--alpha-levels", "0.001", "0.001"], "more than --alpha"),
        (["--sigma-levels", "1", "2", "3", "--confidence-routing", "0.9"], "above the lowest (2), got 1"),
        (["--sigma-levels", "1", "2", "--confidence-routing", "1.5"], "must lie in (0, 1]"),
        (["--sigma-levels", "1", "--confidence-routing", "0.9"], "at least 2 levels"),
        (["--sigma-levels", "1", "2", "--cascade", "--sequential"], "--sequential does not apply"),
        (["--sigma-levels", "1", "2"], "needs a selector"),
    ],
)
def test_route_option_errors_are_one_line_usage_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["certify", "--data", "digits", "--out", "never.tsv", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("ddrs certify: error: "), err
