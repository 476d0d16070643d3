"""Tests for harness.augment: crop, flip and random-resized-crop draws and their determinism."""

from __future__ import annotations

import math

import torch

from harness import data


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
