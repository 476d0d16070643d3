"""Multi-branch building blocks: selection rules, bounded quantizers (values and gradients), branch slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from methods.quant.bounded import activation_bounds_init, inclusive_unit_mask_backward, weight_bounds_init
from methods.quant.branch_norm import BranchAverage, SharedBranchBatchNorm2d, channel_shuffle
from methods.quant.branch_selection import num_branches, partial_branch
from methods.quant.branches import (
    BranchConv2d,
    amortized_selection,
    quantize_activation,
    quantize_weight_2bit,
    serial_selection,
)


def members(selection):
    return {b: set(range(start, start + count)) for b, (start, count) in selection.items()}


def test_amortized_selection_is_the_papers_table_for_2_4_6_8():
    assert members(amortized_selection((2, 4, 6, 8))) == {2: {0}, 4: {1, 2}, 6: {1, 2, 3}, 8: {0, 1, 2, 3}}
    # Branch 0 serves 2 of the 4 bit-widths instead of all 4.
    assert sum(0 in used for used in members(amortized_selection((2, 4, 6, 8))).values()) == 2


def test_serial_selection_always_starts_at_branch_0():
    assert members(serial_selection((8, 2, 6, 4))) == {2: {0}, 4: {0, 1}, 6: {0, 1, 2}, 8: {0, 1, 2, 3}}


@pytest.mark.parametrize("bits", [(2, 4, 8), (2, 8), (4, 8), (2, 4), (2, 4, 6, 8, 10, 12), (2, 6, 10, 16)])
def test_amortized_windows_are_valid_and_never_load_a_branch_more_than_serial(bits):
    selection = amortized_selection(bits)
    num_branches = max(bits) // 2
    assert selection[max(bits)] == (0, num_branches)  # the largest bit-width uses every branch
    usage = [0] * num_branches
    for b, (start, count) in selection.items():
        assert count == b // 2 and 0 <= start and start + count <= num_branches
        for branch in range(start, start + count):
            usage[branch] += 1
    assert max(usage) <= len(bits)
    assert members(amortized_selection((2, 4, 8))) == {2: {0}, 4: {1, 2}, 8: {0, 1, 2, 3}}


def test_odd_bit_selection_is_the_codes_table_for_2_to_8():
    """Full branches and partial branch per bit-width (the authors' code's table for bits 2..8, 0-based)."""
    selection = amortized_selection(range(2, 9))
    table = {b: (set(range(start, start + count)), partial_branch(selection, b)) for b, (start, count) in
             selection.items()}
    assert table == {2: ({0}, None), 3: ({0}, 1), 4: ({1, 2}, None), 5: ({1, 2}, 3), 6: ({1, 2, 3}, None),
                     7: ({0, 1, 2}, 3), 8: ({0, 1, 2, 3}, None)}
    assert num_branches(range(2, 9)) == 4 and num_branches((2, 3)) == 2 and num_branches((2, 4, 7)) == 4


def test_odd_bits_in_serial_selection_take_the_next_branch():
    selection = serial_selection((2, 3, 4))
    assert selection == {2: (0, 1), 3: (0, 1), 4: (0, 2)} and partial_branch(selection, 3) == 1
    assert [partial_branch(serial_selection((3, 5, 7)), b) for b in (3, 5, 7)] == [1, 2, 3]


def test_odd_bit_without_its_even_neighbour_starts_at_0_and_stays_inside():
    selection = amortized_selection((3, 8))
    assert selection == {3: (0, 1), 8: (0, 4)}
    for b, (start, count) in amortized_selection((2, 4, 6, 7, 9, 10)).items():
        assert start + count + (b % 2) <= 5, b


def test_selection_refuses_fewer_than_2_bits():
    with pytest.raises(ConfigError, match="at least 2 bits"):
        amortized_selection((1, 2, 4))


def test_weight_quantizer_levels_by_hand():
    # l = -3, u = 3: w_n = (w + 3) / 6; round(3 w_n) / 3; 2 q - 1.
    weight = torch.tensor([-4.0, -2.5, -1.2, -0.9, 0.0, 0.9, 1.2, 2.5, 7.0])
    # 3 w_n =            [0 (clamped), 0.25, 0.9, 1.05, 1.5, 1.95, 2.1, 2.75, 3 (clamped)]
    # round (half even): [0, 0, 1, 1, 2, 2, 2, 3, 3]
    third = torch.tensor(1.0) / 3
    expected = 2 * torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3]) * third - 1
    quantized = quantize_weight_2bit(weight, torch.tensor(-3.0), torch.tensor(3.0))
    assert torch.equal(quantized, expected)
    assert torch.allclose(expected, torch.tensor([-1, -1, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1 / 3, 1, 1]), atol=1e-7)


def test_weight_quantizer_gradient_is_plain_ste_inside_the_bounds():
    weight = torch.tensor([-4.0, -1.0, 0.5, 2.0, 5.0], requires_grad=True)
    lower, upper = torch.tensor(-3.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    quantize_weight_2bit(weight, lower, upper).sum().backward()
    # d(2 w_n - 1)/dw = 2 / (u - l) = 1/3 inside [l, u], 0 where the clamp is active.
    assert torch.allclose(weight.grad, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0]), atol=1e-7)
    # d/du of 2 (w - l) / (u - l) = -2 (w - l) / (u - l)^2 inside; 0 for clamped w.
    inside = torch.tensor([-1.0, 0.5, 2.0])
    assert math.isclose(upper.grad.item(), (-2 * (inside + 3) / 36).sum().item(), rel_tol=1e-6)


def test_backward_scaling_is_ewgs():
    # x_n = 0.4 (l = 0, u = 1, 1 bit: x_q = 0); g = 1: gradient 1 + delta * sign(1) * (0.4 - 0) = 1.2 at delta 0.5.
    x = torch.tensor([0.4, 0.4], requires_grad=True)
    out = quantize_activation(x, torch.tensor(0.0), torch.tensor(1.0), 1, backward_scaling=0.5)
    (out * torch.tensor([1.0, -2.0])).sum().backward()
    # g = -2: -2 * (1 + 0.5 * (-1) * 0.4) = -1.6
    assert torch.allclose(x.grad, torch.tensor([1.2, -1.6]))


def composed_reference(x, lower, upper, bits, delta):
    """The quantizer written as plain autograd ops (STE by detach; EWGS's scaling as a gradient-only term)."""
    levels = 2**bits - 1
    unit = torch.clamp((x - lower) / (upper - lower), 0.0, 1.0)
    quantized = torch.round(unit * levels) / levels
    error = (unit - quantized).detach()
    # Forward value = quantized; d/d(unit) = 1 + delta * sign(g) * error, with g = 1 here (loss = weighted sum
    # with positive weights, so sign(g) = +1).
    return unit + (quantized - unit).detach() + delta * (unit * error - (unit * error).detach())


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_fused_quantizer_gradients_equal_autograd_of_the_formula(delta):
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 2, 2, dtype=torch.float64) * 1.5).requires_grad_()
    lower = torch.tensor([-1.0, -0.5, 0.0, -2.0], dtype=torch.float64, requires_grad=True)
    upper = torch.tensor([1.0, 2.0, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, 4, 2, 2, dtype=torch.float64) + 0.1  # positive: sign(g) = +1 everywhere
    shape = (1, 4, 1, 1)
    fused = quantize_activation(x, lower.view(shape), upper.view(shape), 3, backward_scaling=delta)
    fused_grads = torch.autograd.grad((fused * weights).sum(), (x, lower, upper))
    reference = composed_reference(x, lower.view(shape), upper.view(shape), 3, delta)
    reference_grads = torch.autograd.grad((reference * weights).sum(), (x, lower, upper))
    assert torch.equal(fused.detach(), reference.detach())
    for got, expected in zip(fused_grads, reference_grads):
        assert torch.allclose(got, expected, atol=1e-12)


def test_activation_quantizer_by_hand():
    # l = 0, u = 3, 2 bits: x_n = x / 3 clamped; round(3 x_n) / 3 = round(x) / 3 on [0, 3].
    x = torch.tensor([-1.0, 0.4, 1.6, 2.6, 5.0])
    assert torch.equal(quantize_activation(x, torch.tensor(0.0), torch.tensor(3.0), 2),
                       torch.tensor([0.0, 0.0, 2.0, 3.0, 3.0]) / 3)
    # l = 1, u = 2, 3 bits: x_n = x - 1; round(7 x_n) / 7.
    x = torch.tensor([0.0, 1.25, 1.5, 1.9, 2.2])
    assert torch.allclose(quantize_activation(x, torch.tensor(1.0), torch.tensor(2.0), 3),
                          torch.tensor([0, 2, 4, 6, 7]) / 7.0, atol=1e-7)  # 7*0.25=1.75->2, 3.5->4 (half to even)


def test_bounds_init_formulas_against_numpy():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 3, 3) * torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)  # 3 branches
    lower, upper = weight_bounds_init(weight)
    std = np.std(weight.numpy().astype(np.float64).reshape(3, -1), axis=1, ddof=1)  # unbiased, like torch
    assert np.allclose(upper.numpy(), 3 * std, rtol=1e-5) and np.allclose(lower.numpy(), -3 * std, rtol=1e-5)
    x = torch.relu(torch.randn(5, 4, 4, 4)) - torch.tensor([0.1, 0.1, 0.3, 0.3]).view(1, 4, 1, 1)  # 2 branches
    lower, upper = activation_bounds_init(x, 2)
    for branch in range(2):
        values = x[:, 2 * branch:2 * branch + 2].numpy().astype(np.float64)
        assert lower[branch].item() == pytest.approx(values.min(), rel=1e-6)
        assert upper[branch].item() == pytest.approx(3 * np.std(values, ddof=1) / np.sqrt(1 - 2 / np.pi), rel=1e-5)


def branch_conv(selection, **kw) -> BranchConv2d:
    torch.manual_seed(0)
    conv = BranchConv2d(3, 2, 3, 1, 1, 4, selection, **kw)
    with torch.no_grad():  # distinct bounds per branch and position, so a wrong index shows
        conv.weight_lower.copy_(torch.tensor([-0.5, -0.6, -0.7, -0.8]))
        conv.weight_upper.copy_(torch.tensor([0.5, 0.9, 0.4, 0.8]))
        for key in conv.act_lower:
            count = conv.act_lower[key].numel()
            conv.act_lower[key].copy_(torch.linspace(-0.2, 0.1, count))
            conv.act_upper[key].copy_(torch.linspace(1.0, 1.5, count))
    return conv


@pytest.mark.parametrize("bounds_by", ["branch", "position"])
def test_grouped_conv_of_selected_branches_equals_separate_branches_concatenated(bounds_by):
    selection = {4: (1, 2), 8: (0, 4)}
    conv = branch_conv(selection, bounds_by=bounds_by)
    conv.set_bits(4)
    x = torch.randn(2, 6, 5, 5)  # 2 active branches x 3 input channels
    outputs = []
    for position, branch in enumerate((1, 2)):
        bound = branch if bounds_by == "branch" else position
        weight = conv.weight[branch * 2:(branch + 1) * 2]
        quantized_weight = quantize_weight_2bit(weight, conv.weight_lower[bound], conv.weight_upper[bound])
        branch_input = x[:, position * 3:(position + 1) * 3]
        quantized_input = quantize_activation(branch_input, conv.act_lower["4"][position],
                                              conv.act_upper["4"][position], 4)
        outputs.append(F.conv2d(quantized_input, quantized_weight, padding=1))
    assert torch.allclose(conv(x), torch.cat(outputs, dim=1), atol=1e-6)


def test_branch_conv_quantizes_each_branch_to_the_four_levels_with_its_own_bounds():
    conv = branch_conv({8: (0, 4)})
    weight = conv.active_weight().detach()
    levels = set((2 * (torch.arange(4.0) / 3) - 1).tolist())  # -1, -1/3, 1/3, 1 as the quantizer computes them
    for branch in range(4):
        branch_weight = weight[branch * 2:(branch + 1) * 2]
        assert set(torch.unique(branch_weight).tolist()) <= levels
        assert torch.equal(branch_weight, quantize_weight_2bit(conv.weight[branch * 2:(branch + 1) * 2].detach(),
                                                               conv.weight_lower[branch].detach(),
                                                               conv.weight_upper[branch].detach()))


def test_branch_average_is_the_mean_over_active_branches():
    average = BranchAverage(3, {2: (1, 1), 6: (0, 3)})
    average.set_bits(6)
    x = torch.randn(2, 9, 4, 4)
    assert torch.allclose(average(x), (x[:, 0:3] + x[:, 3:6] + x[:, 6:9]) / 3, atol=1e-6)
    average.set_bits(2)
    assert torch.equal(average(x[:, :3]), x[:, :3])


def test_shared_stem_norm_normalizes_and_tracks_only_the_active_channels():
    norm = SharedBranchBatchNorm2d(2, 4, {4: (1, 2), 8: (0, 4)})
    norm.set_bits(4)
    x = torch.randn(8, 4, 3, 3) * 2 + 5
    out = norm(x)
    reference = F.batch_norm(x, None, None, training=True)
    assert torch.allclose(out, reference, atol=1e-5)
    expected_mean = 0.1 * x.mean(dim=(0, 2, 3))
    assert torch.allclose(norm.running_mean[2:6], expected_mean, atol=1e-6)
    assert torch.equal(norm.running_mean[:2], torch.zeros(2)) and torch.equal(norm.running_mean[6:], torch.zeros(2))


def test_unknown_bits_is_a_config_error():
    conv = branch_conv({8: (0, 4)})
    with pytest.raises(ConfigError, match="no 4-bit setting"):
        conv.set_bits(4)


def test_channel_shuffle_interleaves_branches():
    x = torch.arange(6.0).view(1, 6, 1, 1)  # 2 branches x 3 channels
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 1).flatten().tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inclusive_mask_backward_passes_the_closed_unit_interval_exactly(dtype):
    info = torch.finfo(dtype)
    one = torch.tensor(1.0, dtype=dtype)
    edges = torch.tensor([0.0, -0.0, 1.0, -info.tiny, info.tiny, 0.5, -3.0, 7.0], dtype=dtype)
    edges = torch.cat((edges, torch.nextafter(one, 2 * one).view(1), torch.nextafter(one, 0 * one).view(1)))
    torch.manual_seed(0)
    normalized = torch.cat((edges, (torch.randn(4096) * 0.8 + 0.5).to(dtype)))
    grad = torch.randn(normalized.shape).to(dtype)
    expected = torch.where((normalized >= 0) & (normalized <= 1), grad, 0.0)
    got = inclusive_unit_mask_backward(grad, normalized)
    assert torch.equal(got, expected)
    assert got[:3].tolist() == grad[:3].tolist()  # 0, -0 and 1 pass: the bounds belong to the interval
    assert got[3] == 0 and got[8] == 0  # the next numbers outside do not


def test_inclusive_mask_backward_writes_in_the_layout_of_n_as_where_does():
    # a weight's gradient arrives in the convolution's layout; the result must not inherit it, or what consumes it
    # sums in another order (seen: MBQuant's main-job cells moved by 2 test images)
    normalized = torch.randn(4, 8, 16, 3, 3) * 0.8 + 0.5
    grad = torch.randn(4, 8, 3, 3, 16).permute(0, 1, 4, 2, 3)  # same shape, channels-last-like strides
    got = inclusive_unit_mask_backward(grad, normalized)
    expected = torch.where(normalized.clamp(0.0, 1.0) == normalized, grad, 0.0)
    assert got.stride() == expected.stride() == normalized.stride()
    assert torch.equal(got, expected)
