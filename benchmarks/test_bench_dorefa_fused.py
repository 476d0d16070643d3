"""The fused DoReFa activation against the composed formula, in a whole training step of each DoReFa method.

ResNet-20, batch 128, 8x8 inputs, bits 2,4,8. ``composed`` patches
:func:`methods.quant.dorefa.dorefa_activation_reference` in for the fused function everywhere the methods call it;
compare the two medians of one method.
"""

from __future__ import annotations

import pytest
import torch

import methods.anyprecision
import methods.emq_config
import methods.quant.dorefa as dorefa
from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.registry import get_method

BITS = (2, 4, 8)


@pytest.mark.parametrize("variant", ["fused", "composed"])
@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq"])
def test_dorefa_method_step(benchmark, monkeypatch, name, variant):
    if variant == "composed":
        for module in (dorefa, methods.anyprecision, methods.emq_config):
            monkeypatch.setattr(module, "dorefa_activation", dorefa.dorefa_activation_reference)
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
