"""``--noise uniform`` on the command line (issue 20): L1 certificates from ``ddrs certify``,
``predict``, ``optimize-sigma`` and ``train``, labelled by ``ddrs analyze``; each checked against
the library with the same seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_cli import MODELS, TINY, digits_test, fails, load_builder, ok, rows, run

import ddrs_ext
from ddrs import analyze, noise_options
from ddrs.commands import train as train_command
from ddrs.results import ResultFile, read_rows, remove_result_file
from ddrs_ext.memory import CertificationMemory

SIGMA_FAST = ["--iterations", "2", "--num-samples", "8"]
IDX = torch.tensor([0, 2, 4, 6, 8])
SELECTED = ["--data", "digits", "--max", 9, "--skip", 2]  # the inputs of IDX
THETA_FAST = ["--noise", "uniform", "--sigma0", 0.5, *SIGMA_FAST]


@pytest.fixture
def models(tmp_path) -> Path:
    path = tmp_path / "tinymodels.py"
    path.write_text(MODELS)
    return path


def certify_args(models: Path, *extra) -> list:
    return ["certify", "--model", f"{models}:build", *SELECTED, *TINY, *extra]


def fails_not(capsys, *argv) -> str:
    """Runs a command that must succeed; returns its stderr."""
    code, _, err = run(capsys, *argv, "--no-progress")
    assert code == 0, err
    return err


def analyzed(capsys, *argv) -> str:
    """``ddrs analyze``'s table (it has no --no-progress)."""
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def usage_error(capsys, *argv) -> str:
    """A command refused by its argument checks: exit status 2 and a one-line message; returns it."""
    from ddrs import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def settings_of(path: Path) -> dict:
    return json.loads(Path(f"{path}.settings.json").read_text())


# ----------------------------------------------------------------------------- certify, predict


def test_certify_uniform_rows_are_the_librarys_l1_certificates(capsys, models, tmp_path):
    out = tmp_path / "l1.tsv"
    summary = ok(capsys, *certify_args(models, "--sigma", 0.5, "--noise", "uniform", "--out", out))
    assert "average certified L1 radius" in summary and "at L1 radius 0" in summary
    x, y = digits_test(9)
    model = load_builder(models, "build")
    want = ddrs_ext.certify(model, x[IDX], 0.5, n0=16, n=64, seed=0, index=IDX, noise="uniform")
    assert want.norm == "l1"
    got = read_rows(out)[1]
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert [r["radius"] for r in got] == want.radius.tolist()  # exact
    gaussian = ddrs_ext.certify(model, x[IDX], 0.5, n0=16, n=64, seed=0, index=IDX)
    assert [r["radius"] for r in got] != gaussian.radius.tolist()  # the noise was really uniform
    settings = settings_of(out)
    assert settings["noise"] == "uniform" and settings["norm"] == "l1"
    ok(capsys, *certify_args(models, "--sigma", 0.5, "--out", tmp_path / "l2.tsv"))
    assert settings_of(tmp_path / "l2.tsv")["noise"] == "gaussian"
    assert settings_of(tmp_path / "l2.tsv")["norm"] == "l2"


def test_sequential_certification_passes_the_noise_through(capsys, models, tmp_path):
    out = tmp_path / "seq.tsv"
    ok(capsys, *certify_args(models, "--sigma", 0.5, "--noise", "uniform", "--sequential", "--out", out))
    x, _ = digits_test(9)
    model = load_builder(models, "build")
    want = ddrs_ext.certify_sequential(
        model, x[IDX], 0.5, n0=16, n_max=64, tolerance=0.1, seed=0, index=IDX, noise="uniform"
    )
    got = read_rows(out)[1]
    assert [r["radius"] for r in got] == want.radius.tolist()
    assert [r["samples"] for r in got] == want.samples.tolist()


def test_predict_uniform_is_the_librarys(capsys, models, tmp_path):
    out = tmp_path / "p.tsv"
    ok(capsys, "predict", "--model", f"{models}:build", *SELECTED,
       "--sigma", 0.5, "--n", 64, "--noise", "uniform", "--out", out)  # fmt: skip
    x, _ = digits_test(9)
    model = load_builder(models, "build")
    want = ddrs_ext.predict(model, x[IDX], 0.5, n=64, seed=0, index=IDX, noise="uniform")
    assert [r["predict"] for r in read_rows(out)[1]] == want.tolist()
    assert settings_of(out)["norm"] == "l1"


# ----------------------------------------------------------------------------- theta per input


def test_optimize_sigma_uniform_is_optimize_theta(capsys, models, tmp_path):
    out = tmp_path / "theta.tsv"
    ok(capsys, "optimize-sigma", "--model", f"{models}:build", *SELECTED,
       *THETA_FAST, "--surrogate-samples", 32, "--out", out)  # fmt: skip
    x, _ = digits_test(9)
    model = load_builder(models, "build")
    theta = ddrs_ext.optimize_theta(model, x[IDX], 0.5, iterations=2, num_samples=8, seed=0, index=IDX)
    surrogate = ddrs_ext.surrogate_radius(
        model, x[IDX], theta, num_samples=32, seed=0, index=IDX, noise="uniform"
    )
    got = read_rows(out)[1]
    assert [r["sigma"] for r in got] == theta.tolist()
    assert [r["surrogate"] for r in got] == surrogate.tolist()
    settings = settings_of(out)
    assert settings["noise"] == "uniform" and "clip" not in settings and settings["surrogate"] == "certify"


def test_paper_with_uniform_noise_is_the_librarys_l1_preset():
    assert noise_options.PAPER_L1_SETTINGS == ddrs_ext.PAPER_L1_SETTINGS
    from ddrs.cli import parse_args

    base = ["optimize-sigma", "--data", "digits", "--out", "x.tsv"]
    args = parse_args([*base, "--noise", "uniform", "--paper"])
    options = args.optimize_options
    assert {k: options[k] for k in ddrs_ext.PAPER_L1_SETTINGS} == ddrs_ext.PAPER_L1_SETTINGS
    assert "clip" not in options
    args = parse_args([*base, "--noise", "uniform", "--paper", "--iterations", "5"])
    assert args.optimize_options["iterations"] == 5  # given options override --paper
    gaussian = parse_args([*base, "--paper"]).optimize_options
    assert gaussian["clip"] == (0.02, 0.98)  # the Gaussian preset is untouched


def test_optimize_and_memory_in_l1(capsys, models, tmp_path):
    """--optimize with uniform noise: optimize_theta, then certify, then an L1 memory in idx order;
    a --sigma-file of optimize-sigma --noise uniform gives the same rows; torchrun's merge (rank
    files finished by one process) adjusts in L1 too."""
    out = tmp_path / "dd.tsv"
    common = certify_args(models, "--noise", "uniform", "--sigma0", 0.5, *SIGMA_FAST)
    ok(capsys, *common, "--optimize", "--out", out)
    x, y = digits_test(9)
    model = load_builder(models, "build")
    theta = ddrs_ext.optimize_theta(model, x[IDX], 0.5, iterations=2, num_samples=8, seed=0, index=IDX)
    raw = ddrs_ext.certify(model, x[IDX], theta, n0=16, n=64, seed=0, index=IDX, noise="uniform")
    memory = CertificationMemory(norm="l1")
    want = memory.adjust_result(x[IDX], raw)
    got = read_rows(out)[1]
    assert [r["radius"] for r in got] == want.radius.tolist()
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert settings_of(out)["memory"] is True and settings_of(out)["norm"] == "l1"

    sigma_file = tmp_path / "theta.tsv"
    ok(capsys, "optimize-sigma", "--model", f"{models}:build", *SELECTED,
       *THETA_FAST, "--surrogate-samples", 8, "--out", sigma_file)  # fmt: skip
    from_file = tmp_path / "file.tsv"
    ok(capsys, *certify_args(models, "--noise", "uniform", "--sigma-file", sigma_file, "--out", from_file))
    assert rows(from_file) == rows(out)
    message = fails(capsys, *certify_args(models, "--sigma-file", sigma_file, "--out", tmp_path / "g.tsv"))
    assert "holds uniform half-widths theta" in message and "give --noise uniform" in message

    # rank files of raw rows, merged by one process: the memory runs in L1 at the merge
    plain = tmp_path / "plain.tsv"
    ok(capsys, *certify_args(models, "--noise", "uniform", "--sigma-file", sigma_file, "--no-memory",
                             "--out", plain))  # fmt: skip
    merged = tmp_path / "merged.tsv"
    raw_rows = read_rows(plain)[1]
    for rank, part in ((0, raw_rows[0::2]), (1, raw_rows[1::2])):
        path = Path(f"{merged}.rank{rank}")
        with ResultFile(path, read_rows(plain)[0]) as f:
            for row in part:
                f.write(row)
        Path(f"{path}.settings.json").write_text(Path(f"{from_file}.settings.json").read_text())
    ok(capsys, *certify_args(models, "--noise", "uniform", "--sigma-file", sigma_file, "--out", merged))
    assert rows(merged) == rows(from_file)
    assert not list(tmp_path.glob("merged.tsv.rank*"))
    remove_result_file(merged)


# ----------------------------------------------------------------------------- resume


def test_resume_with_the_other_noise_is_refused_and_old_files_resume(capsys, models, tmp_path):
    out = tmp_path / "r.tsv"
    ok(capsys, *certify_args(models, "--sigma", 0.5, "--noise", "uniform", "--out", out))
    message = fails(capsys, *certify_args(models, "--sigma", 0.5, "--out", out))
    assert "made with --noise uniform (L1 radii)" in message and "give --noise uniform to resume" in message
    # a Gaussian file of an earlier version (no "noise" or "norm" in its settings) resumes as Gaussian
    old = tmp_path / "old.tsv"
    ok(capsys, *certify_args(models, "--sigma", 0.5, "--out", old))
    whole = rows(old)
    settings = settings_of(old)
    del settings["noise"], settings["norm"]
    Path(f"{old}.settings.json").write_text(json.dumps(settings))
    old.write_text("".join(old.read_text().splitlines(keepends=True)[:3]))  # the header and 2 rows
    err = fails_not(capsys, *certify_args(models, "--sigma", 0.5, "--out", old))
    assert "resuming; 2 of 5 selected inputs already done" in err
    assert rows(old) == whole
    message = fails(capsys, *certify_args(models, "--sigma", 0.5, "--noise", "uniform", "--out", old))
    assert "made with --noise gaussian (L2 radii)" in message


def test_the_settings_check_itself_refuses_another_noise(tmp_path):
    """The generic resume check (without the command's plainer message) compares the noise too."""
    path = tmp_path / "x.tsv"
    with ResultFile(path, ("idx", "radius"), {"noise": "uniform", "norm": "l1"}) as f:
        f.write({"idx": 0, "radius": 0.5})
    with pytest.raises(ValueError, match="noise: 'uniform' then, 'gaussian' now"):
        ResultFile(path, ("idx", "radius"), {"noise": "gaussian", "norm": "l2"})
    with pytest.raises(ValueError, match="noise: 'uniform' then, None now"):
        ResultFile(path, ("idx", "radius"), {})  # a missing noise is Gaussian
    with ResultFile(tmp_path / "g.tsv", ("idx", "radius"), {}) as f:  # a file without the settings
        f.write({"idx": 0, "radius": 0.5})
    with ResultFile(tmp_path / "g.tsv", ("idx", "radius"), {"noise": "gaussian", "norm": "l2"}) as f:
        assert list(f.done) == [0]  # resumes as Gaussian


# ----------------------------------------------------------------------------- analyze


def test_analyze_labels_radii_by_norm_and_refuses_to_mix(capsys, models, tmp_path):
    ok(capsys, *certify_args(models, "--sigma", 0.5, "--noise", "uniform", "--out", tmp_path / "l1.tsv"))
    ok(capsys, *certify_args(models, "--sigma", 0.5, "--out", tmp_path / "l2.tsv"))
    assert analyze.load(tmp_path / "l1.tsv").norm == "l1" and analyze.load(tmp_path / "l2.tsv").norm == "l2"
    table = analyzed(capsys, "analyze", tmp_path / "l1.tsv", "--plot", tmp_path / "l1.png")
    assert table.splitlines()[0].startswith("| result (L1 radius r) | r = 0 |")
    assert (tmp_path / "l1.png").read_bytes()[:4] == b"\x89PNG"
    latex = analyzed(capsys, "analyze", tmp_path / "l1.tsv", "--latex")
    assert latex.startswith("% certified accuracy at L1 radius r")
    assert analyzed(capsys, "analyze", tmp_path / "l2.tsv").startswith("| result | r = 0 |")  # as before
    latex = analyzed(capsys, "analyze", tmp_path / "l2.tsv", "--latex")
    assert latex.startswith("% certified accuracy at L2 radius r")
    code, _, err = run(capsys, "analyze", tmp_path / "l1.tsv", tmp_path / "l2.tsv")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    message = err
    assert "different norms (L1 radii: l1; L2 radii: l2)" in message and "separately" in message
    results = [analyze.load(tmp_path / "l1.tsv"), analyze.load(tmp_path / "l2.tsv")]
    with pytest.raises(ValueError, match="different norms"):
        analyze.plot_certified_accuracy(results, tmp_path / "mixed.png")
    assert not (tmp_path / "mixed.png").exists()


def test_the_plot_axis_says_the_norm(tmp_path, monkeypatch):
    labels = []
    from matplotlib.axes import Axes

    real = Axes.set_xlabel
    monkeypatch.setattr(Axes, "set_xlabel", lambda self, text: labels.append(text) or real(self, text))
    certified = analyze.Certified("a", torch.tensor([True]).numpy(), torch.tensor([0.3]).double().numpy())
    analyze.plot_certified_accuracy([certified], tmp_path / "l2.png")
    l1 = analyze.Certified("b", certified.correct, certified.radius, norm="l1")
    analyze.plot_certified_accuracy([l1], tmp_path / "l1.png")
    assert labels == ["L2 radius r", "L1 radius r"]


# ----------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--optimize", "--clip", "0.1", "0.9"], "--clip is Gaussian-only"),
        (["--optimize", "--estimator", "score"], "--estimator score is Gaussian-only"),
        (["--sigma", "0.5", "--noise", "laplace"], "argument --noise: invalid choice"),
    ],
)  # fmt: skip
def test_gaussian_only_options_are_refused_with_uniform_noise(capsys, models, tmp_path, extra, match):
    noise = [] if "--noise" in extra else ["--noise", "uniform"]
    message = usage_error(capsys, *certify_args(models, *noise, *extra, "--out", tmp_path / "x.tsv"))
    assert re.search(match, message), message
    assert not (tmp_path / "x.tsv").exists()


def test_help_says_sigma_means_theta(capsys):
    from ddrs.cli import parse_args

    for command in ("certify", "predict", "optimize-sigma"):
        with pytest.raises(SystemExit):
            parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--noise {gaussian,uniform}" in text
        assert "(--noise uniform: the cube's half-width theta)" in text


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--scheme", "macer"], "--scheme macer is Gaussian-only"),
        (["--scheme", "smoothadv"], "--scheme smoothadv is Gaussian-only"),
        (["--data-dependent", "--sigma-estimator", "score"], "--sigma-estimator score is Gaussian-only"),
    ],
)
def test_train_refuses_gaussian_only_schemes_with_uniform_noise(capsys, tmp_path, extra, match):
    message = usage_error(capsys, "train", "--noise", "uniform", *extra, "--out", tmp_path / "c.pt")
    assert match in message


def test_train_default_noise_matches_old_checkpoints():
    assert train_command.build_parser().parse_args([]).noise == "gaussian"


def test_train_uniform_writes_its_noise_and_certifies(capsys, tmp_path):
    checkpoint = tmp_path / "l1.pt"
    code = train_command.main(["--noise", "uniform", "--sigma", "0.5", "--data-dependent", "--epochs", "1",
                               "--sigma-steps", "1", "--sigma-samples", "4", "--sigma-surrogate", "certify",
                               "--out", str(checkpoint)])  # fmt: skip
    log = capsys.readouterr().out
    assert code == 0 and "test accuracy under noise theta=0.5" in log
    from ddrs.checkpoints import load_checkpoint

    model, bank, config = load_checkpoint(checkpoint)
    assert config["noise"] == "uniform" and bank is not None
    assert not torch.equal(bank.sigma, torch.full_like(bank.sigma, 0.5))  # the thetas moved
    out = tmp_path / "l1.tsv"
    ok(capsys, "certify", "--checkpoint", checkpoint, "--data", "digits", "--max", 9, "--skip", 2, *TINY,
       "--sigma", 0.5, "--noise", "uniform", "--out", out)  # fmt: skip
    x, _ = digits_test(9)
    want = ddrs_ext.certify(model, x[IDX], 0.5, n0=16, n=64, seed=0, index=IDX, noise="uniform")
    assert [r["radius"] for r in read_rows(out)[1]] == want.radius.tolist()
    # certified with Gaussian noise: it runs, with a note that the checkpoint was trained otherwise
    code, _, err = run(capsys, "certify", "--checkpoint", checkpoint, *SELECTED, *TINY, "--sigma", 0.5,
                       "--no-progress", "--out", tmp_path / "l2.tsv")  # fmt: skip
    assert code == 0 and "was trained with uniform noise (ddrs train --noise uniform)" in err
    err = fails_not(capsys, "certify", "--checkpoint", checkpoint, *SELECTED, *TINY, "--sigma", 0.5,
                    "--noise", "uniform", "--out", tmp_path / "again.tsv")  # fmt: skip
    assert "trained with" not in err


# ----------------------------------------------------------------------------- torchrun


def test_two_processes_certify_in_l1_like_one(tmp_path):
    """torchrun passes --noise through: two processes give one process's rows, the L1 memory applied
    when rank 0 merges (on data where it changes rows)."""
    import test_cli_distributed as dist

    (tmp_path / "absmodel.py").write_text(dist.MODELS)
    x = torch.zeros(dist.COUNT, 1, 2)
    x[:, 0, 0] = torch.linspace(-0.3, 0.3, dist.COUNT)
    x[:, 0, 1] = torch.arange(dist.COUNT) * 1e-3
    torch.save({"x": x, "y": (torch.arange(dist.COUNT) % 2).long()}, tmp_path / "abs.pt")
    with ResultFile(tmp_path / "theta.tsv", ("idx", "sigma")) as f:
        for i in range(dist.COUNT):
            f.write({"idx": i, "sigma": 0.05 if i % 2 else 2.0})
    argv = ["certify", "--model", f"{tmp_path / 'absmodel.py'}:build_abs", "--data", tmp_path / "abs.pt",
            "--sigma-file", tmp_path / "theta.tsv", "--n0", 16, "--n", 64, "--noise", "uniform",
            "--no-progress", "--max", 12]  # fmt: skip
    dist.one_process(*argv, "--memory", "--out", tmp_path / "one.tsv")
    dist.one_process(*argv, "--no-memory", "--out", tmp_path / "plain.tsv")
    assert rows(tmp_path / "one.tsv") != rows(tmp_path / "plain.tsv")  # the memory matters here
    log = dist.launch(
        tmp_path, "-m", "ddrs", "--", *argv, "--memory", "--out", tmp_path / "two.tsv", *dist.TIMEOUT
    )
    assert "12 inputs, shared by 2 process(es)" in log
    dist.assert_same_file(tmp_path / "two.tsv", tmp_path / "one.tsv")
    assert settings_of(tmp_path / "two.tsv")["norm"] == "l1"
