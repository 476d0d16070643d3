"""EMQ's weight bias correction (Eq. 2): the formula element-wise, the matched variance, the gradient."""

import math

import pytest
import torch

from methods.quant.bias_correction import BiasCorrectedQuantizer, bias_correct
from methods.quant.dorefa import dorefa_weight
from methods.quant.statsq import statsq_weight


def test_formula_element_wise_on_a_given_tensor():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])  # E = 2.5, V = 1.25 (population)
    quantized = torch.tensor([0.0, 0.0, 4.0, 4.0])  # E = 2,   V = 4
    scale, shift = math.sqrt(1.25 / 4.0), 2.5 - 2.0
    expected = torch.tensor([scale * (0 + shift), scale * (0 + shift), scale * (4 + shift), scale * (4 + shift)])
    corrected = bias_correct(quantized, reference)
    torch.testing.assert_close(corrected, expected, rtol=1e-7, atol=0)
    assert corrected.var(correction=0).item() == pytest.approx(1.25, rel=1e-6)
    # Applied literally, the scale multiplies the shifted weight: the mean becomes scale * E[w], not E[w].
    assert corrected.mean().item() == pytest.approx(scale * 2.5, rel=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("quantizer", [dorefa_weight, statsq_weight])
def test_corrected_weight_has_the_variance_of_the_32_bit_weight(bits, quantizer):
    torch.manual_seed(bits)
    latent = torch.randn(16, 8, 3, 3) * 0.1 + 0.02
    corrected = BiasCorrectedQuantizer(quantizer)(latent, bits)
    reference = quantizer(latent, 32)
    quantized = quantizer(latent, bits)
    scale = torch.sqrt(reference.var(correction=0) / quantized.var(correction=0))
    torch.testing.assert_close(corrected.var(correction=0), reference.var(correction=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(corrected.mean(), scale * reference.mean(), rtol=1e-5, atol=1e-9)
    # Same check with the unbiased estimator: both sides use one estimator, so the ratio carries over.
    torch.testing.assert_close(corrected.var(), reference.var(), rtol=1e-5, atol=0)


def test_per_channel_statistics_match_each_output_channel():
    torch.manual_seed(0)
    latent = torch.randn(6, 4, 3, 3) * torch.linspace(0.05, 0.5, 6).view(6, 1, 1, 1)
    corrected = BiasCorrectedQuantizer(dorefa_weight, "per_channel")(latent, 2)
    reference = dorefa_weight(latent, 32)
    dims = (1, 2, 3)
    torch.testing.assert_close(corrected.var(dim=dims, correction=0), reference.var(dim=dims, correction=0),
                               rtol=1e-5, atol=0)
    layer_wise = BiasCorrectedQuantizer(dorefa_weight, "per_layer")(latent, 2)
    assert not torch.allclose(layer_wise.var(dim=dims, correction=0), reference.var(dim=dims, correction=0),
                              rtol=1e-3)


def test_32_bits_is_the_uncorrected_32_bit_weight():
    latent = torch.randn(4, 3, 3, 3)
    assert torch.equal(BiasCorrectedQuantizer(dorefa_weight)(latent, 32), dorefa_weight(latent, 32))


def test_statistics_carry_no_gradient_the_weight_gets_scale_times_ste_gradient():
    torch.manual_seed(1)
    latent = (torch.randn(5, 7) * 0.3).requires_grad_(True)
    upstream = torch.randn(5, 7)
    (BiasCorrectedQuantizer(statsq_weight)(latent, 3) * upstream).sum().backward()
    corrected_grad = latent.grad.clone()
    latent.grad = None
    (statsq_weight(latent, 3) * upstream).sum().backward()
    with torch.no_grad():
        quantized = statsq_weight(latent, 3)
        scale = torch.sqrt(latent.var(correction=0) / quantized.var(correction=0))
    torch.testing.assert_close(corrected_grad, scale * latent.grad)


def test_a_constant_quantized_tensor_keeps_scale_one():
    corrected = bias_correct(torch.full((4,), 0.5), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(corrected, torch.full((4,), 0.5 + 2.0))
