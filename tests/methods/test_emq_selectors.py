"""EMQ with other coreset selectors and with re-scoring: scoring cost, call counts and exact resume."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from harness.config import Schedule
from harness.data import SubsetImageSet
from harness.errors import ConfigError
from harness.method import RunContext
from harness.registry import get_method
from harness.store import RunStore
from harness.train import instantiate, run_cell
from methods.emq import EMQ
from methods.quant.coreset_selectors import moderate_scores


def build(synthetic, bits=(2, 8), **options):
    method = get_method("emq").from_options(options)
    torch.manual_seed(0)
    return method, method.build("resnet20", 10, bits, synthetic.info, 0.25)


def context(synthetic, bits) -> RunContext:
    return RunContext(bits=bits, device=torch.device("cpu"), num_classes=10, seed=0, epochs=2,
                      data_info=synthetic.info, schedule=Schedule(epochs=2, batch_size=32, lr=0.05))


def test_selector_options_parse_and_unknown_ones_are_one_line_errors():
    cfg = instantiate("emq:selector=el2n:rescore_every=10").cfg
    assert (cfg.selector, cfg.rescore_every) == ("el2n", 10)
    assert (EMQ().cfg.selector, EMQ().cfg.rescore_every) == ("tdds", None)
    with pytest.raises(ConfigError, match="unknown coreset selector 'loss'"):
        instantiate("emq:selector=loss")
    with pytest.raises(ConfigError, match="rescore_every must be a positive integer"):
        instantiate("emq:rescore_every=0")


def test_random_selector_runs_no_scoring_pass(synthetic):
    method, model = build(synthetic, selector="random")
    ctx = context(synthetic, (2, 8))
    train = SubsetImageSet(synthetic.train, torch.arange(40))
    method.prepare(model, train, ctx)
    assert ctx.passes == Counter()
    assert torch.equal(method.probabilities(), torch.full((2, 40), 1 / 40, dtype=torch.float64))
    draws = method.epoch_indices(0, train, (2, 8))
    assert all(len(v) == 8 and len(v.unique()) == 8 for v in draws.values())


@pytest.mark.parametrize("selector", ["el2n", "entropy", "forgetting", "moderate"])
def test_scored_selectors_cost_one_scoring_phase_per_bit_width(synthetic, selector):
    method, model = build(synthetic, selector=selector, score_epochs=3)
    ctx = context(synthetic, (2, 8))
    train = SubsetImageSet(synthetic.train, torch.arange(40))
    method.prepare(model, train, ctx)
    assert ctx.passes == Counter({2: 3 * 40, 8: 3 * 40})
    assert method.scores.shape == (2, 40) and torch.isfinite(method.scores).all()
    assert "coreset_scores" in method.artifacts() and "tdds_scores" not in method.artifacts()


def test_moderate_reads_the_classifier_input_of_the_scored_network(synthetic, monkeypatch):
    """The features handed to the moderate selector are the FC input of every (unaugmented) training sample."""
    seen = {}

    def spy(features, labels):
        seen.setdefault("features", []).append(features)
        return moderate_scores(features, labels)

    monkeypatch.setattr("methods.quant.coreset_selectors.moderate_scores", spy)
    method, model = build(synthetic, (2,), selector="moderate", score_epochs=3)
    method.prepare(model, SubsetImageSet(synthetic.train, torch.arange(24)), context(synthetic, (2,)))
    assert [tuple(f.shape) for f in seen["features"]] == [(24, model.fc.in_features)]


def counting(monkeypatch):
    calls: list[tuple[int, ...]] = []
    original = EMQ.scoring_run

    def counted(self, initial, train_set, bits, stream_seed, ctx):
        calls.append(bits)
        return original(self, initial, train_set, bits, stream_seed, ctx)

    monkeypatch.setattr(EMQ, "scoring_run", counted)
    return calls


@pytest.mark.parametrize(("epochs", "every"), [(5, 2), (4, 2), (3, 1)])
def test_rescoring_every_e_epochs_scores_ceil_epochs_over_e_times(tiny_spec, synthetic, monkeypatch, epochs, every):
    label = f"emq:score_epochs=3:rescore_every={every}"
    spec = tiny_spec(methods=(label,), bits=(2, 8), epochs=epochs)
    data = dataclasses.replace(synthetic, train=SubsetImageSet(synthetic.train, torch.arange(48)))
    calls = counting(monkeypatch)
    record = run_cell(spec, label, 0, data).record
    phases = math.ceil(epochs / every)
    assert len(calls) == 2 * phases  # bit-wise: one scoring run per bit-width per phase
    # every phase: 3 scoring epochs on all 48 samples; every epoch: round(0.2 x 48) = 10 coreset samples
    assert record["results"]["2"]["sample_passes"] == phases * 3 * 48 + epochs * 10


def test_rescored_run_resumes_exactly(tiny_spec, synthetic, tmp_path, monkeypatch):
    label = "emq:score_epochs=3:rescore_every=2"
    spec = tiny_spec(methods=(label,), bits=(2, 8), epochs=5)
    data = dataclasses.replace(synthetic, train=SubsetImageSet(synthetic.train, torch.arange(48)))
    full = run_cell(spec, label, 0, data, RunStore(tmp_path / "full"))
    store = RunStore(tmp_path / "resumed")
    assert run_cell(spec, label, 0, data, store, stop_after=3).record is None  # epochs 0-2, scored before 0 and 2
    calls = counting(monkeypatch)
    resumed = run_cell(spec, label, 0, data, store)
    assert len(calls) == 2  # only the re-scoring before epoch 5 (index 4) is left
    assert resumed.record["results"] == full.record["results"]
    assert resumed.record["sample_passes_total"] == full.record["sample_passes_total"]
    saved = [torch.load(s.cell_dir(label, 0) / "artifacts.pt") for s in (RunStore(tmp_path / "full"), store)]
    assert saved[0]["scored_at"].tolist() == saved[1]["scored_at"].tolist() == [0, 2, 4]
    assert torch.equal(saved[0]["coreset_indices"], saved[1]["coreset_indices"])
    assert torch.equal(saved[0]["coreset_scores"], saved[1]["coreset_scores"])


def test_rescoring_changes_the_scores_and_the_draws_that_follow(tiny_spec, synthetic, tmp_path):
    label = "emq:score_epochs=3:rescore_every=2:resample_every=3"
    spec = tiny_spec(methods=(label,), bits=(2,), epochs=4)
    data = dataclasses.replace(synthetic, train=SubsetImageSet(synthetic.train, torch.arange(48)))
    store = RunStore(tmp_path)
    run_cell(spec, label, 0, data, store)
    artifacts = torch.load(store.cell_dir(label, 0) / "artifacts.pt")
    # resample every 3 epochs, re-score before epoch 2: draws start at 0, 2 (new scores) and 3 (resampling)
    assert artifacts["coreset_epochs"].tolist() == [0, 2, 3]


def test_a_kill_during_scoring_resumes_at_the_next_scoring_epoch_with_the_same_scores(tiny_spec, synthetic, tmp_path,
                                                                                      monkeypatch):
    label = "emq:score_epochs=3"
    spec = tiny_spec(methods=(label,), bits=(2, 8), epochs=2)
    data = dataclasses.replace(synthetic, train=SubsetImageSet(synthetic.train, torch.arange(48)))
    full = run_cell(spec, label, 0, data, RunStore(tmp_path / "full"))
    store = RunStore(tmp_path / "killed")
    prepare_saves = []
    original = RunStore.save_checkpoint

    def killed_after_the_first_8_bit_epoch(self, method_label, seed, state):
        original(self, method_label, seed, state)
        if not state["prepared"]:
            prepare_saves.append(state["method_state"]["scoring_progress"]["running"]["epochs_done"])
            if len(prepare_saves) == 4:  # the 2-bit run's 3 scoring epochs, then the 8-bit run's first
                raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "save_checkpoint", killed_after_the_first_8_bit_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_cell(spec, label, 0, data, store)
    monkeypatch.undo()
    assert prepare_saves == [1, 2, 3, 1]
    state = store.load_checkpoint(label, 0)
    assert state["prepared"] is False and sorted(state["method_state"]["scoring_progress"]["done"]) == [2]
    calls = counting(monkeypatch)
    messages: list[str] = []
    resumed = run_cell(spec, label, 0, data, store, echo=messages.append)
    assert messages == [f"{label} seed 0: resuming scoring at 8-bit epoch 2"]
    assert calls == [(8,)]  # the finished 2-bit scores are reused
    assert resumed.record["results"] == full.record["results"]
    assert resumed.record["sample_passes_total"] == full.record["sample_passes_total"]
    saved = [torch.load(s.cell_dir(label, 0) / "artifacts.pt") for s in (RunStore(tmp_path / "full"), store)]
    assert torch.equal(saved[0]["coreset_scores"], saved[1]["coreset_scores"])
    assert torch.equal(saved[0]["coreset_indices"], saved[1]["coreset_indices"])
