"""The full-precision reference (``--reference fp``): one cell per seed under the comparison's model, data,
schedule, seed and budget, on the same batches as the methods; 32-bit results and the 32-bit network's storage;
resumable; stored in spec.json, where an older folder without the field still loads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from harness.compare import run_comparison, validate
from harness.config import RunSpec
from harness.errors import ConfigError, MbqError
from harness.models import create_model
from harness.store import RunStore
from harness.train import run_cell
from methods.anyprecision import AnyPrecision
from methods.reference import FullPrecision

SAME_AS_THE_METHODS = ("seed", "dataset", "model", "width", "train_subset", "epochs", "epochs_run", "schedule",
                       "runtime")


@pytest.fixture
def batches_seen(monkeypatch):
    """Every training batch (method, seed, epoch, indices, inputs) of anyprecision and of the fp reference."""
    seen: list[tuple[str, int, int, torch.Tensor, torch.Tensor]] = []

    def recording(cls):
        original = cls.train_step

        def train_step(self, model, batch, ctx):
            seen.append((self.name, ctx.seed, ctx.epoch, batch.indices.clone(), batch.x.clone()))
            return original(self, model, batch, ctx)

        monkeypatch.setattr(cls, "train_step", train_step)

    recording(AnyPrecision)
    recording(FullPrecision)
    return seen


def test_reference_trains_on_the_methods_batches_under_their_schedule_and_seed(batches_seen, tiny_spec,
                                                                               tmp_path):
    spec = tiny_spec(methods=("anyprecision",), bits=(2, 8), epochs=2, seeds=(0, 1), train_subset=128,
                     schedule={"augment": True})
    records, markdown = run_comparison(spec, tmp_path, show_progress=False)
    assert [(r["method"], r["seed"]) for r in records] == [("anyprecision", 0), ("fp", 0), ("anyprecision", 1),
                                                          ("fp", 1)]
    for seed in (0, 1):
        method, reference = (next(r for r in records if r["method"] == m and r["seed"] == seed)
                             for m in ("anyprecision", "fp"))
        assert {k: reference[k] for k in SAME_AS_THE_METHODS} == {k: method[k] for k in SAME_AS_THE_METHODS}
        assert reference["seed"] == seed and reference["schedule"] == spec.schedule.to_dict()
        assert reference["method_name"] == "fp" and list(reference["results"]) == ["32"]
        assert reference["bits"] == reference["eval_bits"] == [32]
        assert reference["results"]["32"]["sample_passes"] == reference["sample_passes_total"] == 2 * 128
        assert (tmp_path / "cells" / f"fp__seed{seed}" / "record.json").is_file()
        ours = [(e, i, x) for name, s, e, i, x in batches_seen if name == "fp" and s == seed]
        theirs = [(e, i, x) for name, s, e, i, x in batches_seen if name == "anyprecision" and s == seed]
        assert len(ours) == len(theirs) == 2 * 2  # 128 samples / batch 64, two epochs
        for (e1, i1, x1), (e2, i2, x2) in zip(ours, theirs):
            assert e1 == e2 and torch.equal(i1, i2) and torch.equal(x1, x2)  # augmentation included
    first = [i for name, s, _, i, _ in batches_seen if name == "fp" and s == 0]
    second = [i for name, s, _, i, _ in batches_seen if name == "fp" and s == 1]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # each seed its own order
    assert "| fp (reference) |" in markdown
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert sum(line.startswith("fp,32,") for line in summary) == 2
    assert sum(line.startswith("fp,32,") for line in (tmp_path / "stats.csv").read_text().splitlines()) == 1


def hand_count_bytes(model: nn.Module) -> int:
    """Parameters of every convolution, linear layer and BN plus BN's running mean and variance, 4 bytes each."""
    values = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            values += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        elif isinstance(module, nn.BatchNorm2d):
            values += module.weight.numel() + module.bias.numel()
            values += module.running_mean.numel() + module.running_var.numel()
    assert values == sum(p.numel() for p in model.parameters()) + sum(
        m.running_mean.numel() * 2 for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # nothing left out
    return 4 * values


def test_storage_is_the_32_bit_networks_parameters_and_bn_buffers(tiny_spec, synthetic):
    spec = tiny_spec(methods=("dedicated",), bits=(2, 4), epochs=1, train_subset=64)
    record = run_cell(spec, "fp", 0, synthetic).record
    info = synthetic.info
    plain = create_model("resnet20", num_classes=info.num_classes, in_chans=info.in_chans, mean=info.mean,
                         std=info.std, width=0.25)
    expected = hand_count_bytes(plain)
    assert isinstance(record["results"]["32"]["storage_bytes"], int)
    assert record["results"]["32"]["storage_bytes"] == record["storage_total_bytes"] == expected
    # by hand: ResNet-20 at width 0.25 (4/8/16 channels), 1 input channel, 10 classes; a BN of c channels holds
    # 4c values (gamma, beta, running mean and variance), a 3x3 convolution in x out 9 * in * out
    stem = 9 * 1 * 4 + 4 * 4
    stage1 = 3 * (2 * 9 * 4 * 4 + 2 * 4 * 4)
    stage2 = (9 * 4 * 8 + 9 * 8 * 8 + 2 * 4 * 8 + 4 * 8 + 4 * 8) + 2 * (2 * 9 * 8 * 8 + 2 * 4 * 8)  # + 1x1 projection
    stage3 = (9 * 8 * 16 + 9 * 16 * 16 + 2 * 4 * 16 + 8 * 16 + 4 * 16) + 2 * (2 * 9 * 16 * 16 + 2 * 4 * 16)
    head = 16 * 10 + 10
    assert expected == 4 * (stem + stage1 + stage2 + stage3 + head) == 71416


def test_reference_cell_resumes_to_the_uninterrupted_run(tiny_spec, synthetic, tmp_path):
    spec = tiny_spec(methods=("anyprecision",), epochs=3, train_subset=128)
    full = run_cell(spec, "fp", 0, synthetic, RunStore(tmp_path / "full"))
    store = RunStore(tmp_path / "resumed")
    assert run_cell(spec, "fp", 0, synthetic, store, stop_after=1).record is None
    assert store.load_checkpoint("fp", 0)["epoch"] == 1
    resumed = run_cell(spec, "fp", 0, synthetic, store)
    assert resumed.record["results"] == full.record["results"]
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in full.log]


def test_a_finished_reference_is_reused_not_retrained(tiny_spec, tmp_path):
    spec = tiny_spec(methods=("anyprecision",), epochs=1, train_subset=64, test_subset=32)
    records, markdown = run_comparison(spec, tmp_path, show_progress=False)
    messages: list[str] = []
    again, again_md = run_comparison(spec, tmp_path, show_progress=False, echo=messages.append)
    assert "fp seed 0: already finished, reusing its record" in messages
    assert again == json.loads(json.dumps(records)) and again_md == markdown  # records as read back from disk


def test_reference_trains_under_the_same_budget_rules(tiny_spec, tmp_path):
    budget = 300.0  # sample-passes: the reference spends 64 per step (one bit-width), anyprecision 128 (two)
    spec = tiny_spec(methods=("anyprecision",), bits=(2, 32), epochs=2, train_subset=128, test_subset=32,
                     schedule={"budget_kind": "sample-passes", "budget": budget})
    records, markdown = run_comparison(spec, tmp_path, show_progress=False)
    method, reference = records
    assert reference["method"] == "fp" and reference["schedule"] == method["schedule"]
    assert reference["sample_passes_total"] == 320 and method["sample_passes_total"] == 384  # first step past it
    assert reference["epochs_run"] == 3 and method["epochs_run"] == 2  # 2 steps per epoch: 5 steps, 3 steps
    assert reference["log"][-1]["lr"] < reference["log"][0]["lr"]  # its lr curve annealed over the budget
    assert "| fp (reference) |" in markdown and "epochs run" in markdown


def test_spec_stores_the_reference_and_dedupes_a_listed_fp():
    spec = RunSpec(methods=("anyprecision",))
    assert spec.reference == "fp" and json.loads(spec.to_json())["reference"] == "fp"
    assert spec.cell_methods == ("anyprecision", "fp")
    assert RunSpec(methods=("anyprecision",), reference="none").cell_methods == ("anyprecision",)
    listed = RunSpec(methods=("fp", "anyprecision", "fp"))
    assert listed.methods == ("anyprecision",) and listed.to_json() == spec.to_json()  # one fp cell per seed
    assert RunSpec.from_dict(json.loads(spec.to_json())) == spec
    assert RunSpec(methods=("anyprecision",), baseline="fp").baseline == "fp"  # "cost vs fp"


@pytest.mark.parametrize("options, match", [
    ({"reference": "int8"}, "unknown --reference 'int8'; choose one of fp, none"),
    ({"reference": None}, "unknown --reference None"),
    ({"methods": ("anyprecision", "fp"), "reference": "none"}, "--methods lists fp, the full-precision reference"),
    ({"methods": ("anyprecision", "fp:width=2")}, "the full-precision reference 'fp' takes no options"),
    ({"methods": ("fp",)}, "list at least one method to compare with it"),
    ({"baseline": "fp", "reference": "none"}, "baseline 'fp' is not one of the compared methods"),
])
def test_bad_reference_settings_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        RunSpec(**{"methods": ("anyprecision",), **options})


def test_a_folder_from_before_the_field_resumes_with_the_default(tiny_spec, tmp_path):
    spec = tiny_spec(methods=("anyprecision",), epochs=1)
    old = json.loads(spec.to_json())
    del old["reference"]
    RunStore(tmp_path).write_json("spec.json", old)
    validate(spec, tmp_path)  # the default reference fp: the same comparison, its fp cells still to train
    with pytest.raises(MbqError, match="holds a different comparison"):
        validate(tiny_spec(methods=("anyprecision",), epochs=1, reference="none"), tmp_path)
