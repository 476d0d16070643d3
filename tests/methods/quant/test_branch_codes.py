"""The deployed 2-bit codes of a branch convolution: levels to codes and back, exactly."""

from __future__ import annotations

import pytest
import torch

from harness.errors import ConfigError
from methods.quant.bounded import quantize_weight_2bit
from methods.quant.branch_codes import StoredBranchLevels, codes_to_levels, levels_to_codes


def test_the_four_levels_map_to_codes_0_to_3_and_back_bit_for_bit():
    levels = 2 * (torch.arange(4.0) / 3) - 1  # -1, -1/3, 1/3, 1 as the forward pass computes them
    codes = levels_to_codes(levels)
    assert codes.tolist() == [0, 1, 2, 3]
    assert codes.dtype == torch.int64
    torch.testing.assert_close(codes_to_levels(codes), levels, rtol=0, atol=0)


def test_a_quantized_weight_survives_the_round_trip_exactly():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    lower, upper = torch.tensor(-0.7), torch.tensor(0.9)
    levels = quantize_weight_2bit(weight, lower, upper, 0.0)
    torch.testing.assert_close(codes_to_levels(levels_to_codes(levels)), levels, rtol=0, atol=0)


def test_stored_levels_answer_by_code_set_name_and_refuse_an_unknown_one():
    stored = StoredBranchLevels()
    levels = codes_to_levels(torch.tensor([[0, 3], [1, 2]]))
    stored.add("branch1.partial", levels)
    torch.testing.assert_close(stored.levels("branch1.partial"), levels, rtol=0, atol=0)
    assert stored.levels("branch1.partial").data_ptr() != levels.data_ptr()  # a copy, not the caller's tensor
    with pytest.raises(ConfigError, match="no codes 'branch0'"):
        stored.levels("branch0")
