"""SAT nested weight quantizer and the AdaBits conv / linear layers against hand-computed values (adabits spec,
"Weight quantizer")."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from methods.quant.pact import SwitchablePACT
from methods.quant.sat import SATConv2d, SATLinear, sat_normalize, sat_rescale_factor, sat_weight

# w = [-2, -0.5, 0, 0.3, 1, 2]: tanh(w) = [-0.964028, -0.462117, 0, 0.291313, 0.761594, 0.964028];
# w~ = tanh / max|tanh| = [-1, -0.479361, 0, 0.302183, 0.790013, 1]; u = (w~ + 1) / 2 = [0, 0.26032, 0.5, 0.65109,
# 0.89501, 1]. Codes min(floor(2^b u), 2^b - 1):
#   b=1: 2u = [0, 0.52, 1, 1.30, 1.79, 2]           -> [0, 0, 1, 1, 1, 1]   (2 clamps to 1)
#   b=2: 4u = [0, 1.04, 2, 2.60, 3.58, 4]           -> [0, 1, 2, 2, 3, 3]
#   b=3: 8u = [0, 2.08, 4, 5.21, 7.16, 8]           -> [0, 2, 4, 5, 7, 7]
#   b=8: 256u = [0, 66.64, 128, 166.68, 229.12, 256] -> [0, 66, 128, 166, 229, 255]
# and W_q = -1 + 2 code / 2^b (levels include -1 and 0, never +1).
WEIGHT = [-2.0, -0.5, 0.0, 0.3, 1.0, 2.0]
CODES = {1: [0, 0, 1, 1, 1, 1], 2: [0, 1, 2, 2, 3, 3], 3: [0, 2, 4, 5, 7, 7], 8: [0, 66, 128, 166, 229, 255]}


def codes_of(quantized: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes back from W_q = 2 code / 2^b - 1 (exact in float32)."""
    codes = (quantized + 1) * 2 ** (bits - 1)
    assert torch.equal(codes, codes.round())
    return codes.long()


@pytest.mark.parametrize("bits", sorted(CODES))
def test_weight_levels_match_hand_computation(bits):
    expected = torch.tensor([-1 + 2 * c / 2**bits for c in CODES[bits]])
    quantized = sat_weight(torch.tensor(WEIGHT), bits)
    torch.testing.assert_close(quantized, expected, rtol=0, atol=0)
    assert codes_of(quantized, bits).tolist() == CODES[bits]


def test_32_bits_is_the_normalized_weight():
    expected = torch.tanh(torch.tensor(WEIGHT)) / math.tanh(2.0)
    torch.testing.assert_close(sat_weight(torch.tensor(WEIGHT), 32), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 10.0])
def test_b_bit_code_is_the_8_bit_code_shifted_right(scale):
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(32, 32, 3, 3, generator=generator) * scale
    weight = torch.cat([half, -half])  # holds both +max and -max, so codes 0 and 255 both occur
    eight = codes_of(sat_weight(weight, 8), 8)
    assert eight.min() == 0 and eight.max() == 255  # the extremes (u = 0 and u = 1) are covered
    for bits in range(1, 9):
        assert torch.equal(codes_of(sat_weight(weight, bits), bits), eight >> (8 - bits)), bits


def test_gradient_passes_straight_through_the_floor():
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(len(WEIGHT), generator=generator)
    quantized_input = torch.tensor(WEIGHT, requires_grad=True)
    (sat_weight(quantized_input, 3) * upstream).sum().backward()
    # W_q = 2 (u + (q - u).detach()) - 1 has the gradient of 2u - 1 = w~.
    normalized_input = torch.tensor(WEIGHT, requires_grad=True)
    (sat_normalize(normalized_input) * upstream).sum().backward()
    torch.testing.assert_close(quantized_input.grad, normalized_input.grad, rtol=1e-6, atol=1e-7)
    assert quantized_input.grad.abs().sum() > 0


# W_q at 2 bits = [-1, -0.5, 0, 0, 0.5, 0.5]: mean -1/12, sum of squares 1.75, unbiased variance
# (1.75 - 6/144) / 5 = 0.3416667, std 0.5845226. A conv of shape (2, 3, 1, 1) has n_out = 2 * 1 * 1 = 2:
# factor = 1 / (sqrt(2) * 0.5845226) = 1.2097167.
FACTOR_2BIT_FANOUT_2 = 1.2097167


def test_rescale_factor_matches_hand_computation():
    factor = sat_rescale_factor(sat_weight(torch.tensor(WEIGHT), 2), 2)
    assert factor.item() == pytest.approx(FACTOR_2BIT_FANOUT_2, abs=1e-6)


def test_conv_uses_rescaled_weights_and_quantizes_its_input():
    conv = SATConv2d(3, 2, 1, bits_set=(2, 8), input_quantizer=SwitchablePACT((2, 8), init=2.0))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(WEIGHT).view(2, 3, 1, 1))
    conv.set_bits(2)
    assert conv.input_quantizer.bits == 2  # the layer switches its own quantizer
    expected_weight = torch.tensor([-1, -0.5, 0, 0, 0.5, 0.5]).view(2, 3, 1, 1) * FACTOR_2BIT_FANOUT_2
    torch.testing.assert_close(conv.effective_weight(), expected_weight, rtol=0, atol=1e-6)
    # input [-1, 1.1, 5] with alpha 2 at 2 bits (step 2/3): 0, round(1.65) = 2 -> 4/3, clipped -> 2
    x = torch.tensor([-1.0, 1.1, 5.0]).view(1, 3, 1, 1)
    quantized_x = torch.tensor([0.0, 4 / 3, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(quantized_x, expected_weight), rtol=1e-6, atol=1e-6)
    # the rescaled weight has std 1 / sqrt(n_out) whatever the bit-width
    big = SATConv2d(16, 32, 3, bits_set=(4,))
    torch.testing.assert_close(big.effective_weight().std(), torch.tensor(1 / math.sqrt(32 * 9)), rtol=1e-5, atol=0)


def test_weight_bits_rules():
    bits_set = (2, 4, 5)
    stem = SATConv2d(3, 4, 3, bits_set=bits_set, weight_bits_rule="highest")
    head = SATLinear(4, 3, bits_set=bits_set, weight_bits_rule="max8")
    assert [stem.weight_bits(b) for b in bits_set] == [5, 5, 5]
    assert [head.weight_bits(b) for b in bits_set] == [8, 8, 8]
    assert SATLinear(4, 3, bits_set=(2, 32), weight_bits_rule="max8").weight_bits(32) == 32
    with pytest.raises(ConfigError, match="unknown weight-bits rule"):
        SATConv2d(3, 4, 3, bits_set=bits_set, weight_bits_rule="lowest")


def make_linear() -> SATLinear:
    torch.manual_seed(0)
    layer = SATLinear(5, 3, bits_set=(2, 8), weight_bits_rule="max8", input_quantizer=SwitchablePACT((2, 8), 10.0))
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    layer.set_bits(2)
    return layer


def test_linear_rescales_weights_in_training_and_divides_the_bias_at_eval():
    layer = make_linear()
    x = torch.tensor([[0.0, 1.0, 2.5, 7.0, 12.0], [3.0, 0.4, 9.9, 4.0, 1.0]])
    # at 2 bits the input is quantized with alpha 10 (step 10/3) and the weights are at max(2, 8) = 8 bits
    quantized_x = torch.tensor([[0.0, 0.0, 10 / 3, 20 / 3, 10.0], [10 / 3, 0.0, 10.0, 10 / 3, 0.0]])
    weight8 = sat_weight(layer.weight.detach(), 8)
    factor = 1 / (math.sqrt(3) * weight8.std())
    layer.train()
    train_out = layer(x)
    torch.testing.assert_close(train_out, quantized_x @ (weight8 * factor).T + layer.bias, rtol=1e-6, atol=1e-6)
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    eval_out = layer(x)
    torch.testing.assert_close(eval_out, quantized_x @ weight8.T + layer.bias / factor, rtol=1e-6, atol=1e-6)
    # eval logits = training logits / factor (argmax unchanged), and nothing was modified in place
    torch.testing.assert_close(eval_out * factor, train_out, rtol=1e-6, atol=1e-6)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert layer.bias.tolist() == [0.5, -1.0, 2.0]


def test_linear_without_rescale_is_plain():
    layer = make_linear()
    layer.rescale = False
    x = torch.rand(2, 5) * 10
    layer.train()
    train_out = layer(x)
    layer.eval()
    assert torch.equal(layer(x), train_out)


def test_unbuilt_bit_width_is_an_error():
    layer = make_linear()
    with pytest.raises(ConfigError, match=r"built for bits \(2, 8\), not 4"):
        layer.set_bits(4)


# Storage of a 3x3 conv 4 -> 8 (288 weights), bits (2, 4, 8), rule "same", one alpha per bit-width:
#   at b: 288 b + 32 (its alpha); total: 288 * 8 (one 8-bit copy) + 3 * 32 (three alphas).
# A linear 16 -> 10 with bias, rule "max8": at b: 160 * 8 + 10 * 32 + 32; total: 160 * 8 + 320 + 3 * 32.
def test_storage_counts_one_highest_copy_and_per_bit_alphas():
    bits_set = (2, 4, 8)
    conv = SATConv2d(4, 8, 3, bits_set=bits_set, input_quantizer=SwitchablePACT(bits_set, 8.0))
    assert [conv.storage_bits(b) for b in bits_set] == [288 * b + 32 for b in bits_set]
    assert conv.storage_bits_total(bits_set) == 288 * 8 + 3 * 32
    linear = SATLinear(16, 10, bits_set=bits_set, input_quantizer=SwitchablePACT(bits_set, 10.0))
    assert [linear.storage_bits(b) for b in bits_set] == [160 * 8 + 320 + 32] * 3
    assert linear.storage_bits_total(bits_set) == 160 * 8 + 320 + 3 * 32
    stem = SATConv2d(1, 4, 3, bits_set=(2, 32), weight_bits_rule="highest")
    assert stem.storage_bits(2) == 36 * 32 and stem.storage_bits_total((2, 32)) == 36 * 32
