"""ddrs.results: resumable tab-separated result files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ddrs.results import (
    CERTIFY_COLUMNS,
    SIGMA_COLUMNS,
    ResultFile,
    ResultFileError,
    format_time,
    parse_time,
    read_results,
    read_rows,
)

SETTINGS = {"n": 64, "sigma": {"fixed": 0.25}, "data": "digits"}
AWKWARD = [0.1, 1 / 3, 2.0**-60, 1e300, 0.30000000000000004, math.nextafter(0.5, 1), 0.0]


def certify_row(idx, radius=0.25, predict=3, label=3, time=1.5, sigma=0.25):
    return {"idx": idx, "label": label, "predict": predict, "radius": radius,
            "correct": int(predict == label), "time": time, "sigma": sigma}  # fmt: skip


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
        f.write("0\t3\t3\t0.25\t1\t0:00:01\t0.25\n")
    with pytest.raises(ResultFileError, match="idx 0 appears twice"):
        read_rows(path)
    with pytest.raises(ResultFileError, match="appears twice"):
        ResultFile(path, CERTIFY_COLUMNS, SETTINGS)


def test_malformed_rows(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("\t".join(CERTIFY_COLUMNS) + "\n0\t3\n")
    with pytest.raises(ResultFileError, match="line 2: 2 cells"):
        read_rows(path)
    path.write_text("\t".join(CERTIFY_COLUMNS) + "\nzero\t3\t3\t0.25\t1\t0:00:01\t0.25\n")
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
