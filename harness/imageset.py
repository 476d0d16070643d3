"""The split contract (``ImageSet``), the in-memory splits and the one-line data errors every loader raises.

Images come out of ``ImageSet.get_batch`` as float32 ``(B, C, H, W)`` tensors in ``[0, 1]``. Train augmentation
draws all its randomness from an explicit ``torch.Generator`` so that the same generator state always gives
bit-identical batches. Splits read from files (``harness.folder_data``) also decode one sample at a time
(``load_sample``), which is what the epoch loader's worker processes call.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.augment import augment_crop_flip
from harness.errors import DataError


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


class ImageSet(abc.ABC):
    """One split of a data set: labels in memory, images produced batch by batch."""

    labels: torch.Tensor  # int64, shape (N,)
    #: True when images are decoded from files one by one: the epoch loader then feeds ``load_sample`` through a
    #: ``torch.utils.data.DataLoader`` with one augmentation seed per sample, instead of calling ``get_batch``.
    per_sample: bool = False
    #: ``(C, H, W)`` of every ``load_sample`` image when all have one shape (the loader then gives its workers
    #: shared-memory slots of that shape to write batches into), else None.
    sample_shape: tuple[int, int, int] | None = None

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

    def load_sample(self, index: int, augment: bool = False, sample_seed: int | None = None) -> torch.Tensor:
        """One uint8 ``(C, H, W)`` image; with ``augment`` its randomness comes only from ``sample_seed``.

        Only splits with ``per_sample = True`` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} produces whole batches only (get_batch)")

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


def unit_range(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 images in [0, 1]: uint8 divided by 255 in place on the new float copy (one batch-sized allocation),
    float images converted to float32 as they are. ``out``: a float32 tensor of the images' shape to write into
    instead of a new one (the same operations, so the same bits)."""
    if out is None:
        out = images.to(torch.float32)
    else:
        out.copy_(images)
    if images.dtype != torch.uint8:
        return out
    # CUDA divides by a Python number as a product by its reciprocal, which is 1 ulp off the quotient for some
    # pixels (3/255 among them); a divisor held on the device takes the true division, the CPU's values
    divisor = 255.0 if out.device.type == "cpu" else torch.full((), 255.0, dtype=out.dtype, device=out.device)
    return out.div_(divisor)


def as_index(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


def require_generator(generator: torch.Generator | None) -> torch.Generator:
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
        batch = self.images[as_index(indices).to(self.images.device, non_blocking=True)]  # staged: no wait
        batch = unit_range(batch)
        if augment and self.augment == "crop_flip":
            # The crop offsets and flips are drawn on the CPU generator (3 x B numbers) and applied where the
            # images live, so the device path sees exactly the CPU path's augmentation.
            batch = augment_crop_flip(batch, require_generator(generator))
        return batch

    def on_device(self, device: torch.device) -> TensorImageSet:
        # Labels stay on the CPU: methods index and count them there; the loader moves each batch's labels.
        return TensorImageSet(self.images.to(device), self.labels, self.augment)


class SubsetImageSet(ImageSet):
    """A view on selected samples of another split (used for train_subset / test_subset)."""

    def __init__(self, base: ImageSet, indices: torch.Tensor) -> None:
        self.base = base
        self.indices = as_index(indices)
        self.labels = base.labels[self.indices]
        self.per_sample = base.per_sample
        self.sample_shape = base.sample_shape

    def get_batch(
        self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.base.get_batch(self.indices[as_index(indices)], augment=augment, generator=generator)

    def load_sample(self, index: int, augment: bool = False, sample_seed: int | None = None) -> torch.Tensor:
        return self.base.load_sample(int(self.indices[index]), augment, sample_seed)

    def on_device(self, device: torch.device) -> ImageSet | None:
        base = self.base.on_device(device)
        if not isinstance(base, TensorImageSet):
            return None
        # Materialized: a subset held on the device is usually a small fraction of the base split.
        return TensorImageSet(base.images[self.indices.to(device)], self.labels, base.augment)


# ---------------------------------------------------------------------------------------------------------------------
# Errors and small helpers shared by the loaders
# ---------------------------------------------------------------------------------------------------------------------


def data_error(message: str) -> DataError:
    # The CLI prints the message as a single line; wrapped library messages may contain newlines.
    return DataError(" ".join(message.split()))


def missing(path: Path, how: str) -> DataError:
    return data_error(f"{path} not found; {how}")


def check_labels(labels: np.ndarray, num_classes: int, source: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise data_error(f"{source}: label {bad} out of range [0, {num_classes})")


def subdir(root: Path, dirname: str, marker: str) -> Path:
    """``root/dirname`` if present, else ``root`` itself when it already is that folder (contains ``marker``)."""
    nested = root / dirname
    if nested.is_dir():
        return nested
    if (root / marker).exists():
        return root
    return nested
