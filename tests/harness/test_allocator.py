"""glibc keeps large freed blocks after keep_large_blocks(): a batch-sized tensor made again faults no pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from harness import allocator

# Minor page faults per 38.5 MB float32 batch (9,408 pages of 4 KiB) once a few batches have come and gone
# (glibc still maps the first four afresh here, then reuses the freed block).
FAULTS_PER_BATCH = """
import resource, sys, torch
from harness.allocator import keep_large_blocks
print(keep_large_blocks() if sys.argv[1] == "keep" else None)
x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
for _ in range(8):
    x.to(torch.float32).div_(255.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x.to(torch.float32).div_(255.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""
PAGES = 64 * 3 * 224 * 224 * 4 // 4096


def _faults_per_batch(mode: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_BATCH, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc malloc's")
def test_a_batch_sized_tensor_reuses_warm_pages_only_with_large_blocks_kept(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    took, kept = _faults_per_batch("keep")
    assert took == "True"
    assert kept < PAGES / 100
    _, default = _faults_per_batch("default")
    assert default >= PAGES * 0.9  # glibc's defaults: a fresh mmap, every page faulted in


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_MMAP_THRESHOLD_", "4096"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_thresholds_the_environment_chooses_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.environment_chooses_thresholds()
    assert allocator.keep_large_blocks() is False


def test_unrelated_tunables_do_not_count_as_a_choice(monkeypatch):
    for name in allocator.ENVIRONMENT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert not allocator.environment_chooses_thresholds()
