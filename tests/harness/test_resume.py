"""A run interrupted after epoch k and resumed equals the uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from harness.store import RunStore
from harness.train import run_cell

ROOT = Path(__file__).resolve().parents[2]


def test_resumed_cell_equals_uninterrupted(tiny_spec, synthetic, tmp_path):
    spec = tiny_spec(methods=("anyprecision",), epochs=3)
    full_store, resumed_store = RunStore(tmp_path / "full"), RunStore(tmp_path / "resumed")
    full = run_cell(spec, "anyprecision", 0, synthetic, full_store)
    partial = run_cell(spec, "anyprecision", 0, synthetic, resumed_store, stop_after=1)
    assert partial.record is None and len(partial.log) == 1
    assert resumed_store.load_checkpoint("anyprecision", 0)["epoch"] == 1
    resumed = run_cell(spec, "anyprecision", 0, synthetic, resumed_store)
    assert resumed.record["results"] == full.record["results"]
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in full.log]
    a = full_store.load_checkpoint("anyprecision", 0)["model"]
    b = resumed_store.load_checkpoint("anyprecision", 0)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _compare(out: Path) -> subprocess.Popen:
    args = [sys.executable, "cli.py", "compare", "--methods", "dedicated", "--dataset", "synthetic", "--epochs", "4",
            "--width", "0.25", "--bits", "2,32", "--train-subset", "256", "--batch-size", "32", "--quiet",
            "--out", str(out)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_process_resumes_to_the_same_summary(tmp_path):
    reference = _compare(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0
    victim = _compare(tmp_path / "victim")
    checkpoint = tmp_path / "victim" / "cells" / "dedicated__seed0" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    killed = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert killed, "the run finished before it could be killed"
    assert not (tmp_path / "victim" / "summary.csv").exists()
    resumed = _compare(tmp_path / "victim")
    assert resumed.wait(timeout=300) == 0
    columns = ["method", "bits", "top1", "top5", "storage_mb", "sample_passes"]
    expected = pd.read_csv(tmp_path / "reference" / "summary.csv")[columns]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "victim" / "summary.csv")[columns], expected)
    log = pd.read_csv(tmp_path / "victim" / "log.csv")
    # the method, then the default fp reference, which the resumed run trained after it
    assert log.groupby("method", sort=False)["epoch"].apply(list).to_dict() == {"dedicated": [1, 2, 3, 4],
                                                                                  "fp": [1, 2, 3, 4]}
    assert set(pd.read_csv(tmp_path / "victim" / "summary.csv")["method"]) == {"dedicated", "fp"}
