"""The fused DoReFa quantizers against the composed formulas, in a whole training step of each DoReFa method.

ResNet-20, batch 128, 8x8 inputs, bits 2,4,8. ``fused``: both fused nodes. ``composed-weight``: the fused activation
with :func:`methods.quant.dorefa.dorefa_weight_reference` patched in for the weights. ``composed``: both composed
(the activation and the weight reference everywhere the methods call them). Compare the medians of one method.
"""

from __future__ import annotations

import pytest
import torch

import methods.anyprecision
import methods.emq
import methods.emq_config
import methods.quant.dorefa as dorefa
from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.registry import get_method

BITS = (2, 4, 8)


@pytest.mark.parametrize("variant", ["fused", "composed-weight", "composed"])
@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq"])
def test_dorefa_method_step(benchmark, monkeypatch, name, variant):
    if variant == "composed":
        for module in (dorefa, methods.anyprecision, methods.emq_config):
            monkeypatch.setattr(module, "dorefa_activation", dorefa.dorefa_activation_reference)
    if variant in ("composed", "composed-weight"):
        for module in (methods.anyprecision, methods.emq):
            monkeypatch.setattr(module, "dorefa_weight", dorefa.dorefa_weight_reference)
    info = DatasetInfo("bench", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, "none")
    method = get_method(name)()
    model = method.build("resnet20", 10, BITS, info, 1.0).train()
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    torch.manual_seed(0)
    batch = Batch(torch.rand(128, 3, 8, 8), torch.randint(0, 10, (128,)), torch.arange(128))

    def step():
        model.zero_grad()
        method.train_step(model, batch, ctx)

    benchmark(step)
