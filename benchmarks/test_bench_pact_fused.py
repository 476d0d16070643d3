"""The fused PACT quantizer against the composed formula, in a whole AdaBits training step.

ResNet-20, batch 128, 8x8 inputs, bits 2,4,8. ``fused``: :func:`methods.quant.pact.pact_quantize` as it ships;
``composed``: :func:`methods.quant.pact.pact_quantize_reference` patched in. Compare the two medians.
"""

from __future__ import annotations

import pytest
import torch

import methods.quant.pact as pact
from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.registry import get_method

BITS = (2, 4, 8)


@pytest.mark.parametrize("variant", ["fused", "composed"])
def test_adabits_step(benchmark, monkeypatch, variant):
    if variant == "composed":
        monkeypatch.setattr(pact, "pact_quantize", pact.pact_quantize_reference)
    info = DatasetInfo("bench", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, "none")
    method = get_method("adabits")()
    model = method.build("resnet20", 10, BITS, info, 1.0).train()
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    torch.manual_seed(0)
    batch = Batch(torch.rand(128, 3, 8, 8), torch.randint(0, 10, (128,)), torch.arange(128))

    def step():
        model.zero_grad()
        method.train_step(model, batch, ctx)

    benchmark(step)
