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


def test_every_pixel_value_becomes_the_correctly_rounded_quotient():
    """k / 255 rounded once to float32 for every k: the true division (a product by a rounded 1/255, which CUDA makes
    of a division by a Python number, is 1 ulp off for some k, 3 among them)."""
    from fractions import Fraction

    from harness.imageset import unit_range

    values = unit_range(torch.arange(256, dtype=torch.uint8))
    above = torch.nextafter(values, torch.tensor(2.0))
    below = torch.nextafter(values, torch.tensor(-1.0))
    for k in range(256):
        exact = Fraction(k, 255)
        error = abs(Fraction(values[k].item()) - exact)
        assert error <= abs(Fraction(above[k].item()) - exact) and error <= abs(Fraction(below[k].item()) - exact)
    reciprocal = torch.arange(256, dtype=torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)
    assert not torch.equal(reciprocal, values)  # the product differs: the check above can tell them apart


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_batch_off_the_cpu_is_divided_by_a_divisor_on_its_device(device):
    """On the CPU the divisor is the number 255 (ATen's CPU kernel divides by it exactly); anywhere else it is a
    tensor on the batch's device, which takes the true division there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from harness.imageset import unit_range

    divisions = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.div_:
                divisions.append((func, args[1]))
            return func(*args, **(kwargs or {}))

    with Record():
        batch = unit_range(torch.zeros(2, 3, dtype=torch.uint8, device=device))
    assert batch.device.type == device and batch.dtype == torch.float32 and batch.shape == (2, 3)
    [(func, divisor)] = divisions
    if device == "cpu":
        assert divisor == 255.0
    else:
        assert func is torch.ops.aten.div_.Tensor and divisor.device.type == device and divisor.shape == ()
