"""methods/quant/module_lists.py: a network's modules of one kind, listed once and walked again after any
registration; set_model_bits through it."""

import gc
import weakref

import torch
from torch import nn

from methods.quant import module_lists
from methods.quant.dorefa import dorefa_weight
from methods.quant.modules import QuantConv2d, SwitchableBatchNorm2d, set_model_bits


def network() -> nn.Sequential:
    return nn.Sequential(QuantConv2d(3, 4, 3, weight_quantizer=dorefa_weight, bits=8), nn.ReLU(),
                         nn.Sequential(SwitchableBatchNorm2d.from_norm(nn.BatchNorm2d(4), (2, 8)), nn.ReLU()))


def is_relu(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU)


def test_the_list_equals_a_walk_and_is_kept_until_a_registration(monkeypatch):
    model = network()
    first = module_lists.modules_where(model, "relu", is_relu)
    assert first == [m for m in model.modules() if isinstance(m, nn.ReLU)] and len(first) == 2
    walks = []
    real_modules = nn.Module.modules
    monkeypatch.setattr(nn.Module, "modules", lambda self: walks.append(self) or real_modules(self))
    assert module_lists.modules_where(model, "relu", is_relu) is first and walks == []
    model[2].append(nn.ReLU())  # a registration anywhere below
    again = module_lists.modules_where(model, "relu", is_relu)
    assert walks == [model] and len(again) == 3 and again[-1] is model[2][2]
    # lists under other names are kept apart
    assert module_lists.modules_where(model, "all", lambda m: True) == list(real_modules(model))


def test_set_model_bits_reaches_a_layer_that_replaced_another():
    model = network()
    set_model_bits(model, 2)
    assert model[0].bits == 2 and model[2][0].bits == 2
    model[0] = QuantConv2d(3, 4, 3, weight_quantizer=dorefa_weight, bits=8)
    set_model_bits(model, 2)
    assert model[0].bits == 2
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(model(x), model(x))


def test_a_listed_network_is_not_kept_alive():
    model = network()
    module_lists.modules_where(model, "relu", is_relu)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
