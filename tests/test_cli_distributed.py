"""``ddrs certify`` / ``optimize-sigma`` and ``python -m ddrs.train_digits`` under torchrun (issue 13), with
gloo on this CPU.

Every multi-process test starts the real torchrun (``python -m torch.distributed.run --standalone``, which
picks a free port) with 2 processes, in a folder outside the checkout, so that the workers import the
installed packages; each is bounded by ``--dist-timeout`` and by a subprocess timeout, so a failure
cannot hang the suite. Results are compared with one process's, run in this process. The model is a
two-class function of one coordinate (class 1 when |x_0| > 1/2), cheap to evaluate, with sigmas per
input for which the memory-based adjustment changes answers."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ddrs import cli
from ddrs.results import ResultFile, read_rows, remove_result_file

CHECKOUT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 180  # seconds for one torchrun launch (a few on two idle cores)
TIMEOUT = ("--dist-timeout", "60")  # of the launched ddrs commands
COUNT = 24  # inputs in the data file

MODELS = textwrap.dedent(
    """
    import os
    import time

    import torch


    class Abs(torch.nn.Module):
        # class 1 when |x_0| > 1/2. ABS_SLEEP: seconds per forward pass (and the process id in pid<RANK>)
        def forward(self, x):
            pause = float(os.environ.get("ABS_SLEEP", "0"))
            if pause:
                with open(f"pid{os.environ.get('RANK', '0')}", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(pause)
            a = x.flatten(1)[:, 0].abs()
            return torch.stack([0.5 - a, a - 0.5], 1) * 10


    class Flaky(Abs):
        def forward(self, x):
            if os.environ.get("RANK") == "1" and x.shape[0] > 1:  # not when ddrs probes the model
                raise RuntimeError("this model fails on rank 1")
            return super().forward(x)


    def build_abs():
        return Abs()


    def build_flaky():
        return Flaky()


    def build_by_rank():  # random weights, from a generator seeded differently by each rank
        torch.manual_seed(int(os.environ.get("RANK", "0")))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2))
    """
)

# ddrs with its command line plus the arguments in EXTRA_RANK<RANK> (different settings per rank)
PER_RANK = textwrap.dedent(
    """
    import os
    import sys

    from ddrs.cli import main

    sys.exit(main(sys.argv[1:] + os.environ.get("EXTRA_RANK" + os.environ["RANK"], "").split()))
    """
)

# train_digits' train() on every rank; each rank saves what it returned (its model and sigma bank)
TRAIN = textwrap.dedent(
    """
    import os
    import sys

    import torch

    from ddrs import train_digits

    checkpoint = train_digits.train(train_digits.build_parser().parse_args(sys.argv[1:]))
    torch.save(checkpoint, f"returned{os.environ['RANK']}.pt")
    """
)


def _inside_checkout(path: str) -> bool:
    resolved = Path(path).resolve()
    return resolved == CHECKOUT or CHECKOUT in resolved.parents


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder outside the checkout with the model file, the data (abs.pt: inputs (COUNT, 1, 2), labels
    alternating) and a sigma per input (sigma.tsv)."""
    folder = tmp_path_factory.mktemp("torchrun")
    assert not _inside_checkout(str(folder))
    (folder / "absmodel.py").write_text(MODELS)
    (folder / "per_rank.py").write_text(PER_RANK)
    (folder / "train.py").write_text(TRAIN)
    x = torch.zeros(COUNT, 1, 2)
    x[:, 0, 0] = torch.linspace(-0.3, 0.3, COUNT)
    x[:, 0, 1] = torch.arange(COUNT) * 1e-3
    torch.save({"x": x, "y": (torch.arange(COUNT) % 2).long()}, folder / "abs.pt")
    with ResultFile(folder / "sigma.tsv", ("idx", "sigma")) as f:
        for i in range(COUNT):
            f.write({"idx": i, "sigma": 0.05 if i % 2 else 2.0})
    return folder


def certify_args(place: Path, model: str = "build_abs") -> list[str]:
    return [
        "certify",
        "--model",
        f"{place / 'absmodel.py'}:{model}",
        "--data",
        str(place / "abs.pt"),
        "--sigma-file",
        str(place / "sigma.tsv"),
        "--n0",
        "16",
        "--n",
        "64",
        "--no-progress",
    ]


def one_process(*argv) -> str:
    """``ddrs ARGV`` in this process; its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    assert code == 0, err.getvalue()
    return err.getvalue()


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and not _inside_checkout(p)]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(place: Path, *argv, env: dict | None = None, tee: bool = False) -> subprocess.Popen:
    """Starts ``torchrun --standalone --nproc-per-node 2 ARGV`` in ``place`` (output captured)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if tee:
        command += ["--tee", "3"]  # every worker line prefixed with its rank, e.g. [default1]:
    return subprocess.Popen(
        [*command, *map(str, argv)],
        cwd=place,
        env=environment(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def launch(place: Path, *argv, **kwargs) -> str:
    code, out = finish(torchrun(place, *argv, **kwargs))
    assert code == 0, out[-4000:]
    return out


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_rows(path)[1]]


def assert_same_file(got: Path, want: Path) -> None:
    """Equal in every column but time, and in the settings file."""
    assert read_rows(got)[0] == read_rows(want)[0]
    assert rows(got) == rows(want)
    assert Path(f"{got}.settings.json").read_text() == Path(f"{want}.settings.json").read_text()
    assert not list(got.parent.glob(got.name + ".rank*")), "rank files left behind"


@pytest.fixture(scope="module")
def reference(place, tmp_path_factory) -> dict[str, Path]:
    """One process's result files: certify with and without --memory, and with --max 23."""
    folder = tmp_path_factory.mktemp("one_process")
    files = {}
    runs = (("plain", ["--no-memory"]), ("memory", ["--memory"]), ("memory_max", ["--memory", "--max", "23"]))
    for name, extra in runs:
        files[name] = folder / f"{name}.tsv"
        one_process(*certify_args(place), *extra, "--out", files[name])
    return files


# ----------------------------------------------------------------------------- torchrun's options


def _ddrs_options() -> set[str]:
    commands = [a for a in cli.build_parser()._actions if isinstance(a, cli.argparse._SubParsersAction)][0]
    return {
        s
        for name in ("certify", "optimize-sigma", "predict")
        for action in commands.choices[name]._actions
        for s in action.option_strings
    }


def test_the_separator_passes_every_option_through_torchrun():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    options = _ddrs_options()
    assert {"--n", "--max", "--N", "--dist-timeout", "--memory"} <= options
    clashing = set()
    for option in sorted(options):
        tail = ["certify", option, "1"]
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(["--nproc-per-node", "2", "-m", "ddrs", "--", *tail])
            assert (args.module, args.training_script, args.training_script_args) == (True, "ddrs", tail)
            try:
                parser.parse_args(["--nproc-per-node", "2", "-m", "ddrs", *tail])
            except SystemExit:
                clashing.add(option)
    # the trap the separator avoids: abbreviations of --nnodes, --nproc-per-node, --max-restarts, ...
    assert {"--n", "--max"} <= clashing


def test_ddrs_reads_a_separator_before_the_command():
    argv = ["certify", "--data", "digits", "--sigma", "0.25", "--out", "x.tsv", "--n", "7"]

    def values(args):
        return {k: v for k, v in vars(args).items() if not callable(v)}

    assert values(cli.parse_args(["--", *argv])) == values(cli.parse_args(argv))
    assert values(cli.parse_args(["--", *argv]))["n"] == 7


# ----------------------------------------------------------------------------- certify and optimize-sigma


def test_two_processes_certify_like_one_with_the_memory(place, reference, tmp_path):
    out = tmp_path / "two.tsv"
    # --n and --max are the options torchrun would take for its own without the --
    log = launch(
        place, "-m", "ddrs", "--", *certify_args(place), "--memory", "--max", "23", "--out", out, *TIMEOUT
    )
    assert "23 inputs, shared by 2 process(es)" in log
    assert_same_file(out, reference["memory_max"])
    memory, plain = rows(reference["memory"]), rows(reference["plain"])
    assert sum(a != b for a, b in zip(memory, plain)) >= 3  # the memory, applied after the merge, matters


def test_two_processes_optimize_sigma_like_one(place, tmp_path):
    argv = ["optimize-sigma", "--model", f"{place / 'absmodel.py'}:build_abs", "--data", place / "abs.pt"]
    argv += ["--max", "7", "--iterations", "3", "--num-samples", "8", "--surrogate-samples", "16"]
    argv += ["--sigma0", "0.3", "--no-progress"]
    one_process(*argv, "--out", tmp_path / "one.tsv")
    launch(place, "-m", "ddrs", "--", *argv, "--out", tmp_path / "two.tsv", *TIMEOUT)
    assert_same_file(tmp_path / "two.tsv", tmp_path / "one.tsv")
    assert len({r["sigma"] for r in rows(tmp_path / "one.tsv")}) > 1


def test_more_processes_than_inputs_leave_one_idle(place, tmp_path):
    """One input for two processes (with sequential certification, which shards like the rest)."""
    argv = [*certify_args(place), "--memory", "--sequential", "--n", "1000", "--max", "1"]
    one_process(*argv, "--out", tmp_path / "one.tsv")
    log = launch(place, "-m", "ddrs", "--", *argv, "--out", tmp_path / "two.tsv", *TIMEOUT)
    assert "1 inputs, shared by 2 process(es) (1 of them with nothing to do)" in log
    assert_same_file(tmp_path / "two.tsv", tmp_path / "one.tsv")
    assert len(rows(tmp_path / "one.tsv")) == 1


def test_resume_after_a_rank_is_killed(place, reference, tmp_path):
    out = tmp_path / "killed.tsv"
    argv = [*certify_args(place), "--memory", "--chunk", "1", "--out", out, *TIMEOUT]
    for pid in place.glob("pid*"):
        pid.unlink()
    proc = torchrun(place, "-m", "ddrs", "--", *argv, env={"ABS_SLEEP": "0.25"})
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    rank1 = Path(f"{out}.rank1")
    while not (rank1.exists() and len(rank1.read_text().splitlines()) >= 3):  # header and 2 rows
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[1][-4000:]
        time.sleep(0.1)
    pid = ""
    while not pid:  # the rank writes its pid file as it starts: wait for the whole number
        assert time.monotonic() < deadline, "rank 1 wrote no pid"
        pid = (place / "pid1").read_text().strip() if (place / "pid1").exists() else ""
        time.sleep(0.02)
    os.kill(int(pid), signal.SIGKILL)
    code, log = finish(proc)
    assert code != 0, log[-4000:]  # torchrun stops the other rank and fails
    assert len(read_rows(rank1)[1]) >= 2 and read_rows(out)[1] == []  # rows kept per rank, none merged
    # the same command resumes (here through python -m ddrs_ext, which delegates to ddrs)
    log = launch(place, "-m", "ddrs_ext", "--", *argv, tee=True)
    assert re.search(r"resuming; \d+ of 24 selected inputs already done \(in .* and 2 rank file\(s\)\)", log)
    assert_same_file(out, reference["memory"])


def _write_rows(path: Path, rows_: list[dict], like: Path, partial: str = "") -> None:
    """A result file of ``rows_`` with the columns and settings of the result file ``like``."""
    with ResultFile(path, read_rows(like)[0]) as f:
        for row in rows_:
            f.write(row)
    Path(f"{path}.settings.json").write_text(Path(f"{like}.settings.json").read_text())
    with open(path, "a") as f:
        f.write(partial)


def test_one_process_finishes_the_rank_files_of_another_launch(place, reference, tmp_path, capsys):
    """Rank files of a 3-process launch and a merged prefix, resumed by one process (no torchrun):
    the rows found anywhere are not computed again, the memory adjusts the rest in idx order."""
    out = tmp_path / "resumed.tsv"
    settings = reference["memory"]
    adjusted = {r["idx"]: r for r in read_rows(reference["memory"])[1]}
    raw = {r["idx"]: r for r in read_rows(reference["plain"])[1]}  # rows before the memory
    _write_rows(out, [adjusted[i] for i in (0, 1, 2)], settings)
    _write_rows(Path(f"{out}.rank0"), [raw[i] for i in (3, 6, 9, 0)], settings, partial="12\t0\t1")
    _write_rows(Path(f"{out}.rank1"), [raw[i] for i in (4, 7)], settings)
    _write_rows(Path(f"{out}.rank2"), [raw[i] for i in (5, 8, 11)], settings)
    err = one_process(*certify_args(place), "--memory", "--out", out)
    assert "resuming; 11 of 24 selected inputs already done (in" in err and "3 rank file(s)), 13 to go" in err
    assert_same_file(out, reference["memory"])


def test_a_rank_file_with_other_settings_is_refused(place, reference, tmp_path, capsys):
    out = tmp_path / "other.tsv"
    raw = read_rows(reference["plain"])[1]
    _write_rows(Path(f"{out}.rank1"), raw[:2], reference["plain"])
    code = cli.main([*certify_args(place), "--memory", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{out}.rank1 was started with other settings (memory: False then, True now)" in err
    remove_result_file(Path(f"{out}.rank1"))


# ----------------------------------------------------------------------------- a bad launch


def test_mismatched_settings_stop_every_rank(place, tmp_path):
    """Rank 1 is given another --n0, and the model builder draws other weights on each rank."""
    argv = ["per_rank.py", "--", *certify_args(place, "build_by_rank"), "--out", tmp_path / "x.tsv", *TIMEOUT]
    code, log = finish(torchrun(place, *argv, env={"EXTRA_RANK1": "--n0 17"}, tee=True))
    assert code != 0
    for rank in (0, 1):
        want = (
            rf"\[\w*{rank}\]:ddrs certify: error: rank {rank} of 2: the ranks were given different settings: "
            r"model weights \(rank 0: '[0-9a-f]+', rank 1: '[0-9a-f]+'\); n0 \(rank 0: 16, rank 1: 17\); "
            r"every rank must pass the same \(a --model built without --checkpoint must build the same"
        )
        assert re.search(want, log), log[-4000:]
    assert not (tmp_path / "x.tsv").exists()


def test_a_failing_rank_stops_every_rank(place, tmp_path):
    out = tmp_path / "f.tsv"
    argv = ["-m", "ddrs", "--", *certify_args(place, "build_flaky"), "--out", out, *TIMEOUT]
    code, log = finish(torchrun(place, *argv, tee=True))
    assert code != 0
    assert re.search(
        r"\[\w*0\]:ddrs certify: error: rank 0 of 2: stopped: rank 1 failed \(RuntimeError: "
        r"this model fails on rank 1\)",
        log,
    ), log[-4000:]
    assert re.search(r"\[\w*1\]:.*RuntimeError: this model fails on rank 1", log)
    assert len(read_rows(Path(f"{out}.rank0"))[1]) == COUNT // 2  # rank 0's share is kept for a resume


# ----------------------------------------------------------------------------- train_digits


def test_train_digits_two_ranks_share_one_sigma_bank(place, tmp_path):
    from ddrs.train_digits import load_checkpoint

    out = tmp_path / "ddp.pt"
    argv = ["train.py", "--data-dependent", "--epochs", "1", "--batch-size", "128", "--sigma-steps", "1"]
    argv += ["--sigma-samples", "4", "--sigma", "0.25", "--out", out]
    log = launch(place, *argv)
    assert "epoch 1/1" in log
    returned = [torch.load(place / f"returned{r}.pt", weights_only=True) for r in (0, 1)]
    banks = [r["sigma_bank"]["sigma"] for r in returned]
    assert torch.equal(banks[0], banks[1])  # every rank's updates reached every rank
    assert bool((banks[0] != 0.25).all())  # each example, seen by one rank, moved on both
    for name, value in returned[0]["model"].items():  # parameters and BatchNorm statistics: rank 0's
        assert torch.equal(value, returned[1]["model"][name]), name
    model, bank, _ = load_checkpoint(out)
    assert torch.equal(bank.sigma, banks[0])
    assert all(torch.equal(v, returned[0]["model"][k]) for k, v in model.state_dict().items())
