"""Tables from records: seed statistics with a bootstrap interval, noise marks, schedule mixing, plots."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from harness.errors import MbqError
from harness.report import (
    check_same_schedule,
    comparison_table,
    seed_stats,
    stats_frame,
    within_noise_of_best,
    write_reports,
)


def record(method, seed, top1, hours=1.0, passes=100, schedule=None):
    return {"method": method, "seed": seed, "dataset": "digits", "model": "resnet20", "epochs": 1, "device": "cpu",
            "schedule": schedule or {"epochs": 1, "optimizer": "sgd", "lr": 0.1, "lr_schedule": "cosine",
                                     "batch_size": 8},
            "results": {str(b): {"top1": v, "top5": 100.0, "storage_bytes": 1000 * b, "sample_passes": passes}
                        for b, v in top1.items()},
            "storage_total_bytes": 5000, "device_hours": hours, "sample_passes_total": passes,
            "device_hours_by_phase": {"prepare": 0.0, "train": hours, "finalize": 0.0, "eval": 0.0}}


def test_seed_stats_match_numpy_and_scipy():
    values = [90.0, 91.0, 93.0]
    stats = seed_stats(values)
    assert stats["mean"] == pytest.approx(np.mean(values)) and stats["std"] == pytest.approx(np.std(values, ddof=1))
    expected = bootstrap((np.array(values),), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                         random_state=0).confidence_interval
    assert (stats["ci_low"], stats["ci_high"]) == (expected.low, expected.high)
    assert np.isnan(seed_stats([90.0])["std"])


def test_noise_marks_overlapping_intervals_only():
    records = [record("a", s, {2: v}) for s, v in enumerate((90.0, 91.0, 92.0))]
    records += [record("b", s, {2: v}) for s, v in enumerate((89.5, 90.5, 91.5))]  # overlaps a
    records += [record("c", s, {2: v}) for s, v in enumerate((50.0, 51.0, 52.0))]  # far below
    assert within_noise_of_best(stats_frame(records)) == {("b", 2)}
    table = comparison_table(records, baseline="a").set_index("method")
    assert table.loc["b", "2-bit top-1 %"] == "90.50 ± 1.00 ~"
    assert table.loc["a", "2-bit top-1 %"] == "91.00 ± 1.00"
    assert table.loc["c", "cost vs a"] == "1.00x"


def test_passes_are_normalized_by_the_cheapest_method():
    records = [record("cheap", 0, {2: 80.0}, passes=100), record("dear", 0, {2: 85.0}, passes=400)]
    table = comparison_table(records).set_index("method")
    assert table.loc["dear", "passes vs fewest"] == "4.00x" and table.loc["cheap", "passes vs fewest"] == "1.00x"


def test_mixed_schedules_are_refused_unless_asked(tmp_path):
    records = [record("a", 0, {2: 80.0}), record("b", 0, {2: 80.0}, schedule={"epochs": 2})]
    with pytest.raises(MbqError, match="different schedules"):
        check_same_schedule(records)
    check_same_schedule(records, allow_mixed=True)
    write_reports(tmp_path, records, allow_mixed=True)
    for name in ("summary.csv", "stats.csv", "table.md", "table.tex", "accuracy.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
