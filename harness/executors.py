"""Sweep executors: where the unfinished cells of a comparison run.

A cell is one (method spec, seed) pair. ``LocalExecutor`` trains the cells one after another in this process.
``SubmititExecutor`` sends each cell out as an independent job of one submitit job array: to Slurm where there is
one, or as processes on this machine (``cluster="local"``), or in this process (``cluster="debug"``). Every cell
checkpoints after each epoch into the run folder, so a job that is preempted, timed out or killed continues from
its last completed epoch when it runs again (submitit requeues timed-out and preempted jobs by itself); a cell
whose record exists is never resubmitted. Either way the records end up in ``RunStore(out)`` and
``harness.compare`` gathers them into one table.

submitit is an optional dependency (``pip install 'mbqbench[sweep]'``).
"""

from __future__ import annotations

import json
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.config import RunSpec
from harness.data import DataBundle, load_dataset
from harness.errors import ConfigError, MbqError
from harness.store import RunStore
from harness.train import run_cell

SUBSET_SEED = 0  # the same training subset for every seed: seeds vary initialization and order only
EXECUTORS = ("local", "submitit")
SUBMITIT_OPTIONS = ("cluster", "partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb",
                    "array_parallelism")
MISSING_SUBMITIT = "--executor submitit needs the optional dependency: pip install 'mbqbench[sweep]'"
SLURM_TIMEOUT_MIN = 240  # fits common partition limits; a longer cell is requeued and resumes from its checkpoint
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # a process on this machine has no queue limit to fit
MAX_REQUEUES = 20  # each requeue resumes from the last completed epoch, so a long cell may need many

Cell = tuple[str, int]
Record = dict[str, Any]
Echo = Callable[[str], None]
OnLog = Callable[[Cell, list[dict[str, Any]]], None]


def load_data(spec: RunSpec) -> DataBundle:
    """The comparison's data set, with the same fixed training subset for every method and seed."""
    return load_dataset(spec.dataset, spec.data_root, train_subset=spec.train_subset, test_subset=spec.test_subset,
                        seed=SUBSET_SEED)


class Executor(ABC):
    """Runs the unfinished cells of a comparison; each finished cell also leaves its record in ``RunStore(out)``."""

    name: str
    runs_on_this_machine: bool = True  # False: the device is checked on the machine that runs the job, not here

    def prepare(self, spec: RunSpec) -> None:
        """Whatever may still fail once the spec is valid, done before the comparison writes any output."""
        return None

    def describe(self) -> dict[str, Any]:
        """How the cells were run, for env.json."""
        return {"name": self.name}

    @abstractmethod
    def run(self, spec: RunSpec, out: Path, cells: Sequence[Cell], *, show_progress: bool, echo: Echo,
            on_log: OnLog) -> dict[Cell, Record]:
        """Run every cell in ``cells`` (none of them finished) and return their records.

        ``on_log(cell, rows)``: called with a cell's log rows after each of its epochs, where the executor sees them.
        """


class LocalExecutor(Executor):
    """Every cell in this process, one after another, in the order given."""

    name = "local"

    def __init__(self) -> None:
        self.data: DataBundle | None = None

    def prepare(self, spec: RunSpec) -> None:
        self.data = load_data(spec)

    def run(self, spec: RunSpec, out: Path, cells: Sequence[Cell], *, show_progress: bool, echo: Echo,
            on_log: OnLog) -> dict[Cell, Record]:
        data = self.data if self.data is not None else load_data(spec)
        store = RunStore(out)
        records = {}
        for method_spec, seed in cells:
            outcome = run_cell(spec, method_spec, seed, data, store, show_progress=show_progress,
                               on_epoch=lambda log, cell=(method_spec, seed): on_log(cell, list(log)), echo=echo)
            records[(method_spec, seed)] = outcome.record
        return records


class CellJob:
    """One cell as a submitit job, run in the job's own process (or on another machine).

    It rebuilds the spec from JSON and reloads the data set there, then trains with ``run_cell``, which resumes
    from the cell's last checkpoint. ``checkpoint`` is submitit's hook for a job that times out or is preempted:
    returning the same call requeues it, and the rerun resumes from disk.
    """

    def __init__(self, spec_json: str, out: str, num_threads: int | None = None) -> None:
        self.spec_json = spec_json
        self.out = out
        self.num_threads = num_threads

    def __call__(self, method_spec: str, seed: int) -> Record:
        if self.num_threads is not None:
            import torch

            torch.set_num_threads(self.num_threads)  # jobs that share the machine must not oversubscribe its cores
        spec = RunSpec.from_dict(json.loads(self.spec_json))
        store = RunStore(Path(self.out))
        finished = store.load_record(method_spec, seed)  # a requeued job whose first run already got this far
        if finished is not None:
            return finished
        return run_cell(spec, method_spec, seed, load_data(spec), store).record

    def checkpoint(self, method_spec: str, seed: int) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, method_spec, seed)


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError(MISSING_SUBMITIT) from None
    return submitit


def _check_positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


class SubmititExecutor(Executor):
    """Each cell an independent job of one submitit job array; waits for all of them.

    ``cluster``: None detects it (Slurm where ``sbatch`` is there, else local processes); "local" runs the jobs as
    processes on this machine, "debug" in this process. The other options are Slurm's resources per job (the
    local backend honours ``timeout_min``, ``gpus_per_node`` and ``cpus_per_task`` too).
    """

    name = "submitit"

    def __init__(self, cluster: str | None = None, partition: str | None = None, timeout_min: int | None = None,
                 gpus_per_node: int | None = None, cpus_per_task: int | None = None, mem_gb: float | None = None,
                 array_parallelism: int | None = None) -> None:
        self.submitit = import_submitit()
        known = list(self.submitit.core.plugins.get_executors())
        if cluster is not None and cluster not in known:
            raise ConfigError(f"unknown submitit cluster {cluster!r}; choose one of {', '.join(known)}")
        for name, value in (("timeout_min", timeout_min), ("gpus_per_node", gpus_per_node),
                            ("cpus_per_task", cpus_per_task), ("array_parallelism", array_parallelism)):
            _check_positive_int(name, value)
        if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or mem_gb <= 0):
            raise ConfigError(f"--mem-gb must be a positive number, got {mem_gb!r}")
        self.cluster = cluster or self.submitit.AutoExecutor.which()
        self.partition = partition
        self.timeout_min = timeout_min
        self.gpus_per_node = gpus_per_node
        self.cpus_per_task = cpus_per_task
        self.mem_gb = mem_gb
        self.array_parallelism = array_parallelism
        self.runs_on_this_machine = self.cluster in ("local", "debug")

    def describe(self) -> dict[str, Any]:
        options = {name: getattr(self, name) for name in SUBMITIT_OPTIONS}
        return {"name": self.name, **{k: v for k, v in options.items() if v is not None}}

    def _parameters(self, spec: RunSpec) -> dict[str, Any]:
        local = self.runs_on_this_machine
        gpus = self.gpus_per_node
        if gpus is None and self.cluster == "local" and spec.device != "cpu":
            import torch

            # submitit's local backend hides every GPU (CUDA_VISIBLE_DEVICES="") unless the job asks for some
            gpus = 1 if torch.cuda.is_available() else None
        parameters = {
            "name": "mbqbench", "timeout_min": self.timeout_min or (LOCAL_TIMEOUT_MIN if local else SLURM_TIMEOUT_MIN),
            "gpus_per_node": gpus, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
            "slurm_partition": self.partition, "slurm_array_parallelism": self.array_parallelism,
        }
        return {k: v for k, v in parameters.items() if v is not None}

    def auto_executor(self, spec: RunSpec, folder: Path) -> Any:
        """submitit's executor for this sweep's jobs, their resources set; job files and logs go under ``folder``."""
        executor = self.submitit.AutoExecutor(folder=folder, cluster=self.cluster, slurm_max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(**self._parameters(spec))
        return executor

    def _threads(self, cells: Sequence[Cell]) -> int | None:
        if self.cluster == "debug":
            return None  # runs in this process: leave its threads alone
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        if self.cluster == "local":  # all jobs start at once on this machine's cores
            return max(1, (os.cpu_count() or 1) // len(cells))
        return None  # a cluster job sees only the cores it was given

    def run(self, spec: RunSpec, out: Path, cells: Sequence[Cell], *, show_progress: bool, echo: Echo,
            on_log: OnLog) -> dict[Cell, Record]:
        if not cells:
            return {}
        folder = Path(out) / "submitit"
        executor = self.auto_executor(spec, folder)
        job = CellJob(spec.to_json(), str(out), self._threads(cells))
        jobs = executor.map_array(job, [m for m, _ in cells], [s for _, s in cells])
        ids = jobs[0].job_id if len(jobs) == 1 else f"{jobs[0].job_id} .. {jobs[-1].job_id}"
        echo(f"submitted {len(jobs)} cell(s) to submitit ({self.cluster}) as job(s) {ids}; logs in {folder}")
        failures = self._wait(dict(zip(cells, jobs)), echo)
        if failures:
            (method_spec, seed), (job, reason) = next(iter(failures.items()))
            more = f" ({len(failures) - 1} more cell(s) failed too)" if len(failures) > 1 else ""
            raise MbqError(f"{method_spec} seed {seed} failed in submitit job {job.job_id}: {reason}{more}; "
                           f"its log: {job.paths.stderr}")
        store = RunStore(out)
        records = {}
        for cell in cells:
            record = store.load_record(*cell)
            if record is None:
                raise MbqError(f"{cell[0]} seed {cell[1]}: its job finished but left no record under {out}")
            records[cell] = record
        return records

    def _wait(self, pending: dict[Cell, Any], echo: Echo) -> dict[Cell, tuple[Any, str]]:
        """Wait for every job; returns the failed cells (job, reason) in the order they were submitted."""
        order = list(pending)
        failures: dict[Cell, tuple[Any, str]] = {}
        poll_s = 1.0 if self.runs_on_this_machine else 10.0
        try:
            while pending:
                for cell, job in list(pending.items()):
                    # a debug job runs inside exception(); its done() would open pdb on a failure
                    if self.cluster != "debug" and not job.done():
                        continue
                    error = job.exception()
                    del pending[cell]
                    if error is None:
                        echo(f"{cell[0]} seed {cell[1]}: finished (job {job.job_id})")
                    else:
                        failures[cell] = (job, self._reason(error))
                        echo(f"{cell[0]} seed {cell[1]}: failed (job {job.job_id})")
                if pending:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            for job in pending.values():  # a rerun resumes them from their checkpoints
                job.cancel(check=False)
            raise
        return {cell: failures[cell] for cell in order if cell in failures}

    def _reason(self, error: BaseException) -> str:
        """One line that says why a job failed: the exception its traceback ends with, or submitit's first line."""
        text = str(error)
        rule = "-" * 22
        if isinstance(error, self.submitit.core.utils.FailedJobError) and text.count(rule) >= 2:
            text = text.split(rule)[1]  # submitit puts the job's traceback between two rules
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            last = lines[-1] if lines else "the job raised an exception"
            return re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", last)  # harness.errors.MbqError: ... -> MbqError: ...
        return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)


def make_executor(name: str, options: dict[str, Any] | None = None) -> Executor:
    """``local`` or ``submitit`` with its options; options whose value is None are unset."""
    options = {key: value for key, value in (options or {}).items() if value is not None}
    if name == "local":
        if options:
            raise ConfigError(f"--{next(iter(options)).replace('_', '-')} only applies to --executor submitit")
        return LocalExecutor()
    if name == "submitit":
        unknown = sorted(set(options) - set(SUBMITIT_OPTIONS))
        if unknown:
            raise ConfigError(f"the submitit executor has no option {unknown[0]!r}; options: "
                              f"{', '.join(SUBMITIT_OPTIONS)}")
        return SubmititExecutor(**options)
    raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
