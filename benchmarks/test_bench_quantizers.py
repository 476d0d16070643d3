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


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sat_weight(benchmark, bits):
    from methods.quant.sat import sat_weight

    weight = torch.randn(64, 64, 3, 3, requires_grad=True)
    benchmark(lambda: sat_weight(weight, bits).sum().backward())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_activation(benchmark, bits):
    from methods.quant.pact import pact_quantize

    x = torch.randn(128, 64, 16, 16, requires_grad=True)
    alpha = torch.tensor(3.0, requires_grad=True)
    benchmark(lambda: pact_quantize(x, alpha, bits).sum().backward())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_activation(benchmark, bits):
    from methods.quant.lsq import lsq_quantize

    x = torch.randn(128, 64, 16, 16, requires_grad=True)
    step = torch.tensor(0.1, requires_grad=True)
    benchmark(lambda: lsq_quantize(x, step, bits).sum().backward())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mbquant_branch_conv(benchmark, bits):
    """MBQuant's grouped branch convolution at b bits (b/2 active 2-bit branches of 16 -> 16 channels)."""
    from methods.quant.branches import BranchConv2d, amortized_selection

    layer = BranchConv2d(16, 16, 3, 1, 1, 4, amortized_selection((2, 4, 8)))
    layer.set_bits(bits)
    x = torch.rand(128, 16 * (bits // 2), 16, 16)
    benchmark(lambda: layer(x).sum().backward())
