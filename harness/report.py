"""Tables and plots from cell records: summary.csv (one row per method, bits, seed), table.md/.tex, a plot.

The table has one row per method spec: top-1 per bit-width (mean, and +- std over seeds when there are
several), storage per bit-width and for the whole switchable set, device-hours by phase, sample-passes, and
the cost relative to a baseline method. Records made under different schedules are not mixed unless asked.
The full-precision reference (records of method ``fp``, ``--reference fp``) is the first row, ``fp (reference)``,
its 32-bit top-1 in every bit-width's column; summary.csv and stats.csv hold it at bits 32 like any record, and
the plots draw it as a dashed horizontal line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import REFERENCE_METHOD
from harness.errors import MbqError
from harness.store import atomic_write_bytes, atomic_write_text

MB = 1e6
REFERENCE_LABEL = f"{REFERENCE_METHOD} (reference)"
SUMMARY_COLUMNS = (
    "method", "bits", "top1", "top5", "storage_mb", "storage_total_mb", "device_hours", "sample_passes", "device",
    "dataset", "model", "epochs", "seed", "hours_prepare", "hours_train", "hours_finalize", "hours_eval",
    "sample_passes_total", "train_subset",
)


def summary_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for rec in records:
        for bits, res in rec["results"].items():
            rows.append({
                "method": rec["method"], "bits": int(bits), "top1": res["top1"], "top5": res["top5"],
                "storage_mb": res["storage_bytes"] / MB, "storage_total_mb": rec["storage_total_bytes"] / MB,
                "device_hours": rec["device_hours"], "sample_passes": res["sample_passes"], "device": rec["device"],
                "dataset": rec["dataset"], "model": rec["model"], "epochs": rec["epochs"], "seed": rec["seed"],
                **{f"hours_{p}": h for p, h in rec["device_hours_by_phase"].items()},
                "sample_passes_total": rec["sample_passes_total"], "train_subset": rec.get("train_subset"),
            })
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def check_same_schedule(records: Sequence[dict[str, Any]], allow_mixed: bool = False) -> None:
    keys = {json.dumps([r["schedule"], r["dataset"], r["model"], r.get("train_subset"),
                        r.get("runtime", {}).get("amp", "off")], sort_keys=True)
            for r in records}
    if len(keys) > 1 and not allow_mixed:
        raise MbqError("these records were trained under different schedules, data sets or models; "
                       "pass --allow-mixed to tabulate them together")


def _fmt(values: pd.Series, digits: int = 2) -> str:
    if values.isna().all():
        return "n/a"
    if len(values) > 1:
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
    return f"{values.mean():.{digits}f}"


def seed_stats(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and a percentile bootstrap interval of the mean over seeds (``nan`` for one seed)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    stats = {"n": len(data), "mean": float(data.mean()), "std": float(data.std(ddof=1)) if len(data) > 1 else math.nan,
             "ci_low": math.nan, "ci_high": math.nan}
    if len(data) > 1 and np.ptp(data) > 0:
        result = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile",
                           random_state=0)
        interval = result.confidence_interval
        stats["ci_low"], stats["ci_high"] = float(interval.low), float(interval.high)
    elif len(data) > 1:
        stats["ci_low"] = stats["ci_high"] = stats["mean"]
    return stats


def stats_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (method, bits): statistics of top-1 over seeds."""
    frame = summary_frame(records)
    rows = [{"method": method, "bits": bits, **seed_stats(part["top1"].tolist())}
            for (method, bits), part in frame.groupby(["method", "bits"], sort=False)]
    return pd.DataFrame(rows, columns=["method", "bits", "n", "mean", "std", "ci_low", "ci_high"])


def within_noise_of_best(stats: pd.DataFrame) -> set[tuple[str, int]]:
    """(method, bits) cells whose bootstrap interval overlaps the best method's at that bit-width."""
    marked = set()
    for bits, part in stats.groupby("bits"):
        best = part.loc[part["mean"].idxmax()]
        if part["n"].min() < 2 or math.isnan(best["ci_low"]):
            continue
        for row in part.itertuples(index=False):
            if row.method != best["method"] and row.ci_high >= best["ci_low"] and best["ci_high"] >= row.ci_low:
                marked.add((row.method, int(bits)))
    return marked


def is_reference(record: dict[str, Any]) -> bool:
    """A record of the full-precision reference (``methods/reference.py``), the table's reference row."""
    return record["method"] == REFERENCE_METHOD


def comparison_table(records: Sequence[dict[str, Any]], method_order: Sequence[str] | None = None,
                     baseline: str | None = None) -> pd.DataFrame:
    """One row per method: formatted strings, ready for markdown/LaTeX.

    The full-precision reference (records of method ``fp``) comes first, as the row ``fp (reference)``: its one
    (32-bit) top-1 and storage are repeated in every bit-width's column, so each column reads as the gap to full
    precision. It adds no column of its own, takes no part in the '~' noise marks and is not "the fewest" of
    "passes vs fewest"; the methods' columns are what they are without it.
    """
    frame = summary_frame(records)
    if frame.empty:
        raise MbqError("no finished records to tabulate")
    reference = frame["method"] == REFERENCE_METHOD
    compared = frame[~reference] if (~reference).any() else frame  # a folder with only the reference: its row
    methods = list(method_order) if method_order else list(dict.fromkeys(frame["method"]))
    methods = [m for m in methods if m in set(compared["method"]) and m != REFERENCE_METHOD]
    if reference.any():
        methods.insert(0, REFERENCE_METHOD)
    all_bits = sorted(compared["bits"].unique())
    per_method_hours = frame.groupby("method")["device_hours"].mean()
    per_method_passes = frame.drop_duplicates(["method", "seed"]).groupby("method")["sample_passes_total"].mean()
    fewest = per_method_passes[list(compared["method"].unique())].min()
    noisy = within_noise_of_best(stats_frame([r for r in records if not is_reference(r)] or records))
    rows = []
    for method in methods:
        part = frame[frame["method"] == method]
        if method == REFERENCE_METHOD:  # its one 32-bit result in every bit-width's column
            part = pd.concat([part.assign(bits=b) for b in all_bits], ignore_index=True)
        row: dict[str, str] = {"method": REFERENCE_LABEL if method == REFERENCE_METHOD else method}
        for b in all_bits:
            row[f"{b}-bit top-1 %"] = _fmt(part[part["bits"] == b]["top1"]) + (" ~" if (method, b) in noisy else "")
        firsts = part.drop_duplicates("seed")
        row["MB at this bit-width"] = " / ".join(
            f"{part[part['bits'] == b]['storage_mb'].mean():.3f}" if (part["bits"] == b).any() else "-"
            for b in all_bits)
        row["MB for all bit-widths"] = f"{firsts['storage_total_mb'].mean():.3f}"
        row["device-hours"] = _fmt(firsts["device_hours"], 4)
        row["prepare/train/finalize/eval h"] = " / ".join(
            f"{firsts[f'hours_{p}'].mean():.4f}" for p in ("prepare", "train", "finalize", "eval"))
        row["sample-passes (M)"] = f"{firsts['sample_passes_total'].mean() / 1e6:.3f}"
        row["passes vs fewest"] = f"{per_method_passes[method] / fewest:.2f}x"
        if any(r["schedule"].get("budget") is not None for r in records):
            row["epochs run"] = _fmt(pd.Series([r.get("epochs_run", r["epochs"]) for r in records
                                                if r["method"] == method], dtype=float), 1)
        if baseline is not None and baseline in per_method_hours:
            row[f"cost vs {baseline}"] = f"{per_method_hours[method] / per_method_hours[baseline]:.2f}x"
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def caption(records: Sequence[dict[str, Any]]) -> str:
    first = records[0]
    seeds = sorted({r["seed"] for r in records})
    subset = f", train subset {first['train_subset']}" if first.get("train_subset") else ""
    sched = first["schedule"]
    devices = f"{first['device']} x{first['num_devices']}" if first.get("num_devices", 1) > 1 else first["device"]
    amp = ", bf16 autocast" if first.get("runtime", {}).get("amp", "off") == "bf16" else ""
    budget = ""
    if sched.get("budget") is not None:
        budget = (f" Equal-cost run: every method trained until it had spent {sched['budget_kind']}="
                  f"{sched['budget']:g} (its prepare phase included), its lr curve stretched onto that budget; "
                  f"'epochs run' counts the (last partial) epochs this took.")
    reference = ""
    if any(is_reference(r) for r in records):
        reference = (f" '{REFERENCE_LABEL}': the full-precision network of the same model, trained under the same "
                     f"schedule, seeds and batches{' and budget' if budget else ''} and evaluated at 32 bits; its "
                     f"32-bit top-1 and storage fill every bit-width's column (the gap to full precision), and it "
                     f"takes no part in the '~' marks or in 'passes vs fewest'.")
    length = (f"lr curve shaped over {sched['epochs']} nominal epochs (each method's epochs: 'epochs run')"
              if sched.get("budget") is not None else f"{sched['epochs']} epochs")
    few_seeds = (" With 2 seeds the bootstrap interval is the range of the two values, not a 95% interval: use 3 "
                 "or more seeds for intervals." if len(seeds) == 2 else "")
    warmup = f", {sched['warmup_epochs']} warm-up epochs" if sched.get("warmup_epochs") else ""
    recipe = f" (the {sched['recipe']} recipe)" if sched.get("recipe") else ""
    return (f"{first['dataset']} / {first['model']}{subset}; {length}, {sched['optimizer']} "
            f"lr {sched['lr']:g} {sched['lr_schedule']}{warmup}{recipe}, batch {sched['batch_size']}{amp}; "
            f"seeds {seeds}; "
            f"device {devices}.{budget} Top-1 on the test split; storage: the tensor payload `cli.py export` writes. "
            f"With several seeds: mean ± std; '~' marks a cell whose 95% bootstrap interval overlaps the best "
            f"method's at that bit-width (a difference within the noise). 'passes vs fewest' normalizes the "
            f"training work (forward+backward sample-passes) by the cheapest method's.{few_seeds}{reference}")


def regime_lines(records: Sequence[dict[str, Any]]) -> str:
    """One line per method whose run is outside its operating regime (``Method.regime_notes``), else nothing."""
    notes: dict[str, list[str]] = {}
    for record in records:
        for note in record.get("regime_notes", ()):
            if note not in notes.setdefault(record["method"], []):
                notes[record["method"]].append(note)
    lines_out = "".join(f"\nOutside its regime: {method}: {'; '.join(lines)}.\n" for method, lines in notes.items())
    for record in records:
        if record.get("training_notes"):
            lines_out += (f"\nUnstable training: {record['method']} (seed {record['seed']}): "
                          f"{'; '.join(record['training_notes'])}.\n")
    return lines_out


PLOT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
PLOT_OFFSET = 0.06  # x offset between methods, in bit-width slots
MIN_ACCURACY_SPAN = 10.0  # percentage points: an axis never zooms closer, so seed noise does not look like a trend


def accuracy_range(values: Sequence[float]) -> tuple[float, float]:
    """Y limits covering ``values`` with a margin, spanning at least ``MIN_ACCURACY_SPAN`` points, within 0..100."""
    low, high = min(values), max(values)
    margin = max(1.0, 0.1 * (high - low))
    low, high = low - margin, high + margin
    if high - low < MIN_ACCURACY_SPAN:
        middle = (high + low) / 2
        low, high = middle - MIN_ACCURACY_SPAN / 2, middle + MIN_ACCURACY_SPAN / 2
    if high > 100.0:
        low, high = max(0.0, low - (high - 100.0)), 100.0
    if low < 0.0:
        low, high = 0.0, min(100.0, high - low)
    return low, high


def latex_escape(text: str) -> str:
    """Text for a LaTeX caption: the special characters escaped."""
    specials = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(specials.get(char, char) for char in text)


def latex_table(table: pd.DataFrame, text: str) -> str:
    """Booktabs rules, the method column left-aligned and every number right-aligned, the caption below."""
    return table.to_latex(index=False, escape=True, column_format="l" + "r" * (len(table.columns) - 1),
                          caption=latex_escape(" ".join(text.split())), label="tab:mbqbench")


def accuracy_plot_png(records: Sequence[dict[str, Any]]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = summary_frame(records)
    reference = frame["method"] == REFERENCE_METHOD
    fig, ax = plt.subplots(figsize=(6, 4))
    all_bits = sorted(frame[~reference]["bits"].unique()) or sorted(frame["bits"].unique())
    position = {b: i for i, b in enumerate(all_bits)}
    groups = list(frame[~reference].groupby("method", sort=False))
    for index, (method, part) in enumerate(groups):
        by_bits = part.groupby("bits")["top1"]
        means, spread = by_bits.mean(), by_bits.std().fillna(0.0)
        # a small horizontal offset per method keeps coinciding lines and error bars visible
        offset = (index - (len(groups) - 1) / 2) * PLOT_OFFSET
        ax.errorbar([position[b] + offset for b in means.index], means.values, yerr=spread.values, capsize=3,
                    marker=PLOT_MARKERS[index % len(PLOT_MARKERS)], label=method)
    values = list(frame["top1"])
    if reference.any():
        ax.axhline(frame[reference]["top1"].mean(), color="0.3", linestyle="--", label=REFERENCE_LABEL)
    ax.set_ylim(*accuracy_range(values))
    ax.set_xticks(range(len(all_bits)), [str(b) for b in all_bits])
    ax.set_xlabel("bit-width")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{records[0]['dataset']} / {records[0]['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def pareto_plot_png(records: Sequence[dict[str, Any]]) -> bytes:
    """Accuracy vs device-hours, one panel per bit-width, one point (mean over seeds) per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = summary_frame(records)
    reference = frame["method"] == REFERENCE_METHOD
    methods = frame[~reference] if (~reference).any() else frame
    all_bits = sorted(methods["bits"].unique())
    fig, axes = plt.subplots(1, len(all_bits), figsize=(3.2 * len(all_bits), 3.2), squeeze=False, sharey=True)
    device = records[0].get("device", "device")
    for ax, bits in zip(axes[0], all_bits):
        grouped = methods[methods["bits"] == bits].groupby("method", sort=False)[["device_hours", "top1"]]
        spread = grouped.std().fillna(0.0)
        for index, (method, row) in enumerate(grouped.mean().iterrows()):
            ax.errorbar(row["device_hours"], row["top1"], xerr=spread.loc[method, "device_hours"],
                        yerr=spread.loc[method, "top1"], fmt=PLOT_MARKERS[index % len(PLOT_MARKERS)], capsize=3,
                        label=method)
        if reference.any() and methods is not frame:  # the reference's accuracy and cost in every panel
            ax.axhline(frame[reference]["top1"].mean(), color="0.3", linestyle="--", linewidth=1)
            ax.scatter(frame[reference]["device_hours"].mean(), frame[reference]["top1"].mean(), marker="*",
                       color="0.3", label=REFERENCE_LABEL)
        ax.set_title(f"{bits}-bit")
        ax.set_xlabel(f"device-hours ({device})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].set_ylim(*accuracy_range(list(frame["top1"])))
    axes[0][-1].legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_reports(root: Path, records: Sequence[dict[str, Any]], method_order: Sequence[str] | None = None,
                  baseline: str | None = None, allow_mixed: bool = False) -> str:
    """Write summary.csv, stats.csv, table.md, table.tex, accuracy.png and pareto.png under ``root``; return the
    markdown table."""
    check_same_schedule(records, allow_mixed)
    root = Path(root)
    frame = summary_frame(records)
    atomic_write_text(root / "summary.csv", frame.to_csv(index=False))
    table = comparison_table(records, method_order, baseline)
    markdown = to_markdown(table) + "\n" + caption(records) + "\n" + regime_lines(records)
    atomic_write_text(root / "table.md", markdown)
    atomic_write_text(root / "table.tex", latex_table(table, caption(records)))
    atomic_write_text(root / "stats.csv", stats_frame(records).to_csv(index=False))
    atomic_write_bytes(root / "accuracy.png", accuracy_plot_png(records))
    atomic_write_bytes(root / "pareto.png", pareto_plot_png(records))
    return markdown
