"""ddrs certify --sequential (ddrs_ext.certify_sequential) and --sigma-levels with a selector
(ddrs_ext.certify_dual), the samples column, and the selector that python -m ddrs.train_digits
--selector-for trains: rows equal the library's, resumption, option errors."""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest
import torch
from test_cli import fails, ok, run  # the command-line helpers the other CLI tests use

import ddrs_ext
from ddrs import analyze, cli, selector, train_digits
from ddrs.commands import certify as certify_command
from ddrs.results import CERTIFY_COLUMNS, DUAL_COLUMNS, ResultFile, read_results, read_rows
from ddrs_ext.data import load_digits_split

MODELS = textwrap.dedent(
    """
    import torch


    class Linear(torch.nn.Module):
        # a fixed random linear map of the 64 pixels: logits far apart, so certificates are not all 0
        def __init__(self, outputs, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.map = torch.nn.Linear(64, outputs)
            with torch.no_grad():
                for p in self.map.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))

        def forward(self, x):
            return self.map(x.flatten(1))


    def classifier():
        return Linear(10, 0)


    def expert1():
        return Linear(10, 1)


    def expert2():
        return Linear(10, 2)


    def selector():
        return Linear(3, 3)


    def selector2():
        return Linear(2, 3)
    """
)
TINY = ["--n0", "16", "--n", "64"]
LEVELS = [0.12, 0.25, 0.5]


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "dualmodels.py"
    path.write_text(MODELS)
    return path


def rows(path, drop=("time",)):
    """The rows without ``drop``, NaN (the sigma of an input whose selector abstained) as "nan"."""
    nan = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return [{k: nan(v) for k, v in r.items() if k not in drop} for r in read_rows(path)[1]]


def build(models, name):
    from ddrs.loading import load_model

    return load_model(f"{models}:{name}", None, torch.device("cpu"))


def digits_test(count):
    _, (x, y) = load_digits_split(seed=0)
    return x[:count], y[:count]


def cut(path, keep: int) -> None:
    """Keeps the header and ``keep`` rows, and half of the next, as a kill mid-write leaves a file."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: keep + 1]) + lines[keep + 1][:5])


# ----------------------------------------------------------------------------- --sequential


@pytest.mark.parametrize(
    "mode, library",
    [([], {}), (["--tolerance", "0.3"], {"tolerance": 0.3}), (["--radius", "0.2"], {"radius": 0.2})],
)
def test_sequential_rows_equal_the_library_and_resume(capsys, models, tmp_path, mode, library):
    common = ["certify", "--model", f"{models}:classifier", "--data", "digits", "--sigma", 0.25, "--max", 12]
    argv = [*common, "--n0", 16, "--n", 800, "--sequential", *mode]
    summary = ok(capsys, *argv, "--batch-size", 7, "--chunk", 5, "--out", tmp_path / "s.tsv")
    assert "model evaluations per input" in summary
    header, got = read_rows(tmp_path / "s.tsv")
    assert header == CERTIFY_COLUMNS
    x, y = digits_test(12)
    want = ddrs_ext.certify_sequential(
        build(models, "classifier"), x, 0.25, n0=16, n_max=800, seed=0, index=torch.arange(12), **library
    )
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert [r["radius"] for r in got] == want.radius.tolist()  # exact
    assert [r["samples"] for r in got] == want.samples.tolist()
    assert min(r["samples"] for r in got) < 16 + 800  # some inputs stopped early
    settings = json.loads((tmp_path / "s.tsv.settings.json").read_text())
    tolerance = library.get(
        "tolerance", None if "radius" in library else certify_command.SEQUENTIAL_TOLERANCE
    )
    assert settings["sequential"] == {"radius": library.get("radius"), "tolerance": tolerance}
    # killed after 5 rows, resumed with other batching: the uninterrupted run's rows
    ok(capsys, *argv, "--out", tmp_path / "whole.tsv")
    cut(tmp_path / "s.tsv", 5)
    ok(capsys, *argv, "--batch-size", 1000, "--out", tmp_path / "s.tsv")
    assert rows(tmp_path / "s.tsv") == rows(tmp_path / "whole.tsv")
    # another tolerance is another run
    msg = fails(
        capsys,
        *common,
        "--n0",
        16,
        "--n",
        800,
        "--sequential",
        "--tolerance",
        0.7,
        "--out",
        tmp_path / "s.tsv",
    )
    assert "other settings" in msg and "sequential" in msg


def test_radius_mode_files_report_only_certified_at_r(capsys, models, tmp_path):
    """--sequential --radius r answers "certified at r or not" per input: its file is marked, and its
    summary and ddrs analyze give the certified accuracy at r alone (no curve, no ACR). The negative
    control, curve mode, is not marked and keeps its full row."""
    x, _ = digits_test(12)
    with torch.no_grad():  # labelled with the classifier's own answers: some certify, some do not
        torch.save({"x": x, "y": build(models, "classifier")(x).argmax(1)}, tmp_path / "own.pt")
    common = ["certify", "--model", f"{models}:classifier", "--data", tmp_path / "own.pt", "--sigma", 0.25]
    argv = [*common, "--n0", 16, "--n", 800, "--sequential"]
    summary = ok(capsys, *argv, "--radius", 0.2, "--out", tmp_path / "r.tsv")
    curve = ok(capsys, *argv, "--out", tmp_path / "c.tsv")
    got = read_rows(tmp_path / "r.tsv")[1]
    at = sum(r["correct"] == 1 and r["radius"] >= 0.2 for r in got) / len(got)
    assert 0 < at < 1
    assert f"12 inputs, certified accuracy {at:.3f} at radius 0.2 (radius mode" in summary
    assert not re.search(r"average certified radius \d", summary) and "model evaluations per input" in summary
    assert re.search(r"average certified radius \d", curve) and "radius mode" not in curve
    notes = json.loads((tmp_path / "r.tsv.settings.json").read_text())["notes"]
    assert len(notes) == 1 and notes[0].startswith("sequential certification in radius mode (r = 0.2)")
    assert "notes" not in json.loads((tmp_path / "c.tsv.settings.json").read_text())
    code, table, _ = run(capsys, "analyze", tmp_path / "r.tsv", tmp_path / "c.tsv", "--radii", 0, 0.5)
    assert code == 0
    lines = table.strip().splitlines()
    assert lines[0] == "| result | r = 0 | r = 0.2 | r = 0.5 | ACR | inputs |"  # r joins the columns
    assert lines[2] == f"| r (radius mode, r = 0.2) | – | {at:.3f} | – | – | 12 |"
    c = analyze.load(tmp_path / "c.tsv")
    assert (
        lines[3]
        == "| c | " + " | ".join(f"{a:.3f}" for a in c.accuracy([0, 0.2, 0.5])) + f" | {c.acr:.3f} | 12 |"
    )
    assert lines[-1].startswith("note: r: sequential certification in radius mode (r = 0.2)")
    code, latex, _ = run(capsys, "analyze", tmp_path / "r.tsv", "--latex")
    assert code == 0 and f"r (radius mode, r = 0.2) & -- & {at:.3f} & -- & -- & -- & -- & -- & 12" in latex
    code, _, _ = run(capsys, "analyze", tmp_path / "r.tsv", tmp_path / "c.tsv", "--plot", tmp_path / "p.png")
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0
    r = analyze.load(tmp_path / "r.tsv")
    assert r.radius_mode == 0.2 and c.radius_mode is None and not c.notes


def test_sequential_with_a_sigma_per_input_and_the_memory(capsys, models, tmp_path):
    sigma = torch.tensor([0.1 + 0.04 * i for i in range(10)], dtype=torch.float64)
    with ResultFile(tmp_path / "sigma.tsv", ("idx", "sigma")) as f:
        for i in range(10):
            f.write({"idx": i, "sigma": float(sigma[i])})
    argv = ["certify", "--model", f"{models}:classifier", "--data", "digits", "--max", 10, "--n0", 16,
            "--n", 400, "--sequential", "--sigma-file", tmp_path / "sigma.tsv", "--memory"]  # fmt: skip
    ok(capsys, *argv, "--out", tmp_path / "m.tsv")
    x, _ = digits_test(10)
    want = ddrs_ext.certify_sequential(
        build(models, "classifier"), x, sigma, n0=16, n_max=400, seed=0, index=torch.arange(10)
    )
    prediction, radius = ddrs_ext.CertificationMemory().adjust(x, want.prediction, want.radius)
    got = rows(tmp_path / "m.tsv")
    assert [r["predict"] for r in got] == prediction.tolist() and [
        r["radius"] for r in got
    ] == radius.tolist()
    assert [r["sigma"] for r in got] == sigma.tolist() and [
        r["samples"] for r in got
    ] == want.samples.tolist()


def test_a_result_file_without_samples_resumes_in_its_format(capsys, models, tmp_path):
    """Files of earlier versions (no samples column) are read and resumed; plain certify's settings
    gained no entry, so their settings files still match."""
    argv = [
        "certify",
        "--model",
        f"{models}:classifier",
        "--data",
        "digits",
        "--sigma",
        0.25,
        "--max",
        9,
        *TINY,
    ]
    ok(capsys, *argv, "--out", tmp_path / "new.tsv")
    assert all(r["samples"] == 80 for r in rows(tmp_path / "new.tsv"))
    settings = json.loads((tmp_path / "new.tsv.settings.json").read_text())
    assert not {"sequential", "selector", "alpha_selector", "experts"} & set(settings)
    # the same file as an earlier version wrote it, killed after 4 rows
    lines = [line.split("\t")[:-1] for line in (tmp_path / "new.tsv").read_text().splitlines()]
    (tmp_path / "old.tsv").write_text("".join("\t".join(cells) + "\n" for cells in lines[:5]))
    (tmp_path / "old.tsv.settings.json").write_text((tmp_path / "new.tsv.settings.json").read_text())
    code, _, err = run(capsys, *argv, "--no-progress", "--out", tmp_path / "old.tsv")
    assert code == 0 and "resuming; 4 of 9 selected inputs already done" in err, err
    header, got = read_rows(tmp_path / "old.tsv")
    assert header == CERTIFY_COLUMNS[:-1]
    assert rows(tmp_path / "old.tsv") == rows(tmp_path / "new.tsv", drop=("time", "samples"))
    assert analyze.load(tmp_path / "old.tsv").acr == analyze.load(tmp_path / "new.tsv").acr


# ----------------------------------------------------------------------------- --sigma-levels


def dual_argv(models, *extra):
    model = ["--model", f"{models}:classifier", "--selector", f"{models}:selector"]
    return ["certify", *model, "--data", "digits", "--max", 12, *TINY, "--sigma-levels", *LEVELS,
            "--selector-sigma", 0.25, *extra]  # fmt: skip


def assert_dual_rows(path, want, y):
    got = read_results(path)
    assert got["predict"].tolist() == want.prediction.tolist()
    assert got["radius"].tolist() == want.radius.tolist()
    assert got["level"].tolist() == want.level.tolist()
    assert got["radius_selector"].tolist() == want.radius_selector.tolist()
    assert got["radius_classifier"].tolist() == want.radius_classifier.tolist()
    assert got["samples"].tolist() == want.samples.tolist()
    assert got["correct"].tolist() == (want.prediction == y).long().tolist()
    sigma = got["sigma"].tolist()
    assert [math.isnan(s) for s in sigma] == (want.level == -1).tolist()
    assert [s for s in sigma if not math.isnan(s)] == want.sigma[want.level != -1].tolist()


def test_dual_rows_equal_the_library_and_resume(capsys, models, tmp_path):
    summary = ok(capsys, *dual_argv(models), "--batch-size", 50, "--chunk", 5, "--out", tmp_path / "d.tsv")
    assert "the selector abstained on" in summary and "model evaluations per input" in summary
    assert read_rows(tmp_path / "d.tsv")[0] == DUAL_COLUMNS
    x, y = digits_test(12)
    want = ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, LEVELS, selector_sigma=0.25,
        n0=16, n=64, alpha=0.001, seed=0, index=torch.arange(12),
    )  # fmt: skip
    assert_dual_rows(tmp_path / "d.tsv", want, y)
    levels = read_results(tmp_path / "d.tsv")["level"]
    assert (levels >= 0).sum() >= 3 and len(set(levels.tolist()) - {-1}) >= 2  # the test means something
    settings = json.loads((tmp_path / "d.tsv.settings.json").read_text())
    assert settings["sigma"] == {"levels": LEVELS, "selector_sigma": 0.25}
    assert settings["alpha_selector"] == 0.0005 and settings["selector"]["model"].endswith(":selector")
    assert analyze.load(tmp_path / "d.tsv").radius.tolist() == want.radius.tolist()
    # resumed after a kill, with other batching
    ok(capsys, *dual_argv(models), "--out", tmp_path / "whole.tsv")
    cut(tmp_path / "d.tsv", 7)
    ok(capsys, *dual_argv(models), "--batch-size", 1000, "--chunk", 2, "--out", tmp_path / "d.tsv")
    assert rows(tmp_path / "d.tsv") == rows(tmp_path / "whole.tsv")
    # another alpha split: another run, equal to the library's
    msg = fails(capsys, *dual_argv(models, "--alpha-selector", 0.0002), "--out", tmp_path / "d.tsv")
    assert "alpha_selector: 0.0005 then, 0.0002 now" in msg
    ok(capsys, *dual_argv(models, "--alpha-selector", 0.0002), "--out", tmp_path / "split.tsv")
    want = ddrs_ext.certify_dual(
        build(models, "classifier"), build(models, "selector"), x, LEVELS, selector_sigma=0.25,
        n0=16, n=64, alpha=0.001, alpha_selector=0.0002, seed=0, index=torch.arange(12),
    )  # fmt: skip
    assert_dual_rows(tmp_path / "split.tsv", want, y)


def test_one_expert_per_level(capsys, models, tmp_path):
    experts = ["--model", f"{models}:expert1", "--model", f"{models}:expert2"]
    ok(capsys, *dual_argv(models, *experts), "--out", tmp_path / "e.tsv")
    x, y = digits_test(12)
    want = ddrs_ext.certify_dual(
        [build(models, n) for n in ("classifier", "expert1", "expert2")], build(models, "selector"), x,
        LEVELS, selector_sigma=0.25, n0=16, n=64, seed=0, index=torch.arange(12),
    )  # fmt: skip
    assert_dual_rows(tmp_path / "e.tsv", want, y)
    settings = json.loads((tmp_path / "e.tsv.settings.json").read_text())
    assert [e["model"].rsplit(":", 1)[1] for e in settings["experts"]] == ["classifier", "expert1", "expert2"]
    ok(capsys, *dual_argv(models), "--out", tmp_path / "one.tsv")
    assert rows(tmp_path / "e.tsv") != rows(tmp_path / "one.tsv")


def test_selector_errors_are_one_line(capsys, models, tmp_path):
    out = ["--out", tmp_path / "o.tsv"]
    argv = dual_argv(models)
    selector_at = argv.index("--selector") + 1
    wrong = [*argv[:selector_at], f"{models}:selector2", *argv[selector_at + 1 :]]
    msg = fails(capsys, *wrong, *out)
    assert "one logit per sigma level (3 levels" in msg and "(1, 2)" in msg
    wrong = [*argv[:selector_at], "no_such_module_xyz:build", *argv[selector_at + 1 :]]
    assert "--selector: cannot import module" in fails(capsys, *wrong, *out)
    wrong = [*argv[: selector_at - 1], *argv[selector_at + 1 :], "--selector-checkpoint", tmp_path / "no.pt"]
    assert fails(capsys, *wrong, *out).endswith(f"--selector-checkpoint {tmp_path / 'no.pt'}: no such file")
    assert not (tmp_path / "o.tsv").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sigma", "0.25", "--radius", "0.5"], "--radius and --tolerance need --sequential"),
        (["--sigma", "0.25", "--tolerance", "0.5"], "--radius and --tolerance need --sequential"),
        (["--sigma", "0.25", "--sequential", "--radius", "0.5", "--tolerance", "0.1"], "not allowed with"),
        (["--sigma", "0.25", "--sequential", "--radius", "-1"], "argument --radius: must be >= 0"),
        (["--sigma", "0.25", "--sigma-levels", "0.5"], "not allowed with argument --sigma"),
        (
            ["--sigma-levels", "0.5", "0.25", "--selector", "m:f", "--selector-sigma", "1"],
            "strictly increasing",
        ),
        (
            ["--sigma-levels", "0.5", "0.5", "--selector", "m:f", "--selector-sigma", "1"],
            "strictly increasing",
        ),
        (
            ["--sigma-levels", "0", "--selector", "m:f", "--selector-sigma", "1"],
            "--sigma-levels: must be > 0",
        ),
        (["--sigma-levels", "0.25", "0.5", "--selector-sigma", "1"], "needs a selector"),
        (["--sigma", "0.25", "--selector", "m:f"], "--selector: for dual certification, with --sigma-levels"),
        (["--sigma", "0.25", "--alpha-selector", "0.1"], "--alpha-selector: for dual certification"),
        (
            [
                "--sigma-levels",
                "1",
                "--selector",
                "m:f",
                "--selector-sigma",
                "1",
                "--alpha-selector",
                "0.001",
            ],
            "--alpha-selector 0.001 must be below --alpha 0.001",
        ),  # fmt: skip
        (
            ["--sigma-levels", "1", "--selector", "m:f", "--selector-sigma", "1", "--memory"],
            "--memory does not",
        ),
        (
            ["--sigma-levels", "1", "--selector", "m:f", "--selector-sigma", "1", "--labels"],
            "--labels does not apply to --sigma-levels",
        ),
        (["--sigma", "1", "--model", "a:b", "--model", "c:d"], "--model given 2 times"),
        (["--sigma", "1", "--checkpoint", "a.pt", "--checkpoint", "b.pt"], "--checkpoint given 2 times"),
        (
            [
                "--sigma-levels",
                "1",
                "2",
                "3",
                "--selector",
                "m:f",
                "--selector-sigma",
                "1",
                "--model",
                "a:b",
                "--model",
                "c:d",
            ],
            "once per level (3 levels); got 2 --model and 0 --checkpoint",
        ),  # fmt: skip
        (
            [
                "--sigma-levels",
                "1",
                "2",
                "--selector",
                "m:f",
                "--selector-sigma",
                "1",
                "--model",
                "a:b",
                "--model",
                "c:d",
                "--checkpoint",
                "x.pt",
            ],
            "got 2 --model and 1 --checkpoint",
        ),  # fmt: skip
    ],
)
def test_bad_options_are_one_line_usage_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["certify", "--data", "digits", "--out", "never.tsv", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("ddrs certify: error: "), err


def test_repeated_model_and_checkpoint_options():
    base = [
        "certify",
        "--data",
        "d",
        "--out",
        "o",
        "--sigma-levels",
        "1",
        "2",
        "--selector",
        "m:f",
        "--selector-sigma",
        "1",
    ]
    args = cli.parse_args([*base, "--model", "a:b", "--checkpoint", "1.pt", "--checkpoint", "2.pt"])
    assert (args.model, args.models, args.checkpoint, args.checkpoints) == (
        "a:b",
        ["a:b"],
        "1.pt",
        ["1.pt", "2.pt"],
    )
    args = cli.parse_args(["certify", "--data", "d", "--out", "o", "--sigma", "1", "--model", "a:b"])
    assert (args.model, args.models, args.checkpoint, args.checkpoints) == ("a:b", ["a:b"], None, [])
    args = cli.parse_args(["certify", "--data", "d", "--out", "o", "--sigma", "1", "--sequential"])
    assert args.tolerance == certify_command.SEQUENTIAL_TOLERANCE and args.radius is None


# ----------------------------------------------------------------------------- selectors of train_digits


@pytest.fixture
def classifier_checkpoint(tmp_path):
    from ddrs_ext import models

    torch.manual_seed(0)
    net = models.digits_cnn()
    state = {"format": train_digits.FORMAT, "version": 1, "builder": train_digits.BUILDER,
             "model": net.state_dict(), "sigma_bank": None, "config": {"seed": 0}}  # fmt: skip
    torch.save(state, tmp_path / "classifier.pt")
    return tmp_path / "classifier.pt", net.eval()


def test_train_digits_selector_end_to_end(capsys, tmp_path, classifier_checkpoint):
    path, net = classifier_checkpoint
    sel = tmp_path / "selector.pt"
    argv = ["--selector-for", path, "--sigma-levels", "0.25", "0.5", "--selector-sigma", "0.5"]
    argv += ["--epochs", "1", "--batch-size", "256", "--label-n0", "4", "--label-n", "16", "--out", sel]
    assert train_digits.main([str(a) for a in argv]) == 0
    assert "labels per level" in capsys.readouterr().out
    model, checkpoint = selector.load_selector_checkpoint(sel)
    assert checkpoint["sigma_levels"] == [0.25, 0.5] and checkpoint["selector_sigma"] == 0.5
    assert checkpoint["config"]["classifier_fingerprint"] == selector.fingerprint(net)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 2)
    # the labels: best_level on every training input (noise streams = training indices), under a seed
    # of their own (not the seed later certifications use)
    (x_train, y_train), _ = load_digits_split(0)
    labels = selector.selector_labels(net, x_train, y_train, [0.25, 0.5], seed=0, n0=4, n=16)
    assert torch.bincount(labels, minlength=2).tolist() == checkpoint["label_counts"]
    assert sum(checkpoint["label_counts"]) == len(y_train) == 1100 and min(checkpoint["label_counts"]) > 0
    seed = selector.derived_seed(0, selector._LABEL_KEY)
    assert seed not in (0, ddrs_ext.dual.selector_seed(0))
    want = ddrs_ext.dual.best_level(net, x_train[:50], y_train[:50], [0.25, 0.5], n0=4, n=16, alpha=0.01,
                                    seed=seed, index=torch.arange(50))  # fmt: skip
    assert torch.equal(labels[:50], want)

    # ddrs certify loads it alone, as --selector-checkpoint
    cert = ["certify", "--checkpoint", path, "--data", "digits", "--max", 6, *TINY,
            "--selector-checkpoint", sel, "--selector-sigma", 0.5]  # fmt: skip
    code, _, err = run(
        capsys, *cert, "--sigma-levels", 0.25, 0.5, "--no-progress", "--out", tmp_path / "d.tsv"
    )
    assert code == 0 and "note" not in err, err
    x, y = digits_test(6)
    want = ddrs_ext.certify_dual(net, model, x, [0.25, 0.5], selector_sigma=0.5, n0=16, n=64, seed=0,
                                 index=torch.arange(6))  # fmt: skip
    assert_dual_rows(tmp_path / "d.tsv", want, y)
    # other levels than it was trained for: allowed (sound), with a note
    code, _, err = run(capsys, *cert, "--sigma-levels", 0.25, 1, "--no-progress", "--out", tmp_path / "e.tsv")
    assert code == 0 and "was trained for --sigma-levels 0.25 0.5 --selector-sigma 0.5" in err, err
    # given in the wrong place
    msg = fails(
        capsys, "certify", "--checkpoint", sel, "--data", "digits", "--sigma", 0.5, "--out", tmp_path / "x"
    )
    assert "is a selector checkpoint" in msg and "--selector-checkpoint" in msg
    msg = fails(
        capsys, "certify", "--model", sel, "--data", "digits", "--sigma", 0.5, "--out", tmp_path / "x"
    )
    assert f"give it as --selector-checkpoint {sel}" in msg


def test_train_digits_selector_options(capsys, tmp_path, classifier_checkpoint):
    with pytest.raises(SystemExit) as exit_:
        train_digits.main(["--sigma-levels", "0.25", "0.5", "--out", str(tmp_path / "x.pt")])
    assert exit_.value.code == 2 and "are for --selector-for" in capsys.readouterr().err
    path, _ = classifier_checkpoint
    with pytest.raises(SystemExit) as exit_:
        train_digits.main(["--selector-for", str(path), "--out", str(tmp_path / "x.pt")])
    assert exit_.value.code == 2 and "--selector-for needs --sigma-levels" in capsys.readouterr().err
    argv = ["--selector-for", str(path), "--sigma-levels", "0.5", "0.25", "--selector-sigma", "1"]
    with pytest.raises(SystemExit) as exit_:
        train_digits.main([*argv, "--out", str(tmp_path / "x.pt")])
    assert exit_.value.code == 2 and "strictly increasing" in capsys.readouterr().err
    argv = ["--sigma-levels", "0.25", "0.5", "--selector-sigma", "1", "--out", str(tmp_path / "x.pt")]
    assert train_digits.main(["--selector-for", str(tmp_path / "no.pt"), *argv]) == 2
    assert capsys.readouterr().err.endswith(f"error: --selector-for {tmp_path / 'no.pt'}: no such file\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    assert train_digits.main(["--selector-for", str(tmp_path / "w.pt"), *argv]) == 2
    assert "is not a checkpoint of python -m ddrs.train_digits" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert selector.demo_levels(0.25, 1.0) == [0.25, 0.5, 1.0]
    assert selector.demo_levels(0.5, 1.0) == [0.5, 1.0] and selector.demo_levels(1.0, 1.0) == [1.0]
