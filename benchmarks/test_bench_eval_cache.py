"""Evaluation with the quantized-weight cache against recomputing the weights on every batch.

One evaluation pass of every registered method at 8 bits over the digits test split (360 images, batches of 32:
12 batches), ResNet-20 at width 1. ``extra_info["speedup"]`` is the uncached pass time over the cached one,
measured in the same test.
"""

from __future__ import annotations

import time

import pytest
import torch

from harness.data import load_dataset
from harness.registry import get_method, list_methods
from methods.quant.weight_cache import weight_cache_disabled

BATCH = 32


def evaluation_pass(method, model, images: torch.Tensor) -> None:
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            model(images[start:start + BATCH])


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "fp"])
def test_eval_pass_with_weight_cache(benchmark, name):
    data = load_dataset("digits")
    method = get_method(name)()
    bits = (2, 4, 8)
    model = method.build("resnet20", data.info.num_classes, bits, data.info, 1.0).eval()
    method.set_bits(model, 8)
    images = data.test.get_batch(torch.arange(len(data.test)))
    benchmark(evaluation_pass, method, model, images)
    with weight_cache_disabled():
        start = time.perf_counter()
        for _ in range(3):
            evaluation_pass(method, model, images)
        uncached = (time.perf_counter() - start) / 3
    benchmark.extra_info["uncached_s"] = round(uncached, 5)
    if benchmark.stats:  # None under --benchmark-disable, which runs the pass once, untimed
        benchmark.extra_info["speedup"] = round(uncached / benchmark.stats.stats.median, 3)
