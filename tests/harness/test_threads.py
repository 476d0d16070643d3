"""CPU thread defaults: passive OpenMP waiting unless the environment says otherwise, threads from the affinity."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from harness import threads


def test_wait_policy_is_passive_on_a_busy_machine_only_and_respects_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.1)
    threads.set_wait_policy()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.9)
    threads.set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_without_proc_stat_the_load_average_decides(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "PROC_STAT", "/nonexistent/stat")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    threads.set_wait_policy()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    threads.set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


STAT_BEFORE = """cpu  900 0 900 900 0 0 0 0 0 0
cpu0 100 0 100 700 100 0 0 0 0 0
cpu1 200 10 90 600 0 5 5 0 0 0
cpu2 500 0 500 0 0 0 0 0 0 0
intr 12345
"""
STAT_AFTER = """cpu  990 0 990 990 0 0 0 0 0 0
cpu0 130 0 120 720 130 0 0 0 0 0
cpu1 200 10 90 700 0 5 5 0 0 0
cpu2 900 0 900 0 0 0 0 0 0 0
intr 12399
"""


def test_busy_cores_counts_the_sampled_cpus_busy_share_exactly(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    monkeypatch.setattr(threads, "PROC_STAT", str(stat))
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 1})  # cpu2 (fully busy) is not ours
    stat.write_text(STAT_BEFORE)
    assert threads.cpu_jiffies({0, 1}) == (100 + 100 + 200 + 10 + 90 + 5 + 5, 1000 + 910)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: stat.write_text(STAT_AFTER))
    # cpu0: 50 busy of 100 (idle and iowait do not count), cpu1: 0 of 100 -> 2 CPUs x 50 / 200
    assert threads.busy_cores() == 0.5


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_thread_count_follows_the_affinity_mask_then_omp_num_threads_then_the_flag(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert threads.configure_threads(None) == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert threads.configure_threads(None) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert threads.configure_threads(None) == 1  # left to torch, which read OMP_NUM_THREADS
        assert threads.configure_threads(2) == 2  # the flag wins
    finally:
        torch.set_num_threads(before)


SPY = """
import importlib.abc, os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
from harness import threads
threads.busy_cores = lambda: 2.0  # a busy machine
seen = []


class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None


sys.meta_path.insert(0, Spy())
import cli
cli.run(["list", "models"])
print(seen)
"""


def test_the_cli_sets_passive_waiting_before_torch_loads():
    out = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip().splitlines()[-1] == "['PASSIVE']"  # the policy was set when torch was first imported


@pytest.mark.parametrize("start", [1, 2, 3])
def test_intra_op_threads_sets_the_count_inside_and_restores_it_after(start):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(start)
        with threads.intra_op_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == start
        with pytest.raises(RuntimeError), threads.intra_op_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError("inside")
        assert torch.get_num_threads() == start
    finally:
        torch.set_num_threads(previous)
