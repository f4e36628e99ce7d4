"""ddrs train --sample-weights (examples drawn by weight each epoch: a specialist) and --selector-for
... --save-labels (the labels table that provides the weights): the examples seen, reproducibility,
the checkpoint's record, cross-fitting with a specialist, and bad weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cli import run

from ddrs import selector, train_digits
from ddrs.commands.train import build_parser
from ddrs.digits_training import train
from ddrs.sample_weights import read_label_settings, weights_digest
from ddrs_ext import training
from ddrs_ext.data import load_digits_split
from ddrs_ext.dual import level_radii, soft_level_labels

FAST = ["--epochs", "2", "--batch-size", "256"]
LABELS = ["--label-n0", "8", "--label-n", "32"]
N = 1100  # the digits' training split


def trains(capsys, *argv) -> str:
    code, out, err = run(capsys, "train", *argv)
    assert code == 0, err
    return out


def train_fails(capsys, *argv) -> str:
    """A ddrs train command that fails with one line and exit 2 (a usage error or one of its run)."""
    try:
        code, _, err = run(capsys, "train", *argv)
    except SystemExit as exc:
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture
def seen(monkeypatch):
    """The training-split indices of every example each minibatch's loss receives, in order."""
    batches: list[torch.Tensor] = []
    loss = training.gaussian_augmentation_loss

    def recording(net, x, y, sigma, *, index=None, **kw):
        batches.append(index.clone())
        return loss(net, x, y, sigma, index=index, **kw)

    monkeypatch.setattr(training, "gaussian_augmentation_loss", recording)
    return batches


def one_class_weights(seed: int, digit: int) -> torch.Tensor:
    (_, y), _ = load_digits_split(seed)
    return (y == digit).double()


def test_weights_zero_but_one_class_train_on_that_class_only(capsys, tmp_path, seen):
    weights = one_class_weights(0, 3)
    np.save(tmp_path / "w.npy", weights.numpy())
    trains(capsys, *FAST, "--sample-weights", tmp_path / "w.npy", "--out", tmp_path / "s.pt")
    (_, y), _ = load_digits_split(0)
    drawn = torch.cat(seen)
    assert len(drawn) == 2 * N and bool((y[drawn] == 3).all())
    # exactly the draws the help describes: N per epoch, with replacement, under a generator seeded by --seed
    order = torch.Generator().manual_seed(0)
    want = torch.cat([torch.multinomial(weights, N, replacement=True, generator=order) for _ in range(2)])
    assert torch.equal(drawn, want)
    # negative control: without weights every example is seen once per epoch, every class among them
    seen.clear()
    trains(capsys, *FAST, "--out", tmp_path / "plain.pt")
    drawn = torch.cat(seen)
    assert sorted(drawn[:N].tolist()) == list(range(N)) and len(set(y[drawn].tolist())) == 10


def test_weights_in_proportion_reproducible_and_recorded(capsys, tmp_path, seen):
    (_, y), _ = load_digits_split(1)
    weights = torch.where(y == 0, 3.0, torch.where(y == 1, 1.0, 0.0)).double()
    (tmp_path / "w.txt").write_text("# one weight per line\n" + "\n".join(f"{w:g}" for w in weights.tolist()))
    argv = [*FAST, "--seed", "1", "--sample-weights", tmp_path / "w.txt"]
    trains(capsys, *argv, "--out", tmp_path / "a.pt")
    drawn = torch.cat(seen)
    zeros, ones = int((y[drawn] == 0).sum()), int((y[drawn] == 1).sum())
    assert zeros + ones == 2 * N
    expected = 2 * N * float(weights[y == 0].sum() / weights.sum())
    assert abs(zeros - expected) < 5 * (expected * (1 - expected / (2 * N))) ** 0.5
    trains(capsys, *argv, "--out", tmp_path / "b.pt")
    a, _, config = train_digits.load_checkpoint(tmp_path / "a.pt")
    b, _, _ = train_digits.load_checkpoint(tmp_path / "b.pt")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert config["sample_weights"] == str(tmp_path / "w.txt") and config["sample_weights_column"] is None
    assert config["sample_weights_digest"] == weights_digest(weights)
    # other weights (the same file, one weight moved), other model
    weights[int((y == 2).nonzero()[0])] = 1.0
    (tmp_path / "w.txt").write_text("\n".join(f"{w:g}" for w in weights.tolist()))
    trains(capsys, *argv, "--out", tmp_path / "c.pt")
    c, _, _ = train_digits.load_checkpoint(tmp_path / "c.pt")
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_rows_of_a_fold_draw_by_their_own_weights(seen, tmp_path):
    """Re-training for cross-fitted labels (``rows``): the rows' weights, indices local to the rows."""
    weights = one_class_weights(0, 5)
    rows = torch.arange(0, N, 2)
    args = build_parser().parse_args([*FAST, "--out", "unused.pt"])
    torch.save(weights, tmp_path / "w.pt")
    args.sample_weights = tmp_path / "w.pt"
    train(args, log=lambda line: None, rows=rows)
    (_, y), _ = load_digits_split(0)
    drawn = torch.cat(seen)
    assert len(drawn) == 2 * len(rows) and bool((y[rows][drawn] == 5).all())
    order = torch.Generator().manual_seed(0)
    local = weights[rows]
    want = torch.cat(
        [torch.multinomial(local, len(rows), replacement=True, generator=order) for _ in range(2)]
    )
    assert torch.equal(drawn, want)


def test_save_labels_then_a_specialist_then_crossfit_with_it(capsys, tmp_path):
    trains(capsys, *FAST, "--sigma", "0.25", "--out", tmp_path / "e025.pt")
    trains(capsys, *FAST, "--sigma", "0.5", "--out", tmp_path / "e05.pt")
    experts = ["--selector-for", tmp_path / "e025.pt", tmp_path / "e05.pt", "--sigma-levels", "0.25", "0.5"]
    for name in ("labels.txt", "labels.npy", "labels.pt"):
        trains(capsys, *experts, *LABELS, "--soft-labels", "--tau", "0.1", "--save-labels", tmp_path / name)
    assert not (tmp_path / "digits_checkpoint.pt").exists()  # no selector trained
    # the labels: soft_level_labels of level_radii with the selector's label seed (in-sample here)
    models = [train_digits.load_checkpoint(tmp_path / f)[0] for f in ("e025.pt", "e05.pt")]
    (x, y), _ = load_digits_split(0)
    radii = level_radii(
        models,
        x,
        y,
        [0.25, 0.5],
        n0=8,
        n=32,
        alpha=0.01,
        seed=selector.derived_seed(0, selector._LABEL_KEY),
        index=torch.arange(N),
    )
    want = soft_level_labels(radii, tau=0.1).double().numpy()
    text = np.loadtxt(tmp_path / "labels.txt")
    np.testing.assert_array_equal(text, want)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), want)
    np.testing.assert_array_equal(torch.load(tmp_path / "labels.pt").numpy(), want)
    settings = read_label_settings(tmp_path / "labels.txt")
    assert settings["sigma_levels"] == [0.25, 0.5] and settings["tau"] == 0.1
    assert settings["fingerprints"] == [selector.fingerprint(m) for m in models]
    # hard labels: one-hot rows
    trains(capsys, *experts, *LABELS, "--save-labels", tmp_path / "hard.txt")
    hard = np.loadtxt(tmp_path / "hard.txt")
    np.testing.assert_array_equal(hard.argmax(1), radii.argmax(1).numpy())
    assert set(np.unique(hard)) <= {0.0, 1.0} and (hard.sum(1) == 1).all()
    # a specialist on column 1, then a selector whose cross-fitted labels re-train it on each fold
    weights = tmp_path / "labels.txt"
    trains(
        capsys,
        *FAST,
        "--sigma",
        "0.5",
        "--sample-weights",
        weights,
        "--sample-weights-column",
        "1",
        "--out",
        tmp_path / "spec.pt",
    )
    _, _, config = train_digits.load_checkpoint(tmp_path / "spec.pt")
    assert config["sample_weights_column"] == 1
    assert config["sample_weights_digest"] == weights_digest(torch.from_numpy(want[:, 1]))
    specialist = [
        "--selector-for",
        tmp_path / "e025.pt",
        tmp_path / "spec.pt",
        "--sigma-levels",
        "0.25",
        "0.5",
    ]
    crossfit = [*LABELS, "--label-source", "crossfit", "--folds", "2", "--soft-labels"]
    trains(capsys, *specialist, *crossfit, "--save-labels", tmp_path / "cf.pt")
    # the weights file changed since the specialist was trained: re-training it is refused
    np.savetxt(weights, want[::-1].copy())
    err = train_fails(capsys, *specialist, *crossfit, "--save-labels", tmp_path / "cf2.pt")
    assert "changed since the checkpoint was trained with it" in err


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("short", [], "has 10 weights; the training split has 1100 examples"),
        ("negative", [], "weight 7 is -1 (weights must be >= 0)"),
        ("zero", [], "every weight is 0"),
        ("nan", [], "weight 3 is nan"),
        ("inf", [], "weight 3 is inf"),
        ("table", [], "is a table of 2 columns: choose one with --sample-weights-column"),
        ("table", ["--sample-weights-column", "2"], "--sample-weights-column 2: "),
        ("vector", ["--sample-weights-column", "1"], "holds one column (0)"),
        ("words", [], "not a table of numbers"),
        ("missing", [], "no such file"),
    ],
)
def test_bad_weight_files_are_one_line_errors(capsys, tmp_path, content, extra, message):
    path = tmp_path / "w.txt"
    values = np.ones(N)
    if content == "short":
        values = np.ones(10)
    elif content == "negative":
        values[7] = -1
    elif content == "zero":
        values[:] = 0
    elif content in ("nan", "inf"):
        values[3] = float(content)
    if content == "table":
        np.savetxt(path, np.ones((N, 2)))
    elif content == "words":
        path.write_text("one\ntwo\n")
    elif content != "missing":
        np.savetxt(path, values)
    err = train_fails(capsys, "--epochs", "1", "--sample-weights", path, *extra, "--out", tmp_path / "x.pt")
    assert err.startswith("ddrs train: error: ") and message in err, err
    assert not (tmp_path / "x.pt").exists()


def test_bad_option_combinations(capsys, tmp_path):
    err = train_fails(capsys, "--sample-weights-column", "1", "--out", tmp_path / "x.pt")
    assert "--sample-weights-column picks a column of --sample-weights FILE" in err
    err = train_fails(capsys, "--save-labels", tmp_path / "l.txt", "--out", tmp_path / "x.pt")
    assert "--save-labels: for --selector-for" in err
    err = train_fails(
        capsys,
        "--selector-for",
        tmp_path / "a.pt",
        "--sigma-levels",
        "0.25",
        "0.5",
        "--sample-weights",
        tmp_path / "w.txt",
    )
    assert "--sample-weights draws a classifier's training examples" in err
    assert "must be >= 0" in train_fails(capsys, "--sample-weights", "w", "--sample-weights-column", "-1")
