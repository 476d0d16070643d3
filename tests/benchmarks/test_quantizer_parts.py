"""benchmarks/quantizer_parts.py: each registered method's weight and/or input quantizers become the identity, and
only those."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.data import DatasetInfo
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
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, SATLayer, BranchConv2d))
              and not (isinstance(m, BranchConv2d) and not m.quantized)
              and not (isinstance(m, QuantConv2d) and m.weight_quantizer is None and m.input_quantizer is None)]
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
