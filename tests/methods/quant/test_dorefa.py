"""DoReFa quantizers against hand-computed values (Any-Precision spec, "Quantizers")."""

import contextlib

import pytest
import torch

from methods.quant.dorefa import dorefa_activation, dorefa_activation_reference, dorefa_weight, dorefa_weight_reference
from methods.quant.ste import quantize_unit, round_ste

# w = [0.5, -1, 0.25, 2]: tanh(w) = [0.462117, -0.761594, 0.244919, 0.964028], max|tanh| = 0.964028,
# u = tanh / (2 max) + 1/2 = [0.739680, 0.104994, 0.627029, 1.0], E = mean|w| = 3.75 / 4 = 0.9375.
WEIGHT = [0.5, -1.0, 0.25, 2.0]
E = 0.9375
# round((2^k - 1) u): k=1 -> [1, 0, 1, 1]; k=2: 3u = [2.219, 0.315, 1.881, 3] -> [2, 0, 2, 3];
# k=4: 15u = [11.095, 1.575, 9.405, 15] -> [11, 2, 9, 15];
# k=8: 255u = [188.62, 26.77, 159.89, 255] -> [189, 27, 160, 255]
WEIGHT_CODES = {1: [1, 0, 1, 1], 2: [2, 0, 2, 3], 4: [11, 2, 9, 15], 8: [189, 27, 160, 255]}


@pytest.mark.parametrize("bits", sorted(WEIGHT_CODES))
def test_weight_levels_match_hand_computation(bits):
    levels = 2**bits - 1
    expected = torch.tensor([E * (2 * c / levels - 1) for c in WEIGHT_CODES[bits]])
    torch.testing.assert_close(dorefa_weight(torch.tensor(WEIGHT), bits), expected, rtol=0, atol=1e-6)


def test_one_bit_weights_are_plus_minus_mean_abs():
    out = dorefa_weight(torch.tensor(WEIGHT), 1)
    assert out.tolist() == [E, -E, E, E]


def test_32_bit_weights_are_scaled_normalized_tanh():
    # E * tanh(w) / max|tanh| = 0.9375 * [0.479361, -0.790017, 0.254060, 1]
    expected = torch.tensor([0.44940087, -0.74063703, 0.23817913, 0.9375])
    torch.testing.assert_close(dorefa_weight(torch.tensor(WEIGHT), 32), expected, rtol=0, atol=1e-6)


ACT = [-0.5, 0.12, 0.26, 0.49, 0.51, 0.93, 1.7]
# clamp to [0,1] = [0, .12, .26, .49, .51, .93, 1]; times 2^k - 1 and rounded:
ACT_CODES = {1: [0, 0, 0, 0, 1, 1, 1], 2: [0, 0, 1, 1, 2, 3, 3], 4: [0, 2, 4, 7, 8, 14, 15],
             8: [0, 31, 66, 125, 130, 237, 255]}


@pytest.mark.parametrize("bits", sorted(ACT_CODES))
def test_activation_levels_match_hand_computation(bits):
    expected = torch.tensor([c / (2**bits - 1) for c in ACT_CODES[bits]])
    torch.testing.assert_close(dorefa_activation(torch.tensor(ACT), bits), expected, rtol=0, atol=1e-7)


def test_32_bit_activation_is_relu_by_default_and_clamp_as_option():
    x = torch.tensor(ACT)
    assert torch.equal(dorefa_activation(x, 32), torch.relu(x))
    assert torch.equal(dorefa_activation(x, 32, full_precision_act="clamp"), x.clamp(0, 1))


def test_round_ste_forward_rounds_and_backward_is_identity():
    x = torch.tensor([0.2, 1.7, -2.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -3.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_gradient_is_straight_through_inside_clip(bits):
    x = torch.tensor(ACT, requires_grad=True)
    dorefa_activation(x, bits).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_gradient_flows_through_tanh_and_max_as_if_unrounded(bits):
    """STE: the gradient equals that of E * (2u - 1) with the rounding removed and E constant."""
    upstream = torch.tensor([0.3, -1.2, 0.7, 2.0])
    w = torch.tensor(WEIGHT, requires_grad=True)
    (dorefa_weight(w, bits) * upstream).sum().backward()
    w_ref = torch.tensor(WEIGHT, requires_grad=True)
    t = torch.tanh(w_ref)
    unrounded = E * (2 * (t / (2 * t.abs().max()) + 0.5) - 1)
    (unrounded * upstream).sum().backward()
    assert torch.equal(w.grad, w_ref.grad)
    assert w.grad.abs().sum() > 0


def test_quantize_unit_levels_are_k_bit_grid():
    u = torch.linspace(0, 1, 2001)
    for bits in (1, 2, 3, 4, 8):
        codes = quantize_unit(u, bits) * (2**bits - 1)
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        assert codes.round().unique().tolist() == list(range(2**bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 32])
def test_fused_activation_equals_the_composed_formula(bits):
    torch.manual_seed(bits)
    # values on both sides of the clip, exactly at 0 and 1, and exactly on half steps of the grid
    levels = 2**min(bits, 8) - 1
    x = torch.cat((torch.randn(4096) * 0.8 + 0.5, torch.tensor([0.0, 1.0, -0.0, 0.5 / levels, 1.5 / levels])))
    fused_x, reference_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused, reference = dorefa_activation(fused_x, bits), dorefa_activation_reference(reference_x, bits)
    assert torch.equal(fused, reference)  # forward bit for bit
    grad = torch.randn_like(x)
    fused.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(fused_x.grad, reference_x.grad, rtol=1e-6, atol=0)
    inside = (x > 0) & (x < 1) if bits < 32 else x > 0  # 32 bits: ReLU
    assert torch.equal(fused_x.grad, grad * inside)  # exactly the straight-through mask


@pytest.mark.parametrize("bits", [*range(1, 9), 32])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64)])
def test_fused_weight_equals_the_composed_formula(bits, shape):
    torch.manual_seed(bits)
    initial = torch.randn(*shape) * 0.2
    flat = initial.view(-1)
    flat[1] = -flat.abs().max()  # a tie at the max: its gradient is shared as torch.max shares it
    flat[0] = -flat[1]
    upstream = torch.randn(*shape)
    results = []
    for quantize in (dorefa_weight, dorefa_weight_reference):
        weight = initial.clone().requires_grad_(True)
        out = quantize(weight, bits)
        (out * upstream).sum().backward()
        results.append((out.detach(), weight.grad))
    (fused, fused_grad), (composed, composed_grad) = results
    torch.testing.assert_close(fused, composed, rtol=0, atol=0)
    # the composition's straight-through rounding divides and multiplies by 2^b - 1: equal up to float rounding
    torch.testing.assert_close(fused_grad, composed_grad)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("bits", [2, 8, 32])
def test_fused_weight_never_reads_a_value_back_to_the_host(bits, cached):
    # A host read (Tensor.item, e.g. inside masked_fill_ with a tensor value) is a device sync on CUDA, once per
    # quantized layer, bit-width and step; the profiler sees the same call on the CPU.
    from torch.profiler import ProfilerActivity, profile

    from methods.quant.version_cache import version_cache_disabled

    weight = (torch.randn(16, 8, 3, 3) * 0.2).requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, (
            contextlib.nullcontext() if cached else version_cache_disabled()):
        dorefa_weight(weight, bits).sum().backward()
    names = [event.name for event in prof.events()]
    node = "_CachedDoReFaWeightBackward" if cached else "_DoReFaWeightBackward"
    assert any(name.endswith(node) and name.count("Cached") == cached for name in names)  # that node ran
    assert names.count("aten::_local_scalar_dense") == 0
