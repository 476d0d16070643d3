"""CPU thread defaults that behave on a shared machine.

PyTorch's OpenMP threads spin while they wait for work by default; on a machine where another process is busy,
the spinning threads and that process take turns on the cores and a training step slows 10x or more. mbqbench
therefore asks OpenMP to wait passively (``OMP_WAIT_POLICY=PASSIVE``, set before torch loads its OpenMP runtime
unless the environment already sets it) and uses as many threads as the CPUs this process may run on (its CPU
affinity: a cluster job's allocation, a ``taskset`` mask), not every core of the machine. ``--threads N`` or
``OMP_NUM_THREADS`` override the count; ``OMP_WAIT_POLICY=ACTIVE`` restores spinning.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"


def set_wait_policy() -> None:
    """Passive OpenMP waiting unless the environment says otherwise; effective only before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``OMP_NUM_THREADS`` (torch reads it), else the available
    CPUs. Returns the count in effect."""
    set_wait_policy()
    import torch

    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = available_cpus()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
