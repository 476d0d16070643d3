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
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    threads.set_wait_policy()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    threads.set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.set_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


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
os.getloadavg = lambda: (2.0, 2.0, 2.0)  # a busy machine
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
