"""Data-parallel training on 2 gloo processes (CPU).

The tight check is one optimizer step: with batch norm on running statistics (eval mode), each sample's loss
depends on that sample only, so the all-reduced gradient of 2 ranks must equal the single-process gradient of the
global batch up to float round-off. Whole runs are not compared number by number: in train mode batch norm
normalizes with per-rank batch statistics (as in DDP without SyncBN), so two-rank and one-process training follow
different trajectories and their losses legitimately differ by more than any tolerance that would still catch a bug.
End to end we check what must hold regardless: identical coresets and weights on both ranks, exactly the same
sample-passes as one process, and both runs learning."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import distributed
from harness.config import RunSpec, Schedule
from harness.data import load_dataset
from harness.loader import epoch_batches
from harness.method import Batch, RunContext
from harness.store import RunStore
from harness.train import instantiate, run_cell

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("dedicated", "emq:score_epochs=3:prune=0.5")


def small_spec() -> RunSpec:
    return RunSpec(methods=METHODS, dataset="digits", model="resnet20", width=0.5, bits=(2, 8), seeds=(0,),
                   schedule=Schedule(epochs=4, batch_size=64, lr=0.05), train_subset=None, test_subset=None,
                   device="cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        distributed.is_writer = lambda: True  # each rank writes its own folder here, to compare them
        spec = small_spec()
        data = load_dataset(spec.dataset, train_subset=spec.train_subset, test_subset=spec.test_subset, seed=0)
        # One step first (a few seconds; it shares this spawn): see test_all_reduced_gradient_equals_...
        torch.save({method: _one_step(method, data) for method in METHODS}, Path(out) / f"step_rank{rank}.pt")
        store = RunStore(Path(out) / f"rank{rank}")
        for method in METHODS:
            run_cell(spec, method, 0, data, store)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    spec = small_spec()
    data = load_dataset(spec.dataset, train_subset=spec.train_subset, test_subset=spec.test_subset, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            run_cell(spec, method, 0, data, RunStore(out))
    finally:
        torch.set_num_threads(threads)
    return out


# -- one step, exactly: the all-reduced gradient of 2 ranks is the gradient of the global batch ------------------
GRAD_BATCH = 64  # an even global batch: each rank's mean over 32 samples, averaged over 2 ranks, is the global mean
# In float64 the only difference is the order of the gradient sums (two partial sums over 32 samples and one add,
# against one sum over 64): round-off of ~1e-16 relative (measured: <= 1e-16 absolute, <= 6e-15 of a tensor's largest
# entry). The tolerance, 1e-10 of the largest gradient entry of the model, leaves about five orders of margin and is
# still ~1e9 times below the gap between one rank's own gradient and the global one (asserted below). float64 also
# keeps round-off from flipping a quantized activation across a rounding step, which float32 could occasionally do.
GRAD_RTOL = 1e-10


def _double(batch: Batch) -> Batch:
    per_bits = None if batch.per_bits is None else {b: _double(v) for b, v in batch.per_bits.items()}
    return Batch(batch.x.double(), batch.y, batch.indices, per_bits=per_bits)


def _one_step(method_spec: str, data) -> dict:
    """One ``train_step`` of ``method_spec`` on the first global batch, then ``all_reduce_gradients`` (a no-op in one
    process): the gradients before and after the all-reduce, the reduced loss and the samples this process used."""
    spec = small_spec()
    torch.manual_seed(0)
    method = instantiate(method_spec)
    model = method.build(spec.model, data.info.num_classes, spec.bits, data.info, spec.width).double()
    # Batch norm running statistics (and any data-initialized quantizer step) from one full batch, the same tensor on
    # every rank; then eval mode, so that batch norm does not couple the samples of a batch.
    model.train()
    with torch.no_grad():
        warmup = data.train.get_batch(torch.arange(2 * GRAD_BATCH)).double()
        for bits in sorted(spec.bits, reverse=True):
            method.set_bits(model, bits)
            model(warmup)
    model.eval()
    ctx = RunContext(bits=spec.bits, device=torch.device("cpu"), num_classes=data.info.num_classes, seed=0,
                     epochs=1, data_info=data.info, schedule=spec.schedule)
    # Per-bit streams (EMQ's coresets) for the EMQ row, so the sharding of zipped streams is covered too.
    per_bits = None if method_spec == "dedicated" else {2: torch.arange(0, len(data.train), 2),
                                                         8: torch.arange(len(data.train))}
    batch = _double(next(iter(epoch_batches(data.train, GRAD_BATCH, 0, 0, False, torch.device("cpu"), per_bits))))
    losses = method.train_step(model, batch, ctx)
    local = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    distributed.all_reduce_gradients(model)
    reduced = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    loss = distributed.sum_scalars([float(sum(losses.values()))], ctx.device)[0] / distributed.world_size()
    indices = {b: batch.for_bits(b).indices for b in spec.bits}
    return {"local": local, "reduced": reduced, "loss": loss, "indices": indices, "passes": dict(ctx.passes)}


@pytest.fixture(scope="module")
def one_step(two_ranks) -> tuple[list[dict], dict]:
    """(each rank's ``_one_step`` results by method, written by ``_worker``; the single process's)."""
    ranks = [torch.load(two_ranks / f"step_rank{r}.pt") for r in (0, 1)]
    spec = small_spec()
    data = load_dataset(spec.dataset, train_subset=spec.train_subset, test_subset=spec.test_subset, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {method: _one_step(method, data) for method in METHODS}
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def _max_abs_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize("method", METHODS)
def test_all_reduced_gradient_equals_the_global_batch_gradient(one_step, method):
    ranks, single = one_step[0], one_step[1][method]
    first, second = ranks[0][method], ranks[1][method]
    for bits, indices in single["indices"].items():
        # Each rank trained on its half of the same global batch: disjoint, together the whole batch, in order.
        assert len(first["indices"][bits]) == len(second["indices"][bits]) == GRAD_BATCH // 2
        assert torch.equal(torch.cat([first["indices"][bits], second["indices"][bits]]), indices)
        assert first["passes"][bits] + second["passes"][bits] == single["passes"][bits] == GRAD_BATCH
    reduced, expected = first["reduced"], single["reduced"]
    assert reduced.keys() == expected.keys() == second["reduced"].keys()
    assert reduced  # the parameters of the trained bit-widths have gradients
    tolerance = GRAD_RTOL * max(float(g.abs().max()) for g in expected.values())
    for name, tensor in reduced.items():
        # The all-reduce leaves bit-identical gradients on both ranks (so the optimizer steps stay identical) ...
        assert torch.equal(tensor, second["reduced"][name]), name
        # ... equal to one process's gradient of the whole batch up to float64 round-off.
        assert float((tensor - expected[name]).abs().max()) <= tolerance, name
    # The loss the harness logs (sum over ranks / world) is the global batch's loss.
    assert first["loss"] == second["loss"] == pytest.approx(single["loss"], rel=1e-12)
    # Not vacuous: one rank's share alone gives a gradient far from the global one.
    assert _max_abs_difference(first["local"], expected) > 1e6 * tolerance


def test_coresets_and_models_are_identical_on_both_ranks(two_ranks):
    cell = "emq_score_epochs_3_prune_0.5__seed0"
    first = torch.load(two_ranks / "rank0" / "cells" / cell / "artifacts.pt")
    second = torch.load(two_ranks / "rank1" / "cells" / cell / "artifacts.pt")
    assert torch.equal(first["tdds_scores"], second["tdds_scores"])
    assert torch.equal(first["coreset_indices"], second["coreset_indices"])
    for method_cell in (cell, "dedicated__seed0"):
        weights = [torch.load(two_ranks / f"rank{r}" / "cells" / method_cell / "checkpoint.pt")["model"]
                   for r in (0, 1)]
        for name, tensor in weights[0].items():
            assert torch.equal(tensor, weights[1][name]), name


def test_two_ranks_and_one_process_do_the_same_work_and_both_learn(two_ranks, one_process):
    chance = 100.0 / 10  # digits: 10 classes
    for method in METHODS:
        single = RunStore(one_process).load_record(method, 0)
        parallel = RunStore(two_ranks / "rank0").load_record(method, 0)
        assert parallel["num_devices"] == 2 and single["num_devices"] == 1
        # Every global batch is seen exactly once across ranks: the same work in sample-passes, exactly.
        assert parallel["sample_passes_total"] == single["sample_passes_total"]
        assert [e["sample_passes"] for e in parallel["log"]] == [e["sample_passes"] for e in single["log"]]
        assert parallel["results"].keys() == single["results"].keys()
        # The trajectories differ (per-rank batch-norm statistics), so no loss is compared across the two runs;
        # each run must learn: its loss falls clearly and every bit-width ends well above chance.
        for record in (single, parallel):
            losses = [e["loss"] for e in record["log"]]
            assert all(torch.isfinite(torch.tensor(losses)))
            assert losses[-1] < 0.8 * losses[0], (method, losses)
            for bits, result in record["results"].items():
                assert result["top1"] > 2 * chance, (method, bits, result["top1"])


def test_emq_scores_cover_every_sample_under_two_ranks(two_ranks, one_process):
    cell = "emq_score_epochs_3_prune_0.5__seed0"
    single = torch.load(one_process / "cells" / cell / "artifacts.pt")["tdds_scores"]
    parallel = torch.load(two_ranks / "rank0" / "cells" / cell / "artifacts.pt")["tdds_scores"]
    assert parallel.shape == single.shape
    # Each rank's scoring pass fills only its shards' rows; without the all-reduce half the scores would be 0.
    assert bool((single > 0).all())
    assert bool((parallel > 0).all())


def test_shard_is_the_identity_in_one_process():
    indices = torch.arange(7)
    assert torch.equal(distributed.shard(indices), indices)
    assert distributed.world_size() == 1 and distributed.is_writer()


def test_torchrun_cli_writes_one_table_labelled_with_two_devices(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "cli.py", "compare", "--methods", "dedicated", "--dataset", "synthetic",
               "--bits", "2", "--epochs", "1", "--width", "0.25", "--device", "cpu", "--out", str(out), "--quiet"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("| dedicated |") == 1  # rank 1 prints nothing
    record = json.loads((out / "cells" / "dedicated__seed0" / "record.json").read_text())
    assert record["num_devices"] == 2
    assert record["device_hours"] == pytest.approx(2 * sum(record["seconds"].values()) / 3600)
    assert "cpu x2" in (out / "table.md").read_text()
