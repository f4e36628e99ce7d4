"""ddrs_ext.distributed with uniform noise (L1 certificates, issue 20): certify, predict and
optimize_sigma take ``noise=`` and give, on every rank, what one process gives with the same seed; the
noise is one of the settings the ranks agree on. One launch of two gloo ranks on this CPU (the launcher
and the model of tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from test_distributed import CHECKOUT, COMMON, _assert_same_certification, _error, _ok, launch

import ddrs_ext
from ddrs_ext import distributed

WORKER = """
import os, sys, traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ddrs_ext import distributed as D

torch.set_num_threads(1)
exec(COMMON)
out = sys.argv[1]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
results = {}

def scenario(name):
    def wrap(fn):
        try:
            results[name] = ("ok", fn())
        except Exception as exc:
            results[name] = ("error", type(exc).__name__, str(exc), getattr(exc, "rank", None))
        print(name, results[name][:3], flush=True)
    return wrap

model = make_model()
x, index, sigma = make_inputs()

@scenario("certify")
def _():
    r = D.certify(model, x, sigma, index=index, seed=4, batch_size=37 + 13 * rank, noise="uniform", **CERTIFY)
    return {**{k: getattr(r, k) for k in D._CERTIFY_FIELDS}, "norm": r.norm}

@scenario("predict")
def _():
    return D.predict(model, x, sigma, index=index, n=200, alpha=0.05, seed=5, noise="uniform")

@scenario("optimize")
def _():
    return D.optimize_sigma(
        model, x, SIGMA0, index=index, seed=7, batch_size=50 + 30 * rank, noise="uniform", **OPTIMIZE
    )

@scenario("mismatch_noise")
def _():
    return D.certify(model, x, 0.25, seed=1, noise="uniform" if rank == 0 else "gaussian", **CERTIFY)

@scenario("score")  # a Gaussian-only option with uniform noise: the error reaches every rank
def _():
    return D.optimize_sigma(model, x, SIGMA0, seed=7, noise="uniform", estimator="score", iterations=1)

torch.save(results, os.path.join(out, f"rank{rank}.pt"))
# a clean shutdown: a gloo group still alive at interpreter exit can abort the process (std::terminate)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def common() -> dict:
    namespace: dict = {}
    exec(COMMON, namespace)
    return namespace


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("two_ranks_l1")
    assert CHECKOUT not in folder.resolve().parents
    return launch(folder, f"COMMON = {COMMON!r}\n" + WORKER, world_size=2)


def test_one_process_passes_the_noise_through(common):
    model = common["make_model"]()
    x, index, sigma = common["make_inputs"]()
    kw = dict(index=index, seed=4, **common["CERTIFY"])
    got = distributed.certify(model, x, sigma, noise="uniform", **kw)
    want = ddrs_ext.certify(model, x, sigma, noise="uniform", **kw)
    _assert_same_certification({k: getattr(got, k) for k in distributed._CERTIFY_FIELDS}, want)
    assert got.norm == "l1" and distributed.certify(model, x, sigma, **kw).norm == "l2"
    assert not torch.equal(distributed.certify(model, x, sigma, **kw).counts, got.counts)
    pred = distributed.predict(model, x, sigma, index=index, n=200, seed=5, noise="uniform")
    assert torch.equal(pred, ddrs_ext.predict(model, x, sigma, index=index, n=200, seed=5, noise="uniform"))
    theta = distributed.optimize_sigma(model, x, 0.3, seed=7, noise="uniform", **common["OPTIMIZE"])
    assert torch.equal(theta, ddrs_ext.optimize_theta(model, x, 0.3, seed=7, **common["OPTIMIZE"]))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x: distributed.certify(m, x, 0.25, n=10, noise="laplace"), ValueError,
         "noise must be one of"),
        (lambda m, x: distributed.predict(m, x, 0.0, n=10, noise="uniform"), ValueError, "theta"),
        (lambda m, x: distributed.optimize_sigma(m, x, 0.3, noise="uniform", estimator="score"), ValueError,
         "estimator='score' is Gaussian-only"),
        (lambda m, x: distributed.optimize_sigma(m, x, 0.3, noise="uniform", clip=(0.1, 0.9)), ValueError,
         "clip is Gaussian-only"),
    ],
)  # fmt: skip
def test_bad_input_says_what_to_change(common, call, error, match):
    x, _, _ = common["make_inputs"]()
    with pytest.raises(error, match=match):
        call(common["make_model"](), x)


def test_two_ranks_certify_in_l1_like_one_process(ranks, common):
    model = common["make_model"]()
    x, index, sigma = common["make_inputs"]()
    want = ddrs_ext.certify(model, x, sigma, index=index, seed=4, noise="uniform", **common["CERTIFY"])
    assert (want.prediction >= 0).any()
    for r in ranks:
        got = _ok(r["certify"])
        _assert_same_certification(got, want)
        assert got["norm"] == "l1"


def test_two_ranks_predict_and_optimize_theta_like_one_process(ranks, common):
    model = common["make_model"]()
    x, index, sigma = common["make_inputs"]()
    pred = ddrs_ext.predict(model, x, sigma, index=index, n=200, alpha=0.05, seed=5, noise="uniform")
    theta = ddrs_ext.optimize_theta(model, x, common["SIGMA0"], index=index, seed=7, **common["OPTIMIZE"])
    assert not torch.equal(theta, torch.full_like(theta, common["SIGMA0"]))
    for r in ranks:
        assert torch.equal(_ok(r["predict"]), pred)
        assert torch.equal(_ok(r["optimize"]), theta)


def test_ranks_must_agree_on_the_noise(ranks):
    for r in ranks:
        kind, message, _ = _error(r["mismatch_noise"])
        assert kind == "ValueError" and "noise (rank 0: 'uniform', rank 1: 'gaussian')" in message


def test_a_gaussian_only_option_fails_on_every_rank(ranks):
    kinds = [_error(r["score"])[0] for r in ranks]
    assert "ValueError" in kinds  # the ranks that ran it say why; any other says which rank failed
    assert all(k in ("ValueError", "OtherRankError") for k in kinds)
    assert any("estimator='score' is Gaussian-only" in _error(r["score"])[1] for r in ranks)
