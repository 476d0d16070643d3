"""The shared training loop: identical data for every method, lr curve, phases, artifacts, NaN handling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from harness import registry
from harness.errors import TrainingDiverged
from harness.method import Method
from harness.method_config import MethodConfig
from harness.models import create_model
from harness.store import RunStore
from harness.train import run_cell


@dataclass(frozen=True)
class RecorderConfig(MethodConfig):
    poison_epoch: int = -1
    blow_up_epoch: int = -1  # from this epoch on the reported loss is finite but huge


class Recorder(Method):
    """Full precision; records every batch's indices and the lr, can return NaN on purpose."""

    Config = RecorderConfig
    seen: list = []

    def build(self, model_name, num_classes, bits, data_info, width):
        self.model = create_model(model_name, num_classes=num_classes, in_chans=data_info.in_chans,
                                  mean=data_info.mean, std=data_info.std, width=width)
        return self.model

    def prepare(self, model, train_set, ctx):
        ctx.count_passes(0, 7)

    def train_step(self, model, batch, ctx):
        Recorder.seen.append((ctx.epoch, batch.indices.clone(), batch.x.clone()))
        loss = F.cross_entropy(model(batch.x), batch.y)
        loss.backward()
        ctx.count_passes(max(ctx.bits), len(batch.y))
        if ctx.epoch == self.cfg.poison_epoch:
            return {"loss": float("nan")}
        if 0 <= self.cfg.blow_up_epoch <= ctx.epoch:
            return {"loss": 1e6}
        return {"loss": loss.item()}

    def set_bits(self, model, bits):
        pass

    def artifacts(self):
        return {"scores": torch.arange(4)}


@pytest.fixture
def recorder():
    registry.discover()
    registry._add("recorder", Recorder, "test")
    Recorder.name = "recorder"
    Recorder.seen = []
    yield Recorder
    registry.unregister("recorder")


def test_every_method_sees_the_same_batches_under_one_seed(recorder, tiny_spec, synthetic):
    spec = tiny_spec(methods=("recorder", "recorder:poison_epoch=-2"), bits=(32,), epochs=2,
                     schedule={"augment": True})
    run_cell(spec, "recorder", 0, synthetic)
    first = list(Recorder.seen)
    Recorder.seen = []
    run_cell(spec, "recorder:poison_epoch=-2", 0, synthetic)
    assert len(first) == len(Recorder.seen) == 2 * 8  # 512 samples / batch 64, two epochs
    for (e1, i1, x1), (e2, i2, x2) in zip(first, Recorder.seen):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(x1, x2)
    epoch0 = torch.cat([i for e, i, _ in first if e == 0])
    assert sorted(epoch0.tolist()) == list(range(512))  # each sample once per epoch
    assert not torch.equal(first[0][1], first[8][1])  # reshuffled between epochs


def test_record_counts_passes_phases_and_saves_artifacts(recorder, tiny_spec, synthetic, tmp_path):
    spec = tiny_spec(methods=("recorder",), bits=(32,), epochs=2)
    store = RunStore(tmp_path)
    record = run_cell(spec, "recorder", 0, synthetic, store).record
    assert record["results"]["32"]["sample_passes"] == 2 * 512
    assert record["sample_passes_total"] == 2 * 512 + 7  # prepare's passes count in the total
    assert set(record["seconds"]) == {"prepare", "train", "finalize", "eval"}
    assert record["device_hours"] == pytest.approx(sum(record["seconds"].values()) / 3600)
    assert [row["epoch"] for row in record["log"]] == [1, 2]
    # the log shows the lr of the epoch's last step: cosine at 7/8 of epoch 1 of 2
    assert record["log"][0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (7 / 8) / 2)), abs=1e-12)
    saved = torch.load(store.cell_dir("recorder", 0) / "artifacts.pt")
    assert torch.equal(saved["scores"], torch.arange(4))


def test_nan_loss_is_a_clear_error_and_keeps_the_last_checkpoint(recorder, tiny_spec, synthetic, tmp_path):
    spec = tiny_spec(methods=("recorder:poison_epoch=1",), bits=(32,), epochs=3)
    store = RunStore(tmp_path)
    with pytest.raises(TrainingDiverged, match="diverged: loss nan at epoch 2 step 1"):
        run_cell(spec, "recorder:poison_epoch=1", 0, synthetic, store)
    assert store.load_checkpoint("recorder:poison_epoch=1", 0)["epoch"] == 1
    assert store.load_record("recorder:poison_epoch=1", 0) is None


def test_a_finite_blow_up_is_flagged_in_the_record_and_under_the_table(recorder, tiny_spec, synthetic, tmp_path):
    """A loss 100x the chance level (ln 10 per loss term here) is flagged, even while it stays finite; the run goes
    on (such spikes can recover) and the table says it under itself."""
    from harness.report import regime_lines

    label = "recorder:blow_up_epoch=1"
    spec = tiny_spec(methods=(label,), bits=(32,), epochs=3)
    messages: list[str] = []
    record = run_cell(spec, label, 0, synthetic, RunStore(tmp_path), echo=messages.append).record
    note = "mean loss 1e+06 in epoch {}, over 100x the chance-level 2.3 (a lower --lr may help)"
    assert record["training_notes"] == [note.format(2), note.format(3)]
    assert messages[1:] == [f"{label} seed 0: unstable training: {note.format(2)}",
                            f"{label} seed 0: unstable training: {note.format(3)}"]
    assert f"Unstable training: {label} (seed 0): {note.format(2)}; {note.format(3)}." in regime_lines([record])


def test_no_progress_output_without_a_terminal(recorder, tiny_spec, synthetic, capsys):
    spec = tiny_spec(methods=("recorder",), bits=(32,), epochs=2)
    run_cell(spec, "recorder", 0, synthetic, show_progress=True)  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""
