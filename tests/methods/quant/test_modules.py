"""Switchable layers: switching has no hidden state, BN per bit-width, layer swapping by role."""

import pytest
import torch
from torch import nn

from harness.errors import ConfigError
from methods.quant.dorefa import dorefa_weight
from methods.quant.modules import QuantConv2d, SwitchableBatchNorm2d, set_model_bits, swap_modules


def test_quant_conv_uses_quantized_weight_and_copies_initial_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    qconv = QuantConv2d.from_conv(conv, weight_quantizer=dorefa_weight, bits=2)
    assert torch.equal(qconv.weight, conv.weight)
    x = torch.randn(1, 2, 5, 5)
    expected = nn.functional.conv2d(x, dorefa_weight(conv.weight, 2), padding=1)
    assert torch.equal(qconv(x), expected)


def test_switchable_bn_keeps_separate_statistics_per_bits():
    bn = SwitchableBatchNorm2d(3, (2, 8))
    bn.train()
    bn.set_bits(2)
    bn(torch.randn(4, 3, 2, 2) + 5.0)
    assert torch.all(bn.norms["2"].running_mean > 0.1)
    assert torch.equal(bn.norms["8"].running_mean, torch.zeros(3))
    with pytest.raises(ConfigError, match="no batch norm for 4 bits"):
        bn.set_bits(4)


def test_swap_modules_replaces_a_shared_module_by_one_shared_replacement():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), relu, nn.Sequential(relu))
    swap_modules(model, lambda m: nn.Tanh() if isinstance(m, nn.ReLU) else None)
    assert isinstance(model[1], nn.Tanh) and model[1] is model[2][0]


def test_set_model_bits_reaches_nested_layers():
    model = nn.Sequential(nn.Sequential(SwitchableBatchNorm2d(2, (2, 4))), SwitchableBatchNorm2d(2, (2, 4)))
    set_model_bits(model, 2)
    assert model[0][0].bits == 2 and model[1].bits == 2
