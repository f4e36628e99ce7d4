"""ddrs.datasets: the data formats the ddrs command line reads, and their one-line errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from ddrs.datasets import CIFAR10_FILES, load_dataset
from ddrs_ext.data import TEST_SIZE, VALIDATION_SIZE, load_digits_split, load_digits_splits


def test_digits_splits():
    (x_train, y_train), (x_test, y_test) = load_digits_split(seed=0)
    test = load_dataset("digits")
    assert test.split == "test" and len(test) == len(y_test)
    assert torch.equal(test.labels, y_test) and torch.equal(test.inputs([3, 0, 7]), x_test[[3, 0, 7]])
    train = load_dataset("digits", "train")
    assert train.split == "train" and torch.equal(train.inputs([5]), x_train[[5]])
    validation = load_dataset("digits", "validation")
    assert validation.split == "validation" and len(validation) == VALIDATION_SIZE
    assert torch.equal(validation.labels, load_digits_splits(seed=0).validation[1])
    with pytest.raises(ValueError, match="--split"):
        load_dataset("digits", "valid")


def test_digits_validation_is_carved_from_training_data():
    """Train, validation and test are disjoint and cover the data; the test split does not depend on
    the validation split's size (so test numbers stay comparable), and validation_size=0 gives the
    whole training data."""
    splits = load_digits_splits(seed=0)
    assert [len(s[1]) for s in splits] == [1797 - TEST_SIZE - VALIDATION_SIZE, VALIDATION_SIZE, TEST_SIZE]
    whole_train, test = load_digits_split(seed=0, validation_size=0)
    assert torch.equal(test[0], splits.test[0])
    assert torch.equal(whole_train[0], torch.cat([splits.train[0], splits.validation[0]]))
    with pytest.raises(ValueError, match="validation_size"):
        load_digits_splits(validation_size=1797 - TEST_SIZE)


def write_cifar(folder, per_batch=4, protocol=2, str_keys=False):
    """Batches in CIFAR-10's python format (the originals are protocol-2 pickles with bytes keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in CIFAR10_FILES["train"] + CIFAR10_FILES["test"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batches[name] = (data, labels)
        content = {"data": data, "labels": labels} if str_keys else {b"data": data, b"labels": labels}
        content[b"batch_label" if not str_keys else "batch_label"] = name
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol,str_keys", [(2, False), (5, True)])
def test_cifar10_python_format(tmp_path, protocol, str_keys):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol, str_keys=str_keys)
    for spec in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        test = load_dataset(str(spec))
        data, labels = batches["test_batch"]
        assert test.split == "test" and test.labels.tolist() == labels
        x = test.inputs([0, 1, 2, 3])
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
        assert torch.equal(x, torch.from_numpy(data).reshape(4, 3, 32, 32).float() / 255)
        assert 0 <= float(x.min()) and float(x.max()) <= 1
    train = load_dataset(str(tmp_path), "train")
    assert len(train) == 20
    assert train.labels.tolist() == sum((batches[n][1] for n in CIFAR10_FILES["train"]), [])
    data, _ = batches["data_batch_3"]
    assert torch.equal(train.inputs([9]), torch.from_numpy(data[1]).reshape(1, 3, 32, 32).float() / 255)
    with pytest.raises(ValueError, match="validation applies to --data digits"):
        load_dataset(str(tmp_path), "validation")


def test_cifar10_damaged(tmp_path):
    folder = tmp_path / "c"
    write_cifar(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(OSError, match="data_batch_3 is missing"):
        load_dataset(str(folder), "train")
    whole = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        load_dataset(str(folder))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [1]}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset(str(folder))
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]})
    )
    with pytest.raises(ValueError, match="expected uint8"):
        load_dataset(str(folder))
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a dict"):
        load_dataset(str(folder))


@pytest.mark.parametrize(
    "content",
    [
        lambda x, y: (x, y),
        lambda x, y: [x, y],
        lambda x, y: {"x": x, "y": y},
        lambda x, y: {"inputs": x, "labels": y, "meta": torch.zeros(1)},
        lambda x, y: {"images": x, "targets": y},
    ],
)
def test_pt_file(tmp_path, content):
    x, y = torch.rand(5, 2, 3), torch.tensor([0, 1, 2, 1, 0])
    torch.save(content(x, y), tmp_path / "d.pt")
    data = load_dataset(str(tmp_path / "d.pt"))
    assert data.split is None and torch.equal(data.labels, y) and torch.equal(data.inputs([4, 1]), x[[4, 1]])


def test_pt_file_uint8_images(tmp_path):
    x = torch.randint(0, 256, (3, 1, 2, 2), dtype=torch.uint8)
    torch.save({"x": x, "y": torch.tensor([1, 2, 3], dtype=torch.int32)}, tmp_path / "d.pt")
    data = load_dataset(str(tmp_path / "d.pt"))
    assert torch.equal(data.inputs([0, 1, 2]), x.float() / 255) and data.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "content,message",
    [
        ({"x": torch.zeros(3, 2), "y": torch.zeros(2, dtype=torch.long)}, "3 inputs but 2 labels"),
        ({"x": torch.zeros(3, 2), "y": torch.zeros(3)}, "labels must be integers"),
        (
            {"x": torch.zeros(3, 2), "y": torch.zeros(3, 1, dtype=torch.long)},
            r"labels must have shape \(N,\)",
        ),
        ({"x": torch.zeros(3, dtype=torch.long), "y": torch.zeros(3, dtype=torch.long)}, "floating point"),
        ({"x": torch.zeros(3), "y": torch.zeros(3, dtype=torch.long)}, r"shape \(N, \.\.\.\)"),
        ({"x": torch.full((2, 2), float("nan")), "y": torch.zeros(2, dtype=torch.long)}, "NaN"),
        ({"features": torch.zeros(1)}, "expected x/y"),
        ((torch.zeros(1), torch.zeros(1), torch.zeros(1)), "expected \\(inputs, labels\\)"),
        (torch.zeros(3), "holds a Tensor"),
    ],
)
def test_pt_file_errors(tmp_path, content, message):
    torch.save(content, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=message):
        load_dataset(str(tmp_path / "d.pt"))


def test_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt is a text file"):
        load_dataset(str(tmp_path / "junk.pt"))
    torch.save((torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)), tmp_path / "d.pt")
    with pytest.raises(ValueError, match="--split applies"):
        load_dataset(str(tmp_path / "d.pt"), "train")


def _save(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_order_and_values(tmp_path):
    """Classes are the sorted subfolders; files within a class sorted, nested folders walked in order,
    non-images skipped (torchvision's ImageFolder numbering); grey images become RGB in [0, 1]."""
    g = np.random.default_rng(0)
    images = {
        "b/x.png": g.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        "a/2.PNG": g.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        "a/10.bmp": g.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        "a/sub/0.png": g.integers(0, 256, (5, 4), dtype=np.uint8),  # greyscale
    }
    for name, array in images.items():
        _save(tmp_path / name, array)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    data = load_dataset(str(tmp_path))
    assert len(data) == 4 and data.labels.tolist() == [0, 0, 0, 1]
    order = ["a/10.bmp", "a/2.PNG", "a/sub/0.png", "b/x.png"]
    x = data.inputs([0, 1, 2, 3])
    assert x.shape == (4, 3, 5, 4) and x.dtype == torch.float32
    for k, name in enumerate(order):
        want = images[name]
        if want.ndim == 2:
            want = np.repeat(want[:, :, None], 3, axis=2)
        assert torch.equal(x[k], torch.from_numpy(want.transpose(2, 0, 1).copy()).float() / 255), name


def test_image_folder_resize_and_crop(tmp_path):
    """--image-size S: shorter side to round(S*256/224) by bilinear resampling, then the central square."""
    from PIL import Image

    g = np.random.default_rng(1)
    wide = g.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    _save(tmp_path / "c" / "wide.png", wide)
    _save(tmp_path / "c" / "tall.png", g.integers(0, 256, (40, 16, 3), dtype=np.uint8))
    data = load_dataset(str(tmp_path), image_size=14)
    x = data.inputs([0, 1])  # sorted: tall, wide
    assert x.shape == (2, 3, 14, 14)
    short = round(14 * 256 / 224)  # 16
    resized = Image.fromarray(wide).resize((int(short * 30 / 20), short), Image.BILINEAR)
    w, h = resized.size
    left, top = round((w - 14) / 2), round((h - 14) / 2)
    want = np.asarray(resized.crop((left, top, left + 14, top + 14)))
    assert torch.equal(x[1], torch.from_numpy(want.transpose(2, 0, 1).copy()).float() / 255)
    # Without --image-size, images of different sizes are an error naming the option.
    with pytest.raises(ValueError, match="--image-size"):
        load_dataset(str(tmp_path)).inputs([0, 1])


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no CIFAR-10 batches and no class subfolders"):
        load_dataset(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(str(tmp_path))
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_dataset(str(tmp_path)).inputs([0])
    with pytest.raises(ValueError, match="--image-size applies to image folders"):
        load_dataset("digits", image_size=8)
    with pytest.raises(ValueError, match="positive integer"):
        load_dataset(str(tmp_path), image_size=0)


def test_cifar10_pickles_naming_numpy_core(tmp_path):
    """The distributed files were written by Python 2 with numpy 1, which named numpy.core.multiarray."""
    batches = write_cifar(tmp_path)
    raw = (tmp_path / "test_batch").read_bytes()
    if b"numpy._core.multiarray" in raw:
        (tmp_path / "test_batch").write_bytes(
            raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        )
    data = load_dataset(str(tmp_path))
    assert torch.equal(
        data.inputs([2]), torch.from_numpy(batches["test_batch"][0][2]).reshape(1, 3, 32, 32) / 255
    )
