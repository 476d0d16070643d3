"""Data sets shipped as array files and held whole in memory: Fashion-MNIST (IDX .gz) and CIFAR-10/100 (pickles).

Each loader checks sizes, magic numbers, keys and label ranges exactly and raises a one-line ``DataError`` naming
the file; the splits are ``TensorImageSet``s of uint8 images.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from harness.imageset import DatasetInfo, ImageSet, TensorImageSet, check_labels, data_error, missing, subdir

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR100_DIR = "cifar-100-python"


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX gz files)
# ---------------------------------------------------------------------------------------------------------------------


def _read_gzip(path: Path, how: str) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise missing(path, how) from exc
    except gzip.BadGzipFile as exc:
        raise data_error(f"{path}: not a valid gzip file ({exc})") from exc
    except (EOFError, zlib.error) as exc:
        raise data_error(f"{path}: truncated or corrupt gzip data ({exc})") from exc
    except OSError as exc:
        raise data_error(f"cannot read {path}: {exc}") from exc


def read_idx(path: Path, magic: int, how: str = "check the file") -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes whose magic number must be ``magic``; exact size checks."""
    raw = _read_gzip(path, how)
    if len(raw) < 4:
        raise data_error(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise data_error(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise data_error(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes after data"
        raise data_error(f"{path}: {what} ({len(raw)} bytes, expected {expected} for dims {list(dims)})")
    # Copy: frombuffer over immutable bytes is read-only, which torch.from_numpy warns about.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fashion_split(root: Path, split: str, info: DatasetInfo, how: str) -> TensorImageSet:
    images_path, labels_path = (root / f for f in FASHION_MNIST_FILES[split])
    images = read_idx(images_path, IDX_IMAGES_MAGIC, how)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, how)
    if images.shape[1:] != (info.image_size, info.image_size):
        size = f"{info.image_size}x{info.image_size}"
        raise data_error(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected {size}")
    if images.shape[0] != labels.shape[0]:
        raise data_error(
            f"{labels_path}: {labels.shape[0]} labels but {images_path.name} has {images.shape[0]} images"
        )
    check_labels(labels, info.num_classes, labels_path)
    return TensorImageSet(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)), info.augment)


def load_fashion_mnist(root: Path, info: DatasetInfo, how: str) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    """The four IDX .gz files of Fashion-MNIST in ``root``; ``how``: where to get them."""
    return _fashion_split(root, "train", info, how), _fashion_split(root, "test", info, how), info


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
        raise missing(path, how) from exc
    except Exception as exc:
        # A corrupt pickle can fail with almost any exception type (EOFError, UnpicklingError, ValueError, ...).
        raise data_error(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise data_error(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # Keys are bytes in files read with encoding='bytes' semantics and str otherwise; accept both.
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int, how: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch as uint8 (N, 3, 32, 32) images and int64 labels."""
    batch = _unpickle(path, how)
    if "data" not in batch or label_key not in batch:
        raise data_error(f"{path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise data_error(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {type(data).__name__} {shape}"
        )
    try:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise data_error(f"{path}: {label_key!r} is not a list of integers") from exc
    if label_array.shape[0] != data.shape[0]:
        raise data_error(f"{path}: {label_array.shape[0]} labels but {data.shape[0]} images")
    check_labels(label_array, num_classes, path)
    # Each row is the R plane, then G, then B, each 32x32 row-major: a plain reshape gives CHW.
    return data.reshape(-1, 3, 32, 32), label_array


def _cifar_split(folder: Path, files: Sequence[str], label_key: str, info: DatasetInfo, how: str) -> TensorImageSet:
    parts = [_cifar_batch(folder / name, label_key, info.num_classes, how) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorImageSet(torch.from_numpy(images), torch.from_numpy(labels), info.augment)


def cifar_layout(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...], str]:
    """(folder name, train files, test files, label key) of a CIFAR variant."""
    if name == "cifar10":
        return CIFAR10_DIR, CIFAR10_TRAIN_FILES, ("test_batch",), "labels"
    return CIFAR100_DIR, ("train",), ("test",), "fine_labels"


def cifar_folder(name: str, root: Path) -> Path:
    dirname, train_files, _, _ = cifar_layout(name)
    return subdir(root, dirname, train_files[0])


def load_cifar(root: Path, info: DatasetInfo, how: str) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    """CIFAR-10 or CIFAR-100 (``info.name``) from torchvision's python pickle folder under ``root``."""
    _, train_files, test_files, label_key = cifar_layout(info.name)
    folder = cifar_folder(info.name, root)
    if not folder.is_dir():
        raise missing(folder, how)
    train = _cifar_split(folder, train_files, label_key, info, how)
    test = _cifar_split(folder, test_files, label_key, info, how)
    return train, test, info
