"""Equal-cost training (``--budget``): the lr curve indexed by the fraction of the budget spent, training that
stops once the budget is spent, and resume inside a budgeted run."""

from __future__ import annotations

import math

import pytest

from harness.config import Schedule, parse_budget
from harness.errors import ConfigError
from harness.report import comparison_table
from harness.store import RunStore
from harness.train import run_cell


def test_parse_budget():
    assert parse_budget("sample-passes=2e6") == ("sample-passes", 2e6)
    assert parse_budget("device-hours=0.5") == ("device-hours", 0.5)
    for bad in ("passes=3", "sample-passes", "device-hours=abc", "sample-passes=0", "sample-passes=-1",
                "device-hours=nan"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_schedule_needs_kind_and_amount_together():
    with pytest.raises(ConfigError, match="both a kind and an amount"):
        Schedule(budget_kind="sample-passes")
    with pytest.raises(ConfigError, match="unknown budget kind"):
        Schedule(budget_kind="joules", budget=1.0)


@pytest.mark.parametrize("fraction, expected", [(0.0, 1.0), (0.25, 0.5 * (1 + math.cos(math.pi * 0.25))),
                                                (0.5, 0.5), (1.0, 0.0), (1.5, 0.0)])
def test_cosine_curve_over_the_budget(fraction, expected):
    assert Schedule(epochs=10).lr_factor_at_fraction(fraction) == pytest.approx(expected, abs=1e-15)


def test_step_and_warmup_curves_over_the_budget():
    step = Schedule(epochs=10, lr_schedule="step", milestones=(5, 8), gamma=0.1)
    assert [step.lr_factor_at_fraction(f) for f in (0.0, 0.49, 0.5, 0.79, 0.8)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01], abs=1e-15)
    warm = Schedule(epochs=10, lr_schedule="constant", warmup_epochs=2)
    assert warm.lr_factor_at_fraction(0.1) == pytest.approx(0.5, abs=1e-15)  # 1 of 2 warm-up epochs
    assert warm.lr_factor_at_fraction(0.3) == 1.0


def test_budgeted_cells_stop_at_the_budget_and_agree_on_cost(tiny_spec, synthetic):
    budget = 1500.0  # sample-passes: 512 samples x 2 bit-widths = 1024 per epoch, so one epoch and part of another
    records = {}
    for method in ("anyprecision", "dedicated"):
        spec = tiny_spec(epochs=3, schedule={"budget_kind": "sample-passes", "budget": budget})
        records[method] = run_cell(spec, method, 0, synthetic).record
    for record in records.values():
        total = record["sample_passes_total"]
        assert budget <= total < budget + 2 * 64  # stops within one step (batch 64 at 2 bit-widths)
        assert total == 1536  # 1024 + 4 steps of 128
        assert record["epochs_run"] == 2
        assert record["log"][-1]["lr"] < record["log"][0]["lr"]  # the curve annealed over the budget
    assert records["anyprecision"]["sample_passes_total"] == records["dedicated"]["sample_passes_total"]
    table = comparison_table(list(records.values()))
    assert list(table["epochs run"]) == ["2.0", "2.0"]


def test_budgeted_run_resumes_exactly(tiny_spec, synthetic, tmp_path):
    spec = tiny_spec(epochs=2, schedule={"budget_kind": "sample-passes", "budget": 1500.0})
    whole = run_cell(spec, "anyprecision", 0, synthetic).record
    store = RunStore(tmp_path)
    assert run_cell(spec, "anyprecision", 0, synthetic, store, stop_after=1).record is None
    resumed = run_cell(spec, "anyprecision", 0, synthetic, store).record
    assert resumed["log"] == [{**row, "seconds": resumed["log"][i]["seconds"]} for i, row in enumerate(whole["log"])]
    assert resumed["results"] == whole["results"]


def test_a_budget_that_emq_scoring_spends_alone_is_an_error(tiny_spec, synthetic):
    # EMQ's scoring phase alone spends 3 epochs x 512 samples x 2 bit-widths = 3072 passes: nothing is left, and
    # a table calling that run "equal-cost" would mislead, so it stops with one line.
    spec = tiny_spec(epochs=3, schedule={"budget_kind": "sample-passes", "budget": 1000.0})
    with pytest.raises(ConfigError, match=r"^emq:score_epochs=3: the budget sample-passes=1000 is spent by its "
                                          r"prepare phase alone \(3072\), so it would train no step; raise --budget$"):
        run_cell(spec, "emq:score_epochs=3", 0, synthetic)


def test_the_lr_curve_spans_what_prepare_left_of_the_budget(tiny_spec, synthetic):
    # EMQ scores for 3 epochs (3072 passes of 512 x 2 bit-widths); the rest of a 5000 budget is for training,
    # and training starts at the top of its lr curve rather than where 3072/5000 of the curve would be.
    spec = tiny_spec(epochs=3, schedule={"budget_kind": "sample-passes", "budget": 5000.0})
    record = run_cell(spec, "emq:score_epochs=3:prune=0.5", 0, synthetic).record
    assert record["epochs_run"] >= 2
    first_epoch_lr = record["log"][0]["lr"]
    schedule = spec.schedule
    trained = record["log"][0]["sample_passes"] - 3072  # the lr is logged at the last step, 128 passes before
    expected_last = schedule.lr * schedule.lr_factor_at_fraction((trained - 128) / (5000.0 - 3072))
    assert first_epoch_lr == pytest.approx(expected_last, rel=1e-9)
    assert first_epoch_lr > schedule.lr * schedule.lr_factor_at_fraction(3072 / 5000.0)
