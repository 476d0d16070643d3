"""Peak memory and time of one EMQ training step and one evaluation pass on a ViT (digits, batch 128, bits 4,8).

The peak is the maximum resident set (``ru_maxrss``) of a fresh subprocess per configuration, minus its resident
set once torch and the data are loaded (so other benchmarks' allocations cannot leak into it): what building the
model, initializing LSQ and the measured step or pass add at their highest (the step's backward is the peak).
Configurations: DeiT-Tiny with one-pixel tokens (65 tokens, what the suite used on 8x8 images before) and the
composed LSQ formula, the same with the fused LSQ node, DeiT-Tiny at the current patch size (2x2 pixels, 17
tokens), and ``deit_micro``. ``extra_info`` holds the peak in MB; the benchmark's time is the step (or pass) in
this process at the same configuration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness.models as models
import methods.quant.lsq as lsq_module
from harness.config import Schedule
from harness.data import load_dataset
from harness.method import Batch, RunContext
from harness.registry import get_method

BATCH = 128
BITS = (4, 8)
ROOT = Path(__file__).resolve().parents[1]

# (model, patch size or 0 for the model's own, LSQ form)
CONFIGS = {
    "deit_tiny-patch1-composed-lsq": ("deit_tiny", 1, "composed"),
    "deit_tiny-patch1-fused-lsq": ("deit_tiny", 1, "fused"),
    "deit_tiny-patch2-fused-lsq": ("deit_tiny", 0, "fused"),
    "deit_micro-patch2-fused-lsq": ("deit_micro", 0, "fused"),
}

_PROBE = """
import json, os, resource, sys
import torch
sys.path.insert(0, {root!r})
from benchmarks.test_bench_vit_memory import setup
from harness.data import load_dataset
torch.set_num_threads(1)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
load_dataset("digits")
before = rss_mb()
method, model, batch, ctx, test_images = setup({model!r}, {patch}, {lsq!r})
if {phase!r} == "train":
    method.train_step(model, batch, ctx)
else:
    model.eval()
    with torch.no_grad():
        for bits in ctx.bits:
            method.set_bits(model, bits)
            model(test_images)
print(json.dumps({{"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}}))
"""


def setup(model_name: str, patch: int, lsq: str):
    """EMQ (full data) on ``model_name`` with its LSQ steps initialized, a training batch and the test images."""
    if patch:
        models.vit_patch_size = lambda image_size: patch
    if lsq == "composed":
        lsq_module.lsq_quantize = lsq_module.lsq_quantize_reference
    data = load_dataset("digits")
    method = get_method("emq").from_options({"prune": "0"})
    torch.manual_seed(0)
    model = method.build(model_name, data.info.num_classes, BITS, data.info, 1.0)
    indices = torch.arange(BATCH)
    batch = Batch(data.train.get_batch(indices), data.train.labels[indices], indices)
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=data.info.num_classes, seed=0, epochs=1,
                     data_info=data.info, schedule=Schedule(epochs=1, batch_size=BATCH))
    model.train()
    with torch.no_grad():  # LSQ initializes each bit-width's steps on its first batch; no graph kept here
        for bits in BITS:
            method.set_bits(model, bits)
            model(batch.x)
    return method, model, batch, ctx, data.test.get_batch(torch.arange(len(data.test)))


def peak_memory_mb(model_name: str, patch: int, lsq: str, phase: str) -> float:
    code = _PROBE.format(root=str(ROOT), model=model_name, patch=patch, lsq=lsq, phase=phase)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.fixture
def restore_patching(monkeypatch):
    monkeypatch.setattr(models, "vit_patch_size", models.vit_patch_size)
    monkeypatch.setattr(lsq_module, "lsq_quantize", lsq_module.lsq_quantize)


@pytest.mark.parametrize("config", CONFIGS)
def test_vit_train_step_memory(benchmark, config, restore_patching):
    model_name, patch, lsq = CONFIGS[config]
    benchmark.extra_info["peak_mb"] = round(peak_memory_mb(model_name, patch, lsq, "train"), 1)
    method, model, batch, ctx, _ = setup(model_name, patch, lsq)

    def step() -> None:
        method.train_step(model, batch, ctx)
        for parameter in model.parameters():
            parameter.grad = None

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("config", CONFIGS)
def test_vit_eval_pass_memory(benchmark, config, restore_patching):
    model_name, patch, lsq = CONFIGS[config]
    benchmark.extra_info["peak_mb"] = round(peak_memory_mb(model_name, patch, lsq, "eval"), 1)
    method, model, _, ctx, test_images = setup(model_name, patch, lsq)
    model.eval()

    def evaluation_pass() -> None:
        with torch.no_grad():
            for bits in ctx.bits:
                method.set_bits(model, bits)
                model(test_images)

    benchmark.pedantic(evaluation_pass, rounds=3, warmup_rounds=1)
