"""Tests for harness.data: the data-set registry, the built-in sets (digits, synthetic) and train subsets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import data
from harness.errors import ConfigError, DataError


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
