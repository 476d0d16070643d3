"""SAT nested weight quantizer against hand-computed values, under the paper's scheme and the authors' later
"centered" scheme (the layers that use it: test_sat_layers.py)."""

from __future__ import annotations

import math

import pytest
import torch

from methods.quant.sat import nested_quantize_unit, sat_normalize, sat_rescale_factor, sat_weight

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


# The centered scheme (deJQK/AdaBits, models/quant_ops.py, scheme 'centered'): the same codes j as above, read as
# W_q = (2j + 1) / 2^b - 1, i.e. the paper's level plus 2^-b. For WEIGHT (codes in CODES; 4 bits: 16u = [0, 4.17,
# 8, 10.42, 14.32, 16] -> [0, 4, 8, 10, 14, 15], which is also the 8-bit code >> 4):
CENTERED = {
    1: [-1 / 2, -1 / 2, 1 / 2, 1 / 2, 1 / 2, 1 / 2],
    2: [-3 / 4, -1 / 4, 1 / 4, 1 / 4, 3 / 4, 3 / 4],
    3: [-7 / 8, -3 / 8, 1 / 8, 3 / 8, 7 / 8, 7 / 8],
    4: [-15 / 16, -7 / 16, 1 / 16, 5 / 16, 13 / 16, 15 / 16],
    8: [-255 / 256, -123 / 256, 1 / 256, 77 / 256, 203 / 256, 255 / 256],
}


def centered_codes_of(quantized: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes back from W_q = (2 code + 1) / 2^b - 1 (exact in float32)."""
    codes = ((quantized + 1) * 2**bits - 1) / 2
    assert torch.equal(codes, codes.round())
    return codes.long()


@pytest.mark.parametrize("bits", sorted(CENTERED))
def test_centered_weight_matches_hand_computation(bits):
    quantized = sat_weight(torch.tensor(WEIGHT), bits, "centered")
    torch.testing.assert_close(quantized, torch.tensor(CENTERED[bits]), rtol=0, atol=0)
    assert centered_codes_of(quantized, bits).tolist() == ([0, 4, 8, 10, 14, 15] if bits == 4 else CODES[bits])
    # the paper's level shifted up by 2^-b (exact): same codes, other reading
    torch.testing.assert_close(quantized, sat_weight(torch.tensor(WEIGHT), bits) + 2.0**-bits, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_centered_levels_are_2_to_b_odd_steps_symmetric_about_zero(bits):
    dense = torch.linspace(-3.0, 3.0, 200_001)  # reaches every code at 8 bits (u moves < 1e-4 per point)
    levels = torch.unique(sat_weight(dense, bits, "centered"))
    expected = torch.tensor([(2 * j + 1) / 2**bits - 1 for j in range(2**bits)])
    torch.testing.assert_close(levels, expected, rtol=0, atol=0)
    assert len(levels) == 2**bits
    assert torch.equal(levels, -levels.flip(0))  # symmetric about 0
    assert 0.0 not in levels.tolist() and levels.abs().max().item() == 1 - 2.0**-bits  # neither 0 nor +-1
    assert levels.tolist()[: 2**bits // 2][-1] == -(2.0**-bits)  # the two innermost levels are +-2^-b
    # the paper's levels on the same input: -1 and 0 present, +1 absent
    original = torch.unique(sat_weight(dense, bits)).tolist()
    assert original[0] == -1.0 and 0.0 in original and original[-1] == 1 - 2.0 ** (1 - bits)


def test_centered_weights_of_a_symmetric_tensor_have_zero_mean():
    # the README's reason for the scheme: u -> 1 - u maps code j to 2^b - 1 - j, so a weight tensor symmetric about
    # 0 (no value on a bucket edge) quantizes to zero mean; the paper's scheme has mean -2^-b exactly.
    half = torch.randn(500, generator=torch.Generator().manual_seed(2))
    weight = torch.cat([half, -half])
    for bits in (1, 2, 3, 4, 8):
        assert sat_weight(weight, bits, "centered").sum().item() == 0.0
        assert sat_weight(weight, bits).mean().item() == -(2.0**-bits)


def test_centered_gradient_passes_straight_through():
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(len(WEIGHT), generator=generator)
    grads = {}
    for name, fn in [("normalized", sat_normalize), ("original", lambda w: sat_weight(w, 3)),
                     ("centered", lambda w: sat_weight(w, 3, "centered"))]:
        weight = torch.tensor(WEIGHT, requires_grad=True)
        (fn(weight) * upstream).sum().backward()
        grads[name] = weight.grad
    # only powers of two lie between w~ and W_q on the backward path, so the three gradients agree bit for bit
    assert torch.equal(grads["centered"], grads["normalized"]) and torch.equal(grads["centered"], grads["original"])
    assert grads["centered"].abs().sum() > 0
    unit = torch.tensor([0.0, 0.3, 0.999, 1.0], requires_grad=True)
    nested_quantize_unit(unit, 2, "centered").sum().backward()
    assert unit.grad.tolist() == [1.0, 1.0, 1.0, 1.0]  # d/du of (floor(4u) + 1/2) / 4 through the STE


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 10.0])
def test_centered_codes_nest_and_lower_levels_follow_from_the_8_bit_copy(scale):
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(32, 32, 3, 3, generator=generator) * scale
    weight = torch.cat([half, -half])
    stored = sat_weight(weight, 8, "centered")  # the one deployed copy
    eight = centered_codes_of(stored, 8)
    assert eight.min() == 0 and eight.max() == 255
    for bits in range(1, 9):
        quantized = sat_weight(weight, bits, "centered")
        prefix = eight >> (8 - bits)
        assert torch.equal(centered_codes_of(quantized, bits), prefix), bits
        # a deployed b-bit weight is read off the stored 8-bit codes: (2 j_b + 1 - 2^b) / 2^b
        torch.testing.assert_close(quantized, ((2 * prefix + 1 - 2**bits) / 2**bits).float(), rtol=0, atol=0)
    # level values do not nest: 2-bit level 1/4 is no 8-bit level; it is the mean of the 64 8-bit levels it groups
    eight_levels = torch.tensor([(2 * k + 1) / 256 - 1 for k in range(256)])
    assert 0.25 not in eight_levels.tolist()
    assert eight_levels[192:256].mean().item() == 0.75 and eight_levels[128:192].mean().item() == 0.25


