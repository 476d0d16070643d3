"""The batch ring: workers write batches into shared slots, never into one the reader has not released."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from harness import loader
from harness.batch_ring import BatchRing, RingBatch
from harness.data import load_dataset
from harness.errors import DataError
from harness.loader import BatchKeys, decoded_batches
from tests.fixtures import write_imagefolder


def _samples(value: int, count: int = 3) -> list[torch.Tensor]:
    return [torch.full((2, 4, 4), value + i, dtype=torch.uint8) for i in range(count)]


def test_a_written_batch_reads_back_from_its_slot():
    ring = BatchRing(slots=3, capacity=4, sample_shape=(2, 4, 4))
    assert ring.images.is_shared()
    written = ring.write(0, _samples(10))
    assert written == RingBatch(0, 3)
    assert torch.equal(ring.read(written), torch.stack(_samples(10)))
    assert ring.write(1, []) == RingBatch(1, 0) and ring.read(RingBatch(1, 0)).shape == (0, 2, 4, 4)


def test_a_writer_waits_until_the_slot_s_last_batch_is_released():
    ring = BatchRing(slots=2, capacity=3, sample_shape=(2, 4, 4))
    ring.write(0, _samples(10))
    ring.write(1, _samples(20))
    done = threading.Event()
    writer = threading.Thread(target=lambda: (ring.write(2, _samples(30)), done.set()))
    writer.start()
    time.sleep(0.1)
    assert not done.is_set()  # batch 2 goes where batch 0 still is
    assert torch.equal(ring.read(RingBatch(0, 3)), torch.stack(_samples(10)))
    ring.release()
    writer.join(timeout=10)
    assert done.is_set() and ring.released == 1
    assert torch.equal(ring.read(RingBatch(2, 3)), torch.stack(_samples(30)))
    assert torch.equal(ring.read(RingBatch(1, 3)), torch.stack(_samples(20)))  # untouched


def test_closing_the_ring_stops_a_waiting_writer():
    ring = BatchRing(slots=1, capacity=3, sample_shape=(2, 4, 4))
    ring.write(0, _samples(10))
    errors: list[Exception] = []

    def write() -> None:
        try:
            ring.write(1, _samples(20))
        except DataError as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    ring.close()
    writer.join(timeout=10)
    assert not writer.is_alive() and len(errors) == 1 and "closed" in str(errors[0])


def test_a_batch_larger_than_the_slots_is_refused():
    ring = BatchRing(slots=2, capacity=2, sample_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="holds 2"):
        ring.write(0, _samples(0, count=3))
    with pytest.raises(ValueError):
        BatchRing(slots=0, capacity=2, sample_shape=(2, 4, 4))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagefolder(root, classes=2, per_class=6, size=(40, 30))
    return load_dataset("imagenet", root)


def test_workers_hand_batches_over_in_the_ring_and_equal_in_process_decoding(imagenet):
    plan = [(torch.arange(i, i + 2), 0) for i in range(0, 12, 2)] + [(torch.arange(0), 0)]
    in_process = [x.clone() for x in decoded_batches(imagenet.train, BatchKeys(plan, 1, 2), workers=0)]
    storages = set()
    for x, expected in zip(decoded_batches(imagenet.train, BatchKeys(plan, 1, 2), workers=2), in_process,
                           strict=True):
        assert torch.equal(x, expected)
        if x.numel():
            assert x.is_shared()
            storages.add(x.untyped_storage().data_ptr())
    assert len(storages) == 1  # every batch came through the one ring's memory


def test_leaving_early_releases_workers_that_wait_for_a_slot(imagenet, monkeypatch):
    # A one-slot ring: the worker given batch 1 waits for batch 0's release, which never comes. Closing the
    # generator must tell it to stop before the DataLoader joins it (otherwise: a 5 s join timeout, then a kill).
    monkeypatch.setattr(loader, "_ring_for", lambda dataset, keys, workers, pin: BatchRing(1, 1, dataset.sample_shape))
    plan = [(torch.arange(i, i + 1), None) for i in range(12)]
    batches = decoded_batches(imagenet.train, BatchKeys(plan), workers=2)
    first = next(batches)
    time.sleep(0.5)  # batch 1's worker is waiting by now
    start = time.perf_counter()
    batches.close()
    assert first.shape == (1, *imagenet.train.sample_shape) and time.perf_counter() - start < 2.5


def test_pinned_batches_keep_the_data_loader_s_own_path(imagenet):
    keys = BatchKeys([(torch.arange(0, 4), None)])
    assert loader._ring_for(imagenet.train, keys, 2, pin_memory=False) is not None
    assert loader._ring_for(imagenet.train, keys, 2, pin_memory=True) is None
    assert loader._ring_for(imagenet.train, keys, 0, pin_memory=False) is None
