"""Tests for harness.folder_data: the TinyImageNet and ImageNet folder loaders on small fixtures written in the real
on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from harness import data
from harness.errors import DataError


def _save_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int], fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt, quality=95)


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
