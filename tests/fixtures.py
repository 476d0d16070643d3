"""Writers of tiny data sets in the real on-disk formats (shared by tests that run presets end to end)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root: Path, dataset: str, train: int = 10, test: int = 4, seed: int = 0) -> Path:
    """CIFAR-10 (five data batches + test batch) or CIFAR-100 (train + test) python pickles."""
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "cifar10" else 100
    label_key = b"labels" if dataset == "cifar10" else b"fine_labels"

    def batch(count: int) -> dict:
        return {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                label_key: [int(v) for v in rng.integers(0, classes, count)]}

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for index, count in enumerate(np.array_split(np.arange(train), 5), start=1):
            _pickle(folder / f"data_batch_{index}", batch(len(count)))
        _pickle(folder / "test_batch", batch(test))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _pickle(folder / "train", batch(train))
        _pickle(folder / "test", batch(test))
    return folder


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def write_imagefolder(root: Path, classes: int = 2, per_class: int = 2, size: tuple[int, int] = (40, 30)) -> Path:
    """ImageNet layout: imagenet/{train,val}/<wnid>/*.JPEG."""
    folder = root / "imagenet"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            target = folder / split / f"n{c:08d}"
            target.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(target / f"img_{i}.JPEG", format="JPEG")
    return folder


def write_tinyimagenet(root: Path, classes: int = 2, per_class: int = 3, val: int = 4, size: int = 64) -> Path:
    """tiny-imagenet-200/ layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(1)
    wnids = [f"n{c:08d}" for c in range(classes)]
    for wnid in wnids:
        target = folder / "train" / wnid / "images"
        target.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(target / f"{wnid}_{i}.JPEG", format="JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t1\t1")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return folder


def write_fashion_mnist(root: Path, train: int = 10, test: int = 4) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count).astype(np.uint8)
        _gz(root / f"{prefix}-images-idx3-ubyte.gz", struct.pack(">IIII", 0x803, count, 28, 28) + images.tobytes())
        _gz(root / f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">II", 0x801, count) + labels.tobytes())
    return root


def _gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(payload)


def write_dataset(root: Path, dataset: str) -> Path:
    """A tiny copy of ``dataset`` under ``root``; returns the --data-root to pass."""
    if dataset in ("cifar10", "cifar100"):
        write_cifar(root, dataset)
    elif dataset == "imagenet":
        write_imagefolder(root)
    elif dataset == "tinyimagenet":
        write_tinyimagenet(root)
    elif dataset == "fashion-mnist":
        write_fashion_mnist(root)
    else:
        raise ValueError(dataset)
    return root
