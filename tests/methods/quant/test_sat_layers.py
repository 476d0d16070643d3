"""AdaBits' SAT convolution and linear layers against hand-computed values: the rescale, per-layer weight precision,
the input quantizer, storage, under the paper's scheme and the authors' later "centered" one (the weights'
hand-computed values are in test_sat.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from methods.quant.pact import SwitchablePACT
from methods.quant.sat import WEIGHT_SCHEMES, sat_rescale_factor, sat_weight
from methods.quant.sat_layers import SATConv2d, SATLinear
from tests.methods.quant.test_sat import CENTERED, FACTOR_2BIT_FANOUT_2, WEIGHT


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


def test_centered_layers_use_centered_levels_with_the_same_rescale():
    conv = SATConv2d(3, 2, 1, bits_set=(2, 8), weight_scheme="centered",
                     input_quantizer=SwitchablePACT((2, 8), init=2.0))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(WEIGHT).view(2, 3, 1, 1))
    conv.set_bits(2)
    # [-3/4, -1/4, 1/4, 1/4, 3/4, 3/4] is the paper's 2-bit W_q + 1/4: same std, so the same factor 1.2097167
    assert sat_rescale_factor(sat_weight(torch.tensor(WEIGHT), 2, "centered"), 2).item() == pytest.approx(
        FACTOR_2BIT_FANOUT_2, abs=1e-6)
    expected_weight = torch.tensor(CENTERED[2]).view(2, 3, 1, 1) * FACTOR_2BIT_FANOUT_2
    torch.testing.assert_close(conv.effective_weight(), expected_weight, rtol=0, atol=1e-6)
    x = torch.tensor([-1.0, 1.1, 5.0]).view(1, 3, 1, 1)
    quantized_x = torch.tensor([0.0, 4 / 3, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(quantized_x, expected_weight), rtol=1e-6, atol=1e-6)
    conv.set_bits(8)
    torch.testing.assert_close(conv.quantized_weight().flatten(), torch.tensor(CENTERED[8]), rtol=0, atol=0)
    linear = SATLinear(3, 2, bits_set=(2, 8), weight_bits_rule="same", weight_scheme="centered")
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(WEIGHT).view(2, 3))
        linear.bias.zero_()
    linear.set_bits(2)
    linear.train()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    expected = x @ (torch.tensor(CENTERED[2]).view(2, 3) * sat_rescale_factor(torch.tensor(CENTERED[2]), 2)).T
    torch.testing.assert_close(linear(x), expected, rtol=1e-6, atol=1e-6)
    assert SATConv2d(3, 4, 3, bits_set=(2,)).weight_scheme == "original"  # the default
    for bad in (lambda: SATConv2d(3, 4, 3, bits_set=(2,), weight_scheme="modified"),
                lambda: SATLinear(3, 4, bits_set=(2,), weight_scheme="symmetric"),
                lambda: sat_weight(torch.tensor(WEIGHT), 2, "Centered")):
        with pytest.raises(ConfigError, match="unknown SAT weight scheme"):
            bad()
    assert WEIGHT_SCHEMES == ("original", "centered")


# Centered codes nest, so storage is the same hand count as under the paper's scheme (see the test above it).
def test_centered_storage_counts_one_highest_copy():
    bits_set = (2, 4, 8)
    for scheme in WEIGHT_SCHEMES:
        conv = SATConv2d(4, 8, 3, bits_set=bits_set, input_quantizer=SwitchablePACT(bits_set, 8.0),
                         weight_scheme=scheme)
        assert [conv.storage_bits(b) for b in bits_set] == [288 * b + 32 for b in bits_set]
        assert conv.storage_bits_total(bits_set) == 288 * 8 + 3 * 32
        linear = SATLinear(16, 10, bits_set=bits_set, input_quantizer=SwitchablePACT(bits_set, 10.0),
                           weight_scheme=scheme)
        assert linear.storage_bits_total(bits_set) == 160 * 8 + 320 + 3 * 32
