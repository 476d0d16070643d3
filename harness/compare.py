"""A comparison: every method spec x every seed under one ``RunSpec``, resumable, with tables at the end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.data import check_dataset, load_dataset
from harness.errors import ConfigError, MbqError
from harness.models import MODELS, list_models
from harness.report import write_reports
from harness.store import RunStore, check_writable_dir, environment
from harness.train import LOG_COLUMNS, instantiate, resolve_device, run_cell

SUBSET_SEED = 0  # the same training subset for every seed: seeds vary initialization and order only


def validate(spec, out: Path) -> None:
    """Every check that can fail before any output is written."""
    if spec.model not in MODELS:
        raise ConfigError(f"unknown model {spec.model!r}; known models: {', '.join(list_models())}")
    for method_spec in spec.methods:
        method = instantiate(method_spec)
        method.check_model(spec.model)
        method.check_bits(spec.bits)
        method.check_eval_bits(spec.bits, spec.evaluated_bits)
    resolve_device(spec.device)
    check_dataset(spec.dataset, spec.data_root)
    check_writable_dir(out)
    existing = RunStore(out).read_spec()
    if existing is not None and existing != json.loads(spec.to_json()):
        raise MbqError(f"{out} holds a different comparison (its spec.json differs); pass another --out")


def run_comparison(spec, out: Path, *, show_progress: bool = True,
                   echo: Callable[[str], None] = lambda _: None) -> tuple[list[dict[str, Any]], str]:
    """Run (or resume) every cell and write the tables; returns the records and the markdown table."""
    out = Path(out)
    validate(spec, out)
    data = load_dataset(spec.dataset, spec.data_root, train_subset=spec.train_subset,
                        test_subset=spec.test_subset, seed=SUBSET_SEED)
    store = RunStore(out)
    echo(f"run folder: {out}")
    store.write_json("spec.json", json.loads(spec.to_json()))
    store.write_json("env.json", environment(resolve_device(spec.device)))
    logs: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def write_log() -> None:
        store.write_log([row for key in sorted(logs, key=str) for row in logs[key]], LOG_COLUMNS)

    records = []
    for seed in spec.seeds:
        for method_spec in spec.methods:
            record = store.load_record(method_spec, seed)
            if record is not None:
                echo(f"{method_spec} seed {seed}: already finished, reusing its record")
            else:
                def on_epoch(log, key=(method_spec, seed)) -> None:
                    logs[key] = list(log)
                    write_log()

                echo(f"{method_spec} seed {seed}: training")
                record = run_cell(spec, method_spec, seed, data, store, show_progress=show_progress,
                                  on_epoch=on_epoch).record
            logs[(method_spec, seed)] = record["log"]
            records.append(record)
    write_log()
    markdown = write_reports(out, records, spec.methods, spec.baseline)
    return records, markdown
