"""Tests for harness.imageset: the images' conversion to the unit range."""

from __future__ import annotations

import pytest
import torch


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
