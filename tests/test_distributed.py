"""ddrs_ext.distributed and the sigma bank under DistributedDataParallel, with gloo on this CPU.

One launch of two worker processes (a process group of two ranks, outside the checkout) runs every
multi-process scenario and saves what each rank saw; the tests compare that with one process's
results, computed here with the plain functions. Everything is bounded by timeouts: the group's
(60 s), a 3 s subgroup for the test of a rank that never arrives, and the launch's."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddrs_ext
from ddrs_ext import distributed
from ddrs_ext.training import SigmaBank, unwrap_ddp

CHECKOUT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds for the whole two-rank run (it takes a few on two idle cores)

# The model and data both the workers and the tests build (exec'd in each).
COMMON = """
import torch

def make_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
            torch.nn.Linear(8, 3),
        )
        net[2].running_mean.uniform_(-0.2, 0.2)
        net[2].running_var.uniform_(0.5, 1.5)
    return net.eval()

def make_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 1, 4, 4, generator=g)
    index = torch.tensor([11, 3, 40, 0, 7, 25, 2])  # dataset indices, unsorted
    sigma = torch.rand(7, generator=g, dtype=torch.float64) * 0.4 + 0.1
    return x, index, sigma

def make_training_set(n=41):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

CERTIFY = dict(n0=20, n=300, alpha=0.01)
OPTIMIZE = dict(iterations=4, num_samples=24, lr=0.05, rule="ascent")
SIGMA0, TRAIN_SIGMA0 = 0.3, 0.2
"""

WORKER = """
import os, sys, time, traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import ddrs_ext
from ddrs_ext import distributed as D, training

torch.set_num_threads(1)
exec(COMMON)
out = sys.argv[1]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
results = {"file": ddrs_ext.__file__}

def scenario(name):
    def wrap(fn):
        start = time.perf_counter()
        try:
            results[name] = ("ok", fn())
        except Exception as exc:
            results[name] = ("error", type(exc).__name__, str(exc), getattr(exc, "rank", None))
        results[name + ":seconds"] = time.perf_counter() - start
        print(name, results[name][:3], f"{results[name + ':seconds']:.2f} s", flush=True)
    return wrap

model = make_model()
x, index, sigma = make_inputs()

@scenario("certify")
def _():
    torch.manual_seed(123 if rank == 0 else 999)  # seed=None: every rank draws, rank 0's draw is used
    r = D.certify(model, x, sigma, index=index, batch_size=37 + 13 * rank, **CERTIFY)
    return {**{k: getattr(r, k) for k in D._CERTIFY_FIELDS}, "seed": r.seed}

@scenario("predict")
def _():
    return D.predict(model, x, sigma, index=index, n=200, alpha=0.05, seed=5)

@scenario("optimize_sigma")
def _():
    return D.optimize_sigma(model, x, SIGMA0, index=index, seed=7, batch_size=50 + 30 * rank, **OPTIMIZE)

@scenario("dataset")
def _():
    dataset = [(x[i], i % 3) for i in range(len(x))]
    r = D.certify(model, dataset, 0.25, index=[5, 0, 3], seed=9, device="cpu", **CERTIFY)
    alone = D.predict(model, dataset, 0.25, index=[4], n=200, seed=9)  # rank 1 loads nothing
    return {k: getattr(r, k) for k in D._CERTIFY_FIELDS}, alone

@scenario("one_input")  # world size 2 > 1 input: rank 1 idles and gets the result too
def _():
    r = D.certify(model, x[:1], 0.25, index=index[:1], seed=3, **CERTIFY)
    return {k: getattr(r, k) for k in D._CERTIFY_FIELDS}

@scenario("no_input")
def _():
    return D.optimize_sigma(model, x[:0], SIGMA0, seed=3, **OPTIMIZE)

@scenario("mismatch_n")
def _():
    return D.certify(model, x, 0.25, seed=1, n0=20, n=300 if rank == 0 else 400)

@scenario("mismatch_inputs")
def _():
    mine = x.clone()
    if rank == 1:
        mine[4, 0, 1, 2] += 1e-3
    return D.certify(model, mine, 0.25, seed=1, **CERTIFY)

@scenario("mismatch_model")
def _():
    mine = make_model()
    if rank == 1:
        mine[2].running_mean[0] += 1e-3  # as after a DDP epoch: each rank's own BatchNorm statistics
    return D.certify(mine, x, 0.25, seed=1, **CERTIFY)

@scenario("mismatch_seed")
def _():
    return D.optimize_sigma(model, x, SIGMA0, seed=None if rank == 0 else 4, **OPTIMIZE)

@scenario("bad_argument_everywhere")
def _():
    return D.certify(model, x, 0.25, seed=1, n0=20, n=300, alpha=0.01, batch_size=0)

class Flaky(torch.nn.Module):
    def __init__(self, net, fail):
        super().__init__()
        self.net, self.fail = net, fail

    def forward(self, t):
        if self.fail:
            raise ValueError("this model fails on rank 1")
        return self.net(t)

@scenario("rank_failure")
def _():
    return D.certify(Flaky(model, rank == 1), x, 0.25, seed=1, **CERTIFY)

@scenario("after_errors")  # the group still works after every error above
def _():
    return D.gather(torch.arange(5)[D.share(5)] * 10, 5), D.exchange(lambda: 2 * rank)

@scenario("bank_sync")
def _():
    bank = training.SigmaBank(12, TRAIN_SIGMA0)
    if rank == 0:
        bank.update([1, 2, 3], torch.tensor([0.3, 0.31, 0.32], dtype=torch.float64))
    else:
        bank.update([3, 4], torch.tensor([0.5, 0.51], dtype=torch.float64))
    first = bank.synchronize()
    second = bank.synchronize()
    return {"changed": (first, second), "sigma": bank.sigma.clone()}

@scenario("bank_size_mismatch")
def _():
    return training.SigmaBank(12 + rank, TRAIN_SIGMA0).synchronize()

@scenario("bank_diverged")
def _():
    bank = training.SigmaBank(12, TRAIN_SIGMA0)
    if rank == 1:
        bank.sigma[7] = 0.9  # behind update()'s back: nobody is told
    return bank.synchronize()

@scenario("ddp_epoch")
def _():
    torch.manual_seed(10 + rank)
    xs, ys = make_training_set()
    net = make_model().train()
    bn = net[2]
    # find_unused_parameters=True: forward-mode autograd through the wrapper would fail
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    bank = training.SigmaBank(len(ys), TRAIN_SIGMA0, sigma_range=(1e-3, 2.0))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    sampler = torch.utils.data.DistributedSampler(range(len(ys)), shuffle=True, seed=0)  # pads 41 to 42
    updates, bn_untouched = [], True
    for idx in torch.tensor(list(sampler)).split(6):
        before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        s = training.update_sigma(ddp, bank, xs[idx], idx, steps=2, num_samples=8, batch_size=20 + 9 * rank)
        after = (bn.running_mean, bn.running_var, int(bn.num_batches_tracked))
        bn_untouched &= torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        bn_untouched &= before[2] == after[2]
        updates.append((idx.clone(), s.double().clone(), bank[idx]))
        loss = training.gaussian_augmentation_loss(ddp, xs[idx], ys[idx], s, index=idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = bank.synchronize()
    idx = torch.arange(6) + 6 * rank
    for scheme in (training.macer_loss, training.smoothadv_loss):  # the other schemes run under DDP too
        loss = scheme(ddp, xs[idx], ys[idx], bank[idx], num_samples=4, index=idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "updates": updates,
        "bank": bank.state_dict(),
        "changed": changed,
        "bn_untouched": bn_untouched,
        "parameters": {k: v.detach().clone() for k, v in net.named_parameters()},
    }

@scenario("rank_never_arrives")  # last: a timed-out gloo group is not used again
def _():
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    if rank == 1:
        return "stayed away"
    return D.certify(model, x, 0.25, seed=1, group=group, **CERTIFY)

torch.save(results, os.path.join(out, f"rank{rank}.pt"))
# a clean shutdown: a gloo group still alive at interpreter exit can abort the process (std::terminate)
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH entries inside the checkout (the workers import the
    installed ddrs_ext, as a user's script would)."""
    env = dict(os.environ)

    def inside(path: str) -> bool:
        resolved = Path(path).resolve()
        return resolved == CHECKOUT or CHECKOUT in resolved.parents

    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and not inside(p)]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launch(folder: Path, source: str, world_size: int, timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Runs ``source`` as ``world_size`` ranks (the environment torchrun sets: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) with cwd ``folder``; returns what each rank saved."""
    script = folder / "worker.py"
    script.write_text(source)
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = _environment(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        log = open(folder / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(script), str(folder)], cwd=folder, env=env, stdout=log, stderr=log
                ),
                log,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(
        f"--- rank {r}:\n{(folder / f'rank{r}.log').read_text()[-3000:]}" for r in range(world_size)
    )
    codes = [proc.returncode for proc, _ in procs]
    assert codes == [0] * world_size, f"worker exit codes {codes}\n{logs}"
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def common() -> dict:
    namespace: dict = {}
    exec(COMMON, namespace)
    return namespace


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, common) -> list[dict]:
    folder = tmp_path_factory.mktemp("two_ranks")
    assert CHECKOUT not in folder.resolve().parents
    return launch(folder, f"COMMON = {COMMON!r}\n" + WORKER, world_size=2)


def _ok(outcome):
    assert outcome[0] == "ok", f"expected a result, got {outcome}"
    return outcome[1]


def _error(outcome):
    assert outcome[0] == "error", f"expected an error, got {outcome}"
    return outcome[1:]


def _assert_same_certification(got: dict, want: ddrs_ext.CertifyResult) -> None:
    for name in distributed._CERTIFY_FIELDS:
        value = getattr(want, name)
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), f"{name}: {got[name]} != {value}"


# ----------------------------------------------------------------------------- in one process


def test_share_partitions_positions_strided():
    assert distributed.rank_and_world_size() == (0, 1)
    assert torch.equal(distributed.share(5), torch.arange(5))
    assert distributed.share(0).numel() == 0
    with pytest.raises(ValueError, match="total"):
        distributed.share(-1)


def test_one_process_without_a_group_is_the_plain_function(common):
    model = common["make_model"]()
    x, index, sigma = common["make_inputs"]()
    torch.manual_seed(4)
    got = distributed.certify(model, x, sigma, index=index, **common["CERTIFY"])
    torch.manual_seed(4)
    want = ddrs_ext.certify(model, x, sigma, index=index, **common["CERTIFY"])
    _assert_same_certification(vars(got), want)
    assert got.seed == want.seed
    got = distributed.optimize_sigma(model, x, sigma, index=index, seed=2, **common["OPTIMIZE"])
    assert torch.equal(
        got, ddrs_ext.optimize_sigma(model, x, sigma, index=index, seed=2, **common["OPTIMIZE"])
    )
    assert torch.equal(distributed.gather(torch.arange(3.0), 3), torch.arange(3.0))


def test_dataset_inputs_load_only_the_indexed_items(common):
    model = common["make_model"]()
    x, _, _ = common["make_inputs"]()
    loaded = []

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            loaded.append(i)
            return x[i], 0

    got = distributed.predict(model, Data(), 0.25, index=[6, 1], n=100, seed=3)
    assert sorted(loaded) == [1, 6]
    assert torch.equal(got, ddrs_ext.predict(model, x[[6, 1]], 0.25, index=[6, 1], n=100, seed=3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(index=[0, 1]), ValueError, "one entry per input"),
        (dict(index=[0.5] * 7), TypeError, "integers"),
        (dict(sigma=torch.ones(3)), ValueError, "sigma must be a number or hold one value per input"),
        (dict(n=0), ValueError, "n"),
    ],
)
def test_bad_arguments_say_what_to_change(common, kwargs, error, match):
    model = common["make_model"]()
    x, _, _ = common["make_inputs"]()
    args = dict(sigma=0.25, n0=10, n=50, seed=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        distributed.certify(model, x, args.pop("sigma"), **args)
    with pytest.raises(TypeError, match="tensor"):
        distributed.certify(model, [(1, 2), (3, 4)], 0.25, n0=10, n=50, seed=1)


def test_bank_synchronize_alone_forgets_what_changed():
    bank = SigmaBank(6, 0.2)
    bank.update([1, 4, 4], torch.tensor([0.3, 0.4, 0.4], dtype=torch.float64))
    assert bank.synchronize() == 2
    assert bank.synchronize() == 0
    assert torch.equal(bank.sigma, torch.tensor([0.2, 0.3, 0.2, 0.2, 0.4, 0.2], dtype=torch.float64))
    assert set(bank.state_dict()) == {"sigma", "_extra_state"}  # the change flags are not saved


def test_unwrap_ddp_leaves_other_models_alone():
    net = torch.nn.Linear(2, 2)
    assert unwrap_ddp(net) is net


# ----------------------------------------------------------------------------- two ranks


def test_workers_import_the_installed_package(ranks):
    for r in ranks:
        assert Path(r["file"]).resolve() == Path(ddrs_ext.__file__).resolve()


def test_two_ranks_certify_like_one_process(ranks, common):
    model = common["make_model"]()
    x, index, sigma = common["make_inputs"]()
    torch.manual_seed(123)
    want = ddrs_ext.certify(model, x, sigma, index=index, **common["CERTIFY"])
    assert (want.prediction >= 0).any() and (want.prediction < 0).any()  # both outcomes are compared
    for r in ranks:
        got = _ok(r["certify"])
        _assert_same_certification(got, want)
        assert got["seed"] == want.seed  # seed=None: rank 0's draw, as one process would draw it


def test_two_ranks_predict_like_one_process(ranks, common):
    model = common["make_model"]()
    x, index, sigma = common["make_inputs"]()
    want = ddrs_ext.predict(model, x, sigma, index=index, n=200, alpha=0.05, seed=5)
    for r in ranks:
        assert torch.equal(_ok(r["predict"]), want)


def test_two_ranks_optimize_sigma_like_one_process(ranks, common):
    model = common["make_model"]()
    x, index, _ = common["make_inputs"]()
    want = ddrs_ext.optimize_sigma(model, x, common["SIGMA0"], index=index, seed=7, **common["OPTIMIZE"])
    assert not torch.equal(want, torch.full_like(want, common["SIGMA0"]))
    for r in ranks:
        assert torch.equal(_ok(r["optimize_sigma"]), want)


def test_two_ranks_certify_a_dataset_subset(ranks, common):
    model = common["make_model"]()
    x, _, _ = common["make_inputs"]()
    want = ddrs_ext.certify(model, x[[5, 0, 3]], 0.25, index=[5, 0, 3], seed=9, **common["CERTIFY"])
    alone = ddrs_ext.predict(model, x[[4]], 0.25, index=[4], n=200, seed=9)
    for r in ranks:
        got, got_alone = _ok(r["dataset"])
        _assert_same_certification(got, want)
        assert torch.equal(got_alone, alone)


def test_more_ranks_than_inputs_leaves_ranks_idle(ranks, common):
    model = common["make_model"]()
    x, index, _ = common["make_inputs"]()
    want = ddrs_ext.certify(model, x[:1], 0.25, index=index[:1], seed=3, **common["CERTIFY"])
    for r in ranks:
        _assert_same_certification(_ok(r["one_input"]), want)
        got = _ok(r["no_input"])
        assert got.shape == (0,) and got.dtype == torch.float64


@pytest.mark.parametrize(
    "name, match",
    [
        ("mismatch_n", r"different settings: n \(rank 0: 300, rank 1: 400\)"),
        ("mismatch_inputs", r"different settings: inputs \(rank 0: '[0-9a-f]+', rank 1: '[0-9a-f]+'\)"),
        ("mismatch_seed", r"different settings: seed \(rank 0: None, rank 1: 4\)"),
        (
            "mismatch_model",
            r"different settings: model \(rank 0: '[0-9a-f]+', rank 1: '[0-9a-f]+'\).*BatchNorm",
        ),
    ],
)
def test_mismatched_settings_fail_on_every_rank(ranks, name, match):
    for r in ranks:
        kind, message, _ = _error(r[name])
        assert kind == "ValueError"
        assert re.search(match, message), message
        assert r[name + ":seconds"] < 30


def test_a_failing_rank_is_reported_on_every_rank(ranks):
    kind, message, _ = _error(ranks[1]["rank_failure"])
    assert (kind, message) == ("ValueError", "this model fails on rank 1")
    kind, message, failing = _error(ranks[0]["rank_failure"])
    assert kind == "OtherRankError" and failing == 1
    assert "certify failed on rank 1" in message and "ValueError: this model fails on rank 1" in message
    for r in ranks:  # the same bad argument everywhere: each rank raises its own error
        kind, message, _ = _error(r["bad_argument_everywhere"])
        assert kind == "ValueError" and "batch_size" in message
        gathered, exchanged = _ok(r["after_errors"])
        assert torch.equal(gathered, torch.arange(5) * 10) and exchanged == [0, 2]


def test_a_rank_that_never_arrives_times_out(ranks):
    assert _ok(ranks[1]["rank_never_arrives"]) == "stayed away"
    kind, message, _ = _error(ranks[0]["rank_never_arrives"])
    assert (
        kind == "RuntimeError" and "did not make the same call within the process group's timeout" in message
    )
    assert ranks[0]["rank_never_arrives:seconds"] < 30  # the subgroup's 3 s, not the launch's limit


def test_bank_synchronize_merges_every_rank_s_updates(ranks):
    want = torch.full((12,), 0.2, dtype=torch.float64)
    want[[1, 2, 3, 4]] = torch.tensor([0.3, 0.31, 0.5, 0.51], dtype=torch.float64)  # 3: rank 1's (higher)
    for r in ranks:
        got = _ok(r["bank_sync"])
        assert got["changed"] == (4, 0)
        assert torch.equal(got["sigma"], want)


def test_bank_mismatches_fail_on_every_rank(ranks):
    for r in ranks:
        kind, message, _ = _error(r["bank_size_mismatch"])
        assert kind == "ValueError" and "different sizes (12, 13 by rank)" in message
        kind, message, _ = _error(r["bank_diverged"])
        assert kind == "RuntimeError" and "ranks [1] differ from rank 0's" in message


def test_ddp_epoch_leaves_one_bank_holding_every_rank_s_updates(ranks, common):
    epochs = [_ok(r["ddp_epoch"]) for r in ranks]
    xs, ys = common["make_training_set"]()
    want = torch.full((len(ys),), common["TRAIN_SIGMA0"], dtype=torch.float64)
    seen = [set(), set()]
    for rank, epoch in enumerate(epochs):  # rank order, each rank's steps in order: the highest rank wins
        assert epoch["bn_untouched"]
        for idx, returned, stored in epoch["updates"]:
            assert torch.equal(stored.float().double(), returned)  # update_sigma returns x's dtype
            want[idx] = stored
            seen[rank].update(idx.tolist())
    assert seen[0] | seen[1] == set(range(len(ys)))  # DistributedSampler covers the set ...
    assert seen[0] & seen[1]  # ... and pads 41 examples to 42 with one that both ranks update
    assert not torch.equal(want, torch.full_like(want, common["TRAIN_SIGMA0"]))
    for epoch in epochs:
        assert torch.equal(epoch["bank"]["sigma"], want)
        assert epoch["changed"] == len(ys)
    # DDP kept the replicas' parameters equal through every loss (BatchNorm's running statistics are
    # rank 0's at the start of each training forward, then each rank's own: DDP's usual behaviour)
    for name, value in epochs[0]["parameters"].items():
        assert torch.equal(value, epochs[1]["parameters"][name]), name
