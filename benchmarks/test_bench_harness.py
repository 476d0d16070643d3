"""Harness overhead: one epoch of the training loop with a no-op model against raw tensor iteration (digits).

The loop figure includes everything the harness does per step (ordering, batching, the lr schedule, zeroing and
stepping the optimizer, the NaN check, pass counting, per-epoch checkpoint bookkeeping without a store), so the
difference between the two is what the harness adds on top of the model.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.config import RunSpec, Schedule
from harness.data import load_dataset
from harness.loader import epoch_batches
from harness.method import Method
from harness.registry import register_method, unregister
from harness.train import run_cell


class NoOpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * self.scale


class NoOp(Method):
    """Touches every batch once and trains one scalar: the cost of the loop itself."""

    def build(self, model_name, num_classes, bits, data_info, width):
        return NoOpModel()

    def train_step(self, model, batch, ctx):
        loss = model(batch.x).mean()
        loss.backward()
        ctx.count_passes(max(ctx.bits), len(batch.y))
        return {"loss": loss.item()}

    def set_bits(self, model, bits):
        pass


def test_loop_epoch_noop_model(benchmark):
    register_method("bench-noop")(NoOp)
    try:
        data = load_dataset("digits")
        spec = RunSpec(methods=("bench-noop",), bits=(8,), schedule=Schedule(epochs=1), device="cpu")
        benchmark(lambda: run_cell(spec, "bench-noop", 0, data))
    finally:
        unregister("bench-noop")


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
