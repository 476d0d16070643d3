"""mbqbench command line: train and compare multi-bit quantization methods under one schedule.

Commands only parse, validate, call the harness and print; every user error is one line on stderr with exit 2.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import click

from harness.allocator import keep_large_blocks
from harness.cli_options import executor_options, pop_executor_options, pop_runtime_fields, runtime_options
from harness.config import RunSpec, Schedule, parse_bits, parse_budget
from harness.errors import ConfigError, MbqError
from harness.threads import set_wait_policy

DEFAULTS = Schedule()


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip() != "")
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None


def default_out(spec: RunSpec) -> Path:
    digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:10]
    return Path("results") / "runs" / f"{spec.dataset}-{spec.model}-{digest}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """mbqbench: train multi-bit quantization methods under one schedule and compare accuracy per bit-width,
    training cost (device-hours, sample-passes) and storage."""


def _echo_for(quiet: bool):
    from harness import distributed

    if quiet or not distributed.is_writer():
        return lambda _: None
    return lambda msg: click.echo(msg, err=True)


def _join_torchrun(device: str) -> None:
    """Under torchrun, join the process group before any output so that only rank 0 writes and prints."""
    from harness import distributed
    from harness.train import resolve_device

    distributed.init_from_environment(resolve_device(device).type)


def _print(text: str) -> None:
    from harness import distributed

    if distributed.is_writer():
        click.echo(text)


@cli.command()
@click.option("--methods", default="emq,mbquant", show_default=True,
              help="Comma-separated method specs NAME[:KEY=VALUE...]; the same method may appear with different "
                   "options (e.g. anyprecision,anyprecision:width=5). See `list methods`.")
@click.option("--dataset", default="digits", show_default=True, help="Data set name (see `list datasets`).")
@click.option("--data-root", default=None, help="Folder holding the data set files (default: per data set).")
@click.option("--model", default=None,
              help="Model name (see `list models`). [default: resnet8 on digits, else resnet20]")
@click.option("--width", type=float, default=None,
              help="Channel width multiplier of the model. [default: 1.0]")
@click.option("--bits", default="2,4,8", show_default=True,
              help="Bit-widths to train and evaluate (1..32; MBQuant needs 2 or more, 32 is full precision).")
@click.option("--eval-bits", default=None,
              help="Bit-widths to evaluate after training (default: --bits); untrained ones only for methods that "
                   "support them (e.g. EMQ after BN adaptation).")
@click.option("--epochs", type=int, default=None,
              help="Training epochs (under --budget: the length the lr curve is shaped over). "
                   "[default: 60 on digits, else 20]")
@click.option("--budget", default=None,
              help="Equal-cost training: KIND=AMOUNT with KIND sample-passes or device-hours. Every method trains "
                   "until it has spent that much (its prepare phase included), its lr curve stretched to the budget.")
@click.option("--batch-size", type=int, default=None,
              help="Training batch size. [default: 32 on digits, else 128]")
@click.option("--eval-batch-size", type=int, default=DEFAULTS.eval_batch_size, show_default=True,
              help="Evaluation batch size.")
@click.option("--optimizer", default=None,
              help="sgd, adam or adamw. Leaving out all of --optimizer, --lr, --lr-schedule, --momentum, "
                   "--weight-decay and --warmup-epochs picks the model family's recipe (ResNets: SGD lr 0.05 cosine; "
                   "ViTs: AdamW, weight decay 0.05, warm-up, cosine, lr 5e-4 x batch/512 on ImageNet, 1e-3 elsewhere); "
                   "giving any of them "
                   "leaves the others at the generic defaults shown.  [default: sgd]")
@click.option("--lr", type=float, default=None, help=f"Base learning rate.  [default: {DEFAULTS.lr}]")
@click.option("--lr-schedule", default=None,
              help=f"cosine, step, onecycle or constant (per iteration).  [default: {DEFAULTS.lr_schedule}]")
@click.option("--milestones", default="", help="Epochs where the step schedule multiplies the lr by --gamma.")
@click.option("--gamma", type=float, default=DEFAULTS.gamma, show_default=True, help="Step schedule factor.")
@click.option("--momentum", type=float, default=None, help=f"SGD momentum.  [default: {DEFAULTS.momentum}]")
@click.option("--weight-decay", type=float, default=None, help=f"Weight decay.  [default: {DEFAULTS.weight_decay}]")
@click.option("--warmup-epochs", type=int, default=None,
              help=f"Linear warm-up epochs.  [default: {DEFAULTS.warmup_epochs}]")
@click.option("--no-augment", is_flag=True, help="Turn off the data set's standard training augmentation.")
@click.option("--seeds", "--seed", "seeds", default="0", show_default=True,
              help="Seed, or comma-separated seeds (each method runs once per seed).")
@click.option("--train-subset", type=int, default=None,
              help="Train on this many training samples (fixed random subset), e.g. for CPU runs.")
@click.option("--test-subset", type=int, default=None, help="Evaluate on this many test samples.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--baseline", default=None, help="Method spec whose cost is 1.00x in the relative-cost column.")
@click.option("--reference", type=click.Choice(["fp", "none"]), default="fp", show_default=True,
              help="fp: also train the full-precision network of the same model, schedule and budget once per seed "
                   "(same batches) and show it as the table's 'fp (reference)' row, its 32-bit top-1 in every "
                   "bit column; it is resumable like any cell (cells/fp__seed<k>/) and may be the --baseline. "
                   "none: no reference row. Listing fp in --methods too trains it once.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default results/runs/<dataset>-<model>-<hash of the settings>). Running the same "
                   "command again resumes a killed run from its last completed epoch.")
@click.option("--quiet", is_flag=True, help="No progress bars or status lines.")
@runtime_options
@executor_options
def compare(methods, dataset, data_root, model, width, bits, eval_bits, epochs, budget, batch_size, eval_batch_size,
            optimizer, lr, lr_schedule, milestones, gamma, momentum, weight_decay, warmup_epochs, no_augment, seeds,
            train_subset, test_subset, device, baseline, reference, out, quiet, executor, **kwargs) -> None:
    """Train every method under one identical schedule and print a table of top-1 per bit-width, storage and
    cost. Writes spec.json, env.json, log.csv, summary.csv, stats.csv, table.md/.tex, accuracy.png, pareto.png
    and checkpoints. Under `torchrun --nproc_per_node N cli.py compare ...` training is data-parallel.
    The model, width, epochs and batch size a flag does not set come from the data set's defaults (on digits:
    resnet8, 60 epochs, batch 32, which keep every method in its regime on two CPU cores)."""
    from harness.compare import run_comparison
    from harness.recipes import resolve, resolve_optimizer

    budget_kind, budget_amount = parse_budget(budget) if budget is not None else (None, None)
    defaults = resolve(dataset, model=model, width=width, epochs=epochs, batch_size=batch_size)
    model, width, epochs, batch_size = defaults["model"], defaults["width"], defaults["epochs"], defaults["batch_size"]
    optimizer_settings = resolve_optimizer(model, epochs, batch_size, dataset, optimizer=optimizer, lr=lr,
                                           lr_schedule=lr_schedule, momentum=momentum, weight_decay=weight_decay,
                                           warmup_epochs=warmup_epochs)
    runtime = pop_runtime_fields(kwargs)
    options = pop_executor_options(kwargs)
    schedule = Schedule(budget_kind=budget_kind, budget=budget_amount,
        epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size,
        milestones=_parse_ints(milestones, "--milestones"), gamma=gamma, augment=not no_augment, **optimizer_settings)
    method_specs = tuple(m.strip() for m in methods.split(","))
    if any(not m for m in method_specs):
        raise ConfigError(f"--methods has an empty entry: {methods!r}")
    spec = RunSpec(methods=method_specs, dataset=dataset, model=model, width=width, bits=parse_bits(bits),
                   eval_bits=parse_bits(eval_bits) if eval_bits is not None else None,
                   seeds=_parse_ints(seeds, "--seed"), schedule=schedule, data_root=data_root,
                   train_subset=train_subset, test_subset=test_subset, device=device, baseline=baseline,
                   reference=reference, **runtime)
    out = out if out is not None else default_out(spec)
    _join_torchrun(device)
    _, markdown = run_comparison(spec, out, show_progress=not quiet, echo=_echo_for(quiet), executor=executor,
                                 executor_options=options)
    _print(markdown)


@cli.command()
@click.argument("preset_name", metavar="[PRESET]", required=False)
@click.option("--all-claims", is_flag=True,
              help="Instead of one PRESET: run every preset that carries claims (`list presets`) with these options "
                   "and write one markdown table of all verdicts to OUT/summary.md, each preset's run in "
                   "OUT/<preset>-<hash> (default: summary in results/claims/, runs in results/runs/).")
@click.option("--data-root", default=None, help="Folder holding the preset's data set (see `list presets`).")
@click.option("--epochs", type=int, default=None,
              help="Shorten the schedule to this many epochs (milestones scale); the table then says so.")
@click.option("--seeds", "--seed", "seeds", default=None,
              help="Seed or comma-separated seeds (e.g. 0,1,2: mean, std and bootstrap intervals); default: the "
                   "preset's (0 for paper presets, 0,1,2 for claim presets).")
@click.option("--full-size", is_flag=True,
              help="With --all-claims: the paper-sized claim presets (for a GPU) instead of the CPU-sized ones.")
@click.option("--train-subset", type=int, default=None, help="Train on this many samples (a fixed subset).")
@click.option("--test-subset", type=int, default=None, help="Evaluate on this many test samples.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default results/runs/<preset>-<hash of the settings>); rerunning resumes.")
@click.option("--quiet", is_flag=True, help="No progress bars or status lines.")
@runtime_options
@executor_options
def reproduce(preset_name, all_claims, data_root, epochs, seeds, full_size, train_subset, test_subset, device, out,
              quiet, executor, **kwargs) -> None:
    """Run a paper preset (`list presets`) and print published vs measured numbers per bit-width with the gap,
    then one verdict line per claim of the preset: holds / does not hold (the whole 95% bootstrap interval over
    seeds satisfies / violates it) or inconclusive. Writes reproduce.md (and claims.json) into the run folder.
    With --all-claims instead of PRESET: every preset with claims, then one summary table of their verdicts."""
    from harness.compare import run_comparison, validate
    from harness.presets import claim_presets, get_preset
    from harness.reproduce import claims_summary, write_reproduction
    from harness.store import atomic_write_text

    if all_claims == (preset_name is not None):
        raise ConfigError("give one PRESET, or --all-claims to run every preset that has claims (not both)")
    if full_size and not all_claims:
        raise ConfigError("--full-size selects the claim presets of --all-claims; give both, or name one PRESET")
    size = "full" if full_size else "cpu"
    presets = [get_preset(name) for name in (claim_presets(size) if all_claims else [preset_name])]
    if not presets:
        raise ConfigError("no preset carries claims (see `list presets`)")
    runtime = pop_runtime_fields(kwargs)
    options = pop_executor_options(kwargs)
    runs = []
    for preset in presets:
        spec = preset.run_spec(epochs=epochs, seeds=_parse_ints(seeds, "--seed") if seeds is not None else None,
                               data_root=data_root, train_subset=train_subset, test_subset=test_subset,
                               device=device, **runtime)
        folder = f"{preset.name}-{hashlib.sha256(spec.to_json().encode()).hexdigest()[:10]}"
        if out is None:  # the same folder as a plain `reproduce PRESET` with these options, so either resumes both
            runs.append((preset, spec, Path("results") / "runs" / folder))
        else:
            runs.append((preset, spec, out / folder if all_claims else out))
    _join_torchrun(device)
    if all_claims:  # a missing data set or a bad folder fails before any preset spends hours training
        for _, spec, folder in runs:
            validate(spec, folder, check_device=executor == "local")
    results = []
    for preset, spec, folder in runs:
        records, markdown = run_comparison(spec, folder, show_progress=not quiet, echo=_echo_for(quiet),
                                           executor=executor, executor_options=options)
        text, verdicts = write_reproduction(folder, preset, records, spec.schedule.epochs)
        _print(markdown)
        _print(text)
        results.append((preset, verdicts, spec.schedule.epochs))
    if all_claims:
        summary = claims_summary(results)
        atomic_write_text((out if out is not None else Path("results") / "claims") / "summary.md", summary)
        _print(summary)


@cli.command("list")
@click.argument("what", type=click.Choice(["methods", "datasets", "models", "presets"]))
@click.option("-v", "--verbose", is_flag=True, help="Methods: every option with its type and default.")
def list_command(what: str, verbose: bool) -> None:
    """List the registered methods (built-in and entry points), data sets, models or paper presets (with each
    preset's claims: name, statement and source). Method options are set as NAME:KEY=VALUE (e.g. emq:prune=0)."""
    if what == "methods":
        from harness.registry import get_method, list_methods

        for name in list_methods():
            cls = get_method(name)
            doc = (cls.__doc__ or "").strip().splitlines()
            click.echo(f"{name:16s} {doc[0] if doc else ''}  [{cls.__module__}]")
            if verbose:
                for line in cls.Config.option_lines() or ["(no options)"]:
                    click.echo(f"{'':18s}{line}")
    elif what == "datasets":
        from harness.data import DATASETS, default_data_root

        for name in DATASETS:
            root = default_data_root(name)
            click.echo(f"{name:16s} {'default data root: ' + str(root) if root else 'built in'}")
    elif what == "presets":
        from harness.presets import get_preset, list_presets

        for name in list_presets():
            preset = get_preset(name)
            click.echo(f"{name:32s} {preset.title}\n{'':32s} data: {preset.data_needs}")
            for claim in preset.claims:
                click.echo(f"{'':32s} claim {claim.name}: {claim.statement} [{claim.source}]")
    else:
        from harness.models import list_models

        for name in list_models():
            click.echo(name)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", default=None, help="Method spec whose cost is 1.00x in the relative-cost column.")
@click.option("--allow-mixed", is_flag=True, help="Tabulate records trained under different schedules together.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the rebuilt tables (default: the run folder when there is one).")
def report(run_dirs, baseline, allow_mixed, out) -> None:
    """Rebuild summary.csv, table.md/.tex and accuracy.png from stored records (no training)."""
    from harness.report import write_reports
    from harness.store import RunStore, check_writable_dir

    records, order = [], []
    for run_dir in run_dirs:
        if not run_dir.exists():
            raise MbqError(f"{run_dir} does not exist")
        if not (run_dir / "cells").is_dir():
            raise MbqError(f"{run_dir} is not a run folder (no cells/ inside)")
        store = RunStore(run_dir)
        spec = store.read_spec() or {}
        order.extend(m for m in spec.get("methods", []) if m not in order)
        records.extend(store.records())
    if not records:
        raise MbqError("no finished records in " + ", ".join(map(str, run_dirs)))
    target = out if out is not None else (run_dirs[0] if len(run_dirs) == 1 else None)
    if target is None:
        raise MbqError("several run folders: pass --out for the combined tables")
    check_writable_dir(target)
    click.echo(write_reports(target, records, order, baseline, allow_mixed))


@cli.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--method", "method_spec", required=True, help="Method spec of the cell, as in the run's --methods.")
@click.option("--bits", required=True,
              help="A bit-width the cell was evaluated at, or 'all': its whole switchable set (MBQuant's branches, "
                   "AdaBits' highest-bit codes once, the latent weights of DoReFa methods, every dedicated network).")
@click.option("--seed", type=int, default=None, help="Seed of the cell (default: the run's first seed).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .safetensors file to write.")
def export_command(run_dir, method_spec, bits, seed, out) -> None:
    """Write what deploying a trained cell at --bits needs to a safetensors file: integer codes packed at their
    bit-width, per-layer constants, that bit-width's BN, full-precision layers, and a JSON header (method, model,
    bits, data normalization). Its tensor payload equals the cell's storage_mb (storage_total_mb for 'all');
    harness.export.load_exported rebuilds the network from the file alone."""
    from harness.cells import export_cell, parse_export_bits

    header = export_cell(run_dir, method_spec.strip(), parse_export_bits(bits), out, seed)
    recorded = header["record_storage_bytes"]
    note = "" if recorded == header["payload_bytes"] else (
        f" (the record says {recorded}: it was counted by an older storage rule; `report` does not recount it)")
    click.echo(f"{out}: {method_spec} seed {header['source']['seed']} at {header['bits']} bits, "
               f"payload {header['payload_bytes']} bytes = {header['payload_bytes'] / 1e6:.6f} MB{note}")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one ``error: ...`` line on stderr and exit status 2."""
    set_wait_policy()  # before any command imports torch
    keep_large_blocks()
    try:
        result = cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return 2
    except MbqError as exc:
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)
        return 2
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted: run the same command again to resume from the last completed epoch", err=True)
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
