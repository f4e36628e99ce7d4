"""The ddrs command line, end to end in-process (and once as a killed subprocess), with tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

import ddrs_ext
from ddrs_ext import cli
from ddrs_ext.data import load_digits_split
from ddrs_ext.memory import CertificationMemory
from ddrs_ext.results import SIGMA_COLUMNS, ResultFile, read_rows

MODELS = textwrap.dedent(
    """
    import math
    import os
    import time

    import torch


    class Tiny(torch.nn.Module):
        def __init__(self, classes=10, shape=(1, 8, 8), hidden=16):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.hidden = torch.nn.Linear(math.prod(shape), hidden)
            self.out = torch.nn.Linear(hidden, classes)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.sleep = float(os.environ.get("TINY_SLEEP", "0"))

        def forward(self, x):
            if self.sleep:
                time.sleep(self.sleep)
            return self.out(torch.relu(self.hidden(x.flatten(1))))


    class Abs(torch.nn.Module):
        # class 1 when |x_0| > 1/2: with a large sigma most inputs look like class 1, with a small
        # one inputs near 0 are class 0, so inputs certified at different sigmas can overlap.
        def forward(self, x):
            a = x.flatten(1)[:, 0].abs()
            return torch.stack([0.5 - a, a - 0.5], 1) * 10


    def build():
        return Tiny()


    def build5():
        return Tiny(classes=5)


    def build_cifar():
        return Tiny(shape=(3, 32, 32))


    def build_abs():
        return Abs()


    def broken():
        raise RuntimeError("no weights here")
    """
)

TINY = ["--n0", "16", "--n", "64"]
SIGMA_FAST = ["--iterations", "2", "--num-samples", "8"]


@pytest.fixture
def models(tmp_path) -> Path:
    path = tmp_path / "tinymodels.py"
    path.write_text(MODELS)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv, "--no-progress")
    assert code == 0, err
    return out


def fails(capsys, *argv) -> str:
    """Runs a command that must fail with a one-line message; returns the message."""
    code, _, err = run(capsys, *argv, "--no-progress")
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ddrs ") and ": error: " in lines[0], err
    return lines[0]


def rows(path, drop=("time",)) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in read_rows(path)[1]]


def digits_test(count):
    _, (x, y) = load_digits_split(seed=0)
    return x[:count], y[:count]


def load_builder(models: Path, name: str):
    from ddrs_ext.loading import load_model

    return load_model(f"{models}:{name}", None, torch.device("cpu"))


# ----------------------------------------------------------------------------- certify


def test_certify_rows_match_the_library(capsys, models, tmp_path):
    out = tmp_path / "c.tsv"
    summary = ok(capsys, "certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.25,
                 "--max", 9, "--skip", 2, *TINY, "--out", out)  # fmt: skip
    assert "5 inputs" in summary
    header, got = read_rows(out)
    assert header == ("idx", "label", "predict", "radius", "correct", "time", "sigma")
    idx = torch.tensor([0, 2, 4, 6, 8])
    x, y = digits_test(9)
    model = load_builder(models, "build")
    want = ddrs_ext.certify(model, x[idx], 0.25, n0=16, n=64, seed=0, index=idx)
    assert [r["idx"] for r in got] == idx.tolist()
    assert [r["label"] for r in got] == y[idx].tolist()
    assert [r["predict"] for r in got] == want.prediction.tolist()
    assert [r["radius"] for r in got] == want.radius.tolist()  # exact
    assert [r["correct"] for r in got] == (want.prediction == y[idx]).long().tolist()
    assert all(r["sigma"] == 0.25 and r["time"] >= 0 for r in got)


def test_batch_size_and_chunk_do_not_change_rows_and_resume_is_exact(capsys, models, tmp_path):
    common = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.5, "--max", 12, *TINY]
    ok(capsys, *common, "--batch-size", 7, "--chunk", 5, "--out", tmp_path / "a.tsv")
    ok(capsys, *common, "--batch-size", 1000, "--out", tmp_path / "b.tsv")
    assert rows(tmp_path / "a.tsv") == rows(tmp_path / "b.tsv")
    # cut after 4 rows and leave half a row, as a kill mid-write would; resume with other batching
    lines = (tmp_path / "a.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "a.tsv").write_text("".join(lines[:5]) + lines[5][:7])
    ok(capsys, *common, "--batch-size", 50, "--chunk", 3, "--out", tmp_path / "a.tsv")
    assert rows(tmp_path / "a.tsv") == rows(tmp_path / "b.tsv")
    assert "already done" in run(capsys, *common, "--out", tmp_path / "a.tsv")[2]
    code, _, err = run(capsys, *common, "--out", tmp_path / "c.tsv")  # with a progress bar
    assert code == 0 and "12/12" in err and "input/s" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_subprocess_resumes_to_the_same_file(capsys, models, tmp_path, sig):
    common = ["certify", "--model", f"{models}:build", "--data", "digits", "--sigma", 0.5, "--max", 60, *TINY]
    out = tmp_path / "k.tsv"
    env = {**os.environ, "TINY_SLEEP": "0.05", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "ddrs_ext", *map(str, common), "--chunk", "1", "--out", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = len(read_rows(out)[1])
    assert 5 <= done < 60
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert (
            err.strip().splitlines()[-1] == "ddrs certify: interrupted; run the same command again to resume"
        )
    ok(capsys, *common, "--out", out)
    ok(capsys, *common, "--out", tmp_path / "whole.tsv")
    assert rows(out) == rows(tmp_path / "whole.tsv")


def write_abs_data(tmp_path, n=24):
    x = torch.zeros(n, 1, 2)
    x[:, 0, 0] = torch.linspace(-0.3, 0.3, n)
    x[:, 0, 1] = torch.arange(n) * 1e-3
    y = (torch.arange(n) % 2).long()
    torch.save({"x": x, "y": y}, tmp_path / "abs.pt")
    with ResultFile(tmp_path / "sigma.tsv", ("idx", "sigma")) as f:
        for i in range(n):
            f.write({"idx": i, "sigma": 0.05 if i % 2 else 2.0})
    return tmp_path / "abs.pt", tmp_path / "sigma.tsv"


def test_memory_resume_equals_uninterrupted_run(capsys, models, tmp_path):
    data, sigma = write_abs_data(tmp_path)
    common = ["certify", "--model", f"{models}:build_abs", "--data", data, "--sigma-file", sigma, *TINY]
    ok(capsys, *common, "--out", tmp_path / "plain.tsv")
    ok(capsys, *common, "--memory", "--out", tmp_path / "whole.tsv")
    plain, whole = rows(tmp_path / "plain.tsv"), rows(tmp_path / "whole.tsv")
    assert sum(p != w for p, w in zip(plain, whole)) >= 3  # the memory does change answers here
    ok(capsys, *common, "--memory", "--chunk", 4, "--out", tmp_path / "part.tsv")
    lines = (tmp_path / "part.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "part.tsv").write_text("".join(lines[:14]))  # as if killed after 13 rows
    ok(capsys, *common, "--memory", "--chunk", 3, "--out", tmp_path / "part.tsv")
    assert rows(tmp_path / "part.tsv") == whole


def test_memory_extend_restores_the_memory():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    prediction = torch.randint(0, 3, (40,), generator=g)
    radius = torch.rand(40, generator=g, dtype=torch.float64) * 2
    prediction[::7], radius[::7] = -1, 0.0
    whole = CertificationMemory()
    want_p, want_r = whole.adjust(x, prediction, radius)
    first = CertificationMemory()
    p1, r1 = first.adjust(x[:25], prediction[:25], radius[:25])
    rebuilt = CertificationMemory()
    rebuilt.extend(x[:25], p1, r1)
    assert len(rebuilt) == len(first) == int((p1 != -1).sum())
    for key, value in first.state_dict().items():
        other = rebuilt.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    p2, r2 = rebuilt.adjust(x[25:], prediction[25:], radius[25:])
    assert torch.equal(torch.cat([p1, p2]), want_p) and torch.equal(torch.cat([r1, r2]), want_r)


def test_memory_extend_checks_like_adjust():
    memory = CertificationMemory()
    with pytest.raises(ValueError, match="abstains"):
        memory.extend(torch.zeros(1, 2), torch.tensor([-1]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="radius"):
        memory.extend(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([-0.5]))
    with pytest.raises(ValueError, match="shape"):
        memory.extend(torch.zeros(2, 2), torch.tensor([1]), torch.tensor([0.5]))
    memory.extend(torch.zeros(2, 2), torch.tensor([1, -1]), torch.tensor([0.5, 0.0]))
    assert len(memory) == 1
    with pytest.raises(ValueError, match="per-input shape"):
        memory.extend(torch.zeros(1, 3), torch.tensor([1]), torch.tensor([0.5]))


# ----------------------------------------------------------------------------- sigma


def test_optimize_sigma_rows_resume_and_certify_with_them(capsys, models, tmp_path):
    common = ["--model", f"{models}:build", "--data", "digits", "--max", 6]
    opt = ["optimize-sigma", *common, *SIGMA_FAST, "--surrogate-samples", 16]
    ok(capsys, *opt, "--out", tmp_path / "s.tsv")
    header, got = read_rows(tmp_path / "s.tsv")
    assert header == SIGMA_COLUMNS
    x, y = digits_test(6)
    model = load_builder(models, "build")
    idx = torch.arange(6)
    sigma = ddrs_ext.optimize_sigma(model, x, 0.12, iterations=2, num_samples=8, seed=0, index=idx)
    surrogate = ddrs_ext.surrogate_radius(model, x, sigma, num_samples=16, seed=0, index=idx)
    assert [r["sigma"] for r in got] == sigma.tolist()
    assert [r["surrogate"] for r in got] == surrogate.tolist()
    assert [r["label"] for r in got] == y.tolist()
    # resume after a cut
    lines = (tmp_path / "s.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "s2.tsv").write_text("".join(lines[:3]))
    (tmp_path / "s2.tsv.settings.json").write_text((tmp_path / "s.tsv.settings.json").read_text())
    ok(capsys, *opt, "--chunk", 2, "--out", tmp_path / "s2.tsv")
    assert rows(tmp_path / "s2.tsv") == rows(tmp_path / "s.tsv")
    # the sigma file into certify, and --optimize on the fly, give the same rows
    ok(capsys, "certify", *common, *TINY, "--sigma-file", tmp_path / "s.tsv", "--out", tmp_path / "c1.tsv")
    ok(capsys, "certify", *common, *TINY, "--optimize", *SIGMA_FAST, "--out", tmp_path / "c2.tsv")
    assert [r["sigma"] for r in rows(tmp_path / "c1.tsv")] == sigma.tolist()
    assert rows(tmp_path / "c1.tsv") == rows(tmp_path / "c2.tsv")


def test_paper_flag_and_explicit_options():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["optimize-sigma", "--data", "digits", "--out", "x", "--paper", "--iterations", "3"]
    )
    options = cli._optimize_options(args)
    assert options["iterations"] == 3 and options["rule"] == "ascent" and options["num_samples"] == 100
    assert args.sigma0 == 0.12
    args = parser.parse_args(["optimize-sigma", "--data", "digits", "--out", "x", "--clip", "0.1", "0.9"])
    options = cli._optimize_options(args)
    assert (
        options["clip"] == (0.1, 0.9) and options["rule"] == "bisect" and options["keep_prediction"] is True
    )


# ----------------------------------------------------------------------------- models and data


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace/load are deprecated in torch 2.13
def test_checkpoint_torchscript_export_and_module_name_give_the_same_rows(
    capsys, models, tmp_path, monkeypatch
):
    common = ["--data", "digits", "--sigma", 0.1, "--max", 5, *TINY]
    ok(capsys, "certify", "--model", f"{models}:build", *common, "--out", tmp_path / "ref.tsv")
    model = load_builder(models, "build")
    x, _ = digits_test(2)
    torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    ok(capsys, "certify", "--model", tmp_path / "m.ts", *common, "--out", tmp_path / "ts.tsv")
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    ok(capsys, "certify", "--model", tmp_path / "m.pt2", *common, "--out", tmp_path / "pt2.tsv")
    # weights from a checkpoint into a model built with other weights, by module name
    name = f"tinymod_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(MODELS.replace("manual_seed(0)", "manual_seed(1)"))
    monkeypatch.chdir(tmp_path)
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, "ck.pt")
    ok(capsys, "certify", "--model", f"{name}:build", "--checkpoint", "ck.pt", *common, "--out", "ck.tsv")
    ok(capsys, "certify", "--model", f"{name}:build", *common, "--out", "other.tsv")
    reference = rows(tmp_path / "ref.tsv")
    for out in ("ts.tsv", "pt2.tsv", "ck.tsv"):
        assert rows(tmp_path / out) == reference, out
    assert rows(tmp_path / "other.tsv") != reference


def test_train_digits_checkpoint_alone(capsys, tmp_path):
    from ddrs_ext import models, train_digits

    torch.manual_seed(0)
    net = models.digits_cnn()
    state = {"format": train_digits.FORMAT, "version": 1, "builder": train_digits.BUILDER,
             "model": net.state_dict(), "sigma_bank": None, "config": {}}  # fmt: skip
    torch.save(state, tmp_path / "d.pt")
    ok(capsys, "certify", "--checkpoint", tmp_path / "d.pt", "--data", "digits", "--split", "train",
       "--sigma", 0.25, "--max", 3, *TINY, "--out", tmp_path / "d.tsv")  # fmt: skip
    (x, _), _ = load_digits_split(seed=0)
    want = ddrs_ext.certify(net.eval(), x[:3], 0.25, n0=16, n=64, seed=0)
    assert [r["radius"] for r in rows(tmp_path / "d.tsv")] == want.radius.tolist()


def test_cifar10_folder_and_pt_file(capsys, models, tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 0, 9]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    common = ["--model", f"{models}:build_cifar", "--sigma", 0.5, *TINY]
    ok(capsys, "certify", *common, "--data", tmp_path / "cifar", "--out", tmp_path / "c.tsv")
    with open(folder / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(test[b"data"]).reshape(3, 3, 32, 32).float() / 255
    torch.save((x, torch.tensor([1, 0, 9])), tmp_path / "t.pt")
    ok(capsys, "certify", *common, "--data", tmp_path / "t.pt", "--out", tmp_path / "t.tsv")
    assert rows(tmp_path / "c.tsv") == rows(tmp_path / "t.tsv")
    assert [r["label"] for r in rows(tmp_path / "c.tsv")] == [1, 0, 9]


# ----------------------------------------------------------------------------- errors


def test_help_says_what_each_command_does(capsys):
    for argv in (["--help"], ["certify", "--help"], ["optimize-sigma", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text
    assert "idx label predict radius correct time sigma" in text or "idx label sigma" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "--data", "digits", "--out", "x.tsv"],  # no sigma choice
        ["certify", "--data", "digits", "--sigma", "0.2", "--optimize", "--out", "x.tsv"],
        ["certify", "--data", "digits", "--sigma", "-1", "--out", "x.tsv"],
        ["certify", "--data", "digits", "--sigma", "0.2", "--alpha", "2", "--out", "x.tsv"],
        ["certify", "--data", "digits", "--sigma", "0.2", "--skip", "0", "--out", "x.tsv"],
        ["certify", "--data", "digits", "--sigma", "0.2"],  # no --out
        ["optimize-sigma", "--data", "digits", "--estimator", "magic", "--out", "x.tsv"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_user_errors_are_one_line(capsys, models, tmp_path):
    m = ["--model", f"{models}:build"]
    c = ["certify", "--data", "digits", "--sigma", 0.25, "--max", 4, *TINY]
    out = ["--out", tmp_path / "o.tsv"]
    assert "cannot import" in fails(capsys, *c, "--model", "no_such_module_xyz:build", *out)
    assert "no attribute" in fails(capsys, *c, "--model", f"{models}:nothing", *out)
    assert "no weights here" in fails(capsys, *c, "--model", f"{models}:broken", *out)
    assert "no such file" in fails(capsys, *c, "--model", tmp_path / "missing.ts", *out)
    (tmp_path / "junk.ts").write_text("junk")
    assert "not a TorchScript" in fails(capsys, *c, "--model", tmp_path / "junk.ts", *out)
    assert "give --model" in fails(capsys, *c, *out)
    assert "no such file" in fails(capsys, *c, *m, "--checkpoint", tmp_path / "nope.pt", *out)
    assert "no such file" in fails(capsys, "certify", *m, "--data", tmp_path / "nope.pt", "--sigma", 1, *out)
    assert "CUDA is not available" in fails(capsys, *c, *m, "--device", "cuda", *out)
    assert "--split applies" in fails(capsys, *c, *m, "--data", models, "--split", "test", *out)
    assert "need --optimize" in fails(capsys, *c, *m, "--sigma0", 0.3, *out)
    assert "does not exist" in fails(capsys, *c, *m, "--out", tmp_path / "nofolder" / "o.tsv")
    # a checkpoint that does not fit
    bad = load_builder(models, "build5").state_dict()
    torch.save({"model": bad}, tmp_path / "bad.pt")
    msg = fails(capsys, *c, *m, "--checkpoint", tmp_path / "bad.pt", *out)
    assert "does not fit" in msg and "out.weight" in msg and "(5, 16)" in msg
    state = load_builder(models, "build").state_dict()
    state.pop("hidden.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad2.pt")
    msg = fails(capsys, *c, *m, "--checkpoint", tmp_path / "bad2.pt", *out)
    assert "missing keys hidden.bias" in msg and "unexpected keys extra.weight" in msg
    assert "train_digits" in fails(capsys, *c, "--checkpoint", tmp_path / "bad2.pt", *out)
    # labels outside the model's classes; a model that does not fit the data
    msg = fails(capsys, *c, "--model", f"{models}:build5", *out)
    assert "outside [0, 5)" in msg
    assert "fails on one input" in fails(capsys, *c, "--model", f"{models}:build_cifar", *out)
    # sigma file without every selected input
    with ResultFile(tmp_path / "s.tsv", ("idx", "sigma")) as f:
        for i in (0, 1, 3):
            f.write({"idx": i, "sigma": 0.3})
    msg = fails(
        capsys, "certify", *m, "--data", "digits", "--sigma-file", tmp_path / "s.tsv", "--max", 9, *out
    )
    assert "6 selected input(s): idx 2, 4, 5, 6, 7 and 1 more" in msg
    assert "no such file" in fails(
        capsys, "certify", *m, "--data", "digits", "--sigma-file", tmp_path / "x", *out
    )
    # settings changed on resume
    ok(capsys, *c, *m, *out)
    msg = fails(capsys, *c[:-1], "32", *m, *out)
    assert "other settings" in msg and "'n': 64" not in msg and "n: 64 then, 32 now" in msg
    assert not (tmp_path / "nofolder").exists()


def test_bad_data_files(capsys, models, tmp_path):
    c = ["certify", "--model", f"{models}:build", "--sigma", 0.25, *TINY, "--out", tmp_path / "o.tsv"]
    torch.save({"x": torch.zeros(3, 1, 8, 8), "y": torch.zeros(2, dtype=torch.long)}, tmp_path / "len.pt")
    assert "3 inputs but 2 labels" in fails(capsys, *c, "--data", tmp_path / "len.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a torch file")
    assert "cannot be read" in fails(capsys, *c, "--data", tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "keys.pt")
    assert "expected x/y" in fails(capsys, *c, "--data", tmp_path / "keys.pt")
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    assert "no image files" in fails(capsys, *c, "--data", folder)  # a class folder without images
    assert "--image-size applies to image folders" in fails(
        capsys, *c, "--data", "digits", "--image-size", "8"
    )
