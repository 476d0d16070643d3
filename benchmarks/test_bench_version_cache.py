"""The per-version cache of the weight quantizers' bit-width-independent terms, on and off, in one training step.

ResNet-20, batch 128, bits 2,4,8, at 8x8 and 32x32: one step of each method whose weight quantizer uses
:mod:`methods.quant.version_cache` (DoReFa: Any-Precision, dedicated, EMQ with its bias correction; SAT: AdaBits),
timed alternately with the cache on and off in the same test (``rounds`` medians each), so the ratio in
``extra_info["cached_over_uncached"]`` is measured in one run on one machine state. Both give the same bits
(``tests/methods/quant/test_version_cache.py``); only the time differs. Dedicated trains one network per
bit-width, so each of its weights is quantized once per step and the cache cannot share anything there.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.registry import get_method
from methods.quant.version_cache import version_cache_disabled

BITS = (2, 4, 8)
ROUNDS = 5
STEPS_PER_ROUND = 5


def _median_step_seconds(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq", "adabits"])
def test_cached_terms_step(benchmark, name, size):
    info = DatasetInfo("bench", 10, 3, size, (0.5,) * 3, (0.25,) * 3, "none")
    method = get_method(name)()
    model = method.build("resnet20", 10, BITS, info, 1.0).train()
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    torch.manual_seed(0)
    batch = Batch(torch.rand(128, 3, size, size), torch.randint(0, 10, (128,)), torch.arange(128))

    def step():
        model.zero_grad()
        method.train_step(model, batch, ctx)
        # an optimizer step's version bump: each step recomputes the cached terms once
        torch.autograd.graph.increment_version(list(model.parameters()))

    step()
    cached, uncached = [], []
    for _ in range(ROUNDS):
        cached.append(_median_step_seconds(step, STEPS_PER_ROUND))
        with version_cache_disabled():
            uncached.append(_median_step_seconds(step, STEPS_PER_ROUND))
    benchmark.extra_info["cached_step_s"] = round(statistics.median(cached), 5)
    benchmark.extra_info["uncached_step_s"] = round(statistics.median(uncached), 5)
    benchmark.extra_info["cached_over_uncached"] = round(statistics.median(cached) / statistics.median(uncached), 3)
    benchmark.pedantic(step, rounds=3, iterations=1)
