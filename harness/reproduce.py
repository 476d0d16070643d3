"""Published vs measured: the gap table that ``python cli.py reproduce PRESET`` prints.

Rows: every published top-1 cell (method, bit-width), and the per-method summary metrics a paper states
without a per-bit table (``mean_top1``: mean over the trained bit-widths; ``speedup``: device-hours and
sample-passes of the preset's baseline over the method's). An empty published cell is shown as
``n/a (unverified)``; nothing is ever filled in. Under the table, one verdict line per claim of the preset
(``harness.claims``); ``claims_summary`` tabulates the verdicts of several presets (``reproduce --all-claims``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.claims import VERDICTS, Verdict, evaluate_all
from harness.presets import Preset
from harness.report import summary_frame, to_markdown
from harness.store import atomic_write_text

UNVERIFIED = "n/a (unverified)"


def _value(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None or pd.isna(x) else f"{x:.{digits}f}{suffix}"


def _measured_top1(frame: pd.DataFrame, method: str, bits: int) -> tuple[float | None, str]:
    cell = frame[(frame["method"] == method) & (frame["bits"] == bits)]["top1"]
    if cell.empty:
        return None, "-"
    if len(cell) > 1:
        return cell.mean(), f"{cell.mean():.2f} ± {cell.std(ddof=1):.2f} (n={len(cell)})"
    return cell.mean(), f"{cell.mean():.2f}"


def _speedups(records: Sequence[dict[str, Any]], method: str, baseline: str) -> tuple[float | None, float | None]:
    def mean_of(name: str, key: str) -> float | None:
        values = [r[key] for r in records if r["method"] == name]
        return sum(values) / len(values) if values else None

    hours, base_hours = mean_of(method, "device_hours"), mean_of(baseline, "device_hours")
    passes, base_passes = mean_of(method, "sample_passes_total"), mean_of(baseline, "sample_passes_total")
    time_ratio = base_hours / hours if hours and base_hours else None
    pass_ratio = base_passes / passes if passes and base_passes else None
    return time_ratio, pass_ratio


def gap_table(preset: Preset, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    published = preset.published()
    frame = summary_frame(records)
    rows = []
    for pub in published.itertuples(index=False):
        row = {"method": pub.method, "bits": "" if pd.isna(pub.bits) else int(pub.bits), "metric": pub.metric}
        verified = not pd.isna(pub.value)
        row["published"] = _value(pub.value) if verified else UNVERIFIED
        measured: float | None = None
        if pub.metric == "top1":
            measured, row["measured"] = _measured_top1(frame, pub.method, int(pub.bits))
        elif pub.metric == "mean_top1":
            part = frame[(frame["method"] == pub.method) & frame["bits"].isin(preset.bits)]
            measured = part.groupby("bits")["top1"].mean().mean() if not part.empty else None
            row["measured"] = _value(measured)
        elif pub.metric == "speedup" and preset.speedup_baseline:
            measured, pass_ratio = _speedups(records, pub.method, preset.speedup_baseline)
            row["measured"] = (f"{_value(measured, suffix='x')} time, {_value(pass_ratio, suffix='x')} passes "
                               f"vs {preset.speedup_baseline}")
        else:
            row["measured"] = "-"
        row["gap"] = _value(measured - pub.value, suffix="") if verified and measured is not None else "n/a"
        row["source"] = pub.source
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "bits", "metric", "published", "measured", "gap", "source"])


def claim_lines(verdicts: Sequence[Verdict]) -> list[str]:
    """The markdown block of verdict lines (empty for a preset without claims)."""
    if not verdicts:
        return []
    return ["", "Claims (95% bootstrap interval over seeds, paired by seed):", "",
            *[f"- {verdict.line()}" for verdict in verdicts]]


def reproduce_markdown(preset: Preset, records: Sequence[dict[str, Any]], epochs_run: int,
                       verdicts: Sequence[Verdict] | None = None) -> str:
    """The gap table, the claims' verdicts (``verdicts``, evaluated here when None) and the recipe notes."""
    table = gap_table(preset, records)
    verdicts = evaluate_all(preset.claims, records) if verdicts is None else verdicts
    lines = [f"## {preset.title}", ""]
    if epochs_run != preset.schedule.epochs:
        lines.append(f"**Shortened schedule: {epochs_run} of {preset.schedule.epochs} epochs; the measured numbers "
                     f"are not comparable with the published ones.**")
        lines.append("")
    if table.empty:
        lines.append("No published numbers for this preset (our own benchmark).")
    else:
        lines.append(to_markdown(table))
        unverified = int((table["published"] == UNVERIFIED).sum())
        if unverified:
            lines.append(f"{unverified} published cell(s) are unverified: the source table could not be read here; "
                         f"enter them in results/published/{preset.name}.csv with a table citation.")
    lines += claim_lines(verdicts)
    lines += ["", "Notes on the recipe:", *[f"- {note}" for note in preset.notes], ""]
    return "\n".join(lines)


SUMMARY_COLUMNS = ["preset", "claim", "verdict", "measured", "source"]


def claims_summary(results: Sequence[tuple[Preset, Sequence[Verdict], int]]) -> str:
    """One markdown table of every claim's verdict; ``results``: (preset, its verdicts, epochs run) per preset."""
    rows = []
    for preset, verdicts, epochs_run in results:
        full = preset.schedule.epochs
        name = preset.name if epochs_run == full else f"{preset.name} ({epochs_run} of {full} epochs)"
        for verdict in verdicts:
            cells = [name, f"{verdict.claim}: {verdict.statement}", verdict.verdict,
                     "; ".join(effect.describe() for effect in verdict.effects), verdict.source]
            rows.append([cell.replace("|", "\\|") for cell in cells])  # a bare | would split the markdown cell
    counts = {v: sum(row[2] == v for row in rows) for v in VERDICTS}
    lines = ["## Claims: verdicts on the measured records", "",
             to_markdown(pd.DataFrame(rows, columns=SUMMARY_COLUMNS)),
             ", ".join(f"{n} {v}" for v, n in counts.items()) + ". A claim holds when the 95% bootstrap interval "
             "of its effect over seeds satisfies it entirely, does not hold when the interval violates it entirely, "
             "and is inconclusive otherwise (one seed: decided on the point estimate). A shortened schedule's "
             "verdicts are about that run, not about the paper's recipe.", ""]
    return "\n".join(lines)


def write_reproduction(folder: Path, preset: Preset, records: Sequence[dict[str, Any]],
                       epochs_run: int) -> tuple[str, list[Verdict]]:
    """Evaluate the preset's claims and write ``reproduce.md`` (and ``claims.json`` when it has claims) into the
    run folder; returns the markdown and the verdicts."""
    verdicts = evaluate_all(preset.claims, records)
    text = reproduce_markdown(preset, records, epochs_run, verdicts)
    atomic_write_text(Path(folder) / "reproduce.md", text)
    if verdicts:
        atomic_write_text(Path(folder) / "claims.json",
                          json.dumps([verdict.to_dict() for verdict in verdicts], indent=2) + "\n")
    return text, verdicts
