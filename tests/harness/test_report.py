"""Tables from records: seed statistics with a bootstrap interval, noise marks, schedule mixing, plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import bootstrap

from harness.errors import MbqError
from harness.report import (
    MIN_ACCURACY_SPAN,
    accuracy_plot_png,
    accuracy_range,
    caption,
    check_same_schedule,
    comparison_table,
    latex_escape,
    latex_table,
    pareto_plot_png,
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


def test_reference_row_comes_first_with_its_32_bit_top1_in_every_bit_column(tmp_path):
    methods = [record("a", s, {2: v, 32: v + 5}, passes=200) for s, v in enumerate((90.0, 91.0, 92.0))]
    methods += [record("b", s, {2: v, 32: v + 5}, passes=400) for s, v in enumerate((89.5, 90.5, 91.5))]
    reference = [record("fp", s, {32: v}, hours=0.5, passes=100) for s, v in enumerate((98.0, 99.0, 100.0))]
    for rec in reference:
        rec["results"]["32"]["storage_bytes"] = 32_000
        rec["storage_total_bytes"] = 32_000
    without = comparison_table(methods, ["a", "b"])
    table = comparison_table(methods + reference, ["a", "b"], baseline="fp")
    assert list(table["method"]) == ["fp (reference)", "a", "b"]
    assert list(table.columns) == [*without.columns, "cost vs fp"]  # no column of its own
    fp = table.iloc[0]
    assert fp["2-bit top-1 %"] == fp["32-bit top-1 %"] == "99.00 ± 1.00"
    assert fp["MB at this bit-width"] == "0.032 / 0.032" and fp["MB for all bit-widths"] == "0.032"
    assert fp["passes vs fewest"] == "0.50x" and fp["cost vs fp"] == "1.00x"
    # the methods' cells are what they are without the reference: it takes no part in the '~' marks (at 32 bits
    # its interval lies above both methods'; b stays within the noise of a, the best method)
    pd.testing.assert_frame_equal(table.iloc[1:][list(without.columns)].reset_index(drop=True), without)
    assert table.iloc[2]["32-bit top-1 %"] == "95.50 ± 1.00 ~" and table.iloc[1]["cost vs fp"] == "2.00x"
    markdown = write_reports(tmp_path, methods + reference, ["a", "b"])
    assert markdown.splitlines()[2].startswith("| fp (reference) | 99.00 ± 1.00 | 99.00 ± 1.00 | 0.032 / 0.032 |")
    assert "'fp (reference)': the full-precision network of the same model" in markdown
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary[summary["method"] == "fp"]["bits"].tolist() == [32, 32, 32]
    stats = pd.read_csv(tmp_path / "stats.csv").set_index(["method", "bits"])
    assert stats.loc[("fp", 32), "mean"] == 99.0
    assert "fp (reference)" in (tmp_path / "table.tex").read_text()
    for name in ("accuracy.png", "pareto.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_is_drawn_as_a_horizontal_line(monkeypatch):
    import matplotlib.axes

    lines: list[tuple[float, str | None]] = []
    original = matplotlib.axes.Axes.axhline

    def axhline(self, y=0, *args, **kwargs):
        lines.append((y, kwargs.get("label")))
        return original(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    records = [record("a", 0, {2: 80.0, 4: 85.0}), record("fp", 0, {32: 95.0})]  # no 32-bit panel for the fp
    accuracy_plot_png(records)
    assert lines == [(95.0, "fp (reference)")]
    lines.clear()
    pareto_plot_png(records)
    assert [y for y, _ in lines] == [95.0, 95.0]  # one per bit-width panel
    lines.clear()
    accuracy_plot_png(records[:1])
    assert lines == []


def test_regime_notes_are_one_line_per_method_under_the_table(tmp_path):
    from harness.report import regime_lines

    inside = record("mbquant", 0, {2: 90.0})
    outside = [{**record("emq", seed, {2: 80.0}), "regime_notes": ["3 coreset steps per epoch", "scoring 75%"]}
               for seed in (0, 1)]
    assert regime_lines([inside]) == ""
    assert regime_lines([inside, *outside]) == "\nOutside its regime: emq: 3 coreset steps per epoch; scoring 75%.\n"
    markdown = write_reports(tmp_path, [inside, *outside])
    assert markdown.endswith("Outside its regime: emq: 3 coreset steps per epoch; scoring 75%.\n")


@pytest.mark.parametrize(("values", "expected"), [
    ([97.5, 98.3], (90.0, 100.0)),  # a 0.8-point spread: widened to the 10-point minimum, shifted under 100
    ([40.0, 90.0], (35.0, 95.0)),  # wide spreads get a 10 % margin
    ([0.5, 2.0], (0.0, 10.0)),
])
def test_accuracy_axis_never_zooms_into_seed_noise(values, expected):
    low, high = accuracy_range(values)
    assert high - low >= MIN_ACCURACY_SPAN - 1e-9 and 0.0 <= low and high <= 100.0
    assert (low, high) == pytest.approx(expected)
    assert low <= min(values) and high >= max(values)


def test_latex_table_has_booktabs_right_aligned_numbers_and_an_escaped_caption():
    table = comparison_table([record("a", 0, {2: 90.0, 4: 91.0}), record("b", 0, {2: 80.0, 4: 85.0})])
    tex = latex_table(table, "50% of runs_x ~ best")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\begin{tabular}{l" + "r" * (len(table.columns) - 1) + "}" in tex
    assert "\\caption{50\\% of runs\\_x \\textasciitilde{} best}" in tex
    assert latex_escape("a&b#c$d{e}f^g\\h") == "a\\&b\\#c\\$d\\{e\\}f\\textasciicircum{}g\\textbackslash{}h"


def test_caption_says_two_seeds_give_no_95_percent_interval_and_names_budget_epochs():
    two = [record("a", 0, {2: 90.0}), record("a", 1, {2: 91.0})]
    assert "With 2 seeds the bootstrap interval is the range of the two values" in caption(two)
    three = two + [record("a", 2, {2: 92.0})]
    assert "With 2 seeds" not in caption(three)
    budget = {"epochs": 20, "optimizer": "sgd", "lr": 0.1, "lr_schedule": "cosine", "batch_size": 8,
              "budget_kind": "sample-passes", "budget": 1000.0}
    text = caption([record("a", 0, {2: 90.0}, schedule=budget)])
    assert "lr curve shaped over 20 nominal epochs (each method's epochs: 'epochs run')" in text
