"""Image-folder data sets (TinyImageNet, ImageNet): files decoded lazily, one sample at a time.

``FolderImageSet`` keeps only paths and labels in memory. ``load_sample`` decodes one file with torchvision
(libjpeg-turbo / libpng; PIL for what torchvision cannot decode, e.g. 16-bit PNGs) and returns its uint8 view;
the epoch loader (``harness.loader``) calls it from ``torch.utils.data.DataLoader`` worker processes, one sample
seed per sample, so the images do not depend on how many workers or ranks decode them. ``get_batch`` decodes a
whole batch in this process (eval views, features, and the batch-generator augmentation kept for callers that
pass one generator per batch).

Every unreadable or corrupt image raises ``DataError`` with a one-line message naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:  # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; PIL alone still reads every file
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # pragma: no cover - a torchvision without image ops
    decode_image = None

from harness.augment import augment_crop_flip, crop_flip_one, random_resized_crop_flip, resize_center_crop
from harness.imageset import (
    DatasetInfo,
    ImageSet,
    as_index,
    data_error,
    missing,
    require_generator,
    subdir,
    unit_range,
)

TINYIMAGENET_DIR = "tiny-imagenet-200"
IMAGENET_DIR = "imagenet"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
IMAGENET_RESIZE = 256  # eval view: shorter side to 256, then center crop to the image size


def read_image(path: Path) -> torch.Tensor:
    """Read an image file as a uint8 RGB ``(3, H, W)`` tensor; DataError naming the file if it cannot be decoded.

    torchvision decodes JPEG and PNG (about 1.3x faster than PIL on a 500x375 JPEG, and pixel-identical to PIL's
    RGB conversion on the baseline, grayscale, CMYK, palette and RGBA files checked); anything it rejects or
    returns at another depth goes to PIL, whose error names what is wrong with the file.
    """
    if decode_image is not None:
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            if image.dtype == torch.uint8:
                return image
        except RuntimeError:
            pass  # PIL below decodes it or says why it cannot (torchvision's message names its own C++ source)
    try:
        with Image.open(path) as pil_image:
            array = np.array(pil_image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL reports truncated/corrupt files as OSError, unknown formats as UnidentifiedImageError (an OSError).
        raise data_error(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class FolderImageSet(ImageSet):
    """A split of image files decoded (to RGB) when a sample or a batch is requested.

    ``augment`` is "crop_flip" (eval view, then pad-and-crop + flip; TinyImageNet) or "random_resized_crop_flip"
    (ImageNet). The eval view resizes the shorter side to ``resize`` and center-crops ``image_size``.

    Augmentation per sample (``load_sample``): a fresh ``torch.Generator`` seeded with ``sample_seed`` draws the
    crop and the flip. The random-resized crop keeps ``random_resized_crop_params`` (torchvision v2
    ``RandomResizedCrop``'s algorithm on that generator) with v2's ``resized_crop`` kernel, rather than the v2
    transform object, because v2 transforms draw from the global RNG: reseeding it per sample under
    ``fork_rng`` would work too, but an explicit generator touches no process state and gives the same images in
    the main process and in any worker by construction.
    """

    per_sample = True

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
        self.sample_shape = (3, image_size, image_size)  # RGB, cropped to the image size by every view

    def load_sample(self, index: int, augment: bool = False, sample_seed: int | None = None) -> torch.Tensor:
        image = read_image(self.paths[index])
        if not augment:
            return resize_center_crop(image, self.resize, self.image_size)
        if sample_seed is None:
            raise ValueError("augment=True needs a sample_seed")
        generator = torch.Generator().manual_seed(sample_seed)
        if self.augment == "random_resized_crop_flip":
            return random_resized_crop_flip(image, self.image_size, generator)
        return crop_flip_one(resize_center_crop(image, self.resize, self.image_size), generator)

    def get_batch(
        self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        idx = as_index(indices).tolist()
        if augment:
            generator = require_generator(generator)
        if augment and self.augment == "random_resized_crop_flip":
            views = [random_resized_crop_flip(read_image(self.paths[i]), self.image_size, generator) for i in idx]
        else:
            views = [self.load_sample(i) for i in idx]
        if not views:
            return torch.empty(0, 3, self.image_size, self.image_size)
        batch = unit_range(torch.stack(views))
        if augment and self.augment == "crop_flip":
            batch = augment_crop_flip(batch, generator)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# TinyImageNet and ImageNet layouts
# ---------------------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise data_error(f"cannot list {folder}: {exc}") from exc
    return [folder / e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()]


def _read_text_lines(path: Path, how: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise missing(path, how) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise data_error(f"cannot read {path}: {exc}") from exc


def tinyimagenet_folder(root: Path) -> Path:
    return subdir(root, TINYIMAGENET_DIR, "wnids.txt")


def _tinyimagenet_wnids(folder: Path, how: str) -> list[str]:
    path = folder / "wnids.txt"
    wnids = sorted({line.strip() for line in _read_text_lines(path, how) if line.strip()})
    if not wnids:
        raise data_error(f"{path}: no class ids")
    return wnids


def _tinyimagenet_train(folder: Path, wnids: list[str], how: str) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise missing(images_dir, how)
        files = _image_files(images_dir)
        paths += files
        labels += [index] * len(files)
    return paths, labels


def _tinyimagenet_val(folder: Path, wnids: list[str], how: str) -> tuple[list[Path], list[int]]:
    annotations = folder / "val" / "val_annotations.txt"
    images_dir = folder / "val" / "images"
    if not images_dir.is_dir():
        raise missing(images_dir, how)
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for line_no, line in enumerate(_read_text_lines(annotations, how), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in class_index:
            raise data_error(
                f"{annotations}:{line_no}: expected 'filename<TAB>wnid<TAB>...' with a wnid from wnids.txt"
            )
        paths.append(images_dir / fields[0].strip())
        labels.append(class_index[fields[1].strip()])
    return paths, labels


def load_tinyimagenet(root: Path, info: DatasetInfo, how: str) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    """Train and val splits of ``tiny-imagenet-200/`` (classes: sorted wnids.txt); ``how``: where to get it."""
    folder = tinyimagenet_folder(root)
    if not folder.is_dir():
        raise missing(folder, how)
    wnids = _tinyimagenet_wnids(folder, how)
    info = dataclasses.replace(info, num_classes=len(wnids))
    size = info.image_size
    splits = [_tinyimagenet_train(folder, wnids, how), _tinyimagenet_val(folder, wnids, how)]
    train, test = (FolderImageSet(p, torch.tensor(y, dtype=torch.long), size, size, info.augment) for p, y in splits)
    return train, test, info


def imagenet_folder(root: Path) -> Path:
    return subdir(root, IMAGENET_DIR, "train")


def _class_dirs(split_dir: Path, how: str) -> list[str]:
    if not split_dir.is_dir():
        raise missing(split_dir, how)
    try:
        return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    except OSError as exc:
        raise data_error(f"cannot list {split_dir}: {exc}") from exc


def _imagenet_split(split_dir: Path, class_index: dict[str, int], how: str) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for wnid in _class_dirs(split_dir, how):
        if wnid not in class_index:
            raise data_error(f"{split_dir / wnid}: class folder not present in the train split")
        files = _image_files(split_dir / wnid)
        paths += files
        labels += [class_index[wnid]] * len(files)
    if not paths:
        raise data_error(f"{split_dir}: no .JPEG/.jpg/.png images in its class folders")
    return paths, labels


def load_imagenet(root: Path, info: DatasetInfo, how: str) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    """Train and val splits of ``imagenet/{train,val}/<wnid>/*`` (classes: the train folders, sorted)."""
    folder = imagenet_folder(root)
    wnids = _class_dirs(folder / "train", how)
    if not wnids:
        raise data_error(f"{folder / 'train'}: no class folders")
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    info = dataclasses.replace(info, num_classes=len(wnids))
    sets = []
    for split in ("train", "val"):
        paths, labels = _imagenet_split(folder / split, class_index, how)
        sets.append(FolderImageSet(paths, torch.tensor(labels), info.image_size, IMAGENET_RESIZE, info.augment))
    return sets[0], sets[1], info


