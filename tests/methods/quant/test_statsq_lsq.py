"""StatsQ weights and LSQ activations against hand-computed values; LSQ's step gradient against its closed form."""

import math

import pytest
import torch

from harness.errors import ConfigError
from methods.quant.lsq import LSQActivation, lsq_initial_step, lsq_quantize, lsq_quantize_reference
from methods.quant.statsq import statsq_weight

# Row 0: mean|w| = 0.45 -> s = 0.9, w / s = [1/9, -1/3, 5/9, -1].
# Row 1: mean|w| = 0.5  -> s = 1.0, w / s = [2 -> clipped to 1 (level n-1), 0, 0, 0].
WEIGHT = torch.tensor([[0.1, -0.3, 0.5, -0.9], [2.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("bits, expected", [
    # n = 1: floor(c) in {-1, 0} -> +-s/2
    (1, [[0.45, -0.45, 0.45, -0.45], [0.5, 0.5, 0.5, 0.5]]),
    # n = 2: n c = [0.22, -0.67, 1.11, -2] -> levels [0, -1, 1, -2] -> (l + 1/2) / 2 * s; row 1 level 2 -> 1
    (2, [[0.225, -0.225, 0.675, -0.675], [0.75, 0.25, 0.25, 0.25]]),
    # n = 4: n c = [0.44, -1.33, 2.22, -4] -> levels [0, -2, 2, -4] -> (l + 1/2) / 4 * s; row 1 level 4 -> 3
    (3, [[0.1125, -0.3375, 0.5625, -0.7875], [0.875, 0.125, 0.125, 0.125]]),
])
def test_statsq_hand_values(bits, expected):
    torch.testing.assert_close(statsq_weight(WEIGHT, bits), torch.tensor(expected), rtol=0, atol=1e-6)


def test_statsq_uses_two_to_the_k_symmetric_levels_and_is_identity_at_32_bits():
    torch.manual_seed(0)
    weight = torch.randn(3, 200)
    scale = 2 * weight.abs().mean(dim=1, keepdim=True)
    levels = torch.round(statsq_weight(weight, 3) / scale * 4 * 2) / 2  # l + 1/2, exactly representable
    assert torch.unique(levels).tolist() == [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
    assert torch.equal(statsq_weight(weight, 32), weight)


def test_statsq_straight_through_gradient_is_one_inside_the_clip_range_zero_outside():
    weight = torch.tensor([[0.1, -0.3, 0.2, -0.2, 3.0, -0.05]], requires_grad=True)  # s = 2 * 3.85 / 6 = 1.2833
    statsq_weight(weight, 2).sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]]))  # 3.0 / s > 1: clipped


def test_lsq_forward_hand_values():
    x = torch.tensor([[-3.0, -0.4, 0.26, 0.74, 5.0]])
    # s = 0.5, 2 bits signed: Q_n = 2, Q_p = 1; x / s = [-6, -0.8, 0.52, 1.48, 10] -> clip [-2, 1] -> round
    expected = torch.tensor([[-1.0, -0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(lsq_quantize(x, torch.tensor(0.5), 2), expected, rtol=0, atol=0)
    # 3 bits: Q_n = 4, Q_p = 3; x / s clipped to [-4, 3] -> [-4, -0.8, 0.52, 1.48, 3] -> [-4, -1, 1, 1, 3]
    torch.testing.assert_close(lsq_quantize(x, torch.tensor(0.5), 3), torch.tensor([[-2.0, -0.5, 0.5, 0.5, 1.5]]))


def test_lsq_step_gradient_equals_the_closed_form():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5) * 2  # N = 15 features per sample
    upstream = torch.randn_like(x)
    step = torch.tensor(0.3, requires_grad=True)
    x_leaf = x.clone().requires_grad_(True)
    (lsq_quantize(x_leaf, step, 3) * upstream).sum().backward()
    q_neg, q_pos = 4, 3
    v = x / 0.3
    local = torch.where(v <= -q_neg, torch.full_like(v, -q_neg),
                        torch.where(v >= q_pos, torch.full_like(v, q_pos), torch.round(v) - v))
    expected = (upstream * local).sum() / math.sqrt(15 * q_pos)
    torch.testing.assert_close(step.grad, expected)
    inside = ((v > -q_neg) & (v < q_pos)).float()
    torch.testing.assert_close(x_leaf.grad, upstream * inside)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("step_value", [0.3, 0.0123, 1.7])
def test_fused_lsq_equals_the_composed_formula(bits, step_value):
    torch.manual_seed(bits)
    x = torch.randn(2, 17, 24) * 2
    x[0, 0, :3] = torch.tensor([-2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1, 0.5]) * step_value  # on the clip bounds
    upstream = torch.randn_like(x)
    results = []
    for quantize in (lsq_quantize, lsq_quantize_reference):
        steps = torch.full((32,), step_value, requires_grad=True)  # indexed as LSQActivation indexes its steps
        x_leaf = x.clone().requires_grad_(True)
        out = quantize(x_leaf, steps[bits - 1], bits)
        (out * upstream).sum().backward()
        results.append((out.detach(), x_leaf.grad, steps.grad))
    (fused, fused_dx, fused_ds), (composed, composed_dx, composed_ds) = results
    torch.testing.assert_close(fused, composed, rtol=0, atol=0)  # the forward pass is bit-identical
    torch.testing.assert_close(fused_dx, composed_dx)  # the composition computes (g s) / s
    torch.testing.assert_close(fused_ds, composed_ds)
    assert fused_ds.count_nonzero() == 1


def test_fused_lsq_saves_one_activation_sized_tensor_where_the_composition_saves_three():
    def saved_numel(quantize) -> int:
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel()
            return tensor

        x = torch.randn(8, 100, requires_grad=True)
        step = torch.tensor(0.1, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            quantize(x, step, 4)
        return total

    # x alone (plus the scalar step), against x, x / s and the rounded levels
    assert saved_numel(lsq_quantize) == 800 + 1
    assert saved_numel(lsq_quantize_reference) >= 3 * 800


def test_lsq_module_initializes_each_bit_width_on_its_first_training_batch():
    layer = LSQActivation(bits=4)
    layer.train()
    x = torch.tensor([[1.0, -2.0, 3.0, -6.0]])  # mean|x| = 3
    layer(x)
    assert layer.steps[3].item() == pytest.approx(2 * 3.0 / math.sqrt(7))  # 2 mean|x| / sqrt(Q_p), Q_p = 7
    assert layer.initialized.nonzero().flatten().tolist() == [3]
    layer(x * 10)  # later batches do not re-initialize
    assert layer.steps[3].item() == pytest.approx(2 * 3.0 / math.sqrt(7))
    assert lsq_initial_step(x, 2).item() == pytest.approx(6.0)  # Q_p = 1


def test_lsq_module_refuses_untrained_bits_in_eval_until_calibrated_and_fixed_act_bits():
    layer = LSQActivation(bits=3).eval()
    with pytest.raises(ConfigError, match="never trained or calibrated"):
        layer(torch.ones(1, 4))
    layer.calibrate(torch.tensor([[0.5, -0.5]]), 3)
    assert layer.steps[2].item() == pytest.approx(2 * 0.5 / math.sqrt(3))
    fixed = LSQActivation(bits=8, act_bits=2).train()
    out = fixed(torch.tensor([[-3.0, 0.0, 3.0]]))  # step 2 mean|x| / sqrt(1) = 4; 2-bit levels {-8, -4, 0, 4}
    assert out.tolist() == [[-4.0, 0.0, 4.0]]
    with pytest.raises(ConfigError, match="at least 2 bits"):
        LSQActivation(bits=1).train()(torch.ones(1, 2))
