"""Epoch batches in a reproducible order: the same seed gives the same order and augmentation to every method.

Randomness comes only from generators derived from (seed, epoch, stream), never from the global RNG, so a
resumed run replays exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from harness import distributed
from harness.data import ImageSet
from harness.method import Batch

ORDER_STREAM = 0
AUGMENT_STREAM = 1


def derived_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + stream * 101 + 17) % (2**63))


def _chunks(indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = list(torch.split(indices, batch_size))
    # A trailing batch of one sample breaks batch norm in train mode; fold it into the previous batch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _stream(dataset: ImageSet, indices: torch.Tensor, batch_size: int, seed: int, epoch: int, stream: int,
            augment: bool, device: torch.device, channels_last: bool) -> Iterator[Batch]:
    order = indices[torch.randperm(len(indices), generator=derived_generator(seed, epoch, ORDER_STREAM + stream))]
    aug_generator = derived_generator(seed, epoch, AUGMENT_STREAM + stream)
    for chunk in _chunks(order, batch_size):
        x = dataset.get_batch(chunk, augment=augment, generator=aug_generator)
        if distributed.is_active():
            # Every rank draws the whole global batch's augmentation so its generator stays in step with the
            # other ranks', then keeps its own share (folder data sets thus decode the whole batch on every rank).
            keep = distributed.shard(torch.arange(len(chunk)))
            chunk, x = chunk[keep], x[keep.to(x.device)]
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield Batch(x, dataset.labels[chunk].to(device, non_blocking=True), chunk)


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    return len(_chunks(torch.arange(dataset_size), batch_size))


def epoch_batches(dataset: ImageSet, batch_size: int, seed: int, epoch: int, augment: bool, device: torch.device,
                  per_bits: dict[int, torch.Tensor] | None = None, channels_last: bool = False) -> Iterator[Batch]:
    """Batches of one epoch: all samples shuffled, or (``per_bits``) one stream per bit-width zipped together.

    Per-bit streams stop with the shortest; the common batch is the highest bit-width's. Under ``torchrun`` each
    rank gets its share of every global batch (:func:`harness.distributed.shard`).
    """
    if per_bits is None:
        yield from _stream(dataset, torch.arange(len(dataset)), batch_size, seed, epoch, 0, augment, device,
                           channels_last)
        return
    bits = sorted(per_bits)
    streams = [_stream(dataset, per_bits[b], batch_size, seed, epoch, 2 * (i + 1), augment, device, channels_last)
               for i, b in enumerate(bits)]
    for batches in zip(*streams):
        by_bits = dict(zip(bits, batches))
        top = by_bits[bits[-1]]
        yield Batch(top.x, top.y, top.indices, per_bits=by_bits)
