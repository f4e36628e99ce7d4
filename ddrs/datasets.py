"""Datasets for the ``ddrs`` command line: the embedded digits, CIFAR-10's python format, ``.pt``
tensor files and image folders.

A :class:`Dataset` gives integer labels for all inputs and the inputs themselves by index, as
float32 tensors on the CPU. Every problem with the user's data (a missing file, another format, a
truncated pickle, inputs and labels of different lengths) raises ``ValueError`` or ``OSError``
with a one-line message.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddrs.weights import load_weights

__all__ = ["Dataset", "load_dataset", "DATA_KEYS", "CIFAR10_FILES"]

SPLITS = ("train", "validation", "test")
#: Key pairs (inputs, labels) looked for in a dict of a ``.pt`` data file, in this order.
DATA_KEYS = (
    ("x", "y"),
    ("inputs", "labels"),
    ("images", "targets"),
    ("images", "labels"),
    ("data", "targets"),
)
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@dataclass
class Dataset:
    """``labels`` (N,) int64; ``inputs(index)`` the float32 inputs ``(len(index), ...)`` at those indices."""

    description: str
    labels: torch.Tensor
    _get: Callable[[Sequence[int]], torch.Tensor]
    split: str | None = None  # train/test for the kinds that have splits

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self, index: Sequence[int]) -> torch.Tensor:
        return self._get(list(index))


def _tensor_dataset(description: str, x: torch.Tensor, y: torch.Tensor, split: str | None = None) -> Dataset:
    return Dataset(description, y, lambda index: x[torch.as_tensor(index, dtype=torch.long)], split)


def _check_pair(where: str, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 inputs (N, ...) and int64 labels (N,), or a one-line error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if isinstance(y, (np.ndarray, list, tuple)):
        y = torch.as_tensor(np.asarray(y))
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(
            f"{where}: inputs and labels must be tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dtype == torch.uint8:
        x = x.float() / 255  # 8-bit images
    elif not x.is_floating_point():
        raise ValueError(f"{where}: inputs must be floating point or uint8 images, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{where}: inputs must have shape (N, ...) with N inputs, got {tuple(x.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{where}: labels must have shape (N,), got {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} labels")
    x = x.to(torch.float32).contiguous()
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{where}: input {int((~finite).nonzero()[0, 0])} contains NaN or Inf")
    return x, y.to(torch.int64)


# ----------------------------------------------------------------------------- digits


def _digits(split: str) -> Dataset:
    from ddrs_ext.data import load_digits_splits

    x, y = getattr(load_digits_splits(seed=0), split)
    return _tensor_dataset(f"digits ({split} split of ddrs_ext.data.load_digits_splits(seed=0))", x, y, split)


# ----------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays, nothing that runs code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"--data: CIFAR-10 file {path} is missing") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(
            f"--data: {path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(
            f"--data: {path} is not a CIFAR-10 batch (holds a {type(batch).__name__}, not a dict)"
        )
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"--data: {path} is not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"--data: {path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"--data: {path}: {data.shape[0]} images but labels of shape {labels.shape}")
    return data, labels


def _cifar_folder(path: Path) -> Path | None:
    """The folder holding CIFAR-10's batch files (``path`` or its ``cifar-10-batches-py``), if any."""
    for folder in (path, path / "cifar-10-batches-py"):
        if any((folder / name).exists() for name in ("test_batch", "data_batch_1", "batches.meta")):
            return folder
    return None


def _cifar10(folder: Path, split: str) -> Dataset:
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_FILES[split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data).reshape(-1, 3, 32, 32)  # uint8; converted per chunk
    y = torch.from_numpy(labels.astype(np.int64))

    def get(index):
        return x[torch.as_tensor(index, dtype=torch.long)].to(torch.float32) / 255

    return Dataset(f"CIFAR-10 {split} split in {folder}", y, get, split)


# ----------------------------------------------------------------------------- .pt files


def _tensor_file(path: Path) -> Dataset:
    content = load_weights(path, "--data")
    if isinstance(content, (tuple, list)) and len(content) == 2:
        x, y = content
    elif isinstance(content, dict):
        for kx, ky in DATA_KEYS:
            if kx in content and ky in content:
                x, y = content[kx], content[ky]
                break
        else:
            pairs = ", ".join(f"{a}/{b}" for a, b in DATA_KEYS)
            raise ValueError(
                f"--data: {path} is a dict with keys {sorted(map(str, content))}; expected {pairs}"
            )
    else:
        raise ValueError(
            f"--data: {path} holds a {type(content).__name__}; expected (inputs, labels) or a dict such as "
            "{'x': inputs, 'y': labels}"
        )
    x, y = _check_pair(f"--data {path}", x, y)
    return _tensor_dataset(f"tensors in {path}", x, y)


# ----------------------------------------------------------------------------- image folders


# The file kinds torchvision's ImageFolder accepts, so that idx numbers the same images as there.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_files(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted subfolder names) and ``(file, class)`` in ImageFolder's order: class by class,
    folders walked in sorted order, file names sorted, only image extensions (any case)."""
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(path / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(root, file), label))
    return classes, samples


def _resize_crop(image, size: int):
    """ImageNet's evaluation transform: the shorter side to ``round(size * 256 / 224)`` (bilinear),
    then the central ``size x size`` square (torchvision's Resize + CenterCrop on PIL images)."""
    from PIL import Image

    short = int(round(size * 256 / 224))
    w, h = image.size
    if w <= h:
        new = (short, int(short * h / w))
    else:
        new = (int(short * w / h), short)
    if new != (w, h):
        image = image.resize(new, Image.BILINEAR)
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"an image of {w}x{h} is smaller than the {size}x{size} crop")
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _image_folder(path: Path, image_size: int | None) -> Dataset:
    """One subfolder per class, read with Pillow (RGB, scaled to [0, 1]); numbered as torchvision's
    ImageFolder numbers them. ``image_size``: resize and centre-crop every image to that square."""
    from PIL import Image, UnidentifiedImageError

    classes, samples = _image_files(path)
    if not classes:
        raise ValueError(f"--data: {path} has no CIFAR-10 batches and no class subfolders of images")
    if not samples:
        raise ValueError(f"--data: {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its subfolders")
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    shape = {}

    def get(index):
        images = []
        for i in index:
            file = samples[i][0]
            try:
                with Image.open(file) as image:
                    image = image.convert("RGB")
                    if image_size is not None:
                        image = _resize_crop(image, image_size)
                    array = np.asarray(image, dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise ValueError(f"--data: cannot read image {file} ({exc})") from None
            tensor = torch.from_numpy(array.transpose(2, 0, 1).copy()).to(torch.float32) / 255
            first = shape.setdefault("shape", tuple(tensor.shape))
            if tuple(tensor.shape) != first:
                raise ValueError(
                    f"--data: image {file} has shape {tuple(tensor.shape)}, earlier ones {first}; "
                    "give --image-size to resize and crop them to one size"
                )
            images.append(tensor)
        if not images:
            return torch.zeros((0, *shape.get("shape", ())), dtype=torch.float32)
        return torch.stack(images)

    shown = ", ".join(classes[:5]) + ("..." if len(classes) > 5 else "")
    return Dataset(f"image folder {path} ({len(classes)} classes: {shown})", labels, get)


# ----------------------------------------------------------------------------- dispatch


def load_dataset(spec: str, split: str | None = None, image_size: int | None = None) -> Dataset:
    """The data named by ``spec``: ``digits``, a CIFAR-10 folder, a ``.pt`` file or an image folder.

    ``split`` (``train`` or ``test``, default ``test``) chooses the split of the digits and of
    CIFAR-10; the digits also have a ``validation`` split (carved from their training images, for
    choosing settings); the other kinds hold one set of inputs and refuse a split. ``image_size`` (image
    folders only) resizes and centre-crops every image to that square.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise ValueError(f"--image-size must be a positive integer, got {image_size!r}")
    if spec == "digits":
        if image_size is not None:
            raise ValueError("--image-size applies to image folders, not to the digits")
        return _digits(split or "test")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data: {spec}: no such file or folder (or use --data digits)")
    if path.is_dir():
        cifar = _cifar_folder(path)
        if cifar is not None:
            if image_size is not None:
                raise ValueError("--image-size applies to image folders, not to CIFAR-10")
            if split == "validation":
                raise ValueError(
                    "--split validation applies to --data digits; CIFAR-10 has train and test splits "
                    "(carve a validation set from train into a .pt file)"
                )
            return _cifar10(cifar, split or "test")
        kind = "image folder"
    else:
        kind = "file"
    if split is not None:
        raise ValueError(f"--split applies to --data digits and CIFAR-10 folders, not to a {kind} ({spec})")
    if path.is_dir():
        return _image_folder(path, image_size)
    if image_size is not None:
        raise ValueError(f"--image-size applies to image folders, not to a {kind} ({spec})")
    return _tensor_file(path)


def data_settings(spec: str, dataset: Dataset) -> dict:
    """What identifies the data in a result file's settings (paths made absolute)."""
    return {"data": spec if spec == "digits" else os.path.abspath(spec), "split": dataset.split}


def image_settings(image_size: int | None) -> dict:
    """The image-folder transform, for a result file's settings (only when one is asked for, so that
    files of the other kinds keep their settings)."""
    return {} if image_size is None else {"image_size": int(image_size)}
