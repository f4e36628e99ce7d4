"""ddrs.results: resumable tab-separated result files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ddrs.results import (
    CERTIFY_COLUMNS,
    DUAL_COLUMNS,
    LATER_CERTIFY_COLUMNS,
    SIGMA_COLUMNS,
    ResultFile,
    ResultFileError,
    certify_rows,
    format_time,
    parse_time,
    read_results,
    read_rows,
)

SETTINGS = {"n": 64, "sigma": {"fixed": 0.25}, "data": "digits"}
AWKWARD = [0.1, 1 / 3, 2.0**-60, 1e300, 0.30000000000000004, math.nextafter(0.5, 1), 0.0]


def certify_row(idx, radius=0.25, predict=3, label=3, time=1.5, sigma=0.25, samples=1100):
    return {"idx": idx, "label": label, "predict": predict, "radius": radius,
            "correct": int(predict == label), "time": time, "sigma": sigma, "samples": samples}  # fmt: skip


def test_round_trip_with_exact_floats(tmp_path):
    path = tmp_path / "r.tsv"
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:
        assert f.done == {}
        for i, r in enumerate(AWKWARD):
            f.write(certify_row(i, radius=r, sigma=1 + r, predict=-1 if r == 0 else 3, time=i * 0.25))
    text = path.read_text()
    assert text.splitlines()[0] == "\t".join(CERTIFY_COLUMNS)
    assert text.splitlines()[2].split("\t")[5] == "0:00:00.250000"  # timedelta, as established
    header, rows = read_rows(path)
    assert header == CERTIFY_COLUMNS
    assert [r["radius"] for r in rows] == AWKWARD  # bit for bit
    assert [r["sigma"] for r in rows] == [1 + r for r in AWKWARD]
    assert rows[-1]["predict"] == -1 and rows[-1]["correct"] == 0
    arrays = read_results(path)
    assert arrays["idx"].dtype == np.int64 and arrays["radius"].dtype == np.float64
    assert arrays["time"].tolist() == [i * 0.25 for i in range(len(AWKWARD))]
    assert json.loads((tmp_path / "r.tsv.settings.json").read_text()) == SETTINGS
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:  # resumes: rows are reported as done
        assert sorted(f.done) == list(range(len(AWKWARD)))
        assert f.done[1]["radius"] == 1 / 3
        f.write(certify_row(100))
    assert read_rows(path)[1][-1]["idx"] == 100


def test_sigma_columns(tmp_path):
    with ResultFile(tmp_path / "s.tsv", SIGMA_COLUMNS) as f:
        f.write({"idx": 0, "label": 1, "sigma": 0.12, "surrogate": -0.5, "time": 0.01})
    assert read_results(tmp_path / "s.tsv")["surrogate"].tolist() == [-0.5]


def test_partial_last_line_is_cut_on_resume(tmp_path):
    path = tmp_path / "r.tsv"
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:
        f.write(certify_row(0))
        f.write(certify_row(1))
    whole = path.read_bytes()
    path.write_bytes(whole + b"2\t3\t3\t0.2")  # killed mid-write
    assert [r["idx"] for r in read_rows(path)[1]] == [0, 1]  # readers ignore it
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:
        assert sorted(f.done) == [0, 1]
        assert path.read_bytes() == whole
        f.write(certify_row(2))
    assert [r["idx"] for r in read_rows(path)[1]] == [0, 1, 2]
    path.write_bytes(b"idx\tla")  # a partial header: starts over
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:
        assert f.done == {}
    assert path.read_text() == "\t".join(CERTIFY_COLUMNS) + "\n"


def test_header_mismatch(tmp_path):
    path = tmp_path / "r.tsv"
    with ResultFile(path, SIGMA_COLUMNS) as f:
        f.write({"idx": 0, "label": 1, "sigma": 0.12, "surrogate": 0.3, "time": 0.01})
    with pytest.raises(ResultFileError, match="its header is"):
        ResultFile(path, CERTIFY_COLUMNS, SETTINGS)


def test_settings_mismatch(tmp_path):
    path = tmp_path / "r.tsv"
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:
        f.write(certify_row(0))
    with pytest.raises(ResultFileError, match=r"other settings \(n: 64 then, 32 now\)"):
        ResultFile(path, CERTIFY_COLUMNS, {**SETTINGS, "n": 32})
    with ResultFile(path, CERTIFY_COLUMNS, dict(reversed(SETTINGS.items()))) as f:  # order is irrelevant
        assert list(f.done) == [0]
    (tmp_path / "r.tsv.settings.json").write_text("{broken")
    with pytest.raises(ResultFileError, match="unreadable"):
        ResultFile(path, CERTIFY_COLUMNS, SETTINGS)


def test_settings_of_a_file_without_rows_are_replaced(tmp_path):
    path = tmp_path / "r.tsv"
    ResultFile(path, CERTIFY_COLUMNS, SETTINGS).close()
    with ResultFile(path, CERTIFY_COLUMNS, {**SETTINGS, "n": 32}) as f:
        f.write(certify_row(0))
    assert json.loads((tmp_path / "r.tsv.settings.json").read_text())["n"] == 32


def test_duplicate_idx(tmp_path):
    path = tmp_path / "r.tsv"
    with ResultFile(path, CERTIFY_COLUMNS, SETTINGS) as f:
        f.write(certify_row(0))
        with pytest.raises(ValueError, match="already written"):
            f.write(certify_row(0))
    with open(path, "a") as f:
        f.write("0\t3\t3\t0.25\t1\t0:00:01\t0.25\t1100\n")
    with pytest.raises(ResultFileError, match="idx 0 appears twice"):
        read_rows(path)
    with pytest.raises(ResultFileError, match="appears twice"):
        ResultFile(path, CERTIFY_COLUMNS, SETTINGS)


def test_malformed_rows(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("\t".join(CERTIFY_COLUMNS) + "\n0\t3\n")
    with pytest.raises(ResultFileError, match="line 2: 2 cells"):
        read_rows(path)
    path.write_text("\t".join(CERTIFY_COLUMNS) + "\nzero\t3\t3\t0.25\t1\t0:00:01\t0.25\t1100\n")
    with pytest.raises(ResultFileError, match="line 2"):
        ResultFile(path, CERTIFY_COLUMNS, SETTINGS)
    with ResultFile(tmp_path / "ok.tsv", CERTIFY_COLUMNS) as f:
        with pytest.raises(ValueError, match="lacks column"):
            f.write({"idx": 1})
        with pytest.raises(ValueError, match="finite"):
            f.write(certify_row(1, radius=math.inf))


def test_lock_held_by_another_open_file(tmp_path):
    path = tmp_path / "r.tsv"
    first = ResultFile(path, CERTIFY_COLUMNS, SETTINGS)
    try:
        with pytest.raises(ResultFileError, match="another run is writing"):
            ResultFile(path, CERTIFY_COLUMNS, SETTINGS)
    finally:
        first.close()
    ResultFile(path, CERTIFY_COLUMNS, SETTINGS).close()  # free again


def test_missing_folder_directory_and_missing_file(tmp_path):
    with pytest.raises(ResultFileError, match="does not exist"):
        ResultFile(tmp_path / "no" / "r.tsv", CERTIFY_COLUMNS)
    with pytest.raises(ResultFileError, match="is a directory"):
        ResultFile(tmp_path, CERTIFY_COLUMNS)
    with pytest.raises(ResultFileError, match="no such file"):
        read_rows(tmp_path / "none.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ResultFileError, match="empty"):
        read_rows(tmp_path / "empty.tsv")
    assert issubclass(ResultFileError, ValueError)


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("0:00:01.250000", 1.25),
        ("0:00:00", 0.0),
        ("1:02:03.5", 3723.5),
        ("2 days, 0:00:01", 2 * 86400 + 1),
        ("1 day, 1:00:00", 90000.0),
        ("3.75", 3.75),
    ],
)
def test_time_parsing(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("seconds", [0.0, 0.016721, 1.25, 3723.5, 90061.000001])
def test_time_round_trip(seconds):
    assert parse_time(format_time(seconds)) == pytest.approx(seconds, abs=1e-6)


# ----------------------------------------------------------------------------- samples, dual columns


def test_certify_columns_keep_the_established_prefix():
    """Cohen et al.'s analysis scripts read idx label predict radius correct time by name; ddrs's
    columns come after them."""
    assert CERTIFY_COLUMNS[:6] == ("idx", "label", "predict", "radius", "correct", "time")
    assert CERTIFY_COLUMNS[6:] == ("sigma", "samples") and LATER_CERTIFY_COLUMNS == ("samples",)
    assert DUAL_COLUMNS == (*CERTIFY_COLUMNS, "level", "radius_selector", "radius_classifier")


def test_samples_and_dual_columns_round_trip(tmp_path):
    with ResultFile(tmp_path / "c.tsv", CERTIFY_COLUMNS, SETTINGS) as f:
        f.write(certify_row(0, samples=100_100))
        f.write(certify_row(1, samples=296))
    arrays = read_results(tmp_path / "c.tsv")
    assert arrays["samples"].dtype == np.int64 and arrays["samples"].tolist() == [100_100, 296]
    with ResultFile(tmp_path / "d.tsv", DUAL_COLUMNS) as f:
        f.write({**certify_row(0), "level": 2, "radius_selector": 1 / 3, "radius_classifier": 0.25})
        f.write({**certify_row(1, predict=-1, radius=0.0, sigma=math.nan), "level": -1,
                 "radius_selector": 0.0, "radius_classifier": 0.0})  # fmt: skip
    arrays = read_results(tmp_path / "d.tsv")
    assert arrays["level"].tolist() == [2, -1] and arrays["level"].dtype == np.int64
    assert arrays["radius_selector"].tolist() == [1 / 3, 0.0]  # exact
    assert arrays["sigma"][0] == 0.25 and math.isnan(arrays["sigma"][1])


def test_a_file_without_samples_is_read_and_resumed_in_its_format(tmp_path):
    """A result file written before the samples column existed: readers read it; a resumed run
    continues it in its own format (the extra cell left out), and refuses other headers as before."""
    path = tmp_path / "old.tsv"
    old = CERTIFY_COLUMNS[:-1]
    path.write_text("\t".join(old) + "\n0\t3\t3\t0.25\t1\t0:00:01\t0.25\n")
    assert set(read_results(path)) == set(old)
    with ResultFile(path, CERTIFY_COLUMNS, later=LATER_CERTIFY_COLUMNS) as f:
        assert f.columns == old and list(f.done) == [0]
        f.write(certify_row(1, samples=42))
    assert path.read_text().splitlines()[-1] == "1\t3\t3\t0.25\t1\t0:00:01.500000\t0.25"
    with pytest.raises(ResultFileError, match="its header is"):
        ResultFile(path, CERTIFY_COLUMNS)  # without `later`: the header must be the full one
    # a new (or empty) file gets every column
    with ResultFile(tmp_path / "new.tsv", CERTIFY_COLUMNS, later=LATER_CERTIFY_COLUMNS) as f:
        assert f.columns == CERTIFY_COLUMNS
    # Cohen et al.'s own format (no sigma) is read, not resumed
    (tmp_path / "cohen.tsv").write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:02\n"
    )
    assert read_results(tmp_path / "cohen.tsv")["radius"].tolist() == [0.5]
    with pytest.raises(ResultFileError, match="its header is"):
        ResultFile(tmp_path / "cohen.tsv", CERTIFY_COLUMNS, later=LATER_CERTIFY_COLUMNS)


def test_certify_rows_of_certify_sequential_and_dual_results():
    import torch

    import ddrs_ext

    class Two(torch.nn.Module):
        def forward(self, x):
            s = x.flatten(1)[:, 0] * 4
            return torch.stack([-s, s], 1)

    x = torch.tensor([[1.0], [-1.0], [0.01]])
    plain = ddrs_ext.certify(Two(), x, 0.5, n0=10, n=50, seed=0)
    rows = certify_rows(plain, [7, 8, 9], [1, 0, 0])
    assert [r["samples"] for r in rows] == [60, 60, 60] and [r["idx"] for r in rows] == [7, 8, 9]
    assert [r["correct"] for r in rows] == [int(p == y) for p, y in zip(plain.prediction.tolist(), [1, 0, 0])]
    assert set(rows[0]) == set(CERTIFY_COLUMNS) - {"time"}
    seq = ddrs_ext.certify_sequential(Two(), x, 0.5, n0=10, n_max=400, seed=0)
    assert [r["samples"] for r in certify_rows(seq, [0, 1, 2], [1, 0, 0])] == seq.samples.tolist()
    dual = ddrs_ext.certify_dual(Two(), Two(), x, [0.25, 0.5], selector_sigma=0.5, n0=10, n=50, seed=0)
    rows = certify_rows(dual, [0, 1, 2], [1, 0, 0])
    assert set(rows[0]) == set(DUAL_COLUMNS) - {"time"}
    assert [r["level"] for r in rows] == dual.level.tolist()
    assert [r["radius_selector"] for r in rows] == dual.radius_selector.tolist()
    assert [r["samples"] for r in rows] == dual.samples.tolist()
