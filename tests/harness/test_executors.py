"""Sweep executors: submitit jobs on its local backend (real processes) give the in-process run's table, finished
cells are not resubmitted, a failed job is one error line, and a missing submitit is a one-line config error."""

from __future__ import annotations

import os
import pickle
import shutil
import sys

import pandas as pd
import pytest
import torch

from harness import executors
from harness.compare import run_comparison
from harness.config import RunSpec, Schedule
from harness.errors import ConfigError, MbqError, TrainingDiverged
from harness.executors import MISSING_SUBMITIT, CellJob, SubmititExecutor, make_executor

SPEC = RunSpec(methods=("anyprecision", "dedicated"), dataset="synthetic", model="resnet20", width=0.25, bits=(2, 8),
               schedule=Schedule(epochs=1, batch_size=64, lr=0.05), train_subset=128, device="cpu")
LOCAL_JOBS = {"cluster": "local", "cpus_per_task": 1}
TIMING_COLUMNS = ("device_hours", "hours_prepare", "hours_train", "hours_finalize", "hours_eval")


def submitted(out) -> int:
    return len(list((out / "submitit").glob("*_submitted.pkl")))


def untimed_table(markdown: str) -> list[list[str]]:
    """table.md's rows without the columns that measure time (they differ from run to run)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ")]
    keep = [i for i, name in enumerate(rows[0]) if "hours" not in name and not name.endswith(" h")]
    return [[row[i] for i in keep] for row in rows]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The same tiny comparison in this process and as submitit jobs on the local backend."""
    root = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each job: float sums, and so the losses, depend on the thread count
    try:
        local = run_comparison(SPEC, root / "local", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    messages: list[str] = []
    jobs = run_comparison(SPEC, root / "jobs", show_progress=False, echo=messages.append, executor="submitit",
                          executor_options=LOCAL_JOBS)
    return root, local, jobs, messages


def test_submitit_local_jobs_give_the_in_process_table(sweep):
    root, (local_records, local_md), (job_records, job_md), messages = sweep
    assert submitted(root / "jobs") == 3  # one job per (method, seed) cell, the fp reference's included
    assert any(m.startswith("submitted 3 cell(s) to submitit (local)") for m in messages)
    assert [(r["method"], r["seed"]) for r in job_records] == [("anyprecision", 0), ("dedicated", 0), ("fp", 0)]
    assert "| fp (reference) |" in job_md
    for local, job in zip(local_records, job_records):
        assert job["results"] == local["results"]
        assert [row["loss"] for row in job["log"]] == [row["loss"] for row in local["log"]]
    assert untimed_table(job_md) == untimed_table(local_md)
    assert job_md.split("\n\n")[1] == local_md.split("\n\n")[1]  # the caption
    assert (root / "jobs" / "table.md").read_text() == job_md
    summary = {name: pd.read_csv(root / name / "summary.csv").drop(columns=list(TIMING_COLUMNS))
               for name in ("local", "jobs")}
    pd.testing.assert_frame_equal(summary["jobs"], summary["local"])
    logs = {name: pd.read_csv(root / name / "log.csv").drop(columns=["seconds"]) for name in ("local", "jobs")}
    pd.testing.assert_frame_equal(logs["jobs"], logs["local"])


def test_finished_cells_are_not_resubmitted(sweep):
    root, _, (job_records, job_md), _ = sweep
    messages: list[str] = []
    records, markdown = run_comparison(SPEC, root / "jobs", show_progress=False, echo=messages.append,
                                       executor="submitit", executor_options=LOCAL_JOBS)
    assert submitted(root / "jobs") == 3
    assert records == job_records and markdown == job_md
    assert sum("already finished" in m for m in messages) == 3 and not any("submitted" in m for m in messages)


def test_a_failed_job_is_one_error_line_naming_the_cell_and_its_log(sweep, tmp_path):
    out = tmp_path / "jobs"
    shutil.copytree(sweep[0] / "jobs", out)
    (out / "cells" / "dedicated__seed0" / "record.json").unlink()
    (out / "cells" / "dedicated__seed0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    messages: list[str] = []
    with pytest.raises(MbqError) as info:
        run_comparison(SPEC, out, show_progress=False, echo=messages.append, executor="submitit",
                       executor_options=LOCAL_JOBS)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("dedicated seed 0 failed in submitit job ")
    assert "checkpoint" in message and "is corrupt" in message
    log = message.rsplit("its log: ", 1)[1]
    assert log.endswith("_log.err") and "is corrupt" in open(log).read()
    assert submitted(out) == 4  # only the unfinished cell went out again
    assert "anyprecision seed 0: already finished, reusing its record" in messages


def test_debug_cluster_runs_jobs_in_this_process(tmp_path, monkeypatch):
    def diverge(spec, method_spec, seed, data, store, **_):
        raise TrainingDiverged(f"{method_spec} (seed {seed}) diverged")

    monkeypatch.setattr(executors, "run_cell", diverge)  # only visible to jobs that run in this process
    with pytest.raises(MbqError, match=r"^anyprecision seed 0 failed in submitit job DEBUG_\S+: anyprecision "
                                       r"\(seed 0\) diverged \(2 more cell\(s\) failed too\); its log: "):
        run_comparison(SPEC, tmp_path / "out", show_progress=False, executor="submitit",
                       executor_options={"cluster": "debug"})


def test_missing_submitit_is_a_one_line_error_before_any_output(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(ConfigError) as info:
        run_comparison(SPEC, tmp_path / "out", show_progress=False, executor="submitit")
    assert str(info.value) == MISSING_SUBMITIT == (
        "--executor submitit needs the optional dependency: pip install 'mbqbench[sweep]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("executor, options, match", [
    ("slurm", None, "unknown executor 'slurm'; choose one of local, submitit"),
    ("local", {"partition": "gpu"}, "--partition only applies to --executor submitit"),
    ("submitit", {"queue": "gpu"}, "the submitit executor has no option 'queue'"),
    ("submitit", {"cluster": "lsf"}, "unknown submitit cluster 'lsf'"),
    ("submitit", {"timeout_min": 0}, "--timeout-min must be a positive integer"),
    ("submitit", {"mem_gb": -1}, "--mem-gb must be a positive number"),
])
def test_executor_options_are_checked_before_any_output(tmp_path, executor, options, match):
    with pytest.raises(ConfigError, match=match):
        run_comparison(SPEC, tmp_path / "out", show_progress=False, executor=executor, executor_options=options)
    assert not (tmp_path / "out").exists()


def test_unset_options_are_ignored():
    assert make_executor("local", {"partition": None, "timeout_min": None}).name == "local"


def test_slurm_jobs_get_the_requested_resources(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"  # submitit's Slurm executor only checks that srun exists
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    sweep = SubmititExecutor(cluster="slurm", partition="gpu", timeout_min=30, gpus_per_node=1, cpus_per_task=4,
                             mem_gb=16, array_parallelism=2)
    assert not sweep.runs_on_this_machine
    auto = sweep.auto_executor(SPEC, tmp_path / "submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="run", folder=tmp_path / "submitit", map_count=4, **auto._executor.parameters)
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=16GB",
                 "--array=0-3%2", "--job-name=mbqbench"):
        assert f"#SBATCH {line}\n" in script
    assert auto._executor.max_num_timeout == executors.MAX_REQUEUES


def test_a_cell_job_requeues_itself_with_the_same_arguments():
    job = pickle.loads(pickle.dumps(CellJob(SPEC.to_json(), "/tmp/out", 2)))
    delayed = job.checkpoint("dedicated", 3)
    assert delayed.function is job and delayed.args == ("dedicated", 3)
