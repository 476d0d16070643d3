"""Offline image-classification data sets for the benchmark: the registry, the built-in sets and the entry points.

Every data set is read from local files (nothing is ever downloaded). Images come out of ``ImageSet.get_batch`` as
float32 ``(B, C, H, W)`` tensors in ``[0, 1]``; per-channel normalization is left to the model (``DatasetInfo.mean``
and ``DatasetInfo.std``). Train augmentation draws all its randomness from explicit generators, so that the same
seed always gives bit-identical batches.

Where the parts live: the split contract and the in-memory splits in ``harness.imageset``, augmentation and eval
views in ``harness.augment``, the image-folder sets (TinyImageNet, ImageNet) in ``harness.folder_data``,
Fashion-MNIST and CIFAR (array files held in memory) in ``harness.array_data``; this module holds the registry,
the built-in sets (digits, synthetic) and the entry points, and re-exports the names callers use from the others.

Every missing, incomplete or corrupt data file raises ``DataError`` with a one-line message naming the file.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from harness.array_data import (  # noqa: F401  (re-exported)
    CIFAR10_DIR,
    CIFAR10_TRAIN_FILES,
    CIFAR100_DIR,
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    cifar_folder,
    cifar_layout,
    load_cifar,
    load_fashion_mnist,
    read_idx,
)
from harness.augment import (  # noqa: F401  (re-exported)
    RESIZED_CROP_RATIO,
    RESIZED_CROP_SCALE,
    RESIZED_CROP_TRIES,
    augment_crop_flip,
    crop_flip_at,
    random_resized_crop_params,
    resize_center_crop,
)
from harness.errors import ConfigError
from harness.folder_data import (  # noqa: F401  (re-exported)
    IMAGE_EXTENSIONS,
    IMAGENET_DIR,
    IMAGENET_RESIZE,
    TINYIMAGENET_DIR,
    FolderImageSet,
    imagenet_folder,
    load_imagenet,
    load_tinyimagenet,
    read_image,
    tinyimagenet_folder,
)
from harness.imageset import (  # noqa: F401  (re-exported)
    DataBundle,
    DatasetInfo,
    ImageSet,
    SubsetImageSet,
    TensorImageSet,
    data_error,
    missing,
)

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet", "synthetic")

AUGMENTS: tuple[str, ...] = ("none", "crop_flip", "random_resized_crop_flip")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Train-split statistics of sklearn's digits (values / 16) as one channel; tests/harness/test_data.py recomputes them.
DIGITS_MEAN = 0.3054
DIGITS_STD = 0.3761
DIGITS_TEST_SIZE = 0.2
DIGITS_SPLIT_SEED = 0

# The synthetic set is a fixed data set (like the real ones): the run seed only picks subsets, never the data.
SYNTHETIC_SEED = 0
SYNTHETIC_TRAIN = 512
SYNTHETIC_TEST = 128
SYNTHETIC_NOISE = 0.15
SYNTHETIC_MEAN = 0.4931  # train-split statistics, rechecked in the tests
SYNTHETIC_STD = 0.3080

# Seed offset for the test-subset generator, so the test subset does not depend on whether a train subset was drawn.
_TEST_SUBSET_SEED_OFFSET = 1_000_003

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


_INFOS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, (DIGITS_MEAN,), (DIGITS_STD,), "none"),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "crop_flip"),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip"),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip"),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, 3, 64, _IMAGENET_MEAN, _IMAGENET_STD, "crop_flip"),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD, "random_resized_crop_flip"),
    "synthetic": DatasetInfo("synthetic", 10, 1, 8, (SYNTHETIC_MEAN,), (SYNTHETIC_STD,), "none"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Registry helpers
# ---------------------------------------------------------------------------------------------------------------------

def _how_to_get(name: str, root: Path) -> str:
    hints = {
        "fashion-mnist": f"run `apt-get install dataset-fashion-mnist` or put the four Fashion-MNIST IDX .gz files "
        f"({', '.join(f for pair in FASHION_MNIST_FILES.values() for f in pair)}) in --data-root",
        "cifar10": f"extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into {root} "
        "or pass --data-root",
        "cifar100": f"extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into {root} "
        "or pass --data-root",
        "tinyimagenet": f"extract tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) into {root} "
        "or pass --data-root",
        "imagenet": f"put ILSVRC2012 train/ and val/ in ImageFolder layout (<split>/<wnid>/*.JPEG) under "
        f"{root / IMAGENET_DIR} or pass --data-root",
    }
    return hints[name]


def _validate_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
    """The static ``DatasetInfo`` of a data set (ImageNet's class count is replaced by the folders found on load)."""
    _validate_name(name)
    return _INFOS[name]


def default_data_root(name: str) -> Path | None:
    """Where a data set is looked for without --data-root; None for the built-in sets (digits, synthetic)."""
    _validate_name(name)
    if name in ("digits", "synthetic"):
        return None
    if name == "fashion-mnist":
        return FASHION_MNIST_ROOT
    return Path("data")


def _resolve_root(name: str, data_root: str | Path | None) -> Path:
    root = default_data_root(name) if data_root is None else Path(data_root)
    assert root is not None  # only called for the file-backed sets
    return root


# ---------------------------------------------------------------------------------------------------------------------
# digits and synthetic (built in)
# ---------------------------------------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of sklearn's digits, x as float32 (N, 1, 8, 8) in [0, 1]."""
    # Imported here: scikit-learn takes about a second to import and only this data set needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    try:
        bunch = load_digits()
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise data_error(f"cannot read scikit-learn's bundled digits data: {exc}; reinstall scikit-learn") from exc
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]
    target = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(target)), test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=target
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return images[train_idx], target[train_idx], images[test_idx], target[test_idx]


def _load_digits(_root: Path | None) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    train_x, train_y, test_x, test_y = _digits_arrays()
    train = TensorImageSet(torch.from_numpy(train_x), torch.from_numpy(train_y))
    test = TensorImageSet(torch.from_numpy(test_x), torch.from_numpy(test_y))
    return train, test, _INFOS["digits"]


def _synthetic_split(prototypes: torch.Tensor, count: int, generator: torch.Generator) -> TensorImageSet:
    labels = torch.randint(0, prototypes.shape[0], (count,), generator=generator)
    noise = SYNTHETIC_NOISE * torch.randn((count, *prototypes.shape[1:]), generator=generator)
    return TensorImageSet((prototypes[labels] + noise).clamp(0.0, 1.0), labels)


def _load_synthetic(_root: Path | None) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    info = _INFOS["synthetic"]
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    # One fixed random prototype per class; samples are the prototype plus small noise, so the task is learnable.
    prototypes = torch.rand((info.num_classes, info.in_chans, info.image_size, info.image_size), generator=generator)
    train = _synthetic_split(prototypes, SYNTHETIC_TRAIN, generator)
    test = _synthetic_split(prototypes, SYNTHETIC_TEST, generator)
    return train, test, info


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path | None], tuple[ImageSet, ImageSet, DatasetInfo]]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "fashion-mnist": lambda root: load_fashion_mnist(root, _INFOS["fashion-mnist"], _how_to_get("fashion-mnist", root)),
    "cifar10": lambda root: load_cifar(root, _INFOS["cifar10"], _how_to_get("cifar10", root)),
    "cifar100": lambda root: load_cifar(root, _INFOS["cifar100"], _how_to_get("cifar100", root)),
    "tinyimagenet": lambda root: load_tinyimagenet(root, _INFOS["tinyimagenet"], _how_to_get("tinyimagenet", root)),
    "imagenet": lambda root: load_imagenet(root, _INFOS["imagenet"], _how_to_get("imagenet", root)),
}


def _required_paths(name: str, root: Path) -> list[Path]:
    """Files and folders that must exist for ``name`` (existence only: nothing is opened)."""
    if name == "fashion-mnist":
        return [root / f for pair in FASHION_MNIST_FILES.values() for f in pair]
    if name in ("cifar10", "cifar100"):
        folder = cifar_folder(name, root)
        _, train_files, test_files, _ = cifar_layout(name)
        return [folder] + [folder / f for f in (*train_files, *test_files)]
    if name == "tinyimagenet":
        folder = tinyimagenet_folder(root)
        parts = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
        return [folder] + [folder / p for p in parts]
    folder = imagenet_folder(root)
    return [folder / "train", folder / "val"]


def check_dataset(name: str, data_root: str | Path | None = None) -> None:
    """Cheap check that a data set's files and folders exist (no reading): DataError naming the first missing one."""
    _validate_name(name)
    if name in ("digits", "synthetic"):
        return
    root = _resolve_root(name, data_root)
    for path in _required_paths(name, root):
        if not path.exists():
            raise missing(path, _how_to_get(name, root))


def _validate_subset(size: int | None, what: str) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ConfigError(f"{what} must be a positive integer, got {size!r}")


def _subset(split: ImageSet, size: int | None, seed: int, what: str, dataset: str) -> ImageSet:
    if size is not None and size > len(split):
        split_name = "training" if what == "--train-subset" else "test"
        raise ConfigError(f"{what} {size} is larger than the {dataset} {split_name} split ({len(split)} samples)")
    if size is None or size == len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(split), generator=generator)[:size].sort().values
    return SubsetImageSet(split, indices)


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Load a data set from local files; optional random subsets (deterministic given ``seed``, sorted indices)."""
    _validate_name(name)
    # Validate subset sizes before any (possibly slow) reading.
    _validate_subset(train_subset, "--train-subset")
    _validate_subset(test_subset, "--test-subset")
    root = None if name in ("digits", "synthetic") else _resolve_root(name, data_root)
    train, test, info = _LOADERS[name](root)
    train = _subset(train, train_subset, seed, "--train-subset", name)
    test = _subset(test, test_subset, seed + _TEST_SUBSET_SEED_OFFSET, "--test-subset", name)
    return DataBundle(info=info, train=train, test=test)
