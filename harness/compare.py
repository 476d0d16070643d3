"""A comparison: every method spec x every seed under one ``RunSpec``, resumable, with tables at the end.

Where the cells run is up to an executor (``harness.executors``): in this process one after another (``local``,
the default), or as independent submitit jobs (``submitit``, e.g. a Slurm job array). Either way the finished
records are gathered from the run folder, in seeds x methods order, into one log and one set of tables. With
``spec.reference == "fp"`` (the default) each seed also has a cell ``fp`` (``methods/reference.py``): the
full-precision network of the same model, trained by the same loop under the same schedule, seed and budget, so
on the same batches; the tables show it as the reference row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.data import check_dataset
from harness.errors import ConfigError, MbqError
from harness.executors import SUBSET_SEED, Cell, make_executor
from harness.models import MODELS, list_models
from harness.report import write_reports
from harness.store import RunStore, check_writable_dir, environment
from harness.train import LOG_COLUMNS, cell_spec, instantiate, resolve_device

__all__ = ["SUBSET_SEED", "run_comparison", "validate"]


def validate(spec, out: Path, *, check_device: bool = True) -> None:
    """Every check that can fail before any output is written.

    ``check_device=False`` when the cells run on other machines (a cluster), which check the device themselves.
    """
    if spec.model not in MODELS:
        raise ConfigError(f"unknown model {spec.model!r}; known models: {', '.join(list_models())}")
    for method_spec in spec.cell_methods:
        method = instantiate(method_spec)
        cell = cell_spec(spec, method)
        method.check_model(cell.model)
        method.check_bits(cell.bits)
        method.check_eval_bits(cell.bits, cell.evaluated_bits)
    if check_device:
        resolve_device(spec.device)
    check_dataset(spec.dataset, spec.data_root)
    check_writable_dir(out)
    existing = RunStore(out).read_spec()
    if existing is not None:
        try:  # a folder written before a RunSpec field was added compares with that field at its default
            existing = json.loads(type(spec).from_dict(existing).to_json())
        except (ConfigError, TypeError):
            pass
    if existing is not None and existing != json.loads(spec.to_json()):
        raise MbqError(f"{out} holds a different comparison (its spec.json differs); pass another --out")


def run_comparison(spec, out: Path, *, show_progress: bool = True, echo: Callable[[str], None] = lambda _: None,
                   executor: str = "local", executor_options: dict[str, Any] | None = None,
                   ) -> tuple[list[dict[str, Any]], str]:
    """Run (or resume) every cell and write the tables; returns the records and the markdown table.

    ``executor``: "local" (this process) or "submitit" (one job per cell); ``executor_options``: the submitit
    executor's options (see ``harness.executors.SubmititExecutor``), None values meaning unset.
    """
    out = Path(out)
    runner = make_executor(executor, executor_options)
    validate(spec, out, check_device=runner.runs_on_this_machine)
    runner.prepare(spec)
    store = RunStore(out)
    echo(f"run folder: {out}")
    store.write_json("spec.json", json.loads(spec.to_json()))
    # a cluster's jobs check their device there; the submitting host describes itself
    device = resolve_device(spec.device) if runner.runs_on_this_machine else torch.device("cpu")
    env = environment(device)
    if runner.name != "local":
        env["executor"] = runner.describe()
    store.write_json("env.json", env)

    # per seed: the methods, then the full-precision reference (spec.reference == "fp"), which is a cell like any
    cells: list[Cell] = [(method_spec, seed) for seed in spec.seeds for method_spec in spec.cell_methods]
    finished = {}
    for cell in cells:
        record = store.load_record(*cell)
        if record is not None:
            echo(f"{cell[0]} seed {cell[1]}: already finished, reusing its record")
            finished[cell] = record
    logs: dict[Cell, list[dict[str, Any]]] = {cell: record["log"] for cell, record in finished.items()}

    def write_log() -> None:
        store.write_log([row for key in sorted(logs, key=str) for row in logs[key]], LOG_COLUMNS)

    def on_log(cell: Cell, rows: list[dict[str, Any]]) -> None:
        logs[cell] = rows
        write_log()

    ran = runner.run(spec, out, [cell for cell in cells if cell not in finished], show_progress=show_progress,
                     echo=echo, on_log=on_log)
    records = [finished[cell] if cell in finished else ran[cell] for cell in cells]
    for cell, record in zip(cells, records):
        logs[cell] = record["log"]
    write_log()
    markdown = write_reports(out, records, spec.methods, spec.baseline)
    return records, markdown
