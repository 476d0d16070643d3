"""Epoch batches in a reproducible order: the same seed gives the same order and augmentation to every method.

Randomness comes only from generators derived from (seed, epoch, stream), never from the global RNG, so a
resumed run replays exactly the batches the uninterrupted run would have seen. The batch order of a stream is
one permutation drawn over the whole data set; under ``torchrun`` each rank takes its share of every global
batch (:func:`harness.distributed.shard`). Two paths produce the images:

* In-memory splits (digits, Fashion-MNIST, CIFAR, synthetic): ``get_batch`` gathers and augments the whole global
  batch at once, drawing from one augmentation generator per stream; every rank draws the whole batch (so its
  generator stays in step with the other ranks') and keeps its share. Cheap, and their numbers never change.
* Per-sample splits (image folders: TinyImageNet, ImageNet): a ``torch.utils.data.DataLoader`` with ``workers``
  processes (``--workers``; 0: this process), prefetching and, on CUDA, pinned memory, decodes only this rank's
  share of each global batch. Each sample's augmentation is seeded by :func:`sample_seed` (seed, epoch, stream,
  sample index), a pure function, so the batches are bit-identical whatever the number of workers and ranks, and
  on resume. Workers write uint8 batches into a ring of shared-memory slots (:mod:`harness.batch_ring`); the
  scaling to float32 in [0, 1] happens after the copy to the device (on the CPU, into memory that the next batch
  reuses: :func:`harness.allocator.reusable_empty`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from harness import allocator, distributed
from harness.batch_ring import BatchRing, RingBatch
from harness.errors import DataError
from harness.imageset import ImageSet, unit_range
from harness.method import Batch
from harness.threads import intra_op_threads

ORDER_STREAM = 0
AUGMENT_STREAM = 1
PREFETCH_FACTOR = 2  # batches each worker decodes ahead

_MASK64 = (1 << 64) - 1


def derived_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, epoch, stream))


def _derived_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + stream * 101 + 17) % (2**63)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, stream: int, index: int) -> int:
    """The augmentation seed of sample ``index`` (its position in the split) in ``stream`` of ``epoch``.

    A pure function of its arguments (no state advances), mixed with splitmix64 so that neighbouring samples and
    epochs get unrelated generator seeds.
    """
    return _seed_of(_stream_base(seed, epoch, stream), index)


def _stream_base(seed: int, epoch: int, stream: int) -> int:
    return _splitmix64(_derived_seed(seed, epoch, AUGMENT_STREAM + stream))


def _seed_of(base: int, index: int) -> int:
    return _splitmix64(base ^ index) % (2**63)


def _chunks(indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = list(torch.split(indices, batch_size))
    # A trailing batch of one sample breaks batch norm in train mode; fold it into the previous batch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _global_batches(indices: torch.Tensor, batch_size: int, seed: int, epoch: int, stream: int) -> list[torch.Tensor]:
    order = indices[torch.randperm(len(indices), generator=derived_generator(seed, epoch, ORDER_STREAM + stream))]
    return _chunks(order, batch_size)


def _on_device_in_unit_range(x: torch.Tensor, device: torch.device, workers: int = 0) -> torch.Tensor:
    """Decoded samples travel as uint8 (4x less to copy) and are scaled where they land.

    On the CPU, while ``workers`` decoding processes share the cores, the scaling runs on one thread: a parallel
    region would wait on a thread that a worker holds off its core, and its idle threads spin against the workers
    (the loader benchmark's 2-worker epoch on 2 Xeon cores: about 1,090 images/s with torch's 2 threads here,
    about 1,170 with one). The float32 batch goes into :func:`harness.allocator.reusable_empty`'s memory, which
    the next batch reuses instead of faulting in 38.5 MB of fresh pages.
    """
    x = x.to(device, non_blocking=True)
    if x.device.type != "cpu" or x.dtype != torch.uint8:
        return unit_range(x)
    with intra_op_threads(1) if workers else contextlib.nullcontext():
        return unit_range(x, out=allocator.reusable_empty(tuple(x.shape)))


def _to_batch(dataset: ImageSet, x: torch.Tensor, indices: torch.Tensor, device: torch.device,
              channels_last: bool, workers: int = 0) -> Batch:
    x = _on_device_in_unit_range(x, device, workers)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return Batch(x, dataset.labels[indices].to(device, non_blocking=True), indices)


def _stream(dataset: ImageSet, indices: torch.Tensor, batch_size: int, seed: int, epoch: int, stream: int,
            augment: bool, device: torch.device, channels_last: bool) -> Iterator[Batch]:
    """An in-memory split's batches: one augmentation generator per stream, drawn over the global batch."""
    aug_generator = derived_generator(seed, epoch, AUGMENT_STREAM + stream)
    for chunk in _global_batches(indices, batch_size, seed, epoch, stream):
        x = dataset.get_batch(chunk, augment=augment, generator=aug_generator)
        if distributed.is_active():
            # Every rank draws the whole global batch's augmentation so its generator stays in step with the
            # other ranks', then keeps its own share.
            keep = distributed.shard(torch.arange(len(chunk)))
            chunk, x = chunk[keep], x[keep.to(x.device)]
        yield _to_batch(dataset, x, chunk, device, channels_last)


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample splits through a DataLoader
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeFailure:
    """A sample that could not be decoded, passed back from a worker as data: DataLoader would re-raise the
    worker's DataError with its traceback folded into the message, and the CLI shows exactly one line."""

    message: str


class SampleDataset(Dataset):
    """``ImageSet.load_sample`` behind a DataLoader. A key is ``(batch number, index, sample_seed)``, seed None for
    no augmentation; an item is ``(batch number, image)``, so that the collate function knows its batch."""

    def __init__(self, split: ImageSet) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int | None]) -> tuple[int, torch.Tensor] | DecodeFailure:
        number, index, seed = key
        try:
            return number, self.split.load_sample(index, seed is not None, seed)
        except DataError as exc:
            return DecodeFailure(str(exc))


def _worker_init(worker_id: int) -> None:
    allocator.release_in_worker(worker_id)


def _first_failure(samples: list) -> DecodeFailure | None:
    return next((s for s in samples if isinstance(s, DecodeFailure)), None)


def _collate(samples: list[tuple[int, torch.Tensor] | DecodeFailure]) -> torch.Tensor | DecodeFailure:
    """A batch decoded in this process, or by a worker where no ring is used."""
    failure = _first_failure(samples)
    if failure is not None:
        return failure
    # default_collate stacks straight into shared memory inside a worker, which saves the batch a second copy
    return default_collate([image for _, image in samples]) if samples else torch.empty(0, dtype=torch.uint8)


class RingCollate:
    """A worker's collate function: the batch goes into its :class:`~harness.batch_ring.BatchRing` slot, and only
    its number and size travel back."""

    def __init__(self, ring: BatchRing) -> None:
        self.ring = ring

    def __call__(self, samples: list[tuple[int, torch.Tensor] | DecodeFailure]) -> RingBatch | DecodeFailure:
        failure = _first_failure(samples)
        if failure is not None:
            return failure
        if not samples:  # an empty share: nothing to write, and the reader knows the number itself
            return RingBatch(-1, 0)  # read as slot -1's first 0 samples: an empty batch of the right shape
        return self.ring.write(samples[0][0], [image for _, image in samples])


class BatchKeys:
    """The DataLoader's batch sampler: per batch, its ``(batch number, index, sample_seed)`` keys, made as the
    loader asks.

    ``plan``: one ``(indices, stream)`` per batch, ``stream`` None for no augmentation. Lazy, so an ImageNet epoch
    does not hold a million keys at once.
    """

    def __init__(self, plan: list[tuple[torch.Tensor, int | None]], seed: int = 0, epoch: int = 0) -> None:
        self.plan = plan
        self.bases = {stream: _stream_base(seed, epoch, stream) for _, stream in plan if stream is not None}

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[tuple[int, int, int | None]]]:
        for number, (indices, stream) in enumerate(self.plan):
            base = self.bases.get(stream) if stream is not None else None
            yield [(number, i, None if base is None else _seed_of(base, i)) for i in indices.tolist()]


def _ring_for(dataset: ImageSet, keys: BatchKeys, workers: int, pin_memory: bool) -> BatchRing | None:
    # Not for pinned (CUDA) batches: there the DataLoader's pinning thread copies each batch out of shared memory
    # beside the training thread, and the ring would move that copy onto it (measured on the CPU only).
    if not workers or pin_memory or dataset.sample_shape is None:
        return None
    capacity = max(len(indices) for indices, _ in keys.plan)
    return BatchRing(workers * PREFETCH_FACTOR + 1, max(1, capacity), dataset.sample_shape)


def decoded_batches(dataset: ImageSet, keys: BatchKeys, workers: int = 0,
                    pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """uint8 ``(B, C, H, W)`` images of each batch of ``keys``, in order, decoded by ``workers`` processes.

    With workers and without ``pin_memory``, a batch is a view of a shared-memory slot (:mod:`harness.batch_ring`)
    that stays valid until the next batch is requested: take what you need from it (a copy, a conversion) before
    asking for the next one.
    """
    if not len(keys):
        return
    workers = min(workers, len(keys))  # a short eval split need not start eight processes
    ring = _ring_for(dataset, keys, workers, pin_memory)
    collate = RingCollate(ring) if ring is not None else _collate
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, which the
    # training process's methods may use (no augmentation uses the workers' RNG: every draw is seeded per sample).
    loader = DataLoader(SampleDataset(dataset), batch_sampler=keys, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, prefetch_factor=PREFETCH_FACTOR if workers else None,
                        worker_init_fn=_worker_init, generator=torch.Generator())
    batches = iter(loader)
    empty: torch.Tensor | None = None
    try:
        for number, item in enumerate(batches):
            if isinstance(item, DecodeFailure):
                raise DataError(item.message)
            images = item
            if isinstance(item, RingBatch):
                if item.number not in (number, -1):
                    raise RuntimeError(f"the loader returned batch {item.number} where batch {number} was due")
                images = ring.read(item)  # (0, C, H, W) for an empty share
            if images.ndim == 1:  # an empty share (more ranks than samples in a batch): keep the image shape
                empty = empty if empty is not None else dataset.get_batch(torch.empty(0, dtype=torch.long))
                images = empty.to(torch.uint8)
            yield images
            if ring is not None:
                ring.release()
    finally:
        if ring is not None:
            ring.close()  # before the workers are shut down, which waits for each one
        del batches


def _sample_stream_batches(dataset: ImageSet, streams: list[tuple[torch.Tensor, int]], batch_size: int, seed: int,
                           epoch: int, augment: bool, device: torch.device, channels_last: bool,
                           workers: int) -> Iterator[list[Batch]]:
    """Zipped batches of several streams of a per-sample split (stops with the shortest stream), one DataLoader
    for all of them so that per-bit-width streams share the workers."""
    shares_by_stream = []
    for indices, stream in streams:
        # The order is the global one; this rank keeps its contiguous share and decodes nothing else.
        shares_by_stream.append([(chunk[distributed.shard(torch.arange(len(chunk)))], stream if augment else None)
                                 for chunk in _global_batches(indices, batch_size, seed, epoch, stream)])
    steps = min(len(shares) for shares in shares_by_stream)
    plan = [shares[step] for step in range(steps) for shares in shares_by_stream]
    images = decoded_batches(dataset, BatchKeys(plan, seed, epoch), workers, pin_memory=device.type == "cuda")
    group: list[Batch] = []
    for (share, _), x in zip(plan, images):
        group.append(_to_batch(dataset, x, share, device, channels_last, workers))
        if len(group) == len(streams):
            yield group
            group = []


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    return len(_chunks(torch.arange(dataset_size), batch_size))


def epoch_batches(dataset: ImageSet, batch_size: int, seed: int, epoch: int, augment: bool, device: torch.device,
                  per_bits: dict[int, torch.Tensor] | None = None, channels_last: bool = False,
                  workers: int = 0) -> Iterator[Batch]:
    """Batches of one epoch: all samples shuffled, or (``per_bits``) one stream per bit-width zipped together.

    Per-bit streams stop with the shortest; the common batch is the highest bit-width's. Under ``torchrun`` each
    rank gets its share of every global batch (:func:`harness.distributed.shard`). ``workers``: DataLoader
    processes for per-sample (folder) splits, 0 to decode here; it changes no image.
    """
    bits = sorted(per_bits) if per_bits is not None else [None]
    indices = [torch.arange(len(dataset))] if per_bits is None else [per_bits[b] for b in bits]
    stream_ids = [0] if per_bits is None else [2 * (i + 1) for i in range(len(bits))]
    if dataset.per_sample:
        groups = _sample_stream_batches(dataset, list(zip(indices, stream_ids)), batch_size, seed, epoch, augment,
                                        device, channels_last, workers)
    else:
        groups = zip(*[_stream(dataset, idx, batch_size, seed, epoch, stream, augment, device, channels_last)
                       for idx, stream in zip(indices, stream_ids)])
    for batches in groups:
        if per_bits is None:
            yield batches[0]
            continue
        by_bits = dict(zip(bits, batches))
        top = by_bits[bits[-1]]
        yield Batch(top.x, top.y, top.indices, per_bits=by_bits)


def eval_batches(dataset: ImageSet, batch_size: int, device: torch.device,
                 workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, indices)`` of the eval view (no augmentation) in index order, every sample once.

    In-memory splits give ``get_batch`` (where the split lives); per-sample splits are decoded by ``workers``
    DataLoader processes and come out float32 on ``device``.
    """
    chunks = list(torch.split(torch.arange(len(dataset)), batch_size))
    if not dataset.per_sample:
        for chunk in chunks:
            yield dataset.get_batch(chunk), chunk
        return
    keys = BatchKeys([(chunk, None) for chunk in chunks])
    for chunk, x in zip(chunks, decoded_batches(dataset, keys, workers, pin_memory=device.type == "cuda")):
        yield _on_device_in_unit_range(x, device, workers), chunk
