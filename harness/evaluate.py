"""Top-1 / top-5 accuracy per bit-width on the test split (no selection on test data ever happens here)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from harness.imageset import ImageSet
from harness.loader import eval_batches
from harness.runtime import Runtime


@torch.no_grad()
def evaluate_bits(model: nn.Module, method, test_set: ImageSet, bits: tuple[int, ...], batch_size: int,
                  device: torch.device, runtime: Runtime | None = None,
                  workers: int = 0) -> dict[int, dict[str, float]]:
    """``{bits: {"top1": %, "top5": %}}``; top-5 is top-k with k = min(5, number of classes).

    ``workers``: DataLoader processes decoding a folder test split (``harness.loader.eval_batches``).
    """
    model.eval()
    results: dict[int, dict[str, float]] = {}
    for b in bits:
        method.set_bits(model, b)
        correct1 = correct5 = 0
        for x, chunk in eval_batches(test_set, batch_size, device, workers):
            x = runtime.prepare_input(x) if runtime else x.to(device)
            y = test_set.labels[chunk].to(device)
            with runtime.autocast() if runtime else contextlib.nullcontext():
                logits = model(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(y.unsqueeze(1))
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
        results[b] = {"top1": 100.0 * correct1 / len(test_set), "top5": 100.0 * correct5 / len(test_set)}
    return results
