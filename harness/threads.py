"""CPU thread defaults that behave on a shared machine.

PyTorch's OpenMP threads spin while they wait for work; on a machine where another process is busy, the spinning
threads and that process take turns on the cores and a training step slows many times over. Passive waiting
fixes that but costs an idle machine about half its speed (the README's main job on 2 cores: 93 s idle with the
default policy, 204 s passive; with one busy process beside it, 191 s passive against over 10 minutes). So
mbqbench waits passively only when the machine is already busy when it starts: a 1-minute load average of at
least ``BUSY_LOAD`` (set before torch loads its OpenMP runtime, unless the environment sets
``OMP_WAIT_POLICY``). It uses as many threads as the CPUs this process may run on (its CPU affinity: a cluster
job's allocation, a ``taskset`` mask). ``--threads N`` or ``OMP_NUM_THREADS`` override the count;
``OMP_WAIT_POLICY=PASSIVE`` or ``ACTIVE`` force a policy.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"
BUSY_LOAD = 0.5  # one other process running for most of the last minute


def machine_is_busy() -> bool:
    return hasattr(os, "getloadavg") and os.getloadavg()[0] >= BUSY_LOAD


def set_wait_policy() -> None:
    """Passive OpenMP waiting on a busy machine unless the environment says otherwise; effective only before torch
    is imported."""
    if "OMP_WAIT_POLICY" not in os.environ and machine_is_busy():
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``OMP_NUM_THREADS`` (torch reads it), else the available
    CPUs. Returns the count in effect. (The wait policy is the CLI's first step, before torch is imported.)"""
    import torch

    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = available_cpus()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
