"""A training step with the quantizer kernels against the same step without them: the compiled kernels
(methods/quant/kernels.py) for AdaBits (PACT activations) and MBQuant (bounded activations) at 32x32 inputs, where
they run (with the native operators off), and the native operators (methods/quant/native.py: DoReFa, PACT and
bounded quantizers) for every quantized method at 8x8 and 32x32 (off: the compiled kernels where they run, else the
eager passes), and of those the weight-list operators alone (DoReFa's and SAT's weights and EMQ's bias correction,
methods/quant/csrc/weight_lists.cpp, sat_weight_lists.cpp, bias_correction.cpp) for the methods with those weights
(off: the list operations).

Each method at its benchmark setting (ResNet-20, batch 128, bits 2,4,8); the timed step is the kernels' one, and
``extra_info`` holds ``eager_over_kernels``: the median over rounds of a step without them over the kernel step
timed right before it (two networks of the same method and initialization, alternating, so a machine's speed drift
cancels), and both steps' ratios to three full-precision steps. The first kernel call compiles or loads the kernels
(seconds), so each side gets a warm-up step first.
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from test_bench_train_step import BITS, SIZES, alternating_medians, batch, full_precision_step_seconds, info

from harness.method import RunContext
from harness.registry import get_method
from methods.quant import kernels, native
from methods.quant.kernels import fused_kernels
from methods.quant.native import native_kernels

ROUNDS = 7


@pytest.mark.parametrize("name", ["adabits", "mbquant"])
def test_step_with_and_without_kernels(benchmark, name):
    with native_kernels(False):
        _step_with_and_without(benchmark, name, SIZES["32x32"], fused_kernels, lambda: kernels._Settings.failure)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq", "adabits", "mbquant"])
def test_step_with_and_without_native(benchmark, name, size):
    _step_with_and_without(benchmark, name, SIZES[size], native_kernels, lambda: native._State.failure)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq", "adabits"])
def test_step_with_and_without_weight_lists(benchmark, name, size):
    _step_with_and_without(benchmark, name, SIZES[size], _weight_lists, lambda: native._State.failure)


@contextlib.contextmanager
def _weight_lists(on: bool):
    """The weight-list operators on or off, every other native operator on: off, ``native.list_loop`` answers None,
    as where an operator declines its inputs, and the callers run their list operations."""
    with mock.patch.object(native, "list_loop", native.list_loop if on else lambda *args: None):
        yield


def _step_with_and_without(benchmark, name: str, size: int, switch, failure) -> None:
    """``switch(on)`` switches the kernels on or off; ``failure()`` says why they could not run, if they could not."""
    method = get_method(name)()
    torch.manual_seed(0)
    model = method.build("resnet20", 10, BITS, info(size), 1.0)
    model.train()
    eager_model = copy.deepcopy(model)
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    data = batch(size)

    def step(network, on: bool) -> None:
        network.zero_grad()
        with switch(on):
            method.train_step(network, data, ctx)
        torch.autograd.graph.increment_version(list(network.parameters()))  # as an optimizer step does

    step(model, True)  # compiles or loads the kernels
    assert failure() is None, failure()  # else both sides would time the eager path
    step(eager_model, False)
    ratio, kernel_seconds, eager_seconds = alternating_medians(lambda: step(model, True),
                                                               lambda: step(eager_model, False), ROUNDS)
    fp_seconds = full_precision_step_seconds(data)
    benchmark(step, model, True)
    benchmark.extra_info["eager_over_kernels"] = round(ratio, 3)
    for label, median in (("kernels", kernel_seconds), ("eager", eager_seconds)):
        benchmark.extra_info[f"{label}_ratio_to_k_fp_steps"] = round(median / (len(BITS) * fp_seconds), 3)
