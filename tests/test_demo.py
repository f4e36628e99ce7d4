"""ddrs demo end to end on tiny settings: files, table, reproducibility, resumption, bad options."""

from __future__ import annotations

import contextlib
import io
import shutil

import numpy as np
import pytest

from ddrs import analyze, cli
from ddrs.commands import demo as demo_command
from ddrs.commands import demo_run as demo
from ddrs.results import CERTIFY_COLUMNS, DUAL_COLUMNS, ResultFileError, read_results

TINY = ["--quick", "--count", "8", "--n", "100", "--sigma-iterations", "2", "--sigma-samples", "32"]


def run(argv):
    return demo.run(cli.parse_args(["demo", *map(str, argv)]))


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny run shared by several tests (capsys is per test, so stdout is captured by hand)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run([*TINY, "--out", out]) == 0
    return out, buffer.getvalue()


def test_files_and_table(first_run):
    out, printed = first_run
    rows = demo.table_rows(0.25, demo.other_levels(0.25, 1.0))
    assert len(rows) == 13 and [row.sigma for row in rows[:3]] == [None, 0.5, 1.0]
    assert [row.method for row in rows].count("sequential") == [row.method for row in rows].count("dual") == 1
    assert rows[-1].label == "experts per level, dual certificate" and rows[-2].memory
    files = ("fixed_model.pt", "fixed_model_s0.5.pt", "fixed_model_s1.pt", "dd_model.pt")
    files += ("specialist_s0.5.pt", "dual_weights.txt", "dual_selector.pt")
    for name in (*files, "table.md", "curves.png"):
        assert (out / name).is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        columns = read_results(out / f"{row.key}.tsv")
        assert list(columns["idx"]) == list(range(8))
        assert set(columns) == set(DUAL_COLUMNS if row.method == "dual" else CERTIFY_COLUMNS)
        np.testing.assert_array_equal(columns["correct"], columns["predict"] == columns["label"])
        assert (out / f"{row.key}.tsv.settings.json").is_file()
        if row.surrogate is None and row.method != "dual":
            assert (columns["sigma"] == (row.sigma or 0.25)).all()
        assert (columns["samples"] <= (2 if row.method == "dual" else 1) * (20 + 100)).all()
    # memory rows: same inputs and sigmas as their source, radii never larger
    for row in rows:
        if row.memory:
            before, after = read_results(out / f"{row.source}.tsv"), read_results(out / f"{row.key}.tsv")
            np.testing.assert_array_equal(before["sigma"], after["sigma"])
            same = after["predict"] == before["predict"]
            assert (after["radius"][same] <= before["radius"][same]).all()

    lines = table_lines(printed)
    assert len(lines) == 2 + len(rows) + 2 + 3  # the certified accuracy table, then the evaluations'
    assert lines[0] == "| result | r = 0 | r = 0.25 | r = 0.5 | r = 0.75 | r = 1 | ACR | inputs |"
    evaluations = lines[2 + len(rows) :]
    assert evaluations[0] == "| result | model evaluations per input (mean) | fewest | most | vs CERTIFY |"
    sequential = read_results(out / "fixed_sigma_sequential.tsv")["samples"]
    dual = read_results(out / "experts_dual.tsv")["samples"]
    sequential_row = next(row for row in rows if row.method == "sequential")
    for line, label, spent in zip(
        evaluations[2:],
        [rows[0].label, sequential_row.label, rows[-1].label + " (selector + classifier)"],
        [np.full(8, 120), sequential, dual],
    ):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [
            label,
            f"{spent.mean():.0f}",
            str(spent.min()),
            str(spent.max()),
            f"{spent.mean() / 120:.2f}",
        ]
    for line, row in zip(lines[2 : 2 + len(rows)], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row.label and cells[-1] == "8" and len(cells) == 8
        values = [float(c) for c in cells[1:-1]]
        assert all(0 <= v for v in values) and all(0 <= v <= 1 for v in values[:-1])
        res = analyze.load(out / f"{row.key}.tsv")
        assert values[-1] == pytest.approx(res.acr, abs=5e-4)
    assert table_lines((out / "table.md").read_text()) == lines
    last = printed.rstrip().splitlines()
    verdict = [line for line in last if line.startswith("Does data-dependent σ help here?")]
    assert len(verdict) == 1 and "The dual certificate (experts per level" in verdict[0]
    assert last[-4].startswith("- data-dependent model, σ per input (certify surrogate) + memory: ")
    assert last[-3].startswith("- experts per level, dual certificate: ")
    abstained = int((read_results(out / "experts_dual.tsv")["level"] == -1).sum())
    assert f"the selector abstained on {abstained} of 8 inputs" in last[-3] and "smaller one on" in last[-3]
    # the winners at each radius, from the run: recomputed here from the files
    sound = [row for row in rows if row.sound]
    assert sequential_row not in sound and not any(row.surrogate and not row.memory for row in sound)
    acc = {row.label: analyze.load(out / f"{row.key}.tsv").accuracy([0.0])[0] for row in sound}
    best = max(acc.values())
    expected = " = ".join(label for label, a in acc.items() if a == best)
    assert last[-2].startswith("Largest certified accuracy among the sound rows")
    assert f"r = 0: {expected} ({best:.3f})" in last[-2]
    assert last[-1].startswith("Sequential certification of the fixed-σ model (the table's radii as radii")
    assert f"{sequential.mean():.0f} model evaluations per input against CERTIFY's 120" in last[-1]


def test_sequential_and_dual_rows_are_the_library_s(first_run):
    """The sequential row is certify_sequential's and the dual row certify_dual's for the same seed and
    test indices, with the checkpoints the demo saved; the dual row's radius is the smaller of two."""
    import torch

    import ddrs_ext
    from ddrs import selector, train_digits
    from ddrs_ext.data import load_digits_split

    out, _ = first_run
    _, (x, y) = load_digits_split(0, demo_command.DEMO_TEST_SIZE)
    x, index = x[:8], torch.arange(8)
    fixed, _, _ = train_digits.load_checkpoint(out / "fixed_model.pt")
    specialist, _, _ = train_digits.load_checkpoint(out / "specialist_s0.5.pt")
    chooser, checkpoint = selector.load_selector_checkpoint(out / "dual_selector.pt")
    assert checkpoint["sigma_levels"] == [0.25, 0.5] and checkpoint["selector_sigma"] == 0.5
    assert checkpoint["expert_fingerprints"] == [
        selector.fingerprint(fixed),
        selector.fingerprint(specialist),
    ]
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    want = ddrs_ext.certify_sequential(fixed, x, 0.25, n0=20, n_max=100, radius=radii, seed=0, index=index)
    got = read_results(out / "fixed_sigma_sequential.tsv")
    assert got["radius"].tolist() == want.radius.tolist() and got["samples"].tolist() == want.samples.tolist()
    want = ddrs_ext.certify_dual(
        [fixed, specialist],
        chooser,
        x,
        [0.25, 0.5],
        selector_sigma=0.5,
        n0=20,
        n=100,
        alpha=0.001,
        seed=0,
        index=index,
    )
    assert want.alpha_selector == 0.0005
    got = read_results(out / "experts_dual.tsv")
    for column in ("predict", "radius", "level", "radius_selector", "radius_classifier", "samples"):
        assert got[column].tolist() == getattr(want, "prediction" if column == "predict" else column).tolist()
    certified = got["predict"] != -1
    np.testing.assert_array_equal(
        got["radius"][certified], np.minimum(got["radius_selector"], got["radius_classifier"])[certified]
    )


def test_the_dual_row_is_the_study_s_recipe(first_run, tmp_path, capsys):
    """The dual row's experts are the σ = 0.25 fixed-σ model and a σ = 0.5 specialist trained on
    examples drawn by the fixed-σ models' held-out soft labels (τ = 0.1); its selector, smoothed at
    the largest level, learns held-out soft labels (τ = 0.25) of those experts with the consistency
    term: each file equals what the ddrs train commands of docs/getting-started.md write."""
    import torch

    from ddrs import selector, train_digits
    from ddrs.sample_weights import read_label_settings, weights_digest
    from ddrs_ext.data import load_digits_split
    from ddrs_ext.dual import level_radii, soft_level_labels

    out, _ = first_run
    fixed = [train_digits.load_checkpoint(out / f)[0] for f in ("fixed_model.pt", "fixed_model_s0.5.pt")]
    weights = np.loadtxt(out / "dual_weights.txt")
    settings = read_label_settings(out / "dual_weights.txt")
    assert (settings["label_source"], settings["folds"], settings["tau"]) == ("crossfit", 2, 0.1)
    assert settings["fingerprints"] == [selector.fingerprint(m) for m in fixed]
    # the weights are held-out labels: the final models' own (in-sample) labels differ
    (x, y), _ = load_digits_split(0)
    seed = selector.derived_seed(0, selector._LABEL_KEY)
    own = level_radii(fixed, x, y, [0.25, 0.5], n0=8, n=32, alpha=0.01, seed=seed, index=torch.arange(len(y)))
    assert not np.array_equal(weights, soft_level_labels(own, tau=0.1).double().numpy())
    # ... and those of the documented command
    experts = ["--sigma-levels", "0.25", "0.5", "--label-source", "crossfit", "--folds", "2"]
    experts += ["--label-n0", "8", "--label-n", "32", "--seed", "0"]
    with demo.one_thread():  # as the demo trains
        code = cli.main(
            [
                "train",
                "--selector-for",
                str(out / "fixed_model.pt"),
                str(out / "fixed_model_s0.5.pt"),
                *experts,
                "--soft-labels",
                "--tau",
                "0.1",
                "--save-labels",
                str(tmp_path / "w.txt"),
            ]
        )
    assert code == 0
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "w.txt"), weights)
    _, _, config = train_digits.load_checkpoint(out / "specialist_s0.5.pt")
    assert (config["scheme"], config["sigma"], config["sample_weights_column"]) == ("gaussian", 0.5, 1)
    assert config["sample_weights_digest"] == weights_digest(torch.from_numpy(weights[:, 1].copy()))
    _, checkpoint = selector.load_selector_checkpoint(out / "dual_selector.pt")
    assert (checkpoint["label_source"], checkpoint["folds"], checkpoint["tau"]) == ("crossfit", 2, 0.25)
    lam = (checkpoint["selector_lam"], checkpoint["selector_eta"], checkpoint["selector_copies"])
    assert lam == (20.0, 0.5, 2) and checkpoint["config"]["lr"] == 0.001 and len(checkpoint["losses"]) == 2
    with demo.one_thread():
        code = cli.main(
            [
                "train",
                "--selector-for",
                str(out / "fixed_model.pt"),
                str(out / "specialist_s0.5.pt"),
                *experts,
                "--soft-labels",
                "--tau",
                "0.25",
                "--selector-lambda",
                "20",
                "--selector-eta",
                "0.5",
                "--selector-copies",
                "2",
                "--lr",
                "0.001",
                "--epochs",
                "2",
                "--selector-sigma",
                "0.5",
                "--out",
                str(tmp_path / "sel.pt"),
            ]
        )
    assert code == 0
    capsys.readouterr()
    mine, _ = selector.load_selector_checkpoint(tmp_path / "sel.pt")
    theirs, _ = selector.load_selector_checkpoint(out / "dual_selector.pt")
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_other_dual_weights_are_refused(first_run, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(first_run[0], out)
    text = (out / "dual_weights.txt").read_text().replace('"tau": 0.1', '"tau": 0.2')
    (out / "dual_weights.txt").write_text(text)
    with pytest.raises(ValueError, match=r"dual_weights.txt was made with other settings \(tau: 0.2 then"):
        run([*TINY, "--out", out])


def test_same_seed_same_table_and_resume(first_run, tmp_path, capsys):
    out, printed = first_run
    # a fresh folder, same seed: the same table
    assert run([*TINY, "--out", tmp_path / "again"]) == 0
    again = capsys.readouterr().out
    assert table_lines(again) == table_lines(printed)
    # a re-run over a finished folder resumes: nothing is trained or certified again
    assert run([*TINY, "--out", tmp_path / "again"]) == 0
    resumed = capsys.readouterr().out
    assert "reusing" in resumed and "training the" not in resumed and "certifying" not in resumed
    assert table_lines(resumed) == table_lines(printed)
    # a half-finished file (rows removed, as if killed) is completed to the same rows
    path = tmp_path / "again" / "dd_model_certify.tsv"
    whole = path.read_text()
    path.write_text("".join(whole.splitlines(keepends=True)[:4]))
    assert run([*TINY, "--out", tmp_path / "again"]) == 0
    assert "certifying 5 inputs (3 done before)" in capsys.readouterr().out
    assert path.read_text().splitlines()[:4] == whole.splitlines()[:4]
    lines = lambda text: [line.split("\t")[:5] + line.split("\t")[6:] for line in text.splitlines()]  # noqa: E731
    assert lines(path.read_text()) == lines(whole)  # all but the time column


def test_other_settings_refused_then_fresh(first_run, tmp_path, capsys):
    out = tmp_path / "d"
    shutil.copytree(first_run[0], out)
    with pytest.raises(ResultFileError, match=r"other settings \(n: 100 then, 60 now\).*--fresh"):
        run([*TINY, "--n", "60", "--out", out])
    with pytest.raises(ValueError, match="trained with other settings.*--fresh"):
        run([*TINY, "--seed", "1", "--out", out])
    capsys.readouterr()
    (out / "unrelated.txt").write_text("keep me")
    assert run([*TINY, "--count", "3", "--n", "60", "--fresh", "--out", out]) == 0
    assert "| fixed-σ model, σ = 0.25 for every input |" in capsys.readouterr().out
    assert (out / "unrelated.txt").read_text() == "keep me"
    assert read_results(out / "fixed_sigma.tsv")["idx"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "0"], "argument --count: must be >= 1, got 0"),
        (["--count", "498"], "--count must lie in 1..497"),
        (["--n", "0"], "argument --n/--N: must be >= 1"),
        (["--n0", "-5"], "argument --n0/--N0: must be >= 1"),
        (["--epochs", "0"], "argument --epochs: must be >= 1"),
        (["--sigma-samples", "0"], "argument --sigma-samples: must be >= 1"),
        (["--alpha", "1.5"], "argument --alpha: must be < 1"),
        (["--sigma", "-0.1"], "argument --sigma: must be > 0"),
        (["--sigma", "nan"], "argument --sigma: must be finite"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--seed", str(2**32)], "argument --seed: must be < 4294967296"),
        (["--batch-size", "0"], "argument --batch-size/--batch: must be >= 1"),
        (["--sigma-max", "0"], "argument --sigma-max: must be > 0"),
        (["--sigma", "0.5", "--sigma-max", "0.4"], "--sigma 0.5 exceeds --sigma-max 0.4"),
        (["--n", "many"], "argument --n/--N: not an integer: 'many'"),
        (["--sigma-s", "8"], "unrecognized arguments: --sigma-s 8"),  # no abbreviations
    ],
)
def test_bad_options_are_one_line_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run([*argv, "--out", tmp_path / "never"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddrs demo: error: ") and message in err, err
    assert err.rstrip().endswith("(see 'ddrs demo --help')")
    assert not (tmp_path / "never").exists()


def test_out_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not a folder"):
        run(["--quick", "--out", tmp_path / "file"])


def test_quick_fills_only_unset_options():
    args = cli.parse_args(["demo", "--quick", "--n", "300"])
    assert (args.n, args.n0, args.count, args.epochs) == (300, demo_command.DEMO_QUICK["n0"], 20, 1)
    args = cli.parse_args(["demo"])
    assert {k: getattr(args, k) for k in demo_command.DEMO_DEFAULTS} == demo_command.DEMO_DEFAULTS
    assert args.out.name == "ddrs_demo"


def test_checkpoints_of_an_earlier_version_are_reused(first_run, tmp_path, capsys):
    """A checkpoint saved before train_digits had an option (its config lacks it) is reused while the
    option keeps its default; with another value it is refused."""
    import torch

    out = tmp_path / "d"
    shutil.copytree(first_run[0], out)
    state = torch.load(out / "fixed_model.pt", weights_only=True)
    for key in ("selector_for", "sigma_levels", "selector_sigma", "label_n0", "label_n"):
        state["config"].pop(key)
    torch.save(state, out / "fixed_model.pt")
    assert run([*TINY, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "training the" not in printed and "certifying" not in printed
    state["config"]["label_n"] = 7
    torch.save(state, out / "fixed_model.pt")
    with pytest.raises(ValueError, match=r"label_n: 7 then, 512 now"):
        run([*TINY, "--out", out])


def test_training_does_not_depend_on_the_thread_count(tmp_path):
    """The demo trains on one thread whatever torch would use, so its checkpoints (and the table) do
    not change with the thread count."""
    import torch

    argv = ["--scheme", "gaussian", "--sigma", "0.25", "--epochs", "1", "--seed", "3"]
    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            model = demo._train_or_load(tmp_path / f"m{count}.pt", argv, "model", demo.Clock())
            assert torch.get_num_threads() == count  # restored after training
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
