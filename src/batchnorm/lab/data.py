"""Data sets for the lab, as flat float32 features and int64 labels.

Embedded (no file, no network): ``mnist1d`` (made offline by the ``mnist1d`` package's
``make_dataset``: 4000 train / 1000 test, 40 features, 10 classes), ``digits``
(scikit-learn's bundled 8x8 digits) and ``gaussians`` (a Gaussian mixture made here).

From files a user already has (``data_dir``): ``mnist`` and ``fashion-mnist`` (the four
IDX files under their standard names, gzipped or not) and ``cifar10`` (the *binary*
version: ``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``, gzipped or not).
The bytes are parsed here; nothing is unpickled. Features are scaled to zero mean and unit variance
with one mean and one standard deviation taken over the training set.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

EMBEDDED = ("mnist1d", "digits", "gaussians")
FROM_FILES = ("mnist", "fashion-mnist", "cifar10")
DATASETS = EMBEDDED + FROM_FILES


class DataError(ValueError):
    """A data set could not be read: the message names the file and what was expected."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set, split into train and test."""

    name: str
    x_train: Tensor  # (N, features) float32
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    source: str  # where it came from, for the report
    image_shape: tuple[int, ...] | None = None  # (channels, height, width) of each flat row, when the rows are images

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @functools.cached_property
    def checksum(self) -> str:
        """SHA-256 of the name and the contents (features and labels as the lab uses them)."""
        h = hashlib.sha256(self.name.encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @property
    def fingerprint(self) -> str:
        """A short hash of the contents: runs on different data never share a stored result."""
        return self.checksum[:16]

    def describe(self) -> dict[str, object]:
        """Name, sizes and source, for results.json."""
        return {
            "name": self.name,
            "train": len(self.y_train),
            "test": len(self.y_test),
            "features": self.n_features,
            "classes": self.n_classes,
            "source": self.source,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "sha256": self.checksum,
        }


def load(name: str, data_dir: Path | None = None) -> Dataset:
    """The data set ``name`` (one of ``DATASETS``); file-based ones are read from ``data_dir``."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    if name in EMBEDDED:
        return {"mnist1d": _mnist1d, "digits": _digits, "gaussians": _gaussians}[name]()
    if data_dir is None:
        raise DataError(f"data set {name!r} is read from files: give the folder that holds them (--data-dir DIR)")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        raise DataError(f"data folder {data_dir} {what} (expected a folder with the {name} files in it)")
    if name == "cifar10":
        return _cifar10(data_dir)
    return _idx_set(name, data_dir)


def _finish(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
            n_classes: int, source: str, image_shape: tuple[int, ...] | None = None) -> Dataset:
    """Flatten, standardise with the training set's mean and std, convert to tensors; ``image_shape``
    (channels, height, width) when the rows are images."""
    x_train = x_train.reshape(len(x_train), -1).astype(np.float64)
    x_test = x_test.reshape(len(x_test), -1).astype(np.float64)
    mean, std = x_train.mean(), x_train.std()
    if not std > 0:
        raise DataError(f"{source}: the training inputs are constant (standard deviation {std}); expected varied inputs")

    def features(x: np.ndarray) -> Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    def labels(y: np.ndarray) -> Tensor:
        return torch.from_numpy(y.astype(np.int64))

    return Dataset(name, features(x_train), labels(y_train), features(x_test), labels(y_test), n_classes, source,
                   image_shape)


def _mnist1d() -> Dataset:
    import mnist1d.data

    # make_dataset seeds Python's and NumPy's global generators: put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = mnist1d.data.make_dataset()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _finish("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], 10,
                   "mnist1d.data.make_dataset() (default arguments, offline)")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    train, test = order[:1297], order[1297:]
    return _finish("digits", d.data[train], d.target[train], d.data[test], d.target[test], 10,
                   "sklearn.datasets.load_digits() (1297 train / 500 test, split with seed 0)", (1, 8, 8))


def _gaussians(n_train: int = 4000, n_test: int = 1000, features: int = 40, classes: int = 10) -> Dataset:
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 0.5, size=(classes, features))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        return centres[y] + rng.normal(0.0, 1.0, size=(n, features)), y

    (xa, ya), (xb, yb) = draw(n_train), draw(n_test)
    return _finish("gaussians", xa, ya, xb, yb, classes,
                   f"Gaussian mixture made in code: {classes} classes, {features} features, seed 0")


# --- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_FOLDERS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic bytes."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}); expected a complete .gz file") from e


def read_idx(path: Path) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzipped or not).

    Layout: two zero bytes, a type byte (0x08 unsigned byte ... 0x0E float64), the number
    of dimensions, each dimension as a big-endian 32-bit integer, then the data.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        found = raw[:4].hex(" ") or "an empty file"
        raise DataError(f"{path}: not an IDX file: expected the header 00 00 <type> <ndim>, found {found}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes for {ndim} dimensions, found {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow for huge headers
    if len(raw) != expected:
        raise DataError(f"{path}: expected {expected} bytes for an IDX array of shape {shape} and type {dtype}, "
                        f"found {len(raw)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(data_dir: Path, folders: tuple[str, ...], filename: str, what: str) -> Path:
    places = [data_dir] + [data_dir / f for f in folders]
    for place in places:
        for candidate in (place / filename, place / (filename + ".gz")):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(p) for p in places)
    raise DataError(f"{what}: missing file {filename} (or {filename}.gz); looked in {looked}")


def _idx_set(name: str, data_dir: Path) -> Dataset:
    arrays = {}
    for key, filename in _IDX_FILES.items():
        path = _find(data_dir, _IDX_FOLDERS[name], filename, name)
        a = read_idx(path)
        if key.endswith("images") and (a.ndim != 3 or a.dtype != np.uint8):
            raise DataError(f"{path}: expected unsigned-byte images of shape (N, rows, cols), found {a.dtype} of shape {a.shape}")
        if key.endswith("images") and 0 in a.shape:
            raise DataError(f"{path}: expected at least one image of at least one pixel, found shape {a.shape}")
        if key.endswith("labels") and (a.ndim != 1 or a.dtype != np.uint8 or (a.size and a.max() > 9)):
            raise DataError(f"{path}: expected unsigned-byte labels 0-9 of shape (N,), found {a.dtype} of shape {a.shape}")
        arrays[key] = (a, path)
    for split in ("train", "test"):
        (images, ipath), (labels, lpath) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels: expected the same number")
    (train, train_path), (test, test_path) = arrays["train_images"], arrays["test_images"]
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{test_path} has images of {test.shape[1]}x{test.shape[2]} pixels but {train_path} has "
                        f"{train.shape[1]}x{train.shape[2]}: expected test images of the training images' size")
    return _finish(name, arrays["train_images"][0] / 255.0, arrays["train_labels"][0],
                   arrays["test_images"][0] / 255.0, arrays["test_labels"][0], 10,
                   f"IDX files in {arrays['train_images'][1].parent}", (1, *arrays["train_images"][0].shape[1:]))


# --- CIFAR-10 binary version -------------------------------------------------------------

_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then 1024 red, 1024 green, 1024 blue bytes
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = ("test_batch.bin",)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one CIFAR-10 binary batch file (gzipped or not)."""
    raw = _read_bytes(path)
    if not raw or len(raw) % _CIFAR_RECORD:
        raise DataError(f"{path}: expected a whole number of {_CIFAR_RECORD}-byte records (CIFAR-10 binary version), "
                        f"found {len(raw)} bytes")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DataError(f"{path}: expected labels 0-9 in the first byte of each record, found {int(labels.max())}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar10(data_dir: Path) -> Dataset:
    def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_batch(_find(data_dir, ("cifar-10-batches-bin",), f, "cifar10")) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    (xa, ya), (xb, yb) = read(_CIFAR_TRAIN), read(_CIFAR_TEST)
    source = _find(data_dir, ("cifar-10-batches-bin",), _CIFAR_TEST[0], "cifar10").parent
    return _finish("cifar10", xa / 255.0, ya, xb / 255.0, yb, 10, f"CIFAR-10 binary batches in {source}", (3, 32, 32))
