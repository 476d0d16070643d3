"""Harness overhead: iterating one epoch of batches through the loader vs raw tensor slicing (digits)."""

import torch

from harness.data import load_dataset
from harness.loader import epoch_batches


def test_loader_epoch(benchmark):
    data = load_dataset("digits")
    benchmark(lambda: sum(len(b.y) for b in epoch_batches(data.train, 128, 0, 0, False, torch.device("cpu"))))


def test_raw_tensor_epoch(benchmark):
    data = load_dataset("digits")
    images = data.train.get_batch(torch.arange(len(data.train)))

    def iterate():
        order = torch.randperm(len(images))
        return sum(len(images[chunk]) for chunk in torch.split(order, 128))

    benchmark(iterate)
