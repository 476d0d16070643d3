"""Offline image-classification data sets for the benchmark: loaders, splits, eval views and train augmentation.

Every data set is read from local files (nothing is ever downloaded). Images come out of ``ImageSet.get_batch`` as
float32 ``(B, C, H, W)`` tensors in ``[0, 1]``; per-channel normalization is left to the model (``DatasetInfo.mean``
and ``DatasetInfo.std``). Train augmentation draws all its randomness from an explicit ``torch.Generator`` so that the
same generator state always gives bit-identical batches.

Every missing, incomplete or corrupt data file raises ``DataError`` with a one-line message naming the file.
"""

from __future__ import annotations

import abc
import dataclasses
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from harness.errors import ConfigError, DataError

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet", "synthetic")

AUGMENTS: tuple[str, ...] = ("none", "crop_flip", "random_resized_crop_flip")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR100_DIR = "cifar-100-python"
TINYIMAGENET_DIR = "tiny-imagenet-200"
IMAGENET_DIR = "imagenet"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

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

IMAGENET_RESIZE = 256  # eval view: shorter side to 256, then center crop to the image size
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RESIZED_CROP_TRIES = 10

# Seed offset for the test-subset generator, so the test subset does not depend on whether a train subset was drawn.
_TEST_SUBSET_SEED_OFFSET = 1_000_003

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set: what the model sees and how the train split is augmented."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str


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
# Splits
# ---------------------------------------------------------------------------------------------------------------------


class ImageSet(abc.ABC):
    """One split of a data set: labels in memory, images produced batch by batch."""

    labels: torch.Tensor  # int64, shape (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abc.abstractmethod
    def get_batch(
        self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Float32 ``(B, C, H, W)`` images in ``[0, 1]`` in the order of ``indices``.

        ``augment=True`` applies the data set's train augmentation with randomness drawn only from ``generator``;
        ``augment=False`` gives the deterministic eval view.
        """

    def on_device(self, device: torch.device) -> ImageSet | None:
        """A copy held in ``device`` memory whose batches come out there (augmentation included), or ``None``
        if this split cannot be held there (files read lazily)."""
        return None


@dataclass(frozen=True)
class DataBundle:
    """A loaded data set: its description and its train and test splits."""

    info: DatasetInfo
    train: ImageSet
    test: ImageSet


def _as_index(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


def _require_generator(generator: torch.Generator | None) -> torch.Generator:
    # A silent fallback to the global RNG would break bit-reproducibility, so a missing generator is a bug.
    if generator is None:
        raise ValueError("augment=True needs an explicit torch.Generator")
    return generator


class TensorImageSet(ImageSet):
    """A split held in memory: uint8 images (scaled by 1/255 on the way out) or float images already in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: str = "none") -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        if augment not in ("none", "crop_flip"):
            raise ValueError(f"in-memory sets support augment 'none' or 'crop_flip', not {augment!r}")
        self.images = images
        self.labels = labels.to(torch.long)
        self.augment = augment

    def get_batch(
        self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        batch = self.images[_as_index(indices).to(self.images.device)]
        batch = batch.to(torch.float32) / 255.0 if batch.dtype == torch.uint8 else batch.to(torch.float32)
        if augment and self.augment == "crop_flip":
            # The crop offsets and flips are drawn on the CPU generator (3 x B numbers) and applied where the
            # images live, so the device path sees exactly the CPU path's augmentation.
            batch = augment_crop_flip(batch, _require_generator(generator))
        return batch

    def on_device(self, device: torch.device) -> TensorImageSet:
        # Labels stay on the CPU: methods index and count them there; the loader moves each batch's labels.
        return TensorImageSet(self.images.to(device), self.labels, self.augment)


class SubsetImageSet(ImageSet):
    """A view on selected samples of another split (used for train_subset / test_subset)."""

    def __init__(self, base: ImageSet, indices: torch.Tensor) -> None:
        self.base = base
        self.indices = _as_index(indices)
        self.labels = base.labels[self.indices]

    def get_batch(
        self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.base.get_batch(self.indices[_as_index(indices)], augment=augment, generator=generator)

    def on_device(self, device: torch.device) -> ImageSet | None:
        base = self.base.on_device(device)
        if not isinstance(base, TensorImageSet):
            return None
        # Materialized: a subset held on the device is usually a small fraction of the base split.
        return TensorImageSet(base.images[self.indices.to(device)], self.labels, base.augment)


class FolderImageSet(ImageSet):
    """A split of image files read lazily with PIL (converted to RGB) when a batch is requested.

    ``augment`` is "crop_flip" (eval view, then pad-and-crop + flip; TinyImageNet) or "random_resized_crop_flip"
    (ImageNet). The eval view resizes the shorter side to ``resize`` and center-crops ``image_size``.
    """

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, image_size: int, resize: int, augment: str) -> None:
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} paths but {labels.shape[0]} labels")
        if augment not in ("crop_flip", "random_resized_crop_flip"):
            raise ValueError(f"folder sets support augment 'crop_flip' or 'random_resized_crop_flip', not {augment!r}")
        self.paths = list(paths)
        self.labels = labels.to(torch.long)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment

    def get_batch(
        self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        idx = _as_index(indices).tolist()
        if augment:
            generator = _require_generator(generator)
        if augment and self.augment == "random_resized_crop_flip":
            views = [self._random_resized_view(read_image(self.paths[i]), generator) for i in idx]
        else:
            views = [resize_center_crop(read_image(self.paths[i]), self.resize, self.image_size) for i in idx]
        if not views:
            return torch.empty(0, 3, self.image_size, self.image_size)
        batch = torch.stack(views).to(torch.float32) / 255.0
        if augment and self.augment == "crop_flip":
            batch = augment_crop_flip(batch, generator)
        return batch

    def _random_resized_view(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left, crop_h, crop_w = random_resized_crop_params(height, width, generator)
        size = [self.image_size, self.image_size]
        view = TF.resized_crop(image, top, left, crop_h, crop_w, size, antialias=True)
        if bool(torch.rand(1, generator=generator).item() < 0.5):
            view = view.flip(-1)
        return view


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation and views
# ---------------------------------------------------------------------------------------------------------------------


def crop_flip_at(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Zero-pad ``(B, C, H, W)`` by ``padding``, crop sample b at (top[b], left[b]) back to HxW, flip where flip[b].

    ``top``/``left`` are offsets into the padded image, in ``[0, 2 * padding]``; the deterministic core of
    ``augment_crop_flip``.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = top.to(device=x.device, dtype=torch.long)
    left = left.to(device=x.device, dtype=torch.long)
    flip = flip.to(device=x.device, dtype=torch.bool)
    rows = top[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # reading columns right to left is the horizontal flip
    channels_last = padded.permute(0, 2, 3, 1)  # advanced indexing over (B, H, W) keeps C as the trailing dim
    gathered = channels_last[torch.arange(batch, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2).contiguous()


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per sample: zero-pad by ``padding``, random crop back to HxW, random horizontal flip with p=0.5.

    Draws, in this order and only from ``generator``: ``top = randint(0, 2p+1, (B,))``, ``left = randint(0, 2p+1,
    (B,))``, ``flip = rand(B) < 0.5``.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch = x.shape[0]
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return crop_flip_at(x, top, left, flip, padding)


def random_resized_crop_params(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RESIZED_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Sample ``(top, left, crop_h, crop_w)`` for RandomResizedCrop using only ``generator``.

    Area fraction is uniform in ``scale`` and aspect ratio (w/h) log-uniform in ``ratio``; after
    ``RESIZED_CROP_TRIES`` draws that do not fit, fall back to the largest centered crop with a ratio in range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RESIZED_CROP_TRIES):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator).item())
            return top, left, crop_h, crop_w
    return _center_crop_params(height, width, ratio)


def _center_crop_params(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, max(1, min(height, round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, max(1, min(width, round(height * ratio[1])))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_center_crop(image: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """Eval view of a ``(C, H, W)`` image: shorter side to ``resize`` (skipped if already), then center crop."""
    if min(image.shape[-2:]) != resize:
        image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [crop, crop])


def read_image(path: Path) -> torch.Tensor:
    """Read an image file as a uint8 RGB ``(3, H, W)`` tensor; DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL reports truncated/corrupt files as OSError, unknown formats as UnidentifiedImageError (an OSError).
        raise _data_error(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Errors and small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _data_error(message: str) -> DataError:
    # The CLI prints the message as a single line; wrapped library messages may contain newlines.
    return DataError(" ".join(message.split()))


def _missing(path: Path, how: str) -> DataError:
    return _data_error(f"{path} not found; {how}")


def _check_labels(labels: np.ndarray, num_classes: int, source: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise _data_error(f"{source}: label {bad} out of range [0, {num_classes})")


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


def _subdir(root: Path, dirname: str, marker: str) -> Path:
    """``root/dirname`` if present, else ``root`` itself when it already is that folder (contains ``marker``)."""
    nested = root / dirname
    if nested.is_dir():
        return nested
    if (root / marker).exists():
        return root
    return nested


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
        raise _data_error(f"cannot read scikit-learn's bundled digits data: {exc}; reinstall scikit-learn") from exc
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
# Fashion-MNIST (IDX gz files)
# ---------------------------------------------------------------------------------------------------------------------


def _read_gzip(path: Path, how: str) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise _missing(path, how) from exc
    except gzip.BadGzipFile as exc:
        raise _data_error(f"{path}: not a valid gzip file ({exc})") from exc
    except (EOFError, zlib.error) as exc:
        raise _data_error(f"{path}: truncated or corrupt gzip data ({exc})") from exc
    except OSError as exc:
        raise _data_error(f"cannot read {path}: {exc}") from exc


def read_idx(path: Path, magic: int, how: str = "check the file") -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes whose magic number must be ``magic``; exact size checks."""
    raw = _read_gzip(path, how)
    if len(raw) < 4:
        raise _data_error(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise _data_error(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _data_error(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes after data"
        raise _data_error(f"{path}: {what} ({len(raw)} bytes, expected {expected} for dims {list(dims)})")
    # Copy: frombuffer over immutable bytes is read-only, which torch.from_numpy warns about.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fashion_split(root: Path, split: str, info: DatasetInfo) -> TensorImageSet:
    how = _how_to_get("fashion-mnist", root)
    images_path, labels_path = (root / f for f in FASHION_MNIST_FILES[split])
    images = read_idx(images_path, IDX_IMAGES_MAGIC, how)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, how)
    if images.shape[1:] != (info.image_size, info.image_size):
        size = f"{info.image_size}x{info.image_size}"
        raise _data_error(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected {size}")
    if images.shape[0] != labels.shape[0]:
        raise _data_error(
            f"{labels_path}: {labels.shape[0]} labels but {images_path.name} has {images.shape[0]} images"
        )
    _check_labels(labels, info.num_classes, labels_path)
    return TensorImageSet(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)), info.augment)


def _load_fashion_mnist(root: Path | None) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    assert root is not None
    info = _INFOS["fashion-mnist"]
    return _fashion_split(root, "train", info), _fashion_split(root, "test", info), info


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# ---------------------------------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds what CIFAR batches contain (numpy arrays), so a data file cannot run code."""

    _ALLOWED_MODULES = frozenset(
        {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"}
    )
    _ALLOWED_NAMES = frozenset({"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"})

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode") or (module in self._ALLOWED_MODULES and name in self._ALLOWED_NAMES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _unpickle(path: Path, how: str) -> dict[str, object]:
    try:
        with open(path, "rb") as handle:
            # latin1 decodes Python 2 str payloads byte for byte, which numpy arrays in the original files need.
            obj = _CifarUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise _missing(path, how) from exc
    except Exception as exc:
        # A corrupt pickle can fail with almost any exception type (EOFError, UnpicklingError, ValueError, ...).
        raise _data_error(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise _data_error(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # Keys are bytes in files read with encoding='bytes' semantics and str otherwise; accept both.
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int, how: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch as uint8 (N, 3, 32, 32) images and int64 labels."""
    batch = _unpickle(path, how)
    if "data" not in batch or label_key not in batch:
        raise _data_error(f"{path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise _data_error(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {type(data).__name__} {shape}"
        )
    try:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise _data_error(f"{path}: {label_key!r} is not a list of integers") from exc
    if label_array.shape[0] != data.shape[0]:
        raise _data_error(f"{path}: {label_array.shape[0]} labels but {data.shape[0]} images")
    _check_labels(label_array, num_classes, path)
    # Each row is the R plane, then G, then B, each 32x32 row-major: a plain reshape gives CHW.
    return data.reshape(-1, 3, 32, 32), label_array


def _cifar_split(folder: Path, files: Sequence[str], label_key: str, info: DatasetInfo, how: str) -> TensorImageSet:
    parts = [_cifar_batch(folder / name, label_key, info.num_classes, how) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorImageSet(torch.from_numpy(images), torch.from_numpy(labels), info.augment)


def _cifar_layout(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...], str]:
    """(folder name, train files, test files, label key) of a CIFAR variant."""
    if name == "cifar10":
        return CIFAR10_DIR, CIFAR10_TRAIN_FILES, ("test_batch",), "labels"
    return CIFAR100_DIR, ("train",), ("test",), "fine_labels"


def _cifar_folder(name: str, root: Path) -> Path:
    dirname, train_files, _, _ = _cifar_layout(name)
    return _subdir(root, dirname, train_files[0])


def _load_cifar(name: str, root: Path | None) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    assert root is not None
    info = _INFOS[name]
    _, train_files, test_files, label_key = _cifar_layout(name)
    folder = _cifar_folder(name, root)
    how = _how_to_get(name, root)
    if not folder.is_dir():
        raise _missing(folder, how)
    train = _cifar_split(folder, train_files, label_key, info, how)
    test = _cifar_split(folder, test_files, label_key, info, how)
    return train, test, info


# ---------------------------------------------------------------------------------------------------------------------
# TinyImageNet and ImageNet (image folders, read lazily)
# ---------------------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise _data_error(f"cannot list {folder}: {exc}") from exc
    return [folder / e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()]


def _read_text_lines(path: Path, how: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise _missing(path, how) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _data_error(f"cannot read {path}: {exc}") from exc


def _tinyimagenet_folder(root: Path) -> Path:
    return _subdir(root, TINYIMAGENET_DIR, "wnids.txt")


def _tinyimagenet_wnids(folder: Path, how: str) -> list[str]:
    path = folder / "wnids.txt"
    wnids = sorted({line.strip() for line in _read_text_lines(path, how) if line.strip()})
    if not wnids:
        raise _data_error(f"{path}: no class ids")
    return wnids


def _tinyimagenet_train(folder: Path, wnids: list[str], how: str) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise _missing(images_dir, how)
        files = _image_files(images_dir)
        paths += files
        labels += [index] * len(files)
    return paths, labels


def _tinyimagenet_val(folder: Path, wnids: list[str], how: str) -> tuple[list[Path], list[int]]:
    annotations = folder / "val" / "val_annotations.txt"
    images_dir = folder / "val" / "images"
    if not images_dir.is_dir():
        raise _missing(images_dir, how)
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for line_no, line in enumerate(_read_text_lines(annotations, how), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in class_index:
            raise _data_error(
                f"{annotations}:{line_no}: expected 'filename<TAB>wnid<TAB>...' with a wnid from wnids.txt"
            )
        paths.append(images_dir / fields[0].strip())
        labels.append(class_index[fields[1].strip()])
    return paths, labels


def _load_tinyimagenet(root: Path | None) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    assert root is not None
    info = _INFOS["tinyimagenet"]
    how = _how_to_get("tinyimagenet", root)
    folder = _tinyimagenet_folder(root)
    if not folder.is_dir():
        raise _missing(folder, how)
    wnids = _tinyimagenet_wnids(folder, how)
    info = dataclasses.replace(info, num_classes=len(wnids))
    size = info.image_size
    splits = [_tinyimagenet_train(folder, wnids, how), _tinyimagenet_val(folder, wnids, how)]
    train, test = (FolderImageSet(p, torch.tensor(y, dtype=torch.long), size, size, info.augment) for p, y in splits)
    return train, test, info


def _imagenet_folder(root: Path) -> Path:
    return _subdir(root, IMAGENET_DIR, "train")


def _class_dirs(split_dir: Path, how: str) -> list[str]:
    if not split_dir.is_dir():
        raise _missing(split_dir, how)
    try:
        return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    except OSError as exc:
        raise _data_error(f"cannot list {split_dir}: {exc}") from exc


def _imagenet_split(split_dir: Path, class_index: dict[str, int], how: str) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for wnid in _class_dirs(split_dir, how):
        if wnid not in class_index:
            raise _data_error(f"{split_dir / wnid}: class folder not present in the train split")
        files = _image_files(split_dir / wnid)
        paths += files
        labels += [class_index[wnid]] * len(files)
    if not paths:
        raise _data_error(f"{split_dir}: no .JPEG/.jpg/.png images in its class folders")
    return paths, labels


def _load_imagenet(root: Path | None) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    assert root is not None
    how = _how_to_get("imagenet", root)
    folder = _imagenet_folder(root)
    wnids = _class_dirs(folder / "train", how)
    if not wnids:
        raise _data_error(f"{folder / 'train'}: no class folders")
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    info = dataclasses.replace(_INFOS["imagenet"], num_classes=len(wnids))
    sets = []
    for split in ("train", "val"):
        paths, labels = _imagenet_split(folder / split, class_index, how)
        sets.append(FolderImageSet(paths, torch.tensor(labels), info.image_size, IMAGENET_RESIZE, info.augment))
    return sets[0], sets[1], info


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path | None], tuple[ImageSet, ImageSet, DatasetInfo]]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": lambda root: _load_cifar("cifar10", root),
    "cifar100": lambda root: _load_cifar("cifar100", root),
    "tinyimagenet": _load_tinyimagenet,
    "imagenet": _load_imagenet,
}


def _required_paths(name: str, root: Path) -> list[Path]:
    """Files and folders that must exist for ``name`` (existence only: nothing is opened)."""
    if name == "fashion-mnist":
        return [root / f for pair in FASHION_MNIST_FILES.values() for f in pair]
    if name in ("cifar10", "cifar100"):
        folder = _cifar_folder(name, root)
        _, train_files, test_files, _ = _cifar_layout(name)
        return [folder] + [folder / f for f in (*train_files, *test_files)]
    if name == "tinyimagenet":
        folder = _tinyimagenet_folder(root)
        parts = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
        return [folder] + [folder / p for p in parts]
    folder = _imagenet_folder(root)
    return [folder / "train", folder / "val"]


def check_dataset(name: str, data_root: str | Path | None = None) -> None:
    """Cheap check that a data set's files and folders exist (no reading): DataError naming the first missing one."""
    _validate_name(name)
    if name in ("digits", "synthetic"):
        return
    root = _resolve_root(name, data_root)
    for path in _required_paths(name, root):
        if not path.exists():
            raise _missing(path, _how_to_get(name, root))


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
