"""PACT activation quantizer and switchable clipping levels (adabits spec, "Activation quantizer (PACT) and S-CL")."""

from __future__ import annotations

import pytest
import torch

from harness.errors import ConfigError
from methods.quant.pact import SwitchablePACT, pact_quantize, pact_quantize_reference

X = [-1.0, 0.0, 0.3, 1.1, 1.9, 2.0, 5.0]
# alpha = 2: min(relu(x), 2) / 2 = [0, 0, 0.15, 0.55, 0.95, 1, 1]; times 2^b - 1 and rounded:
#   b=2 (x3):  [0, 0, 0.45, 1.65, 2.85, 3, 3]         -> [0, 0, 0, 2, 3, 3, 3]
#   b=4 (x15): [0, 0, 2.25, 8.25, 14.25, 15, 15]      -> [0, 0, 2, 8, 14, 15, 15]
# and y = code / (2^b - 1) * 2.
CODES = {2: [0, 0, 0, 2, 3, 3, 3], 4: [0, 0, 2, 8, 14, 15, 15]}


@pytest.mark.parametrize("bits", sorted(CODES))
@pytest.mark.parametrize("alpha", [2.0, -2.0])  # the clipping level is |alpha|
def test_quantizer_matches_hand_computation(bits, alpha):
    levels = 2**bits - 1
    expected = torch.tensor([c / levels * 2 for c in CODES[bits]])
    out = pact_quantize(torch.tensor(X), torch.tensor(alpha), bits)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [2.5, -1.7])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_gradients_match_the_closed_form(bits, alpha):
    generator = torch.Generator().manual_seed(bits)
    x = (torch.rand(500, generator=generator, dtype=torch.float64) * 6 - 2).requires_grad_()  # in [-2, 4)
    alpha_param = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(500, generator=generator, dtype=torch.float64)
    (pact_quantize(x, alpha_param, bits) * upstream).sum().backward()

    a = abs(alpha)
    levels = 2**bits - 1
    ratio = x.detach() / a
    rounded = torch.round(ratio * levels) / levels
    # dy/da = 1 where x >= a; q(x/a) - x/a where 0 <= x < a; 0 where x < 0; dy/dalpha = sign(alpha) dy/da
    dy_da = torch.where(x.detach() >= a, 1.0, torch.where(x.detach() >= 0, rounded - ratio, 0.0))
    expected_alpha_grad = (upstream * dy_da).sum() * (1 if alpha > 0 else -1)
    torch.testing.assert_close(alpha_param.grad, expected_alpha_grad, rtol=1e-12, atol=1e-12)
    # dy/dx = 1 inside (0, a), 0 outside (straight-through rounding); (1 / a) * levels / levels * a = 1 up to rounding
    inside = (x.detach() > 0) & (x.detach() < a)
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, 0.0), rtol=1e-12, atol=0)
    assert (x.detach() >= a).any() and (x.detach() < 0).any() and inside.any()  # all three regions are exercised


def test_gradient_at_the_clipping_level_goes_to_alpha_only():
    x = torch.tensor([2.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    pact_quantize(x, alpha, 3).sum().backward()
    assert alpha.grad.item() == 1.0 and x.grad.item() == 0.0


def test_one_alpha_per_bit_width_and_identity_at_32_bits():
    quantizer = SwitchablePACT((2, 4, 32), init=8.0)
    assert sorted(quantizer.alphas) == ["2", "4"]  # no alpha for 32 bits: nothing is quantized there
    assert all(p.item() == 8.0 for p in quantizer.alphas.values())
    x = torch.tensor([-1.0, 0.3, 3.0, 9.0])
    with torch.no_grad():
        quantizer.alphas["4"].fill_(3.0)
    quantizer.set_bits(2)  # alpha 8, step 8/3: [0, 0, round(1.125) = 1, 3] -> [0, 0, 8/3, 8]
    torch.testing.assert_close(quantizer(x), torch.tensor([0.0, 0.0, 8 / 3, 8.0]), rtol=0, atol=0)
    quantizer.set_bits(4)  # alpha 3, step 1/5: [0, round(1.5) = 2, 15, 15] -> [0, 0.4, 3, 3]
    torch.testing.assert_close(quantizer(x), torch.tensor([0.0, 0.4, 3.0, 3.0]), rtol=0, atol=1e-7)
    quantizer.set_bits(32)
    assert torch.equal(quantizer(x), x)


def test_gradient_reaches_only_the_active_bit_width_alpha():
    quantizer = SwitchablePACT((2, 4), init=1.0)
    quantizer.set_bits(4)
    quantizer(torch.tensor([0.3, 2.0])).sum().backward()
    assert quantizer.alphas["2"].grad is None and quantizer.alphas["4"].grad is not None


def test_shared_clipping_level_option():
    quantizer = SwitchablePACT((2, 4, 32), init=8.0, switchable=False)
    assert list(quantizer.alphas) == ["shared"]
    assert quantizer.alpha(2) is quantizer.alpha(4)
    assert quantizer.storage_bits_total((2, 4, 32)) == 32


def test_storage_is_one_32_bit_alpha_per_quantized_bit_width():
    quantizer = SwitchablePACT((2, 4, 32), init=8.0)
    assert [quantizer.storage_bits(b) for b in (2, 4, 32)] == [32, 32, 0]
    assert quantizer.storage_bits_total((2, 4, 32)) == 64


def test_unbuilt_bit_width_is_an_error():
    with pytest.raises(ConfigError, match=r"no clipping level for 3 bits; it was built for bits \(2, 4\)"):
        SwitchablePACT((2, 4), init=8.0).set_bits(3)


@pytest.mark.parametrize("alpha", [2.5, -1.7, 0.3])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_fused_quantizer_equals_the_composed_formula(bits, alpha):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 8, 6, 6, generator=generator) * 2
    x.view(-1)[:5] = abs(alpha)  # exactly at the clipping level
    x.view(-1)[5:8] = 0.0
    upstream = torch.randn(x.shape, generator=generator)
    results = []
    for quantize in (pact_quantize, pact_quantize_reference):
        x_leaf, alpha_leaf = x.clone().requires_grad_(), torch.tensor(alpha, requires_grad=True)
        out = quantize(x_leaf, alpha_leaf, bits)
        (out * upstream).sum().backward()
        results.append((out, x_leaf.grad, alpha_leaf.grad))
    (fused, fused_x_grad, fused_alpha_grad), (composed, composed_x_grad, composed_alpha_grad) = results
    assert torch.equal(fused, composed)  # forward bit for bit
    torch.testing.assert_close(fused_x_grad, composed_x_grad, rtol=1e-6, atol=0)
    inside = (x > 0) & (x < abs(alpha))
    assert torch.equal(fused_x_grad, upstream * inside)  # exactly the straight-through mask
    torch.testing.assert_close(fused_alpha_grad, composed_alpha_grad, rtol=1e-5, atol=1e-4)


def test_fused_quantizer_saves_only_its_input():
    x = torch.randn(800, requires_grad=True)
    alpha = torch.tensor(1.5, requires_grad=True)

    def saved_numel(quantize) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            quantize(x, alpha, 4)
        return total

    assert saved_numel(pact_quantize) == 800 + 1  # x and the scalar alpha
    assert saved_numel(pact_quantize_reference) >= 3 * 800


def test_the_clip_under_compile_selects_the_same_values_as_in_eager(monkeypatch):
    from methods.quant.pact import _clip

    x = torch.tensor([float("nan"), float("-inf"), -1.0, -0.0, 0.0, 1e-30, 0.3, 0.75, 0.7500001, 2.0, float("inf")])
    clip = torch.tensor(0.75)
    eager = _clip(x, clip)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced_form = _clip(x, clip)
    assert torch.equal(eager.view(torch.int32), traced_form.view(torch.int32))  # bit patterns, NaN and -0 included


def test_the_compiled_forms_give_the_eager_values_and_gradients_for_finite_inputs(monkeypatch):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(64), torch.tensor([0.0, -0.0, 0.75, 1.5])])
    upstream = torch.randn_like(x)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        leaf, alpha = x.clone().requires_grad_(), torch.tensor(0.75, requires_grad=True)
        out = pact_quantize(leaf, alpha, 3)
        out.backward(upstream)
        results.append((out.detach(), leaf.grad, alpha.grad))
    for eager, traced_form in zip(*results):
        assert torch.equal(eager, traced_form)
