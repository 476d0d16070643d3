"""Shared-memory slots that DataLoader workers write decoded batches into, reused batch after batch.

A ``torch.utils.data.DataLoader`` worker hands each collated batch to the training process through a new
shared-memory segment: the worker creates it and faults in its pages (9.6 MB for an ImageNet batch of 64 uint8
images at 224), and the training process maps it and faults the pages in again to read them, once per batch.
Measured on 2 Xeon cores, one process decoding the loader benchmark's JPEGs: 745 images/s with the batch kept as
a list, 724 stacked into ordinary memory, 687 stacked into a new shared segment per batch.

:class:`BatchRing` makes ``slots`` batch-sized slots in shared memory once per loader, and a worker stacks batch
``b`` into slot ``b % slots`` and returns only ``(b, count)``. The reader (the training process) reads the batch
from that slot and releases it when it asks for the next batch. A worker writes batch ``b`` only once batch
``b - slots`` is released, so a slot is never overwritten while it is read. With ``slots`` = workers x prefetch
+ 1 the wait never happens in practice: a DataLoader hands out batch ``b`` only after its reader has received
batch ``b - workers x prefetch``, by which time the reader has released every batch before that one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from harness.errors import DataError

POLL_SECONDS = 0.0005


@dataclass(frozen=True)
class RingBatch:
    """What a worker returns for a batch it wrote into the ring: its number and how many samples it holds."""

    number: int
    count: int


class BatchRing:
    """``slots`` slots of ``capacity`` uint8 samples of ``sample_shape`` in shared memory, and the reader's count
    of released batches (shared too, so the workers can wait on it)."""

    def __init__(self, slots: int, capacity: int, sample_shape: tuple[int, ...]) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a ring needs at least one slot and a capacity of one sample, got {slots}, {capacity}")
        self.slots = slots
        shape = (slots, capacity, *sample_shape)
        # a new shared segment whose pages are first touched by the workers that write them (share_memory_() on a
        # tensor would write every slot here first)
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        self.images = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
        # [batches released, closed]: only the reader writes them, workers read them
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def released(self) -> int:
        return int(self.state[0])

    def write(self, number: int, samples: list[torch.Tensor]) -> RingBatch:
        """In a worker: stack ``samples`` into batch ``number``'s slot once the reader has released the batch
        that last used it."""
        if len(samples) > self.images.shape[1]:
            raise ValueError(f"batch {number} has {len(samples)} samples; the ring holds {self.images.shape[1]}")
        while self.released < number - self.slots + 1:
            if int(self.state[1]):
                raise DataError("the data loader was closed while a worker waited for a free batch slot")
            time.sleep(POLL_SECONDS)
        if samples:
            torch.stack(samples, out=self.images[number % self.slots, : len(samples)])
        return RingBatch(number, len(samples))

    def read(self, batch: RingBatch) -> torch.Tensor:
        """The reader's view of a written batch, valid until it calls :meth:`release` for it."""
        return self.images[batch.number % self.slots, : batch.count]

    def release(self) -> None:
        """The reader is done with the oldest unreleased batch (batches are read and released in order)."""
        self.state[0] += 1

    def close(self) -> None:
        """Tell waiting workers to stop: no batch will be released any more."""
        self.state[1] = 1
