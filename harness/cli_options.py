"""The option groups that ``compare`` and ``reproduce`` share, and their conversion into run settings.

``runtime_options`` are how a schedule executes (speed; ``--amp`` also changes the numbers), ``executor_options``
where its cells run; the ``pop_*`` helpers take a command's keyword arguments of one group out and validate them.
"""

from __future__ import annotations

import click

from harness.errors import ConfigError
from harness.threads import configure_threads


def runtime_options(command):
    """Options on how the schedule executes (they change speed; --amp also changes the numbers)."""
    options = [
        click.option("--amp", type=click.Choice(["off", "bf16"]), default="off", show_default=True,
                     help="bf16 autocast for convolutions and matmuls (CUDA, or CPU where supported)."),
        click.option("--channels-last", is_flag=True, help="NHWC memory format for the model and the batches."),
        click.option("--compile", "compile_model", is_flag=True,
                     help="torch.compile the model in place (one graph per bit-width; another float path than eager, "
                          "so its numbers are close to, not equal to, an eager run's)."),
        click.option("--data-on", "data_placement", type=click.Choice(["auto", "device", "host"]), default="auto",
                     show_default=True,
                     help="Hold in-memory data sets on the GPU and augment there (auto: on CUDA only)."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads for torch (default: OMP_NUM_THREADS, else the CPUs this process may use; "
                          "OpenMP waits passively only if other processes already keep the CPUs busy at start; "
                          "OMP_WAIT_POLICY=ACTIVE or PASSIVE forces a policy)."),
        click.option("--workers", type=int, default=None,
                     help="DataLoader processes decoding folder data sets (tinyimagenet, imagenet); 0 decodes in the "
                          "training process. Changes no batch.  [default: the CPUs this process may use, at most 8]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def executor_options(command):
    """Where the cells run: this process, or one submitit job per (method, seed) cell."""
    options = [
        click.option("--executor", type=click.Choice(["local", "submitit"]), default="local", show_default=True,
                     help="local: cells one after another here; submitit: one job per (method, seed) cell "
                          "(Slurm array, or local processes), each resumable; results gathered into one table."),
        click.option("--cluster", default=None,
                     help="submitit cluster: slurm, local or debug (default: Slurm when available, else local)."),
        click.option("--partition", default=None, help="Slurm partition (submitit)."),
        click.option("--timeout-min", type=int, default=None, help="Per-job time limit in minutes (submitit)."),
        click.option("--gpus-per-node", type=int, default=None, help="GPUs per job (submitit)."),
        click.option("--cpus-per-task", type=int, default=None, help="CPUs per job (submitit)."),
        click.option("--mem-gb", type=float, default=None, help="Memory per job in GB (submitit)."),
        click.option("--array-parallelism", type=int, default=None, help="Slurm: most array jobs at once."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_executor_options(kwargs: dict) -> dict:
    keys = ("cluster", "partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism")
    return {key: kwargs.pop(key) for key in keys}


def pop_runtime_fields(kwargs: dict) -> dict:
    threads = kwargs.pop("threads")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    configure_threads(threads)
    workers = kwargs.pop("workers")
    return {"amp": kwargs.pop("amp"), "channels_last": kwargs.pop("channels_last"),
            "compile": kwargs.pop("compile_model"), "data_placement": kwargs.pop("data_placement"),
            **({} if workers is None else {"workers": workers})}  # unset: RunSpec's default (the available CPUs)
