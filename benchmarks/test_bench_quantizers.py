"""Quantizer forward+backward throughput per bit-width (a 3x3 conv weight of 64x64 channels, activations
of a batch of 128 at 16x16x64)."""

import pytest
import torch

from methods.quant.dorefa import dorefa_activation, dorefa_weight


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_dorefa_weight(benchmark, bits):
    weight = torch.randn(64, 64, 3, 3, requires_grad=True)

    def step():
        dorefa_weight(weight, bits).sum().backward()

    benchmark(step)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_dorefa_activation(benchmark, bits):
    x = torch.randn(128, 64, 16, 16, requires_grad=True)

    def step():
        dorefa_activation(x, bits).sum().backward()

    benchmark(step)
