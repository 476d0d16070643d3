"""CPU thread (and data-loader process) defaults that behave on a shared machine.

PyTorch's OpenMP threads spin while they wait for work; on a machine where another process is busy, the spinning
threads and that process take turns on the cores and a training step slows many times over. Passive waiting
fixes that but costs an idle machine about half its speed (the README's main job on 2 cores: 93 s idle with the
default policy, 204 s passive; with one busy process beside it, 191 s passive against over 10 minutes). So
mbqbench waits passively only when the machine is already busy when it starts: other processes keep at least
``BUSY_CORES`` of this process's CPUs busy over a short sample of ``/proc/stat`` taken before torch loads its
OpenMP runtime (unless the environment sets ``OMP_WAIT_POLICY``). The sample is instantaneous on purpose: the
1-minute load average still counts a run that has just finished, so back-to-back runs on an idle machine would
wait passively and run at half speed. Where ``/proc/stat`` is missing the load average decides. It uses as many
threads as the CPUs this process may run on (its CPU affinity: a cluster job's allocation, a ``taskset`` mask).
``--threads N`` or ``OMP_NUM_THREADS`` override the count; ``OMP_WAIT_POLICY=PASSIVE`` or ``ACTIVE`` force a
policy. Folder data sets are decoded by ``default_loader_workers()`` DataLoader processes unless ``--workers`` says
otherwise.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

WAIT_POLICY = "PASSIVE"
BUSY_CORES = 0.5  # half a core kept busy by others: one CPU-bound process, not a shell or a logger
BUSY_LOAD = 0.5  # the fallback: one other process running for most of the last minute
SAMPLE_SECONDS = 0.15
PROC_STAT = "/proc/stat"
MAX_LOADER_WORKERS = 8  # the default's cap: more decoding processes than this rarely feed one device faster
_IDLE_FIELDS = (3, 4)  # idle, iowait (the fields after "cpuN": user nice system idle iowait irq softirq steal ...)


def cpu_jiffies(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies since boot summed over ``cpus``, from ``/proc/stat``'s per-CPU lines."""
    busy = total = 0
    with open(PROC_STAT) as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            counts = [int(value) for value in fields[:8]]
            total += sum(counts)
            busy += sum(counts) - sum(counts[i] for i in _IDLE_FIELDS)
    return busy, total


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's CPUs other processes keep busy, averaged over ``seconds`` (this process sleeps
    meanwhile, so the busy time is theirs)."""
    cpus = _affinity()
    busy_before, total_before = cpu_jiffies(cpus)
    time.sleep(seconds)
    busy_after, total_after = cpu_jiffies(cpus)
    elapsed = total_after - total_before
    return 0.0 if elapsed <= 0 else len(cpus) * (busy_after - busy_before) / elapsed


def machine_is_busy() -> bool:
    try:
        return busy_cores() >= BUSY_CORES
    except (OSError, ValueError):
        return hasattr(os, "getloadavg") and os.getloadavg()[0] >= BUSY_LOAD


def set_wait_policy() -> None:
    """Passive OpenMP waiting on a busy machine unless the environment says otherwise; effective only before torch
    is imported."""
    if "OMP_WAIT_POLICY" not in os.environ and machine_is_busy():
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    return max(1, len(_affinity()))


def default_loader_workers() -> int:
    """DataLoader worker processes for folder data sets by default: the available CPUs, at most 8."""
    return min(MAX_LOADER_WORKERS, available_cpus())


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``OMP_NUM_THREADS`` (torch reads it), else the available
    CPUs. Returns the count in effect. (The wait policy is the CLI's first step, before torch is imported.)"""
    import torch

    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = available_cpus()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, and the previous count restored after it."""
    import torch

    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
