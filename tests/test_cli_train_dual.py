"""ddrs train's consistency scheme (ddrs_ext.training.consistency_loss) and its selector training for
dual certification: one expert per level, held-out (cross-fitted) labels, soft labels, the consistency
term, a selector for your own --model on --data; each equal to the library's calls with the same
seeds, the checkpoints' records, and bad input."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_cli import ok, run
from test_cli_dual import MODELS, assert_dual_rows, build, digits_test

import ddrs_ext
from ddrs import cli, selector, train_digits
from ddrs.checkpoints import load_selector_checkpoint
from ddrs.digits_training import train
from ddrs_ext import training
from ddrs_ext.data import load_digits_split
from ddrs_ext.dual import cross_fit_radii, level_radii, soft_level_labels, train_selector
from ddrs_ext.models import digits_cnn

FAST = ["--epochs", "1", "--batch-size", "256"]
LABELS = ["--label-n0", "8", "--label-n", "32"]


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "dualmodels.py"
    path.write_text(MODELS)
    return path


def trains(capsys, *argv) -> str:
    """Runs a ddrs train command that must succeed; returns what it printed."""
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def train_fails(capsys, *argv) -> str:
    """Runs a ddrs train command that must fail with one line (exit 2); returns the line."""
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_consistency_scheme_equals_the_library_loop(capsys, tmp_path):
    argv = [
        "train",
        "--scheme",
        "consistency",
        "--sigma",
        "0.5",
        "--consistency-lambda",
        "3",
        "--consistency-eta",
        "0.25",
        "--consistency-copies",
        "3",
        *FAST,
        "--seed",
        "2",
    ]
    trains(capsys, *argv, "--out", tmp_path / "c.pt")
    got, _, config = train_digits.load_checkpoint(tmp_path / "c.pt")
    assert (config["scheme"], config["consistency_lambda"], config["consistency_eta"]) == (
        "consistency",
        3,
        0.25,
    )
    assert config["consistency_copies"] == 3
    # the library: ddrs train's loop written out (Adam, shuffled minibatches under the seed)
    torch.manual_seed(2)
    (x, y), _ = load_digits_split(2)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for index in torch.randperm(len(y)).split(256):
        loss = training.consistency_loss(
            model, x[index], y[index], 0.5, copies=3, lam=3.0, eta=0.25, index=index
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert same_weights(got.state_dict(), model.eval().state_dict())
    # lambda = eta = 0 with one copy is Gaussian augmentation, step for step
    zero = ["--consistency-lambda", "0", "--consistency-eta", "0", "--consistency-copies", "1"]
    trains(capsys, "train", "--scheme", "consistency", *zero, *FAST, "--out", tmp_path / "z.pt")
    trains(capsys, "train", "--scheme", "gaussian", *FAST, "--out", tmp_path / "g.pt")
    z, g = (train_digits.load_checkpoint(tmp_path / n)[0].state_dict() for n in ("z.pt", "g.pt"))
    assert same_weights(z, g) and not same_weights(z, got.state_dict())
    # the defaults are recorded (and are what a checkpoint of an earlier version, without them, meant)
    _, _, config = train_digits.load_checkpoint(tmp_path / "g.pt")
    assert {k: config[k] for k in config if k.startswith("consistency")} == {
        "consistency_lambda": 10.0,
        "consistency_eta": 0.5,
        "consistency_copies": 2,
    }


def test_consistency_with_data_dependent_sigma(capsys, tmp_path):
    argv = [
        "train",
        "--scheme",
        "consistency",
        "--data-dependent",
        "--sigma-steps",
        "1",
        "--sigma-samples",
        "4",
    ]
    trains(capsys, *argv, *FAST, "--out", tmp_path / "dd.pt")
    _, bank, config = train_digits.load_checkpoint(tmp_path / "dd.pt")
    assert config["scheme"] == "consistency" and config["data_dependent"]
    assert bool((bank.sigma != 0.25).any())  # the bank moved: each example trained at its own sigma


def test_selector_for_experts_with_held_out_soft_labels_equals_the_library(capsys, tmp_path):
    for sigma, name in ((0.25, "e1.pt"), (0.5, "e2.pt")):
        trains(capsys, "train", "--scheme", "consistency", "--sigma", sigma, *FAST, "--out", tmp_path / name)
    argv = [
        "train",
        "--selector-for",
        tmp_path / "e1.pt",
        tmp_path / "e2.pt",
        "--sigma-levels",
        0.25,
        0.5,
        "--label-source",
        "crossfit",
        "--folds",
        2,
        "--soft-labels",
        "--tau",
        0.5,
        "--level-weights",
        "balanced",
        "--selector-lambda",
        4,
        "--selector-eta",
        0.5,
        "--selector-copies",
        2,
        *LABELS,
        *FAST,
        "--out",
        tmp_path / "sel.pt",
    ]
    printed = trains(capsys, *argv)
    assert "labels: fold 2/2: re-training 2 model(s)" in printed and "labels per level" in printed
    net, checkpoint = load_selector_checkpoint(tmp_path / "sel.pt")
    assert checkpoint["version"] == 2 and checkpoint["selector_sigma"] == 0.5  # the largest level
    assert (checkpoint["label_source"], checkpoint["folds"], checkpoint["tau"]) == ("crossfit", 2, 0.5)
    assert checkpoint["level_weights"] == "balanced"
    assert (checkpoint["selector_lam"], checkpoint["selector_eta"], checkpoint["selector_copies"]) == (
        4,
        0.5,
        2,
    )
    experts = [train_digits.load_checkpoint(tmp_path / n)[0] for n in ("e1.pt", "e2.pt")]
    assert checkpoint["expert_fingerprints"] == [selector.fingerprint(e) for e in experts]
    assert checkpoint["config"]["expert_fingerprints"] == checkpoint["expert_fingerprints"]

    # the library: held-out radii from experts re-trained (ddrs train's settings) on the other fold
    (x, y), _ = load_digits_split(0)
    configs = [train_digits.load_checkpoint(tmp_path / n)[2] for n in ("e1.pt", "e2.pt")]
    seen = []

    def fit(x_rest, y_rest, fold):
        rows = (x[:, None] == x_rest[None]).flatten(2).all(2).any(1).nonzero()[:, 0]  # found by value
        assert len(rows) == len(x_rest)
        seen.append(len(rows))
        out = []
        for config in configs:
            state = train(argparse.Namespace(**config), log=lambda line: None, rows=rows)["model"]
            model = digits_cnn()
            model.load_state_dict(state)
            out.append(model.eval())
        return out

    label_seed = selector.derived_seed(0, selector._LABEL_KEY)
    radii = cross_fit_radii(fit, x, y, [0.25, 0.5], folds=2, n0=8, n=32, alpha=0.01, seed=label_seed)
    assert seen == [550, 550]
    labels = soft_level_labels(radii, tau=0.5, level_weights="balanced")
    assert torch.bincount(labels.argmax(1), minlength=2).tolist() == checkpoint["label_counts"]
    torch.manual_seed(0)
    want = digits_cnn(2)
    train_selector(
        want,
        x,
        labels,
        sigma_levels=[0.25, 0.5],
        epochs=1,
        batch_size=256,
        lr=3e-3,  # ddrs train's --lr
        seed=selector.derived_seed(0, selector._TRAIN_KEY),
        copies=2,
        lam=4.0,
        eta=0.5,
    )
    assert same_weights(net.state_dict(), want.eval().state_dict())


def test_selector_for_your_own_model_equals_the_library_and_certifies(capsys, models, tmp_path):
    (x, _), _ = load_digits_split(0)
    with torch.no_grad():  # labels the fixed random classifier gets right without noise: radii at every level
        y = build(models, "classifier")(x[:80]).argmax(1)
    torch.save({"x": x[:80], "y": y}, tmp_path / "mine.pt")
    argv = [
        "train",
        "--selector-for",
        "--model",
        f"{models}:classifier",
        "--data",
        tmp_path / "mine.pt",
        "--sigma-levels",
        0.12,
        0.25,
        0.5,
        "--soft-labels",
        "--level-weights",
        "1,2,4",
        *LABELS,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--out",
        tmp_path / "mine_sel.pt",
    ]
    printed = trains(capsys, *argv)
    assert "labels: σ = 0.5 (level 3/3): 80/80 inputs" in printed  # progress
    net, checkpoint = load_selector_checkpoint(tmp_path / "mine_sel.pt")
    assert checkpoint["config"]["classifier_fingerprint"] == selector.fingerprint(build(models, "classifier"))
    assert checkpoint["expert_fingerprints"] is None and checkpoint["label_source"] == "train"
    radii = level_radii(
        build(models, "classifier"),
        x[:80],
        y[:80],
        [0.12, 0.25, 0.5],
        n0=8,
        n=32,
        alpha=0.01,
        seed=selector.derived_seed(0, selector._LABEL_KEY),
        index=torch.arange(80),
    )
    assert len(set(radii.argmax(1).tolist())) >= 2  # not one level for every input: the labels mean something
    labels = soft_level_labels(radii, tau=0.25, level_weights=[1.0, 2.0, 4.0])
    torch.manual_seed(0)
    want = digits_cnn(3)
    train_selector(
        want,
        x[:80],
        labels,
        selector_sigma=0.5,
        epochs=2,
        batch_size=32,
        lr=3e-3,  # ddrs train's --lr
        seed=selector.derived_seed(0, selector._TRAIN_KEY),
    )
    assert same_weights(net.state_dict(), want.eval().state_dict())
    # hard labels (the default) are best_level's
    hard = [
        "train",
        "--selector-for",
        "--model",
        f"{models}:classifier",
        "--data",
        tmp_path / "mine.pt",
        "--sigma-levels",
        0.12,
        0.25,
        0.5,
        *LABELS,
        "--epochs",
        1,
        "--out",
        tmp_path / "hard.pt",
    ]
    trains(capsys, *hard)
    counts = torch.bincount(radii.argmax(1), minlength=3).tolist()
    assert load_selector_checkpoint(tmp_path / "hard.pt")[1]["label_counts"] == counts
    # ddrs certify takes it alone, at the sigma it was trained at
    cert = [
        "certify",
        "--model",
        f"{models}:classifier",
        "--selector-checkpoint",
        tmp_path / "mine_sel.pt",
        "--data",
        "digits",
        "--max",
        6,
        "--n0",
        16,
        "--n",
        64,
        "--sigma-levels",
        0.12,
        0.25,
        0.5,
    ]
    ok(capsys, *cert, "--out", tmp_path / "d.tsv")
    xt, yt = digits_test(6)
    dual = ddrs_ext.certify_dual(
        build(models, "classifier"),
        net,
        xt,
        [0.12, 0.25, 0.5],
        selector_sigma=0.5,
        n0=16,
        n=64,
        seed=0,
        index=torch.arange(6),
    )
    assert_dual_rows(tmp_path / "d.tsv", dual, yt)


def test_selector_of_your_own_architecture_for_other_inputs(capsys, models, tmp_path):
    (x, y), _ = load_digits_split(0)
    torch.save({"x": x[:40].flatten(1), "y": y[:40]}, tmp_path / "flat.pt")  # (N, 64): not 1x8x8
    argv = [
        "train",
        "--selector-for",
        "--model",
        f"{models}:classifier",
        "--data",
        tmp_path / "flat.pt",
        "--sigma-levels",
        0.25,
        0.5,
        *LABELS,
        "--epochs",
        1,
        "--out",
        tmp_path / "flat_sel.pt",
    ]
    msg = train_fails(capsys, *argv)
    assert "takes 1x8x8 inputs" in msg and "--selector-model" in msg
    trains(capsys, *argv, "--selector-model", f"{models}:selector2")
    checkpoint = torch.load(tmp_path / "flat_sel.pt", weights_only=True)
    assert checkpoint["builder"].endswith("dualmodels.py:selector2")
    with pytest.raises(ValueError, match="give it as --selector"):
        load_selector_checkpoint(tmp_path / "flat_sel.pt")
    # certified as --selector SPEC --selector-checkpoint FILE
    cert = [
        "certify",
        "--model",
        f"{models}:classifier",
        "--selector",
        f"{models}:selector2",
        "--selector-checkpoint",
        tmp_path / "flat_sel.pt",
        "--data",
        tmp_path / "flat.pt",
        "--max",
        5,
        "--n0",
        16,
        "--n",
        64,
        "--sigma-levels",
        0.25,
        0.5,
        "--out",
        tmp_path / "f.tsv",
    ]
    ok(capsys, *cert)
    trained = build(models, "selector2")
    trained.load_state_dict(checkpoint["model"])
    dual = ddrs_ext.certify_dual(
        build(models, "classifier"),
        trained,
        x[:5].flatten(1),
        [0.25, 0.5],
        selector_sigma=0.5,
        n0=16,
        n=64,
        seed=0,
        index=torch.arange(5),
    )
    assert_dual_rows(tmp_path / "f.tsv", dual, y[:5])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--soft-labels"], "--soft-labels: for --selector-for"),
        (["--model", "m:f"], "--model: for --selector-for"),
        (["--selector-for", "a.pt", "--sigma-levels", "0.25", "0.5", "--model", "m:f"], "your own model"),
        (["--selector-for", "--sigma-levels", "0.25", "0.5"], "give --model SPEC"),
        (["--selector-for", "--model", "m:f", "--sigma-levels", "0.25", "0.5"], "needs --data"),
        (
            [
                "--selector-for",
                "--model",
                "m:f",
                "--data",
                "digits",
                "--sigma-levels",
                "0.25",
                "0.5",
                "--label-source",
                "crossfit",
            ],
            "only ddrs train checkpoints allow",
        ),
        (["--selector-for", "a.pt", "--sigma-levels", "0.25", "0.5", "--tau", "0.5"], "add --soft-labels"),
        (
            [
                "--selector-for",
                "a.pt",
                "--sigma-levels",
                "0.25",
                "0.5",
                "--soft-labels",
                "--level-weights",
                "1",
            ],
            "one positive number per level (2",
        ),
        (
            [
                "--selector-for",
                "a.pt",
                "--sigma-levels",
                "0.25",
                "0.5",
                "--soft-labels",
                "--level-weights",
                "1,x",
            ],
            "none, balanced or 2 comma-separated numbers",
        ),
        (
            ["--selector-for", "a.pt", "--sigma-levels", "0.25", "0.5", "--selector-lambda", "1"],
            "copies >= 2",
        ),
        (
            ["--selector-for", "a.pt", "b.pt", "c.pt", "--sigma-levels", "0.25", "0.5"],
            "or one per level (2 levels",
        ),
        (["--selector-for", "a.pt", "--sigma-levels", "0.25", "0.5", "--folds", "3"], "--folds is for"),
        (["--scheme", "consistency", "--consistency-copies", "1"], "--consistency-copies must be >= 2"),
        (["--scheme", "consistency", "--consistency-lambda", "-1"], "must be >= 0"),
    ],
)
def test_bad_selector_training_options_are_one_line_usage_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *extra, "--out", "never.pt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("ddrs train: error: "), err


def test_bad_models_and_checkpoints_are_one_line_errors(capsys, models, tmp_path):
    levels = ["--sigma-levels", "0.25", "0.5", *LABELS, "--out", tmp_path / "never.pt"]
    msg = train_fails(
        capsys, "train", "--selector-for", "--model", f"{models}:selector2", "--data", "digits", *levels
    )
    assert "has labels up to 9, the model returns 2 logits" in msg
    trains(capsys, "train", "--epochs", "1", "--seed", "1", "--out", tmp_path / "s1.pt")
    trains(capsys, "train", "--epochs", "1", "--seed", "2", "--out", tmp_path / "s2.pt")
    msg = train_fails(capsys, "train", "--selector-for", tmp_path / "s1.pt", tmp_path / "s2.pt", *levels)
    assert "different --seed ([1, 2])" in msg
    code, _, err = run(capsys, "train", "--selector-for", tmp_path / "nope.pt", *levels)
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "never.pt").exists()
