"""The lab's data sets: IDX and CIFAR-10 binary files written here, read back exactly;
missing or corrupt files give errors that name the file and what was expected."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.data import DataError, load, read_cifar_batch, read_idx

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(a: np.ndarray) -> bytes:
    """An array in the IDX format (unsigned bytes)."""
    assert a.dtype == np.uint8
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx_set(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST files with random contents in ``folder``; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 6, 5), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 6, 5), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (folder / (IDX_NAMES[key] + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / IDX_NAMES[key]).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_reads_back_what_was_written(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path, gz)
    suffix = ".gz" if gz else ""
    for key, a in arrays.items():
        np.testing.assert_array_equal(read_idx(tmp_path / (IDX_NAMES[key] + suffix)), a)


def test_idx_other_types(tmp_path: Path) -> None:
    a = (np.arange(12).reshape(3, 4) / 7).astype(">f4")
    path = tmp_path / "floats"
    path.write_bytes(bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 3, 4) + a.tobytes())
    np.testing.assert_array_equal(read_idx(path), a)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_mnist_loads_flat_standardised_features(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path, gz)
    d = load("mnist", tmp_path)
    assert d.x_train.shape == (12, 30) and d.x_test.shape == (5, 30)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    np.testing.assert_array_equal(d.y_train.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["test_labels"])
    # one mean and one std over the training set: the order of pixel values is kept
    raw = arrays["train_images"].reshape(12, -1) / 255.0
    expected = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(d.x_train.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(d.x_train.double().mean())) < 1e-5
    assert d.n_classes == 10 and d.n_features == 30


def test_torchvision_layout_and_fashion(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "MNIST" / "raw", gz=True)
    write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=False, n_train=7, n_test=3)
    assert load("mnist", tmp_path).x_train.shape == (12, 30)
    assert load("fashion-mnist", tmp_path).x_train.shape == (7, 30)


def test_missing_file_names_it_and_where_it_looked(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing file t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)") as e:
        load("mnist", tmp_path)
    assert str(tmp_path) in str(e.value)


def test_file_based_sets_need_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="expected one of mnist1d"):
        load("imagenet")


def test_truncated_idx_says_how_many_bytes(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"expected 376 bytes for an IDX array of shape \(12, 6, 5\).*found 369") as e:
        load("mnist", tmp_path)
    assert str(path) in str(e.value)


def test_bad_magic_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file: expected the header 00 00 <type> <ndim>, found 01 02 03 04"):
        read_idx(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="found an empty file"):
        read_idx(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="corrupt or truncated gzip file") as e:
        load("mnist", tmp_path)
    assert str(path) in str(e.value)


def test_images_and_labels_must_agree(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DataError, match="has 12 images but .* has 11 labels"):
        load("mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 10, dtype=np.uint8)))
    with pytest.raises(DataError, match="expected unsigned-byte labels 0-9"):
        load("mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((12, 2), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"labels 0-9 of shape \(N,\), found uint8 of shape \(12, 2\)"):
        load("mnist", tmp_path)


def write_cifar(folder: Path, per_file: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The six CIFAR-10 binary batch files with random records; returns (images, labels) per file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        out.append((images, labels))
    return out


def test_cifar_binary_reads_back_what_was_written(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    written = write_cifar(folder)
    images, labels = read_cifar_batch(folder / "data_batch_2.bin")
    np.testing.assert_array_equal(images, written[1][0])
    np.testing.assert_array_equal(labels, written[1][1])
    d = load("cifar10", tmp_path)
    assert d.x_train.shape == (15, 3072) and d.x_test.shape == (3, 3072)
    np.testing.assert_array_equal(d.y_train.numpy(), np.concatenate([w[1] for w in written[:5]]))
    # channel-major layout: feature 0 is the red value of the top-left pixel
    raw = np.concatenate([w[0] for w in written[:5]]).reshape(15, -1) / 255.0
    np.testing.assert_allclose(d.x_train.numpy(), (raw - raw.mean()) / raw.std(), rtol=1e-5, atol=1e-5)


def test_cifar_wrong_size_and_labels(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"expected a whole number of 3073-byte records .* found 9218 bytes") as e:
        load("cifar10", tmp_path)
    assert str(path) in str(e.value)
    write_cifar(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[0] = 12
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="expected labels 0-9 .* found 12"):
        load("cifar10", tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="missing file test_batch.bin"):
        load("cifar10", tmp_path)


def test_embedded_sets() -> None:
    digits = load("digits")
    assert digits.x_train.shape == (1297, 64) and digits.x_test.shape == (500, 64)
    gaussians = load("gaussians")
    assert gaussians.x_train.shape == (4000, 40) and gaussians.n_classes == 10
    assert torch.equal(load("gaussians").x_train, gaussians.x_train)  # made from a fixed seed
    assert digits.fingerprint != gaussians.fingerprint


def test_mnist1d_is_made_offline_and_leaves_global_generators_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = load("mnist1d")
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40) and d.n_classes == 10
    assert sorted(d.y_train.unique().tolist()) == list(range(10))


def test_idx_with_no_images_names_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((0, 6, 5), dtype=np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"expected at least one image of at least one pixel, found shape \(0, 6, 5\)") as e:
        load("mnist", tmp_path)
    assert str(path) in str(e.value)
    path.write_bytes(idx_bytes(np.zeros((5, 0, 5), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"found shape \(5, 0, 5\)"):
        load("mnist", tmp_path)


def test_idx_huge_header_reports_the_exact_byte_count(tmp_path: Path) -> None:
    """Dimensions near 2**32 overflowed NumPy's int64 product and gave a wrong count."""
    path = tmp_path / "train-images-idx3-ubyte"
    dims = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    path.write_bytes(bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", *dims) + bytes(8))  # float32 entries
    expected = 16 + 0xFFFFFFFF**3 * 4
    with pytest.raises(DataError, match=rf"expected {expected} bytes for an IDX array of shape \(4294967295, "
                                        rf"4294967295, 4294967295\) and type >f4, found 24") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_train_and_test_images_of_different_sizes(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 7, 5), dtype=np.uint8))))
    with pytest.raises(DataError, match=r"has images of 7x5 pixels but .*train-images-idx3-ubyte.gz has 6x5: "
                                        r"expected test images of the training images' size") as e:
        load("mnist", tmp_path)
    assert str(path) in str(e.value)


def test_cifar_gzipped_batches_are_decompressed(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    written = write_cifar(folder)
    plain = load("cifar10", tmp_path)
    for name in ["test_batch.bin", "data_batch_2.bin"]:
        (folder / (name + ".gz")).write_bytes(gzip.compress((folder / name).read_bytes()))
        (folder / name).unlink()
    images, labels = read_cifar_batch(folder / "test_batch.bin.gz")
    np.testing.assert_array_equal(images, written[5][0])
    np.testing.assert_array_equal(labels, written[5][1])
    gz = load("cifar10", tmp_path)
    assert torch.equal(gz.x_train, plain.x_train) and torch.equal(gz.x_test, plain.x_test)
    assert torch.equal(gz.y_test, plain.y_test)


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mnist.tar"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"mnist.tar is not a folder \(expected a folder with the mnist files in it\)"):
        load("mnist", path)
