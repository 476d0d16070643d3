"""benchmarks/quantizer_parts.py: each registered method's weight and/or input quantizers become the identity, and
only those."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.registry import get_method, list_methods
from methods.quant.branches import BranchConv2d
from methods.quant.modules import QuantConv2d
from methods.quant.sat_layers import SATLayer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quantizer_parts.py"
_spec = importlib.util.spec_from_file_location("quantizer_parts", SCRIPT)
quantizer_parts = importlib.util.module_from_spec(_spec)
sys.modules["quantizer_parts"] = quantizer_parts
_spec.loader.exec_module(quantizer_parts)

PARTS = [("weight",), ("input",), ("weight", "input")]


def built(name: str):
    torch.manual_seed(0)
    info = DatasetInfo("parts", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, "none")
    method = get_method(name)()
    bits = tuple(getattr(method, "fixed_bits", None) or (2, 4))  # the full-precision reference: 32
    model = method.build("resnet20", 10, bits, info, 1.0)
    method.set_bits(model, bits[0])
    return method, model.train()


def quantized_layers(model) -> list:
    """The layers with a quantizer, weight or input: those the replacements change."""
    return [m for m in model.modules() if isinstance(m, (QuantConv2d, SATLayer, BranchConv2d))
            and not (isinstance(m, BranchConv2d) and not m.quantized)
            and not (isinstance(m, QuantConv2d) and m.weight_quantizer is None and m.input_quantizer is None)]


def weight_is_latent(layer) -> bool:
    if isinstance(layer, QuantConv2d):
        return torch.equal(layer.weight_quantizer(layer.weight, 2), layer.weight)
    if isinstance(layer, SATLayer):
        return layer.quantized_weight() is layer.weight and layer.batch_terms() is None
    start, count = layer.window
    rows = layer.weight[start * layer.out_per_branch:(start + count) * layer.out_per_branch]
    return torch.equal(layer.active_weight(), rows)


def input_passes(layer) -> bool:
    """Whether the layer's input reaches its convolution as it is (a kept quantizer returns a new tensor)."""
    if isinstance(layer, SATLayer):
        return layer.input_quantizer is None
    if isinstance(layer, QuantConv2d):
        x = torch.rand(2, layer.in_channels, 4, 4)
        return layer.input_quantizer(x, 2) is x
    x = torch.rand(2, layer.window[1] * layer.in_per_branch, 4, 4)
    return layer.quantize_input(x) is x


@pytest.mark.parametrize("parts", PARTS, ids="+".join)
@pytest.mark.parametrize("name", list_methods())
def test_removed_parts_are_the_identity_and_the_others_stay(name, parts):
    _, model = built(name)
    layers = quantized_layers(model)
    quantizes_input = [layer for layer in layers
                       if getattr(layer, "input_quantizer", None) is not None or isinstance(layer, BranchConv2d)]
    assert quantizer_parts.remove_quantizers(model, parts) == len(layers)
    if not layers:  # the full-precision reference: nothing to remove
        assert getattr(get_method(name), "fixed_bits", None)
        return
    assert quantizes_input
    for layer in layers:
        assert weight_is_latent(layer) == ("weight" in parts)
    for layer in quantizes_input:
        assert input_passes(layer) == ("input" in parts)


def test_a_network_without_quantizers_computes_the_plain_convolutions():
    """Any-Precision with both parts gone: each quantized convolution is the plain convolution of its latent
    weight (exactly), and a training forward pass runs."""
    _, model = built("anyprecision")
    quantizer_parts.remove_quantizers(model, ("weight", "input"))
    layer = next(m for m in model.modules() if isinstance(m, QuantConv2d) and m.input_quantizer is not None)
    x = torch.randn(2, layer.in_channels, 6, 6)
    expected = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    assert torch.equal(layer(x), expected)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_unknown_or_empty_parts_are_refused():
    _, model = built("anyprecision")
    with pytest.raises(ValueError, match="parts"):
        quantizer_parts.remove_quantizers(model, ("bias",))
    with pytest.raises(ValueError, match="parts"):
        quantizer_parts.remove_quantizers(model, ())


def one_pass_weight(layer) -> torch.Tensor:
    if isinstance(layer, QuantConv2d):
        return layer.weight_quantizer(layer.weight, 2)
    if isinstance(layer, SATLayer):
        return layer.quantized_weight()
    return layer.active_weight()


def active_rows(layer, tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a weight-shaped ``tensor`` the layer runs (a branch convolution: its active branches')."""
    if not isinstance(layer, BranchConv2d):
        return tensor
    start, count = layer.window
    return tensor[start * layer.out_per_branch:(start + count) * layer.out_per_branch]


def one_pass_input(layer, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QuantConv2d):
        return layer.input_quantizer(x, 2)
    if isinstance(layer, SATLayer):
        return layer.input_quantizer(x)
    return layer.quantize_input(x)


@pytest.mark.parametrize("name", list_methods())
def test_one_pass_quantizers_write_a_new_tensor_of_the_same_values_with_the_same_gradient(name):
    """Every quantizer becomes one product by 1.0: a new tensor (one pass over memory) equal to its input, whose
    gradient reaches the latent weight or the input unchanged; a training step still runs."""
    method, model = built(name)
    layers = quantized_layers(model)
    assert quantizer_parts.one_pass_quantizers(model) == len(layers)
    if not layers:
        return
    inputs_checked = 0
    for layer in layers:
        if not isinstance(layer, QuantConv2d) or layer.weight_quantizer is not None:
            weight = one_pass_weight(layer)
            latent = active_rows(layer, layer.weight)
            assert torch.equal(weight, latent) and weight.data_ptr() != latent.data_ptr()
            layer.weight.grad = None
            weight.backward(torch.full_like(weight, 0.5))
            assert torch.equal(active_rows(layer, layer.weight.grad), torch.full_like(weight, 0.5))
        if getattr(layer, "input_quantizer", None) is not None or isinstance(layer, BranchConv2d):
            channels = (layer.window[1] * layer.in_per_branch if isinstance(layer, BranchConv2d)
                        else layer.weight.shape[1])
            x = torch.randn(2, channels, 4, 4, requires_grad=True)
            out = one_pass_input(layer, x)
            assert torch.equal(out, x) and out is not x
            out.backward(torch.full_like(out, 2.0))
            assert torch.equal(x.grad, torch.full_like(x, 2.0))
            inputs_checked += 1
    assert inputs_checked
    sat = [layer for layer in layers if isinstance(layer, SATLayer) and layer.input_quantizer is not None]
    for layer in sat:  # the PACT module keeps its bit-width bookkeeping
        layer.set_bits(layer.bits_set[0])
        assert layer.input_quantizer.bits == layer.bits_set[0]
    model.zero_grad()
    batch = Batch(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    ctx = RunContext(bits=(2, 4), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    losses = method.train_step(model, batch, ctx)
    assert losses and all(math.isfinite(value) for value in losses.values())
