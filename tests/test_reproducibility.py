"""The limits of bit-for-bit reproducibility (issue 17).

certify's noise depends only on (seed, index, sample), so its counts are the same whatever the batch
size, the number of threads or the split of the inputs over processes *provided that the model's
output for a row does not depend on the other rows of its batch*. That holds for the models below,
built from elementwise products and sums over each row's own features in a fixed order. It need not
hold for ordinary layers: matrix-multiply and convolution kernels (oneDNN, MKL, cuBLAS, cuDNN) choose
their blocking by the batch shape, so a row's logits can change in the last bits with the batch size,
and a noisy copy within rounding of a decision boundary then changes its vote. It fails outright for
a model whose output depends on the batch, e.g. BatchNorm normalising with the batch's own statistics
(a module in training mode called through a plain function, which ddrs_ext cannot switch to eval
mode, or ``batch_norm(..., training=True)`` written into the forward pass).
"""

import pytest
import torch

from ddrs_ext import certify

BATCH_SIZES = (1, 7, 1000)
SPLITS = (1, 2, 3)  # as the inputs are divided among processes (world sizes)


class RowwiseMLP(torch.nn.Module):
    """Two layers whose every output is a sum over the row's own features: (z[:, None, :] * W).sum(-1)
    reduces each row in the same order whatever the number of rows."""

    def __init__(self, dim=36, hidden=24, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(hidden, dim, generator=g) / dim**0.5
        self.b1 = torch.randn(hidden, generator=g) * 0.1
        self.w2 = torch.randn(classes, hidden, generator=g) / hidden**0.5

    def forward(self, z):
        h = torch.relu((z.flatten(1)[:, None, :] * self.w1).sum(-1) + self.b1)
        return (h[:, None, :] * self.w2).sum(-1)


class RowwiseCNN(torch.nn.Module):
    """A 3x3 convolution written as nine shifted, weighted copies of the padded image added one after
    the other (each output pixel sums its terms in the same order whatever the batch), then the MLP."""

    def __init__(self, channels=4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.randn(channels, 3, 3, generator=g) / 3
        self.head = RowwiseMLP(dim=channels * 36)

    def forward(self, z):
        padded = torch.nn.functional.pad(z, (1, 1, 1, 1))  # (B, 1, 8, 8)
        out = torch.zeros(z.shape[0], self.weight.shape[0], 6, 6, dtype=z.dtype)
        for dy in range(3):
            for dx in range(3):
                out = out + self.weight[None, :, dy, dx, None, None] * padded[:, :, dy : dy + 6, dx : dx + 6]
        return self.head(torch.relu(out))


class BatchStatistics(torch.nn.Module):
    """The CNN with a BatchNorm that normalises each channel by the batch's own mean and variance."""

    def __init__(self):
        super().__init__()
        self.cnn = RowwiseCNN()

    def forward(self, z):
        z = torch.nn.functional.batch_norm(z, None, None, training=True)
        return self.cnn(z)


def _inputs():
    return torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))


def counts(model, x, batch_size, parts=1):
    """certify's estimation counts for x, its inputs divided into ``parts`` contiguous shards certified
    separately (each input keeps its noise stream, its index in x)."""
    shards = torch.arange(x.shape[0]).tensor_split(parts)
    return torch.cat(
        [
            certify(model, x[i], 0.5, n0=10, n=200, alpha=0.01, seed=4, batch_size=batch_size, index=i).counts
            for i in shards
        ]
    )


def assert_counts_do_not_depend_on_batching(model, x):
    reference = counts(model, x, BATCH_SIZES[-1])
    assert int(((reference > 0).sum(1) > 1).sum()) >= 2  # votes split between classes: boundaries near
    for batch_size in BATCH_SIZES:
        for parts in SPLITS:
            got = counts(model, x, batch_size, parts)
            assert torch.equal(got, reference), (
                f"counts change with batch size {batch_size}, {parts} shard(s)"
            )


@pytest.mark.parametrize("model", [RowwiseMLP(), RowwiseCNN()], ids=["mlp", "cnn"])
def test_rows_are_independent_and_counts_are_identical(model):
    x = _inputs()
    rows = torch.rand(50, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    whole = model(rows)
    for size in (1, 7):  # the premise: a row's logits do not depend on its batch, to the last bit
        assert torch.equal(torch.cat([model(part) for part in rows.split(size)]), whole)
    assert_counts_do_not_depend_on_batching(model, x)


def test_counts_are_identical_whatever_the_threads():
    x = _inputs()
    torch.set_num_threads(1)
    one = counts(RowwiseCNN(), x, 1000)
    torch.set_num_threads(2)
    assert torch.equal(counts(RowwiseCNN(), x, 1000), one)


def _train_mode_batchnorm_behind_a_function():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1), RowwiseCNN()).train()
    return lambda z: model(z)


@pytest.mark.parametrize(
    "make", [BatchStatistics, _train_mode_batchnorm_behind_a_function], ids=["functional", "module"]
)
def test_negative_control_a_model_using_batch_statistics_is_caught(make):
    model = make()
    x = _inputs()
    rows = torch.rand(50, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(torch.cat([model(part) for part in rows.split(7)]), model(rows))
    with pytest.raises(AssertionError, match="counts change with batch size"):
        assert_counts_do_not_depend_on_batching(model, x)
