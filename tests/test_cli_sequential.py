"""ddrs certify --sequential with radii of interest (--radius R [R ...]), the open-ended mode
(--tolerance), evaluation with labels (--labels), and --sigma-levels --sequential: rows equal the
library call's with the same seed, the settings a file records and a resume compares, what the summary
and ddrs analyze report for such files, and the usage errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import fails, ok, run  # the command-line helpers the other CLI tests use
from test_cli_dual import MODELS, assert_dual_rows, build, cut, digits_test, dual_argv, rows

import ddrs_ext
from ddrs import analyze, cli
from ddrs.results import ResultFile, read_rows

N0, N_MAX, COUNT = 16, 800, 12


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "dualmodels.py"
    path.write_text(MODELS)
    return path


def certify_argv(models, *extra):
    return ["certify", "--model", f"{models}:classifier", "--data", "digits", "--sigma", 0.25,
            "--max", COUNT, "--n0", N0, "--n", N_MAX, *extra]  # fmt: skip


def assert_rows(path, want, y):
    got = read_rows(path)[1]
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert [r["radius"] for r in got] == want.radius.tolist()  # exact
    assert [r["samples"] for r in got] == want.samples.tolist()
    assert [r["correct"] for r in got] == (want.prediction == y).long().tolist()


@pytest.mark.parametrize(
    "options, library, recorded",
    [
        # several radii of interest, given unsorted and with a repeat: sorted and de-duplicated
        (["--sequential", "--radius", 0.3, 0, 0.1, 0.3], {"radius": [0.0, 0.1, 0.3]}, [0.0, 0.1, 0.3]),
        (["--sequential", "--radius", 0.2], {"radius": 0.2}, 0.2),  # one radius: radius mode
        (["--sequential", "--tolerance", 0.2], {"tolerance": 0.2}, None),  # open-ended mode
        (
            ["--sequential", "--radius", 0, 0.2, "--labels"],
            {"radius": [0.0, 0.2], "labels": True},
            [0.0, 0.2],
        ),
        (["--labels"], {"labels": True}, None),  # evaluation mode of plain CERTIFY
    ],
)
def test_each_mode_gives_the_library_rows(capsys, models, tmp_path, options, library, recorded):
    out = tmp_path / "s.tsv"
    ok(capsys, *certify_argv(models, *options), "--batch-size", 7, "--chunk", 5, "--out", out)
    x, y = digits_test(COUNT)
    kwargs = dict(n0=N0, seed=0, index=torch.arange(COUNT))
    if library.pop("labels", False):
        kwargs["labels"] = y
    model = build(models, "classifier")
    if "--sequential" in options:
        want = ddrs_ext.certify_sequential(model, x, 0.25, n_max=N_MAX, **kwargs, **library)
        assert want.samples.min() < N0 + N_MAX  # some inputs stopped early: the test means something
    else:
        want = ddrs_ext.certify(model, x, 0.25, n=N_MAX, **kwargs)
    assert_rows(out, want, y)
    settings = json.loads((tmp_path / "s.tsv.settings.json").read_text())
    if "--sequential" in options:
        assert settings["sequential"]["radius"] == recorded
    else:
        assert "sequential" not in settings
    assert settings.get("labels_mode", False) == ("--labels" in options)


def test_labels_mode_is_marked_as_evaluation(capsys, models, tmp_path):
    """--labels: predict is the true label or -1 (never another class), no selection samples; the
    settings, the summary and ddrs analyze say it is an evaluation mode. Negative control: the same
    run without --labels predicts other classes and is not marked."""
    out, plain = tmp_path / "l.tsv", tmp_path / "p.tsv"
    x, _ = digits_test(COUNT)
    with torch.no_grad():  # the classifier's own answers, four of them made wrong
        y = build(models, "classifier")(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    torch.save({"x": x, "y": y}, tmp_path / "own.pt")
    base = ["certify", "--model", f"{models}:classifier", "--data", tmp_path / "own.pt", "--sigma", 0.25,
            "--n0", N0, "--n", N_MAX, "--sequential", "--radius", 0, 0.2]  # fmt: skip
    summary = ok(capsys, *base, "--labels", "--out", out)
    ok(capsys, *base, "--out", plain)
    got = read_rows(out)[1]
    assert all(r["predict"] in (r["label"], -1) for r in got)
    assert any(r["predict"] == -1 for r in got) and any(r["predict"] == r["label"] for r in got)
    assert all(r["samples"] <= N_MAX for r in got)  # n0 unused
    assert any(r["predict"] not in (r["label"], -1) for r in read_rows(plain)[1])  # wrong classes there
    settings = json.loads((tmp_path / "l.tsv.settings.json").read_text())
    assert settings["labels_mode"] is True
    assert any(n.startswith("evaluation mode (--labels)") for n in settings["notes"])
    assert "evaluation mode (--labels)" in summary
    assert "labels_mode" not in json.loads((tmp_path / "p.tsv.settings.json").read_text())
    code, table, _ = run(capsys, "analyze", out, plain)
    assert code == 0
    assert "| l (radii of interest r = 0, 0.2) (labels mode) |" in table
    assert "note: l: evaluation mode (--labels)" in table and "note: p: evaluation" not in table


def test_analyze_and_summary_report_only_the_radii_of_interest(capsys, models, tmp_path):
    """A file with radii of interest: the summary and ddrs analyze give the certified accuracy at each
    of them and nothing else (no ACR, no other radius, points not a curve); the open-ended mode keeps
    the whole curve and the ACR (the negative control)."""
    x, _ = digits_test(COUNT)
    with torch.no_grad():  # labelled with the classifier's own answers: some certify, some do not
        torch.save({"x": x, "y": build(models, "classifier")(x).argmax(1)}, tmp_path / "own.pt")
    base = ["certify", "--model", f"{models}:classifier", "--data", tmp_path / "own.pt", "--sigma", 0.25,
            "--n0", N0, "--n", N_MAX, "--sequential"]  # fmt: skip
    summary = ok(capsys, *base, "--radius", 0.1, 0.3, "--out", tmp_path / "r.tsv")
    curve = ok(capsys, *base, "--out", tmp_path / "c.tsv")
    r = analyze.load(tmp_path / "r.tsv")
    at = r.accuracy([0.1, 0.3])
    assert 0 < at[0] < 1 and at[1] < at[0]  # the radii say different things: the test means something
    assert f"certified accuracy {at[0]:.3f} at r = 0.1, {at[1]:.3f} at r = 0.3 (radii of interest" in summary
    assert "average certified radius" in summary and "average certified radius 0" not in summary
    assert "average certified radius" in curve and "radii of interest" not in curve
    assert r.radii_of_interest == (0.1, 0.3) and r.radius_mode is None
    c = analyze.load(tmp_path / "c.tsv")
    assert c.radii_of_interest is None and not c.notes
    code, table, _ = run(capsys, "analyze", tmp_path / "r.tsv", tmp_path / "c.tsv", "--radii", 0, 0.3, 0.5)
    assert code == 0
    lines = table.strip().splitlines()
    assert lines[0] == "| result | r = 0 | r = 0.1 | r = 0.3 | r = 0.5 | ACR | inputs |"
    assert lines[2] == f"| r (radii of interest r = 0.1, 0.3) | – | {at[0]:.3f} | {at[1]:.3f} | – | – | 12 |"
    full = c.accuracy([0, 0.1, 0.3, 0.5])
    assert lines[3] == "| c | " + " | ".join(f"{a:.3f}" for a in full) + f" | {c.acr:.3f} | 12 |"
    assert lines[-1].startswith("note: r: sequential certification with radii of interest (r = 0.1, 0.3)")
    code, latex, _ = run(capsys, "analyze", tmp_path / "r.tsv", "--latex", "--radii", 0.1, 0.2)
    assert (
        code == 0
        and f"r (radii of interest r = 0.1, 0.3) & {at[0]:.3f} & -- & {at[1]:.3f} & -- & 12" in latex
    )
    code, _, _ = run(capsys, "analyze", tmp_path / "r.tsv", tmp_path / "c.tsv", "--plot", tmp_path / "p.png")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0


def test_resume_compares_the_radii_of_interest_and_labels(capsys, models, tmp_path):
    argv = certify_argv(models, "--sequential", "--radius", 0.1, 0.3)
    out = tmp_path / "s.tsv"
    ok(capsys, *argv, "--out", tmp_path / "whole.tsv")
    ok(capsys, *argv, "--out", out)
    cut(out, 5)
    # the same radii in another order and with a repeat are the same run: it resumes
    ok(
        capsys,
        *certify_argv(models, "--sequential", "--radius", 0.3, 0.1, 0.1),
        "--batch-size",
        3,
        "--out",
        out,
    )
    assert rows(out) == rows(tmp_path / "whole.tsv")
    cut(out, 5)
    msg = fails(capsys, *certify_argv(models, "--sequential", "--radius", 0.1, 0.4), "--out", out)
    assert "other settings" in msg and "'radius': [0.1, 0.3]" in msg and "'radius': [0.1, 0.4]" in msg
    msg = fails(capsys, *certify_argv(models, "--sequential", "--radius", 0.1), "--out", out)
    assert "other settings" in msg and "sequential" in msg
    msg = fails(capsys, *argv, "--labels", "--out", out)
    assert "other settings" in msg and "labels_mode: None then, True now" in msg


def test_a_file_of_the_earlier_sequential_rule_is_not_continued(capsys, models, tmp_path):
    """A --sequential file without "sequential_rule" (written under the earlier rule: a relative
    tolerance) holds other rows for the same options: a rerun refuses to continue it. The negative
    control, the same cut file with the key, resumes."""
    argv = certify_argv(models, "--sequential", "--radius", 0.2)
    out = tmp_path / "s.tsv"
    ok(capsys, *argv, "--out", out)
    assert json.loads((tmp_path / "s.tsv.settings.json").read_text())["sequential_rule"] == 2
    cut(out, 5)
    ok(capsys, *argv, "--out", out)  # resumes
    cut(out, 5)
    settings = json.loads((tmp_path / "s.tsv.settings.json").read_text())
    del settings["sequential_rule"]
    (tmp_path / "s.tsv.settings.json").write_text(json.dumps(settings))
    msg = fails(capsys, *argv, "--out", out)
    assert "stopping rule of an earlier ddrs version (rule 1" in msg and "another --out" in msg


def test_dual_sequential_gives_the_library_rows(capsys, models, tmp_path):
    out = tmp_path / "d.tsv"
    summary = ok(capsys, *dual_argv(models, "--n", 800, "--sequential", "--radius", 0, 0.2), "--out", out)
    x, y = digits_test(12)
    want = ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, [0.12, 0.25, 0.5], selector_sigma=0.25,
        n0=16, n=800, alpha=0.001, seed=0, index=torch.arange(12), sequential=True, radius=[0.0, 0.2],
    )  # fmt: skip
    assert_dual_rows(out, want, y)
    full = ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, [0.12, 0.25, 0.5], selector_sigma=0.25,
        n0=16, n=800, alpha=0.001, seed=0, index=torch.arange(12),
    )  # fmt: skip
    assert want.samples.sum() < full.samples.sum()  # it stopped early: the test means something
    settings = json.loads((tmp_path / "d.tsv.settings.json").read_text())
    assert settings["sequential"] == {"radius": [0.0, 0.2], "tolerance": None}
    assert "(radii of interest" in summary and "the selector abstained on" in summary
    # the open-ended mode passes its tolerance through
    ok(
        capsys,
        *dual_argv(models, "--n", 800, "--sequential", "--tolerance", 0.3),
        "--out",
        tmp_path / "o.tsv",
    )
    want = ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, [0.12, 0.25, 0.5], selector_sigma=0.25,
        n0=16, n=800, alpha=0.001, seed=0, index=torch.arange(12), sequential=True, tolerance=0.3,
    )  # fmt: skip
    assert_dual_rows(tmp_path / "o.tsv", want, y)


def test_sequential_radii_with_a_sigma_per_input_and_the_memory(capsys, models, tmp_path):
    sigma = torch.tensor([0.1 + 0.04 * i for i in range(10)], dtype=torch.float64)
    with ResultFile(tmp_path / "sigma.tsv", ("idx", "sigma")) as f:
        for i in range(10):
            f.write({"idx": i, "sigma": float(sigma[i])})
    argv = ["certify", "--model", f"{models}:classifier", "--data", "digits", "--max", 10, "--n0", 16,
            "--n", 400, "--sequential", "--radius", 0.1, 0.25,
            "--sigma-file", tmp_path / "sigma.tsv"]  # fmt: skip
    summary = ok(capsys, *argv, "--out", tmp_path / "m.tsv")
    x, _ = digits_test(10)
    want = ddrs_ext.certify_sequential(
        build(models, "classifier"),
        x,
        sigma,
        n0=16,
        n_max=400,
        seed=0,
        index=torch.arange(10),
        radius=[0.1, 0.25],
    )
    prediction, radius = ddrs_ext.CertificationMemory().adjust(x, want.prediction, want.radius)
    got = rows(tmp_path / "m.tsv")
    assert [r["predict"] for r in got] == prediction.tolist()
    assert [r["radius"] for r in got] == radius.tolist()
    assert [r["samples"] for r in got] == want.samples.tolist()
    assert "the memory changed" in summary and "at r = 0.25" in summary


def test_help_explains_the_modes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["certify", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "radii of interest",
        "open-ended mode",
        "--radius R [R ...]",
        "evaluation mode, not a prediction",
    ):
        assert phrase in text, phrase


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sigma", 0.25, "--sequential", "--radius", 0.1, -1], "argument --radius: must be >= 0, got -1"),
        (["--sigma", 0.25, "--sequential", "--radius", "inf"], "argument --radius: must be finite"),
        (["--sigma", 0.25, "--sequential", "--radius"], "argument --radius: expected at least one argument"),
        (["--sigma", 0.25, "--radius", 0.1, 0.2], "--radius and --tolerance need --sequential"),
        (["--sigma", 0.25, "--sequential", "--radius", 0.1, "--tolerance", 0.1], "not allowed with"),
        (["--sigma", 0.25, "--sequential", "--tolerance", -0.1], "argument --tolerance: must be >= 0"),
        (["--sigma-file", "s.tsv", "--labels"], "--labels does not apply to --memory"),
        (["--sigma", 0.25, "--memory", "--labels"], "give --no-memory with a sigma per input"),
    ],
)
def test_bad_options_are_one_line_usage_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["certify", "--model", "m:f", "--data", "digits", "--out", "never.tsv", *map(str, extra)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("ddrs certify: error: "), err


def test_labels_outside_the_models_classes_are_refused(capsys, models, tmp_path):
    """--labels certifies the data's labels: one the model has no output for is a clear error."""
    x, y = digits_test(4)
    torch.save({"x": x, "y": torch.tensor([0, 1, 12, 3])}, tmp_path / "bad.pt")
    argv = ["certify", "--model", f"{models}:classifier", "--data", tmp_path / "bad.pt", "--sigma", 0.25]
    msg = fails(capsys, *argv, "--sequential", "--radius", 0.1, "--labels", "--out", tmp_path / "b.tsv")
    assert "input idx 2 has label 12, outside [0, 10)" in msg
