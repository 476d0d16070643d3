"""Epoch loader throughput: a folder data set through the DataLoader at several worker counts, and the in-memory
fast path, which the worker count must not touch.

The folder set is a synthetic ImageNet (``imagenet/{train,val}/<wnid>/*.JPEG``, the layout ``load_dataset``
reads) of ``IMAGES`` (3,000) JPEGs of 500x375, written once per session; one epoch goes through
``epoch_batches`` with the ImageNet preset's train transform (random-resized crop to 224 + flip, seeded per
sample) at 0, 1 and 2 workers, and 8 and 16 where the machine has 16 CPUs. ``extra_info["images_per_s"]`` is the
best epoch's rate; the 2-worker test also records ``speedup_vs_0_workers`` (its rate over the 0-worker one,
measured in the same session). The in-memory benchmark runs one digits epoch at 0 and 2 workers and records their
time ratio, which should be 1: in-memory sets never start a worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import load_dataset
from harness.loader import epoch_batches

IMAGES = 3000  # "a few thousand": enough that starting the workers each epoch is a small share
CLASSES = 10
SIZE = (500, 375)  # width x height, a typical ImageNet photo
BATCH = 64
WORKERS = [0, 1, 2] + ([8, 16] if (os.cpu_count() or 1) >= 16 else [])
CPU = torch.device("cpu")

_rates: dict[int, float] = {}


def _photo(rng: np.random.Generator) -> Image.Image:
    # Smooth colour gradients plus mild noise compress like a photo (tens of kB), unlike pure noise.
    height, width = SIZE[1], SIZE[0]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    planes = [127 + 100 * np.sin(xs / rng.uniform(20, 80) + ys / rng.uniform(20, 80) + p) for p in phase]
    pixels = np.stack(planes, axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", IMAGES), ("val", CLASSES)):
        for index in range(count):
            folder = root / "imagenet" / split / f"n{index % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            _photo(rng).save(folder / f"{split}_{index}.JPEG", format="JPEG", quality=90)
    return root


def _epoch(split, workers: int) -> int:
    return sum(len(batch.y) for batch in epoch_batches(split, BATCH, 0, 0, True, CPU, workers=workers))


@pytest.mark.parametrize("workers", WORKERS)
def test_folder_epoch_images_per_second(benchmark, imagenet_root, workers):
    split = load_dataset("imagenet", imagenet_root).train
    assert split.per_sample and len(split) == IMAGES
    seconds: list[float] = []

    def epoch() -> int:
        start = time.perf_counter()
        count = _epoch(split, workers)
        seconds.append(time.perf_counter() - start)
        return count

    assert benchmark.pedantic(epoch, rounds=3, iterations=1) == IMAGES
    _rates[workers] = IMAGES / min(seconds)
    benchmark.extra_info["images_per_s"] = round(_rates[workers], 1)
    benchmark.extra_info["cpus"] = os.cpu_count()
    if workers == 2 and 0 in _rates:
        benchmark.extra_info["speedup_vs_0_workers"] = round(_rates[2] / _rates[0], 3)


def test_in_memory_epoch_unaffected_by_workers(benchmark):
    split = load_dataset("digits").train
    assert not split.per_sample
    benchmark(_epoch, split, 2)
    timings = {}
    for workers in (0, 2):
        start = time.perf_counter()
        for _ in range(5):
            _epoch(split, workers)
        timings[workers] = time.perf_counter() - start
    benchmark.extra_info["time_2_over_0_workers"] = round(timings[2] / timings[0], 3)
