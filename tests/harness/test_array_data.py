"""Tests for harness.array_data: the Fashion-MNIST and CIFAR loaders on small fixtures written in the real on-disk
formats, and their one-line errors on bad files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import data
from harness.errors import DataError


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(payload)


def _fashion_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(123)
    return {
        "train": (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([9, 0, 3, 7, 1], dtype=np.uint8)),
        "test": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([2, 5, 8], dtype=np.uint8)),
    }


def _write_fashion(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = _fashion_arrays()
    for split, (images, labels) in arrays.items():
        image_file, label_file = data.FASHION_MNIST_FILES[split]
        _write_gz(root / image_file, _idx_bytes(images, 0x00000803))
        _write_gz(root / label_file, _idx_bytes(labels, 0x00000801))
    return arrays


def _cifar_rows(count: int, offset: int) -> np.ndarray:
    # Distinct, position-dependent values so any layout mistake shows up.
    rows = (np.arange(count * 3072, dtype=np.int64).reshape(count, 3072) * 7 + offset) % 251
    return rows.astype(np.uint8)


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)  # the original files are Python 2 pickles (protocol 2)


def _write_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = _cifar_rows(2, i), [(2 * i) % 10, (2 * i + 1) % 10]
        _write_pickle(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": rows, b"labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = _cifar_rows(3, 99), [9, 0, 4]
    _write_pickle(folder / "test_batch", {b"data": test_rows, b"labels": test_labels})
    return np.concatenate(train_rows), train_labels, test_rows, test_labels


def test_fashion_fixture_exact(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    data.check_dataset("fashion-mnist", tmp_path)
    bundle = data.load_dataset("fashion-mnist", tmp_path)
    assert bundle.info.image_size == 28 and bundle.info.augment == "crop_flip"
    for split, (images, labels) in zip((bundle.train, bundle.test), arrays.values(), strict=True):
        assert len(split) == len(labels)
        assert split.labels.dtype == torch.int64
        assert split.labels.tolist() == labels.tolist()
        batch = split.get_batch(torch.arange(len(labels)))
        assert batch.shape == (len(labels), 1, 28, 28) and batch.dtype == torch.float32
        torch.testing.assert_close(batch, torch.from_numpy(images)[:, None].float() / 255, atol=0, rtol=0)
    assert bundle.train.images.dtype == torch.uint8  # kept compact in memory


def _assert_one_line_error(root: Path, file_name: str, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as info:
        data.load_dataset("fashion-mnist", root)
    assert file_name in str(info.value)
    assert "\n" not in str(info.value)


def test_fashion_bad_magic(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    _write_gz(tmp_path / "train-images-idx3-ubyte.gz", _idx_bytes(arrays["train"][0], 0x00000801))
    _assert_one_line_error(tmp_path, "train-images-idx3-ubyte.gz", "magic number 0x00000801")


def test_fashion_truncated_and_trailing(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    payload = _idx_bytes(arrays["test"][0], 0x00000803)
    _write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", payload[:-1])
    _assert_one_line_error(tmp_path, "t10k-images-idx3-ubyte.gz", "truncated")
    _write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", payload + b"\x00")
    _assert_one_line_error(tmp_path, "t10k-images-idx3-ubyte.gz", "trailing")
    _write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", payload[:10])
    _assert_one_line_error(tmp_path, "t10k-images-idx3-ubyte.gz", "truncated")


def test_fashion_truncated_gzip_stream(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    _assert_one_line_error(tmp_path, "train-labels-idx1-ubyte.gz", "gzip")
    path.write_bytes(b"not gzip at all")
    _assert_one_line_error(tmp_path, "train-labels-idx1-ubyte.gz", "gzip")


def test_fashion_count_mismatch_and_label_range(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    _write_gz(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(arrays["train"][1][:4], 0x00000801))
    _assert_one_line_error(tmp_path, "train-labels-idx1-ubyte.gz", "4 labels but")
    _write_gz(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.array([0, 1, 2, 3, 10]), 0x00000801))
    _assert_one_line_error(tmp_path, "train-labels-idx1-ubyte.gz", "label 10 out of range")


def test_fashion_missing_file(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.check_dataset("fashion-mnist", tmp_path)
    _assert_one_line_error(tmp_path, "t10k-labels-idx1-ubyte.gz", "not found")


def test_real_fashion_mnist() -> None:
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    bundle = data.load_dataset("fashion-mnist")
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    with gzip.open(root / "train-labels-idx1-ubyte.gz") as handle:
        raw_labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as handle:
        raw_first_test = np.frombuffer(handle.read(16 + 784), dtype=np.uint8, offset=16).reshape(28, 28)
    assert bundle.train.labels[0].item() == int(raw_labels[0])
    assert torch.equal(bundle.train.labels[:100], torch.from_numpy(raw_labels[:100].astype(np.int64)))
    first_test = bundle.test.get_batch(torch.tensor([0]))[0, 0]
    assert torch.equal(first_test, torch.from_numpy(raw_first_test.copy()).float() / 255)
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10


def test_cifar10_fixture_layout_and_labels(tmp_path: Path) -> None:
    train_rows, train_labels, test_rows, test_labels = _write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        data.check_dataset("cifar10", root)
        bundle = data.load_dataset("cifar10", root)
        assert (len(bundle.train), len(bundle.test)) == (10, 3)
        assert bundle.train.labels.tolist() == train_labels
        assert bundle.test.labels.tolist() == test_labels
        batch = bundle.train.get_batch(torch.arange(10))
        assert batch.shape == (10, 3, 32, 32)
        # Pixel (c, y, x) of image n is byte c*1024 + y*32 + x of row n.
        for n, c, y, x in [(0, 0, 0, 0), (3, 1, 5, 17), (9, 2, 31, 31), (6, 2, 0, 31)]:
            assert batch[n, c, y, x].item() * 255 == pytest.approx(train_rows[n, c * 1024 + y * 32 + x], abs=1e-4)
        expected = torch.from_numpy(test_rows.reshape(3, 3, 32, 32)).float() / 255
        torch.testing.assert_close(bundle.test.get_batch(torch.arange(3)), expected, atol=0, rtol=0)


def test_cifar_latin1_style_str_keys(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    rows = _cifar_rows(3, 5)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": rows, "labels": [1, 2, 3]})
    assert data.load_dataset("cifar10", tmp_path).test.labels.tolist() == [1, 2, 3]


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    for call in (data.check_dataset, data.load_dataset):
        with pytest.raises(DataError, match="data_batch_4") as info:
            call("cifar10", tmp_path)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ({b"data": _cifar_rows(3, 0), b"fine_labels": [0, 1, 2]}, "expected keys"),
        ({b"data": _cifar_rows(3, 0), b"labels": [0, 1]}, "2 labels but 3 images"),
        ({b"data": _cifar_rows(3, 0), b"labels": [0, 1, 10]}, "label 10 out of range"),
        ({b"data": _cifar_rows(3, 0)[:, :100], b"labels": [0, 1, 2]}, "shape"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_cifar_bad_contents(tmp_path: Path, content: object, pattern: str) -> None:
    _write_cifar10(tmp_path)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", content)
    with pytest.raises(DataError, match=pattern) as info:
        data.load_dataset("cifar10", tmp_path)
    assert "test_batch" in str(info.value) and "\n" not in str(info.value)


def test_cifar_truncated_and_malicious_pickles(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch"):
        data.load_dataset("cifar10", tmp_path)
    path.write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))  # a global that is not a numpy array
    with pytest.raises(DataError, match="unexpected object"):
        data.load_dataset("cifar10", tmp_path)


def test_cifar100_fixture(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_rows, test_rows = _cifar_rows(4, 1), _cifar_rows(2, 2)
    _write_pickle(folder / "train", {b"data": train_rows, b"fine_labels": [0, 99, 42, 7], b"coarse_labels": [0] * 4})
    _write_pickle(folder / "test", {b"data": test_rows, b"fine_labels": [99, 3], b"coarse_labels": [1, 1]})
    for root in (tmp_path, folder):
        bundle = data.load_dataset("cifar100", root)
        assert bundle.info.num_classes == 100 and bundle.info.in_chans == 3
        assert bundle.train.labels.tolist() == [0, 99, 42, 7]
        assert bundle.test.labels.tolist() == [99, 3]
        expected = torch.from_numpy(train_rows.reshape(4, 3, 32, 32)).float() / 255
        torch.testing.assert_close(bundle.train.get_batch(torch.arange(4)), expected, atol=0, rtol=0)
    (folder / "test").unlink()
    with pytest.raises(DataError, match=str(folder / "test")):
        data.load_dataset("cifar100", tmp_path)


def test_cifar_train_augmentation_uses_only_generator(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    split = data.load_dataset("cifar10", tmp_path).train
    state = torch.get_rng_state()
    a = split.get_batch(torch.arange(10), augment=True, generator=torch.Generator().manual_seed(1))
    b = split.get_batch(torch.arange(10), augment=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == (10, 3, 32, 32)
    assert not torch.equal(a, split.get_batch(torch.arange(10)))
    with pytest.raises(ValueError):
        split.get_batch(torch.arange(2), augment=True)
