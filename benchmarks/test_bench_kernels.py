"""A training step with the compiled quantizer kernels (methods/quant/kernels.py) against the same step without them.

AdaBits (PACT activations) and MBQuant (bounded activations) at their benchmark setting (ResNet-20, batch 128,
bits 2,4,8) and 32x32 inputs, where the kernels run; the timed step is the kernels' one, and ``extra_info`` holds
``eager_over_kernels``: the median over rounds of an eager step over the kernel step timed right before it (two
networks of the same method and initialization, alternating, so a machine's speed drift cancels), and both
steps' ratios to three full-precision steps. The first kernel call compiles (seconds), so each side gets a warm-up
step first.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_bench_train_step import BITS, SIZES, alternating_medians, batch, full_precision_step_seconds, info

from harness.method import RunContext
from harness.registry import get_method
from methods.quant import kernels
from methods.quant.kernels import fused_kernels

ROUNDS = 7


@pytest.mark.parametrize("name", ["adabits", "mbquant"])
def test_step_with_and_without_kernels(benchmark, name):
    size = SIZES["32x32"]
    method = get_method(name)()
    torch.manual_seed(0)
    model = method.build("resnet20", 10, BITS, info(size), 1.0)
    model.train()
    eager_model = copy.deepcopy(model)
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    data = batch(size)

    def step(network, fused: bool) -> None:
        network.zero_grad()
        with fused_kernels(fused):
            method.train_step(network, data, ctx)
        torch.autograd.graph.increment_version(list(network.parameters()))  # as an optimizer step does

    step(model, True)  # compiles the kernels
    assert kernels._Settings.failure is None, kernels._Settings.failure  # else both sides would time the eager path
    step(eager_model, False)
    ratio, kernel_seconds, eager_seconds = alternating_medians(lambda: step(model, True),
                                                               lambda: step(eager_model, False), ROUNDS)
    fp_seconds = full_precision_step_seconds(data)
    benchmark(step, model, True)
    benchmark.extra_info["eager_over_kernels"] = round(ratio, 3)
    for label, median in (("kernels", kernel_seconds), ("eager", eager_seconds)):
        benchmark.extra_info[f"{label}_ratio_to_k_fp_steps"] = round(median / (len(BITS) * fp_seconds), 3)
