"""benchmarks/epoch_table.py: the CIFAR-size tensors, the cell loop (budget, failures), the ratio and the table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "epoch_table.py"
_spec = importlib.util.spec_from_file_location("epoch_table", SCRIPT)
epoch_table = importlib.util.module_from_spec(_spec)
sys.modules["epoch_table"] = epoch_table  # dataclasses look their module up there
_spec.loader.exec_module(epoch_table)
Cell, Timing = epoch_table.Cell, epoch_table.Timing


def test_cifar_size_bundle_is_cifar_shaped_uint8_and_fixed_by_its_seed():
    bundle = epoch_table.cifar_size_bundle(train=64, test=8)
    assert bundle.train.images.shape == (64, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    assert bundle.test.images.shape == (8, 3, 32, 32)
    assert 0 <= int(bundle.train.labels.min()) and int(bundle.train.labels.max()) < 10
    assert (bundle.info.in_chans, bundle.info.image_size, bundle.info.num_classes) == (3, 32, 10)
    assert bundle.info.augment == "crop_flip" and bundle.train.augment == "crop_flip"
    again = epoch_table.cifar_size_bundle(train=64, test=8)
    assert torch.equal(bundle.train.images, again.train.images) and torch.equal(bundle.train.labels, again.train.labels)
    assert not torch.equal(bundle.train.images, epoch_table.cifar_size_bundle(train=64, test=8, seed=1).train.images)


def _cell(method: str, amp: str = "off") -> Cell:
    return Cell("cifar-size", method, amp, False, "auto")


def test_pass_cost_ratio_is_fp_passes_per_second_over_the_methods_under_the_same_settings():
    rows = [Timing(_cell("anyprecision"), "ok", 1.0, 2.0, 400.0), Timing(_cell("fp"), "ok", 1.0, 1.0, 500.0),
            Timing(_cell("anyprecision", "bf16"), "ok", 1.0, 1.0, 800.0)]
    assert epoch_table.pass_cost_ratio(rows[0], rows) == 500.0 / 400.0
    assert epoch_table.pass_cost_ratio(rows[1], rows) == 1.0
    assert epoch_table.pass_cost_ratio(rows[2], rows) is None  # no bf16 reference


def test_cells_after_the_budget_are_skipped_and_a_failure_is_one_row(monkeypatch):
    calls = []

    def fake_time_cell(cell, data, **kwargs):
        calls.append(cell.method)
        if cell.method == "adabits":
            raise RuntimeError("CUDA error: out of memory\nsecond line")
        return Timing(cell, "ok", 1.0, 0.5, 100.0, 2.0)

    monkeypatch.setattr(epoch_table, "time_cell", fake_time_cell)
    cells = [_cell("anyprecision"), _cell("adabits"), _cell("fp")]
    kwargs = dict(device="cpu", bits=(2, 4, 8), batch_size=128, model="resnet20", echo=lambda _: None)
    rows = epoch_table.run_table(cells, {"cifar-size": None}, budget_seconds=None, **kwargs)
    assert [r.status for r in rows] == ["ok", "failed: RuntimeError: CUDA error: out of memory", "ok"]
    assert calls == ["anyprecision", "adabits", "fp"]
    calls.clear()
    rows = epoch_table.run_table(cells, {"cifar-size": None}, budget_seconds=-1.0, **kwargs)
    assert [r.status for r in rows] == ["skipped (budget)"] * 3 and calls == []


def test_markdown_lists_every_cell_with_its_ratio_and_status():
    rows = [Timing(_cell("anyprecision"), "ok", 3.0, 2.5, 400.0, 7.25), Timing(_cell("fp"), "ok", 1.0, 1.0, 500.0, 2.0),
            Timing(_cell("mbquant"), "skipped (budget)")]
    text = epoch_table.markdown(rows, {"device": "cpu", "commit": "abc1234"})
    lines = text.splitlines()
    assert lines[0] == "# Epoch times on cpu" and "* **commit:** abc1234" in lines
    assert "| cifar-size | anyprecision | fp32 | off | auto | 3.00 | 2.50 | 400 | 1.25 | 7.2 | ok |" in lines
    assert "| cifar-size | mbquant | fp32 | off | auto |  |  |  |  |  | skipped (budget) |" in lines


def test_main_times_two_epochs_per_cell_with_the_harness_loop(tmp_path):
    out = tmp_path / "table.md"
    code = epoch_table.main(["--device", "cpu", "--train-subset", "128", "--methods", "anyprecision,fp", "--amp", "off",
                             "--batch-size", "64", "--out", str(out), "--jsonl", "--commit", "test"])
    assert code == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["commit"] == "test"
    # the second epoch's sample passes: 128 images at each of the three bit-widths, and 128 for fp
    passes = [round(r["passes_per_s"] * r["epoch_s"]) for r in rows]
    assert passes == [3 * 128, 128]
    assert "| cifar-size | anyprecision | fp32 | off | auto |" in out.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--amp", "fp16"], "--amp must be a comma-separated list of off, bf16"),
    (["--compile", "yes"], "--compile must be a comma-separated list of off, on"),
    (["--bits", "2,x"], "--bits must be comma-separated integers"),
    (["--methods", "nosuch"], "nosuch"),
    (["--datasets", "fashion-mnist", "--data-root", "/nonexistent"], "fashion-mnist"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys, tmp_path):
    out = tmp_path / "table.md"
    assert epoch_table.main(["--device", "cpu", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()
