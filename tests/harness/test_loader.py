"""The epoch loader: folder data sets through a DataLoader (workers, ranks, resume, corrupt files, eval batches)
give bit-identical batches whatever the worker count; in-memory sets keep their batch-level draws exactly."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

import cli
from harness import allocator, distributed, folder_data, loader
from harness.config import RunSpec
from harness.data import load_dataset
from harness.errors import ConfigError, DataError
from harness.imageset import unit_range
from harness.loader import (
    AUGMENT_STREAM,
    ORDER_STREAM,
    BatchKeys,
    decoded_batches,
    derived_generator,
    epoch_batches,
    eval_batches,
    sample_seed,
)
from harness.threads import MAX_LOADER_WORKERS, default_loader_workers
from tests.fixtures import write_imagefolder, write_tinyimagenet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagefolder(root, classes=3, per_class=4, size=(70, 50))  # 12 train, 12 val, non-square JPEGs
    return load_dataset("imagenet", root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tinyimagenet(root, classes=2, per_class=5, val=5, size=64)
    return load_dataset("tinyimagenet", root)


def _same(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.indices, b.indices)
        for a, b in zip(first, second))


@pytest.mark.parametrize("name", ["imagenet", "tiny"])
def test_same_batches_with_0_1_2_workers(request, name):
    data = request.getfixturevalue(name)
    runs = {w: list(epoch_batches(data.train, 4, 0, 1, True, CPU, workers=w)) for w in (0, 1, 2)}
    assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])
    batch = runs[0][0]
    assert batch.x.dtype == torch.float32 and batch.x.shape[1:] == (3, data.info.image_size, data.info.image_size)
    assert sorted(torch.cat([b.indices for b in runs[0]]).tolist()) == list(range(len(data.train)))
    # augmented: not the eval view, and another epoch draws other crops
    assert not torch.equal(batch.x, data.train.get_batch(batch.indices))
    other = next(iter(epoch_batches(data.train, 4, 0, 2, True, CPU)))
    assert not torch.equal(other.x, data.train.get_batch(other.indices, True, torch.Generator().manual_seed(0)))


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patch reaches forked workers only")
def test_each_worker_releases_the_inherited_heap_first(imagenet, monkeypatch, tmp_path):
    # Workers are forked, so the patched function runs in them; each leaves a file behind.
    monkeypatch.setattr(allocator, "release_in_worker", lambda worker_id: (tmp_path / f"w{worker_id}").touch())
    assert _same(list(epoch_batches(imagenet.train, 4, 0, 1, True, CPU, workers=2)),
                 list(epoch_batches(imagenet.train, 4, 0, 1, True, CPU, workers=0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0", "w1"]


@pytest.mark.parametrize("workers, threads_while_scaling", [(0, 2), (2, 1)])
def test_scaling_to_float_runs_on_one_thread_while_workers_share_the_cpus(imagenet, monkeypatch, workers,
                                                                         threads_while_scaling):
    seen: list[int] = []
    reusable_empty = allocator.reusable_empty

    def recording_empty(shape: tuple[int, ...]) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return reusable_empty(shape)

    monkeypatch.setattr(allocator, "reusable_empty", recording_empty)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train = list(epoch_batches(imagenet.train, 4, 0, 1, True, CPU, workers=workers))
        evals = list(eval_batches(imagenet.test, 5, CPU, workers=workers))
        assert torch.get_num_threads() == 2  # restored after each batch
    finally:
        torch.set_num_threads(previous)
    assert seen == [threads_while_scaling] * (len(train) + len(evals))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_unit_range_of_the_decoded_images_in_aligned_memory(imagenet, workers):
    keys = BatchKeys([(torch.arange(0, 5), 0), (torch.arange(5, 12), 0)], seed=3, epoch=1)
    decoded = [x.clone() for x in decoded_batches(imagenet.train, keys, workers)]
    batches = list(epoch_batches(imagenet.train, 5, 3, 1, True, CPU, per_bits=None, workers=workers))
    direct = [loader._on_device_in_unit_range(x, CPU, workers) for x in decoded]
    for x, y in zip(decoded, direct):
        assert y.dtype == torch.float32 and y.data_ptr() % allocator.BATCH_ALIGNMENT == 0
        assert torch.equal(y.view(torch.int32), unit_range(x).view(torch.int32))
    assert all(b.x.data_ptr() % allocator.BATCH_ALIGNMENT == 0 for b in batches)


def test_each_sample_is_its_own_seeded_view(tiny):
    # A sample's view depends only on (seed, epoch, stream, index): replay it alone with load_sample.
    batch = next(iter(epoch_batches(tiny.train, 4, 3, 5, True, CPU)))
    for row, index in enumerate(batch.indices.tolist()):
        view = tiny.train.load_sample(index, True, sample_seed(3, 5, 0, index))
        assert torch.equal(batch.x[row], view.to(torch.float32) / 255.0)


def test_per_bit_streams_share_one_loader(imagenet):
    per_bits = {2: torch.arange(0, 8), 8: torch.arange(4, 12)}
    runs = {w: list(epoch_batches(imagenet.train, 3, 0, 0, True, CPU, per_bits=per_bits, workers=w)) for w in (0, 2)}
    assert len(runs[0]) == len(runs[2]) == 3  # 8 samples at batch 3: 3, 3, 2
    for a, b in zip(runs[0], runs[2]):
        assert _same([a.per_bits[2], a.per_bits[8]], [b.per_bits[2], b.per_bits[8]])
        assert torch.equal(a.x, a.per_bits[8].x)  # the common batch is the highest bit-width's
        assert set(a.per_bits[2].indices.tolist()) <= set(range(8))


def test_resumed_epoch_replays_the_same_batches(imagenet):
    state = torch.get_rng_state()
    first = list(epoch_batches(imagenet.train, 5, 7, 3, True, CPU, workers=2))
    list(epoch_batches(imagenet.train, 5, 7, 4, True, CPU))  # another epoch in between changes nothing
    resumed = list(epoch_batches(imagenet.train, 5, 7, 3, True, CPU, workers=1))
    assert _same(first, resumed)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never drawn from
    assert not _same(first, list(epoch_batches(imagenet.train, 5, 8, 3, True, CPU)))


def test_sample_seed_is_a_pure_function():
    seeds = {sample_seed(0, epoch, stream, index) for epoch in range(3) for stream in (0, 2) for index in range(50)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2, 0, 3) == sample_seed(1, 2, 0, 3)


class _Ranks:
    """Simulates ``world`` ranks in this process (harness.distributed asks these three functions)."""

    def __init__(self, monkeypatch, world: int) -> None:
        self.current = 0
        monkeypatch.setattr(distributed, "is_active", lambda: world > 1)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: self.current)


@pytest.mark.parametrize(("world", "batch_size", "workers"), [(1, 4, 0), (2, 4, 0), (2, 5, 2), (3, 2, 0)])
def test_ranks_decode_only_their_share_and_add_up_to_one_process(imagenet, monkeypatch, world, batch_size, workers):
    single = list(epoch_batches(imagenet.train, batch_size, 0, 1, True, CPU))
    decoded = []
    original = folder_data.read_image
    monkeypatch.setattr(folder_data, "read_image", lambda path: (decoded.append(path), original(path))[1])
    ranks = _Ranks(monkeypatch, world)
    shares, counts = [], []
    for rank in range(world):
        ranks.current = rank
        decoded.clear()
        shares.append(list(epoch_batches(imagenet.train, batch_size, 0, 1, True, CPU, workers=workers)))
        counts.append(len(decoded))
    for step, whole in enumerate(single):
        parts = [shares[rank][step] for rank in range(world)]
        assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
        assert torch.equal(torch.cat([p.y for p in parts]), whole.y)
        assert torch.equal(torch.cat([p.indices for p in parts]), whole.indices)
    if workers == 0:  # decoding happens in this process, where the counter is
        assert counts == [sum(len(b.indices) for b in shares[rank]) for rank in range(world)]
        assert sum(counts) == len(imagenet.train)  # every sample decoded once over all ranks
    if world == 3:  # batches of 2 on 3 ranks: the last rank's share is empty but keeps the image shape
        assert shares[2][0].x.shape == (0, 3, 224, 224)


def test_eval_batches_are_the_eval_view(imagenet, tiny, synthetic):
    for split in (imagenet.test, tiny.test):
        for workers in (0, 2):
            chunks = list(eval_batches(split, 5, CPU, workers))
            assert torch.equal(torch.cat([c for _, c in chunks]), torch.arange(len(split)))
            for x, chunk in chunks:
                assert torch.equal(x, split.get_batch(chunk))
    x, chunk = next(iter(eval_batches(synthetic.test, 16, CPU, workers=2)))  # in memory: get_batch itself
    assert torch.equal(x, synthetic.test.get_batch(torch.arange(16))) and torch.equal(chunk, torch.arange(16))


def _corrupt(data_root: Path) -> Path:
    bad = sorted((data_root / "imagenet" / "train").rglob("*.JPEG"))[1]
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_one_line_data_error(tmp_path, workers):
    write_imagefolder(tmp_path, classes=2, per_class=3, size=(40, 30))
    bad = _corrupt(tmp_path)
    data = load_dataset("imagenet", tmp_path)  # lazy: loading still works
    with pytest.raises(DataError) as info:
        list(epoch_batches(data.train, 2, 0, 0, True, CPU, workers=workers))
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message and "Traceback" not in message
    (tmp_path / "imagenet" / "val" / "n00000000" / "img_0.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="img_0.JPEG") as info:
        list(eval_batches(data.test, 2, CPU, workers))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_cli_corrupt_image_is_one_error_line_exit_2(capsys, tmp_path, workers):
    folder = write_tinyimagenet(tmp_path / "data", classes=2, per_class=3, val=2, size=16)
    bad = folder / "train" / "n00000001" / "images" / "n00000001_2.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    code = cli.run(["compare", "--methods", "anyprecision", "--dataset", "tinyimagenet", "--data-root",
                    str(tmp_path / "data"), "--model", "resnet8", "--width", "0.5", "--bits", "2", "--epochs", "1",
                    "--batch-size", "6", "--reference", "none", "--quiet", "--workers", workers,
                    "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2 and captured.err == f"error: cannot read image {bad}: {captured.err.split(': ', 2)[2]}"
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_workers_option_is_validated_and_left_out_of_the_spec(capsys):
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="--workers") as info:
            RunSpec(methods=("anyprecision",), workers=bad)
        assert "\n" not in str(info.value)
    assert 1 <= RunSpec(methods=("anyprecision",)).workers == default_loader_workers() <= MAX_LOADER_WORKERS
    # the worker count changes no batch, so it is not part of spec.json, the folder hash or the resume check
    zero, eight = RunSpec(methods=("dedicated",), workers=0), RunSpec(methods=("dedicated",), workers=8)
    assert zero.to_json() == eight.to_json() and "workers" not in zero.to_dict()
    assert RunSpec.from_dict(zero.to_dict()).workers == default_loader_workers()
    code = cli.run(["compare", "--methods", "anyprecision", "--dataset", "synthetic", "--workers", "-1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --workers") and err.count("\n") == 1


def test_in_memory_sets_keep_their_batch_level_draws(synthetic, monkeypatch):
    # Whatever the worker count, an in-memory set is gathered and augmented by get_batch with one generator per
    # stream over the global batch, exactly as before the DataLoader path existed.
    split = load_dataset("synthetic").train
    split.augment = "crop_flip"  # exercise the augmentation draws on the in-memory path
    order = torch.randperm(len(split), generator=derived_generator(5, 2, ORDER_STREAM))
    generator = derived_generator(5, 2, AUGMENT_STREAM)
    expected = [split.get_batch(chunk, True, generator) for chunk in torch.split(order, 64)]
    for workers in (0, 2):
        batches = list(epoch_batches(split, 64, 5, 2, True, CPU, workers=workers))
        assert all(torch.equal(b.x, e) for b, e in zip(batches, expected)) and len(batches) == len(expected)
    _Ranks(monkeypatch, 2).current = 1  # rank 1 of 2: the second half of every global batch
    shares = list(epoch_batches(split, 64, 5, 2, True, CPU))
    assert all(torch.equal(s.x, e[32:]) for s, e in zip(shares, expected))


def _gloo_rank_decodes(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = load_dataset("imagenet", root)
        decoded: list[str] = []
        original = folder_data.read_image
        folder_data.read_image = lambda path: (decoded.append(str(path)), original(path))[1]
        batches = list(epoch_batches(data.train, 4, 0, 1, True, CPU, workers=0))
        torch.save({"x": [b.x for b in batches], "indices": [b.indices for b in batches], "decoded": decoded},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_each_decode_only_their_share(tmp_path):
    """Real ranks (2 gloo processes): each decodes exactly its share of every global batch of 4, and the shares
    concatenated are the single-process batches."""
    import torch.multiprocessing as mp

    from tests.harness.test_distributed import free_port

    root = tmp_path / "data"
    write_imagefolder(root, classes=3, per_class=4, size=(70, 50))
    mp.start_processes(_gloo_rank_decodes, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = list(epoch_batches(load_dataset("imagenet", root).train, 4, 0, 1, True, CPU))
    for step, whole in enumerate(single):
        assert [len(rank["indices"][step]) for rank in ranks] == [2, 2]
        assert torch.equal(torch.cat([rank["indices"][step] for rank in ranks]), whole.indices)
        assert torch.equal(torch.cat([rank["x"][step] for rank in ranks]), whole.x)
    assert [len(rank["decoded"]) for rank in ranks] == [6, 6]  # 12 images, 3 steps, 2 per rank and step
