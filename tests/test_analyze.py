"""ddrs analyze: certified accuracy, ACR, tables and plots from result files."""

from __future__ import annotations

import numpy as np
import pytest

from ddrs import analyze, cli
from ddrs.commands import analyze as analyze_command
from ddrs.results import CERTIFY_COLUMNS, ResultFile

# idx, label, predict, radius, correct, sigma
ROWS = [
    (0, 3, 3, 0.8, 1, 0.5),
    (1, 1, 1, 0.25, 1, 0.25),
    (2, 7, -1, 0.0, 0, 0.25),  # abstention
    (3, 2, 5, 0.9, 0, 0.5),  # certified, wrong
    (4, 0, 0, 0.1, 1, 0.12),
]
# correct radii: 0.8, 0.25, 0.1 out of 5 inputs
EXPECTED_ACC = {0.0: 3 / 5, 0.1: 3 / 5, 0.25: 2 / 5, 0.5: 1 / 5, 0.8: 1 / 5, 0.81: 0.0, 1.0: 0.0}
EXPECTED_ACR = (0.8 + 0.25 + 0.1) / 5


def write_result(path, rows=ROWS):
    with ResultFile(path, CERTIFY_COLUMNS, {"test": 1}) as out:
        for idx, label, predict, radius, correct, sigma in rows:
            out.write(
                dict(
                    idx=idx,
                    label=label,
                    predict=predict,
                    radius=radius,
                    correct=correct,
                    time=0.5,
                    sigma=sigma,
                    samples=1100,
                )
            )
    return path


def write_cohen(path, rows=ROWS):
    """Cohen et al.'s format: no sigma column, time as a timedelta string, written by hand."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{i}\t{lab}\t{p}\t{r:.3}\t{c}\t0:00:01.250000" for i, lab, p, r, c, _ in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(argv):
    return analyze_command.run(cli.parse_args(["analyze", *map(str, argv)]))


def test_accuracy_and_acr_by_hand(tmp_path):
    res = analyze.load(write_result(tmp_path / "a.tsv"))
    radii = list(EXPECTED_ACC)
    np.testing.assert_allclose(res.accuracy(radii), [EXPECTED_ACC[r] for r in radii], rtol=0, atol=1e-15)
    assert res.acr == pytest.approx(EXPECTED_ACR, rel=1e-15)
    assert len(res) == 5 and res.label == "a"


def test_cohen_format_without_sigma(tmp_path):
    res = analyze.load(write_cohen(tmp_path / "cohen.txt"), label="Cohen")
    np.testing.assert_allclose(res.accuracy([0, 0.25, 0.5, 1.0]), [0.6, 0.4, 0.2, 0.0])
    assert res.acr == pytest.approx(EXPECTED_ACR)
    assert res.label == "Cohen"


def test_correct_derived_from_predict_and_label(tmp_path):
    path = tmp_path / "noc.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\n0\t1\t1\t0.5\n1\t2\t-1\t0.0\n2\t3\t4\t0.7\n")
    res = analyze.load(path)
    np.testing.assert_allclose(res.accuracy([0, 0.5, 0.6]), [1 / 3, 1 / 3, 0])


def test_markdown_table(tmp_path, capsys):
    a, b = write_result(tmp_path / "a.tsv"), write_cohen(tmp_path / "b.txt")
    assert run([a, b, "--labels", "first", "second|x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| result | r = 0 | r = 0.25 | r = 0.5 | r = 0.75 | r = 1 | ACR | inputs |"
    assert lines[1].startswith("|---|")
    assert lines[2] == "| first | 0.600 | 0.400 | 0.200 | 0.200 | 0.000 | 0.230 | 5 |"
    assert lines[3].startswith("| second\\|x | 0.600 |")
    assert len(lines) == 4


def test_custom_radii_and_default_labels(tmp_path, capsys):
    run([write_result(tmp_path / "run_1.tsv"), "--radii", "0.1", "0.8", "0.81"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| result | r = 0.1 | r = 0.8 | r = 0.81 | ACR | inputs |"
    assert lines[2] == "| run_1 | 0.600 | 0.200 | 0.000 | 0.230 | 5 |"


def test_latex_table_and_output_files(tmp_path, capsys):
    a = write_result(tmp_path / "a.tsv")
    md, tex = tmp_path / "t.md", tmp_path / "t.tex"
    run([a, "--labels", "fixed σ_0 & 50%", "--latex", "--output", md, "--output", tex])
    out = capsys.readouterr().out
    assert out == tex.read_text()
    for piece in ("\\begin{tabular}{lrrrrrrr}", "\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}"):
        assert piece in out
    assert "\\cmidrule(lr){2-6}" in out
    assert "fixed $\\sigma$\\_0 \\& 50\\% & 0.600 & 0.400 & 0.200 & 0.200 & 0.000 & 0.230 & 5 \\\\" in out
    assert md.read_text().startswith("| result | r = 0 |")


def test_plot_is_png(tmp_path):
    a, b = write_result(tmp_path / "a.tsv"), write_cohen(tmp_path / "b.txt")
    png = tmp_path / "curves.png"
    run([a, b, "--plot", png, "--title", "test"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_errors(tmp_path):
    good = write_result(tmp_path / "good.tsv")
    with pytest.raises(ValueError, match="no such file"):
        run([good, tmp_path / "missing.tsv"])
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run([empty])
    header_only = tmp_path / "header.tsv"
    header_only.write_text("\t".join(CERTIFY_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        run([header_only])
    sigmas = tmp_path / "sigma.tsv"
    sigmas.write_text("idx\tlabel\tsigma\tsurrogate\ttime\n0\t1\t0.5\t0.3\t1.0\n")
    with pytest.raises(ValueError, match="no 'radius' column"):
        run([sigmas])
    no_correct = tmp_path / "nocorrect.tsv"
    no_correct.write_text("idx\tradius\n0\t0.5\n")
    with pytest.raises(ValueError, match="no 'correct' column"):
        run([no_correct])
    bad = tmp_path / "bad.tsv"
    bad.write_text("idx\tradius\tcorrect\n0\tabc\t1\n")
    with pytest.raises(ValueError, match="line 2"):
        run([bad])
    negative = tmp_path / "neg.tsv"
    negative.write_text("idx\tradius\tcorrect\n0\t-0.5\t1\n")
    with pytest.raises(ValueError, match=">= 0"):
        run([negative])
    with pytest.raises(SystemExit):  # usage errors, before any file is read
        run([good, "--labels", "a", "b"])
    with pytest.raises(SystemExit):
        run([good, "--radii", "-1"])
    with pytest.raises(OSError, match="cannot write"):
        run([good, "--output", tmp_path / "no" / "such" / "dir.md"])
