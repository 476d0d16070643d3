"""Tests for harness.data: every loader on small fixtures written in the real on-disk format, plus augmentation."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from harness import data
from harness.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------------------------------------------------


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


def _save_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int], fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt, quality=95)


# ---------------------------------------------------------------------------------------------------------------------
# Registry, errors, defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        data.load_dataset("mnist", tmp_path)
    for name in data.DATASETS:
        assert name in str(info.value)
    with pytest.raises(ConfigError):
        data.check_dataset("mnist")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fashion-mnist", "train-images-idx3-ubyte.gz"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("tinyimagenet", "tiny-imagenet-200"),
        ("imagenet", "imagenet"),
    ],
)
def test_check_and_load_on_empty_dir_name_expected_path(tmp_path: Path, name: str, expected: str) -> None:
    for call in (data.check_dataset, data.load_dataset):
        with pytest.raises(DataError) as info:
            call(name, tmp_path)
        message = str(info.value)
        assert str(tmp_path / expected) in message
        assert "\n" not in message


def test_fashion_missing_message_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.check_dataset("fashion-mnist", tmp_path)


def test_default_roots_and_builtin_checks() -> None:
    assert data.default_data_root("fashion-mnist") == Path("/usr/share/datasets/fashion-mnist")
    assert data.default_data_root("cifar10") == Path("data")
    assert data.default_data_root("digits") is None
    assert data.default_data_root("synthetic") is None
    data.check_dataset("digits")
    data.check_dataset("synthetic")


def test_infos_are_consistent() -> None:
    for name in data.DATASETS:
        info = data.dataset_info(name)
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.in_chans
        assert info.augment in data.AUGMENTS
    assert data.dataset_info("cifar100").num_classes == 100
    assert data.dataset_info("imagenet").image_size == 224


# ---------------------------------------------------------------------------------------------------------------------
# digits and synthetic
# ---------------------------------------------------------------------------------------------------------------------


def test_digits_split_and_stats() -> None:
    bundle = data.load_dataset("digits")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert bundle.info.num_classes == 10 and bundle.info.image_size == 8 and bundle.info.augment == "none"
    train = bundle.train.get_batch(torch.arange(len(bundle.train)))
    assert train.shape == (1437, 1, 8, 8) and train.dtype == torch.float32
    assert train.min() >= 0.0 and train.max() == 1.0
    assert sorted(bundle.train.labels.unique().tolist()) == list(range(10))
    # Stratified: every class is ~20% test.
    counts = torch.bincount(bundle.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # The constants in the module match the train-split statistics.
    assert train.mean().item() == pytest.approx(data.DIGITS_MEAN, abs=1e-4)
    assert train.std(unbiased=False).item() == pytest.approx(data.DIGITS_STD, abs=1e-4)
    again = data.load_dataset("digits")
    assert torch.equal(again.test.labels, bundle.test.labels)
    assert torch.equal(again.test.get_batch(torch.arange(360)), bundle.test.get_batch(torch.arange(360)))


def test_digits_values_are_sixteenths() -> None:
    batch = data.load_dataset("digits").train.get_batch(torch.arange(50))
    assert torch.equal(batch * 16, (batch * 16).round())


def test_synthetic_is_deterministic_and_learnable() -> None:
    first, second = data.load_dataset("synthetic"), data.load_dataset("synthetic", seed=5)
    assert (len(first.train), len(first.test)) == (512, 128)
    x_train = first.train.get_batch(torch.arange(512))
    assert x_train.shape == (512, 1, 8, 8) and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert torch.equal(x_train, second.train.get_batch(torch.arange(512)))
    assert x_train.mean().item() == pytest.approx(data.SYNTHETIC_MEAN, abs=1e-4)
    assert x_train.std(unbiased=False).item() == pytest.approx(data.SYNTHETIC_STD, abs=1e-4)
    assert torch.bincount(first.train.labels, minlength=10).min() >= 30  # every class is well represented
    # A nearest-class-mean classifier must do (nearly) perfectly: the set is learnable.
    means = torch.stack([x_train[first.train.labels == c].mean(0) for c in range(10)]).flatten(1)
    x_test = first.test.get_batch(torch.arange(128)).flatten(1)
    predicted = torch.cdist(x_test, means).argmin(1)
    assert (predicted == first.test.labels).float().mean().item() >= 0.95


def test_get_batch_keeps_index_order() -> None:
    split = data.load_dataset("synthetic").train
    full = split.get_batch(torch.arange(10))
    assert torch.equal(split.get_batch(torch.tensor([7, 2, 2, 0])), full[[7, 2, 2, 0]])


# ---------------------------------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------------------------------


def test_train_subset_is_deterministic_sorted_subset() -> None:
    full = data.load_dataset("synthetic")
    a = data.load_dataset("synthetic", train_subset=100, test_subset=20, seed=3)
    b = data.load_dataset("synthetic", train_subset=100, test_subset=20, seed=3)
    c = data.load_dataset("synthetic", train_subset=100, seed=4)
    assert (len(a.train), len(a.test), len(c.test)) == (100, 20, 128)
    assert torch.equal(a.train.labels, b.train.labels)
    assert isinstance(a.train, data.SubsetImageSet) and isinstance(c.train, data.SubsetImageSet)
    indices = a.train.indices
    assert torch.equal(indices, indices.sort().values) and len(indices.unique()) == 100
    assert not torch.equal(indices, c.train.indices)
    assert torch.equal(a.train.labels, full.train.labels[indices])
    assert torch.equal(a.train.get_batch(torch.tensor([0, 5])), full.train.get_batch(indices[[0, 5]]))
    expected = torch.randperm(512, generator=torch.Generator().manual_seed(3))[:100].sort().values
    assert torch.equal(indices, expected)


def test_subset_bounds() -> None:
    assert len(data.load_dataset("synthetic", train_subset=512).train) == 512
    with pytest.raises(ConfigError, match=r"^--train-subset 10000 is larger than the synthetic training split \(512 "
                                          r"samples\)$"):
        data.load_dataset("synthetic", train_subset=10_000)
    for bad in (0, -1):
        with pytest.raises(ConfigError):
            data.load_dataset("synthetic", train_subset=bad)
        with pytest.raises(ConfigError):
            data.load_dataset("synthetic", test_subset=bad)


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# TinyImageNet
# ---------------------------------------------------------------------------------------------------------------------

_TINY_COLOURS = {"n02": (200, 30, 60), "n01": (10, 120, 250)}


def _write_tinyimagenet(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("n02\nn01\n")  # unsorted on purpose: class index is the sorted order
    for wnid, colour in _TINY_COLOURS.items():
        for i in range(3 if wnid == "n01" else 2):
            _save_image(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour, (64, 64))
    _save_image(folder / "val" / "images" / "val_0.JPEG", _TINY_COLOURS["n02"], (64, 64))
    _save_image(folder / "val" / "images" / "val_1.JPEG", _TINY_COLOURS["n01"], (80, 50))  # non-square
    lines = ["val_0.JPEG\tn02\t0\t0\t10\t10", "val_1.JPEG\tn01\t1\t2\t30\t40"]
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def _colour(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255


def test_tinyimagenet_fixture(tmp_path: Path) -> None:
    folder = _write_tinyimagenet(tmp_path)
    for root in (tmp_path, folder):
        data.check_dataset("tinyimagenet", root)
        bundle = data.load_dataset("tinyimagenet", root)
        assert bundle.info.image_size == 64 and bundle.info.num_classes == 2
        assert (len(bundle.train), len(bundle.test)) == (5, 2)
        assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1]  # n01 first
        assert bundle.test.labels.tolist() == [1, 0]
        train = bundle.train.get_batch(torch.arange(5))
        assert train.shape == (5, 3, 64, 64) and train.dtype == torch.float32
        torch.testing.assert_close(train[0], _colour(_TINY_COLOURS["n01"]).expand(3, 64, 64), atol=3 / 255, rtol=0)
        test = bundle.test.get_batch(torch.tensor([0, 1]))
        assert test.shape == (2, 3, 64, 64)  # the 80x50 image is resized and center-cropped to 64x64
        torch.testing.assert_close(test[1], _colour(_TINY_COLOURS["n01"]).expand(3, 64, 64), atol=3 / 255, rtol=0)


def test_tinyimagenet_augment_deterministic(tmp_path: Path) -> None:
    _write_tinyimagenet(tmp_path)
    split = data.load_dataset("tinyimagenet", tmp_path).train
    a = split.get_batch(torch.arange(5), augment=True, generator=torch.Generator().manual_seed(7))
    b = split.get_batch(torch.arange(5), augment=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (5, 3, 64, 64)
    # Same draws as augment_crop_flip on the eval view: pad-4 crop + flip.
    expected = data.augment_crop_flip(split.get_batch(torch.arange(5)), torch.Generator().manual_seed(7))
    assert torch.equal(a, expected)


def test_tinyimagenet_corrupt_image_raises_on_read(tmp_path: Path) -> None:
    folder = _write_tinyimagenet(tmp_path)
    bad = folder / "train" / "n02" / "images" / "n02_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    split = data.load_dataset("tinyimagenet", tmp_path).train  # lazy: loading still works
    split.get_batch(torch.tensor([0, 3]))
    with pytest.raises(DataError) as info:
        split.get_batch(torch.tensor([4]))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_tinyimagenet_bad_annotations(tmp_path: Path) -> None:
    folder = _write_tinyimagenet(tmp_path)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_annotations.txt:1"):
        data.load_dataset("tinyimagenet", tmp_path)
    (folder / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="val_annotations.txt"):
        data.check_dataset("tinyimagenet", tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder layout)
# ---------------------------------------------------------------------------------------------------------------------


def _write_imagenet(root: Path) -> Path:
    folder = root / "imagenet"
    _save_image(folder / "train" / "n03" / "a.JPEG", (250, 250, 250), (300, 260))
    _save_image(folder / "train" / "n03" / "b.JPEG", (250, 250, 250), (260, 300))
    _save_image(folder / "train" / "n01" / "c.JPEG", (20, 20, 20), (257, 257))
    # A lossless horizontal ramp, so that crops and flips are visible.
    ramp = np.broadcast_to(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], (300, 400, 3))
    (folder / "train" / "n02").mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(ramp)).save(folder / "train" / "n02" / "d.png")
    (folder / "train" / "n02" / "notes.txt").write_text("not an image")
    # Left half black, right half white, 512x256 (W x H), lossless, to check the geometry of the eval view.
    halves = np.zeros((256, 512, 3), dtype=np.uint8)
    halves[:, 256:] = 255
    (folder / "val" / "n02").mkdir(parents=True)
    Image.fromarray(halves).save(folder / "val" / "n02" / "halves.png")
    _save_image(folder / "val" / "n03" / "e.JPEG", (250, 250, 250), (120, 90))  # smaller than 224, non-square
    return folder


def test_imagenet_fixture_classes_and_views(tmp_path: Path) -> None:
    folder = _write_imagenet(tmp_path)
    for root in (tmp_path, folder):
        data.check_dataset("imagenet", root)
        bundle = data.load_dataset("imagenet", root)
        assert bundle.info.num_classes == 3 and bundle.info.image_size == 224
        assert bundle.info.augment == "random_resized_crop_flip"
        assert bundle.train.labels.tolist() == [0, 1, 2, 2]  # n01, n02, n03 (a, b)
        assert bundle.test.labels.tolist() == [1, 2]
        train = bundle.train.get_batch(torch.arange(4))
        assert train.shape == (4, 3, 224, 224)
        torch.testing.assert_close(train[0], _colour((20, 20, 20)).expand(3, 224, 224), atol=3 / 255, rtol=0)
        test = bundle.test.get_batch(torch.arange(2))
        assert test.shape == (2, 3, 224, 224)
        # 512x256 -> shorter side already 256 -> center crop columns 144..367: 112 black then 112 white.
        assert torch.equal(test[0, :, :, :110], torch.zeros(3, 224, 110))
        assert torch.equal(test[0, :, :, 114:], torch.ones(3, 224, 110))


def test_imagenet_train_augmentation(tmp_path: Path) -> None:
    _write_imagenet(tmp_path)
    split = data.load_dataset("imagenet", tmp_path).train
    state = torch.get_rng_state()
    a = split.get_batch(torch.arange(4), augment=True, generator=torch.Generator().manual_seed(11))
    b = split.get_batch(torch.arange(4), augment=True, generator=torch.Generator().manual_seed(11))
    c = split.get_batch(torch.arange(4), augment=True, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a[1], c[1])
    # Constant-colour images stay constant under any crop/flip.
    torch.testing.assert_close(a[3], _colour((250, 250, 250)).expand(3, 224, 224), atol=3 / 255, rtol=0)
    # Replay the documented draws per image: crop parameters, then one flip draw.
    replay = torch.Generator().manual_seed(11)
    for i in range(4):
        image = data.read_image(split.paths[i])
        top, left, crop_h, crop_w = data.random_resized_crop_params(image.shape[1], image.shape[2], replay)
        view = TF.resized_crop(image, top, left, crop_h, crop_w, [224, 224], antialias=True)
        if torch.rand(1, generator=replay).item() < 0.5:
            view = view.flip(-1)
        assert torch.equal(a[i], view.float() / 255)


def test_imagenet_val_class_not_in_train(tmp_path: Path) -> None:
    folder = _write_imagenet(tmp_path)
    _save_image(folder / "val" / "n09" / "x.JPEG", (0, 0, 0), (10, 10))
    with pytest.raises(DataError, match="n09"):
        data.load_dataset("imagenet", tmp_path)


def test_random_resized_crop_params_in_range() -> None:
    generator = torch.Generator().manual_seed(0)
    for height, width in [(300, 400), (256, 256), (500, 120)]:
        for _ in range(200):
            top, left, crop_h, crop_w = data.random_resized_crop_params(height, width, generator)
            assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
            # Allow for rounding of the crop sides to whole pixels.
            assert 0.08 * height * width * 0.95 <= crop_h * crop_w <= height * width
            assert 3 / 4 * 0.95 <= crop_w / crop_h <= 4 / 3 * 1.05


def test_random_resized_crop_fallback_is_centered() -> None:
    # A 1000x10 strip: no crop with ratio <= 4/3 and >= 8% of the area fits, so the fallback is used.
    top, left, crop_h, crop_w = data.random_resized_crop_params(10, 1000, torch.Generator().manual_seed(0))
    assert (top, crop_h, crop_w) == (0, 10, 13) and left == (1000 - 13) // 2
    impossible = data.random_resized_crop_params(100, 100, torch.Generator(), scale=(2.0, 3.0), ratio=(1.0, 1.0))
    assert impossible == (0, 0, 100, 100)


# ---------------------------------------------------------------------------------------------------------------------
# augment_crop_flip
# ---------------------------------------------------------------------------------------------------------------------


def test_crop_flip_at_hand_built() -> None:
    x = (torch.arange(16, dtype=torch.float32) + 1).reshape(1, 1, 4, 4)
    # Offset (0, 0) in the 1-padded image: shift down-right by one, zeros enter at the top and left.
    shifted = data.crop_flip_at(x, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]), padding=1)
    expected = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]], dtype=torch.float32)
    assert torch.equal(shifted[0, 0], expected)
    # Offset (2, 1): shift up by one, no horizontal shift; then flipped left-right.
    flipped = data.crop_flip_at(x, torch.tensor([2]), torch.tensor([1]), torch.tensor([True]), padding=1)
    expected = torch.tensor([[8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(flipped[0, 0], expected)
    # Centre offset and no flip is the identity.
    same = data.crop_flip_at(x, torch.tensor([1]), torch.tensor([1]), torch.tensor([False]), padding=1)
    assert torch.equal(same, x)


def test_augment_crop_flip_draw_order_and_determinism() -> None:
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = data.augment_crop_flip(x, torch.Generator().manual_seed(42), padding=2)
    assert out.shape == x.shape
    assert torch.equal(out, data.augment_crop_flip(x, torch.Generator().manual_seed(42), padding=2))
    replay = torch.Generator().manual_seed(42)
    top = torch.randint(0, 5, (6,), generator=replay)
    left = torch.randint(0, 5, (6,), generator=replay)
    flip = torch.rand(6, generator=replay) < 0.5
    assert torch.equal(out, data.crop_flip_at(x, top, left, flip, padding=2))


def test_augment_crop_flip_padding_zero_is_flip_or_identity() -> None:
    x = torch.rand(64, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    out = data.augment_crop_flip(x, torch.Generator().manual_seed(3), padding=0)
    assert torch.equal(torch.get_rng_state(), state)
    replay = torch.Generator().manual_seed(3)
    for _ in range(2):  # the (always zero) top and left offsets are drawn first
        torch.randint(0, 1, (64,), generator=replay)
    flips = torch.rand(64, generator=replay) < 0.5
    assert 10 < int(flips.sum()) < 54  # both outcomes occur
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if flips[i] else x[i])


def test_augment_crop_flip_keeps_most_of_the_image() -> None:
    # With padding p the crop keeps at least (H - 2p) x (W - 2p) of the original image; check sums are bounded.
    x = torch.ones(16, 1, 10, 10)
    out = data.augment_crop_flip(x, torch.Generator().manual_seed(5), padding=4)
    sums = out.sum(dim=(1, 2, 3))
    assert torch.all(sums >= 6 * 6) and torch.all(sums <= 100)
    assert math.isclose(float(out.max()), 1.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_unit_range_into_a_given_tensor_equals_a_fresh_one_bit_for_bit(dtype):
    from harness.imageset import unit_range

    images = torch.randint(0, 256, (3, 2, 5, 4)).to(dtype)
    if dtype != torch.uint8:
        images = images / 255.0
    out = torch.empty(images.shape)
    result = unit_range(images, out=out)
    assert result is out
    assert torch.equal(result.view(torch.int32), unit_range(images).view(torch.int32))
    if dtype == torch.uint8:
        assert torch.equal(result, images.float() / 255)  # the formula itself, not only the two paths agreeing
