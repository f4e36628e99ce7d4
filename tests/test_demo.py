"""ddrs demo end to end on tiny settings: files, table, reproducibility, resumption, bad options."""

from __future__ import annotations

import contextlib
import io
import shutil

import numpy as np
import pytest

from ddrs import analyze, cli, demo
from ddrs.results import ResultFileError, read_results

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
    rows = demo.table_rows(0.25)
    assert len(rows) == 9
    for name in ("fixed_model.pt", "dd_model.pt", "table.md", "curves.png"):
        assert (out / name).is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        columns = read_results(out / f"{row.key}.tsv")
        assert list(columns["idx"]) == list(range(8))
        assert set(columns) == {"idx", "label", "predict", "radius", "correct", "time", "sigma"}
        np.testing.assert_array_equal(columns["correct"], columns["predict"] == columns["label"])
        assert (out / f"{row.key}.tsv.settings.json").is_file()
        if row.surrogate is None:
            assert (columns["sigma"] == 0.25).all()
    # memory rows: same inputs and sigmas as their source, radii never larger
    for row in rows:
        if row.memory:
            before, after = read_results(out / f"{row.source}.tsv"), read_results(out / f"{row.key}.tsv")
            np.testing.assert_array_equal(before["sigma"], after["sigma"])
            same = after["predict"] == before["predict"]
            assert (after["radius"][same] <= before["radius"][same]).all()

    lines = table_lines(printed)
    assert len(lines) == 2 + len(rows)
    assert lines[0] == "| result | r = 0 | r = 0.25 | r = 0.5 | r = 0.75 | r = 1 | ACR | inputs |"
    for line, row in zip(lines[2:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row.label and cells[-1] == "8" and len(cells) == 8
        values = [float(c) for c in cells[1:-1]]
        assert all(0 <= v for v in values) and all(0 <= v <= 1 for v in values[:-1])
        res = analyze.load(out / f"{row.key}.tsv")
        assert values[-1] == pytest.approx(res.acr, abs=5e-4)
    assert table_lines((out / "table.md").read_text()) == lines
    last = printed.rstrip().splitlines()
    verdict = [line for line in last if line.startswith("Does data-dependent σ help here?")]
    assert len(verdict) == 1
    assert last[-1].startswith("- data-dependent model, σ per input (certify surrogate) + memory: ")


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
    assert (args.n, args.n0, args.count, args.epochs) == (300, cli.DEMO_QUICK["n0"], 20, 1)
    args = cli.parse_args(["demo"])
    assert {k: getattr(args, k) for k in cli.DEMO_DEFAULTS} == cli.DEMO_DEFAULTS
    assert args.out.name == "ddrs_demo"
