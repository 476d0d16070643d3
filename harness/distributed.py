"""Data-parallel training across processes started by ``torchrun`` (NCCL on CUDA, gloo on CPU).

Under ``torchrun --nproc_per_node N cli.py compare ...`` every rank runs the same comparison: the same seed, the
same global batch order and the same EMQ coresets; each rank trains on its contiguous share of every global batch
and gradients are averaged across ranks before each optimizer step, so one step equals a single-process step on
the global batch (up to batch-norm batch statistics, which stay per rank as in standard DDP without SyncBN).

Why not ``DistributedDataParallel``'s wrapper: every method here runs several forward passes per step with
``set_bits`` between them (and bit-width-specific parameters that go unused in some passes), which DDP's reducer
only supports with ``static_graph``/``find_unused_parameters`` and per-method care. An explicit all-reduce of the
gradients after the method's step is the same arithmetic for every method.

What else is kept identical across ranks:

* after the ``prepare`` phase, the model and the method's state (EMQ's scores and coresets) are broadcast from
  rank 0, so sample selection is identical on every rank even where the scoring phase is not bit-reproducible;
* batch-norm running statistics (and every other floating-point buffer) are averaged across ranks after each
  epoch and after ``finalize``, so checkpoints and evaluation use one set of statistics;
* only rank 0 writes files (``harness.store.atomic_write_bytes`` checks ``is_writer``);
* device-hours are wall time x world size.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_writer() -> bool:
    """Only rank 0 writes records, checkpoints, tables and plots."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device_type: str) -> None:
    """Join the process group torchrun describes in the environment (once; no-op for a single process)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def local_device(device: torch.device) -> torch.device:
    """On CUDA each rank uses the GPU torchrun assigned it (``LOCAL_RANK``)."""
    if device.type == "cuda" and is_active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of one global batch (shares differ in size by at most one sample)."""
    if not is_active():
        return indices
    return torch.tensor_split(indices, world_size())[rank()]


def all_reduce_gradients(model: nn.Module) -> None:
    """Average the gradients of every parameter that has one, in one flat all-reduce."""
    if not is_active():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) so every rank holds the same ones."""
    if not is_active():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world_size()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if is_active():
        dist.all_reduce(tensor)


def broadcast_model(model: nn.Module) -> None:
    if not is_active():
        return
    tensors = list(model.parameters()) + list(model.buffers())
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
    # a write through .data leaves the version counter alone; bump it so that values cached per version (the
    # quantizers' per-step terms, the evaluation weight cache) are recomputed from the broadcast weights
    torch.autograd.graph.increment_version(tensors)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_scalars(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over ranks (every rank gets the same numbers, so decisions taken on them agree)."""
    if not is_active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_counter(counter: Counter, device: torch.device) -> Counter:
    """Per-key sums of an integer counter (sample-passes per bit-width) over ranks."""
    if not is_active():
        return Counter(counter)
    keys = sorted(set().union(*_keys_of_every_rank(counter)))
    totals = sum_scalars([float(counter.get(k, 0)) for k in keys], device)
    return Counter({k: int(round(v)) for k, v in zip(keys, totals)})


def _keys_of_every_rank(counter: Counter) -> list[list[Any]]:
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(counter))
    return gathered


def barrier() -> None:
    if is_active():
        dist.barrier()
