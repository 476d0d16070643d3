"""The one training loop every method shares, with per-epoch checkpoints and exact resume.

One *cell* is one (method spec, seed) pair of a comparison. ``run_cell`` builds the method's network from the
seed, runs the ``prepare`` phase, trains for the schedule's epochs (checkpointing after each), runs ``finalize``,
evaluates every bit-width, counts storage, and writes the cell's record. Restarted with the same arguments, it
continues after the last completed epoch and, on CPU, reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from harness import distributed
from harness.config import RunSpec
from harness.cost import PhaseTimer, device_name, synchronize
from harness.data import DataBundle
from harness.errors import ConfigError, TrainingDiverged
from harness.evaluate import evaluate_bits
from harness.loader import epoch_batches, steps_per_epoch
from harness.method import Method, RunContext
from harness.method_config import parse_method_spec
from harness.optim import build_optimizers, set_lr, step_optimizers
from harness.registry import get_method
from harness.runtime import Runtime, needs_onednn_off, place_data
from harness.store import RunStore

CHECKPOINT_VERSION = 1
LOG_COLUMNS = ("method", "seed", "epoch", "loss", "lr", "seconds", "sample_passes")


def instantiate(method_spec: str) -> Method:
    """``NAME[:KEY=VALUE...]`` -> a configured method instance (errors are one-line ConfigErrors)."""
    name, options = parse_method_spec(method_spec)
    return get_method(name).from_options(options)


def cell_spec(spec: RunSpec, method: Method) -> RunSpec:
    """The spec ``method``'s cell runs under: ``spec`` itself, or, for a method with ``fixed_bits`` (the
    full-precision reference: ``(32,)``), ``spec`` with those bits trained and evaluated instead of the
    comparison's. Data, model, schedule, seeds and budget are the comparison's either way."""
    fixed = getattr(method, "fixed_bits", None)
    if fixed is None:
        return spec
    return dataclasses.replace(spec, bits=tuple(fixed), eval_bits=None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass
class CellOutcome:
    """What ``run_cell`` returns: the finished record, or ``None`` if it stopped early (``stop_after``)."""

    record: dict[str, Any] | None
    log: list[dict[str, Any]]


def _checkpoint(model, optimizers, method, epoch, ctx, passes: Counter, timer, log,
                budget_state: dict[str, Any], prepared: bool = True) -> dict[str, Any]:
    """Everything a resumed cell needs; ``passes`` are the sums over ranks (rank 0 carries them on).
    ``prepared=False``: taken during the prepare phase, whose progress is in the method state."""
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "prepared": prepared,
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "method_state": method.state_dict(),
        "passes": dict(passes),
        "step": ctx.step,
        "seconds": timer.snapshot(),
        "log": log,
        "rng": torch.get_rng_state(),
        **budget_state,
    }


# An epoch's mean loss this many times the chance-level cross-entropy (per loss term) means the run has blown up.
DIVERGENCE_FACTOR = 100.0


def blow_up_note(mean_loss: float, terms: int, num_classes: int, epoch: int) -> str | None:
    """A note when an epoch's finite mean loss is far past chance level (``ln C`` per loss term). Such a spike can
    recover (AdaBits' early 1-bit epochs on digits do), so the run goes on and the table says it under itself;
    without the note a run that never recovers would end in chance accuracies and no word. NaN stops the run."""
    chance = math.log(num_classes) * max(1, terms)
    if mean_loss > DIVERGENCE_FACTOR * chance:
        return (f"mean loss {mean_loss:.3g} in epoch {epoch}, over {DIVERGENCE_FACTOR:g}x the chance-level "
                f"{chance:.3g} (a lower --lr may help)")
    return None


def _budget_spent(schedule, ctx: RunContext, timer: PhaseTimer, device: torch.device) -> float:
    """The cost spent so far in the budget's unit, summed over ranks (so every rank takes the same decision)."""
    if schedule.budget_kind == "device-hours":
        synchronize(device)
        seconds = distributed.sum_scalars([timer.total_seconds()], device)[0]
        return seconds / 3600.0
    return distributed.sum_scalars([float(sum(ctx.passes.values()))], device)[0]


def run_cell(spec: RunSpec, method_spec: str, seed: int, data: DataBundle, store: RunStore | None = None, *,
             show_progress: bool = False, stop_after: int | None = None,
             on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
             echo: Callable[[str], None] | None = None) -> CellOutcome:
    """Train, finalize and evaluate one method under ``spec.schedule`` with ``seed``.

    ``stop_after``: return after that many epochs of this call without finishing (used to test resume).
    ``on_epoch``: called with this cell's log rows after every epoch (the caller rewrites log.csv).
    ``echo``: receives one status line when the cell starts ("training" or "resuming at epoch k").

    Under a cost budget (``schedule.budget_kind``), training runs until the budget is spent, the ``prepare`` phase
    (e.g. EMQ's scoring) included. The lr curve is indexed by the fraction spent of what the training phase has
    left after ``prepare``, instead of by epochs, so every method anneals fully within its budget; ``epochs`` only
    sets the shape of that curve (warm-up and milestones become fractions of it).
    """
    with contextlib.ExitStack() as scope:
        return _run_cell(spec, method_spec, seed, data, store, scope, show_progress=show_progress,
                         stop_after=stop_after, on_epoch=on_epoch, echo=echo or (lambda _: None))


def _run_cell(spec: RunSpec, method_spec: str, seed: int, data: DataBundle, store: RunStore | None,
              scope: contextlib.ExitStack, *, show_progress: bool, stop_after: int | None,
              on_epoch: Callable[[list[dict[str, Any]]], None] | None, echo: Callable[[str], None]) -> CellOutcome:
    """``run_cell``'s body; ``scope`` holds settings that last for the cell (oneDNN off for narrow networks)."""
    method = instantiate(method_spec)
    spec = cell_spec(spec, method)
    schedule = spec.schedule
    method.check_model(spec.model)
    method.check_bits(spec.bits)
    method.check_eval_bits(spec.bits, spec.evaluated_bits)
    base_device = resolve_device(spec.device)
    distributed.init_from_environment(base_device.type)
    device = distributed.local_device(base_device)
    runtime = Runtime(device, spec.amp, spec.channels_last, spec.compile)
    data = place_data(data, device, spec.data_placement)
    world = distributed.world_size()
    # progress bars only where someone watches: a log file or a pipe would fill with thousands of bar lines
    show_progress = show_progress and distributed.is_writer() and sys.stderr.isatty()
    torch.manual_seed(seed)
    model = runtime.prepare_model(method.build(spec.model, data.info.num_classes, spec.bits, data.info, spec.width))
    onednn_off = needs_onednn_off(model, device)
    if onednn_off:
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        scope.callback(setattr, torch.backends.mkldnn, "enabled", previous)
    optimizers = build_optimizers(model, method.param_groups(model), schedule)
    ctx = RunContext(bits=spec.bits, device=device, num_classes=data.info.num_classes, seed=seed,
                     epochs=schedule.epochs, data_info=data.info, schedule=schedule, show_progress=show_progress,
                     eval_bits=spec.evaluated_bits, workers=spec.workers)
    timer = PhaseTimer(device)
    start_epoch, prepared, budget_spent, log = 0, False, False, []
    train_budget_start: float | None = None  # cost already spent when training began (the prepare phase)
    state = store.load_checkpoint(method_spec, seed) if store else None
    if state is not None:
        model.load_state_dict(state["model"])
        for optimizer, saved in zip(optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        method.load_state_dict(state["method_state"])
        # The checkpoint holds the sum over ranks; rank 0 carries it on so later sums stay global.
        ctx.passes = Counter(state["passes"]) if distributed.is_writer() else Counter()
        ctx.step = state["step"]
        timer.seconds.update(state["seconds"])
        start_epoch, prepared, log = state["epoch"], state["prepared"], list(state["log"])
        budget_spent = state.get("budget_spent", False)
        train_budget_start = state.get("train_budget_start")
        torch.set_rng_state(state["rng"])
    if state is None:
        echo(f"{method_spec} seed {seed}: training")
    elif not prepared:
        echo(f"{method_spec} seed {seed}: {method.resume_note() or 'restarting its prepare phase'}")
    else:
        echo(f"{method_spec} seed {seed}: resuming at epoch {start_epoch + 1}")

    def save(epoch: int, passes: Counter, prepared: bool = True) -> None:
        if prepared:
            distributed.average_buffers(model)
        if store is None:
            return
        budget_state = {"budget_spent": budget_spent, "train_budget_start": train_budget_start}
        store.save_checkpoint(method_spec, seed, _checkpoint(model, optimizers, method, epoch, ctx, passes, timer,
                                                             log, budget_state, prepared))
        artifacts = method.artifacts()
        if artifacts:
            store.save_artifacts(method_spec, seed, artifacts)

    # The prepare phase's own checkpoints (EMQ: after every scoring epoch); passes summed over ranks like the others.
    ctx.checkpoint_prepare = lambda: save(0, distributed.sum_counter(ctx.passes, device), prepared=False)
    if not prepared:
        model.train()
        with timer.phase("prepare"), runtime.autocast():
            method.prepare(model, data.train, ctx)
        if distributed.is_active():
            # Rank 0's prepared model and method state (EMQ's scores and coresets) on every rank.
            distributed.broadcast_model(model)
            method.load_state_dict(distributed.broadcast_object(method.state_dict()))
        save(0, distributed.sum_counter(ctx.passes, device))

    budget = schedule.budget
    spent = 0.0
    if budget is not None and not budget_spent:
        spent = _budget_spent(schedule, ctx, timer, device)
        budget_spent = spent >= budget
        if budget_spent and start_epoch == 0:
            raise ConfigError(f"{method_spec}: the budget {schedule.budget_kind}={budget:g} is spent by its prepare "
                              f"phase alone ({spent:g}), so it would train no step; raise --budget")
        if train_budget_start is None:
            train_budget_start = spent
    steps = steps_per_epoch(len(data.train), schedule.batch_size)
    augment = schedule.augment and data.info.augment != "none"
    epoch = start_epoch
    # One bar for the whole cell: its total is re-estimated every epoch (coreset epochs are shorter); under a
    # budget it counts steps without a total.
    cell_bar = scope.enter_context(tqdm(total=None, desc=f"{method_spec} s{seed}", leave=False,
                                        disable=not show_progress, dynamic_ncols=True))
    while (epoch < schedule.epochs) if budget is None else not budget_spent:
        if budget is not None and epoch >= schedule.max_budget_epochs:
            raise ConfigError(f"{method_spec}: the budget {schedule.budget_kind}={budget:g} was not spent after "
                              f"{epoch} epochs (100x the schedule's {schedule.epochs}); lower --budget")
        if stop_after is not None and epoch - start_epoch >= stop_after:
            return CellOutcome(None, log)
        ctx.epoch = epoch
        if type(method).before_epoch is not Method.before_epoch:  # the phase timer synchronizes: skip it if unused
            model.train()
            with timer.phase("prepare"), runtime.autocast():
                method.before_epoch(model, epoch, data.train, ctx)
        per_bits = method.epoch_indices(epoch, data.train, spec.bits)
        batches = epoch_batches(data.train, schedule.batch_size, seed, epoch, augment, device, per_bits,
                                channels_last=spec.channels_last, workers=spec.workers)
        epoch_steps = steps if per_bits is None else steps_per_epoch(
            min(len(v) for v in per_bits.values()), schedule.batch_size)
        model.train()
        total_loss, count, lr = 0.0, 0, 0.0
        before = timer.seconds["train"]
        if budget is None:
            cell_bar.total = cell_bar.n + epoch_steps * (schedule.epochs - epoch)
        cell_bar.set_postfix_str(f"epoch {epoch + 1}/{schedule.epochs}" + (" (budget)" if budget else ""))
        with timer.phase("train"):
            for index, batch in enumerate(batches):
                cell_bar.update(1)
                ctx.step += 1
                if budget is None:
                    factor = schedule.lr_factor(epoch, index, epoch_steps)
                else:
                    factor = schedule.lr_factor_at_fraction(
                        (spent - train_budget_start) / max(budget - train_budget_start, 1e-12))
                set_lr(optimizers, factor)
                lr = schedule.lr * factor  # the schedule's lr; groups with their own base lr follow the same curve
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                with runtime.autocast():
                    losses = method.train_step(model, batch, ctx)
                step_loss = distributed.sum_scalars([float(sum(losses.values()))], device)[0] / world
                if not math.isfinite(step_loss):
                    raise TrainingDiverged(
                        f"{method_spec} (seed {seed}) diverged: loss {step_loss} at epoch {epoch + 1} step "
                        f"{index + 1}; the last completed epoch's checkpoint is kept (try a lower --lr)")
                distributed.all_reduce_gradients(model)
                step_optimizers(optimizers)
                total_loss += step_loss
                count += 1
                if budget is not None:
                    spent = _budget_spent(schedule, ctx, timer, device)
                    if spent >= budget:
                        budget_spent = True
                        break
        epoch += 1
        note = blow_up_note(total_loss / count, len(losses), data.info.num_classes, epoch) if count else None
        if note is not None:
            echo(f"{method_spec} seed {seed}: unstable training: {note}")
        passes = distributed.sum_counter(ctx.passes, device)  # one collective per epoch, for the log and checkpoint
        log.append({"method": method_spec, "seed": seed, "epoch": epoch, "loss": total_loss / max(count, 1),
                    "lr": lr, "seconds": timer.seconds["train"] - before, "sample_passes": sum(passes.values()),
                    **({"note": note} if note else {})})
        save(epoch, passes)
        if on_epoch is not None:
            on_epoch(log)

    model.train()
    with timer.phase("finalize"), runtime.autocast():
        finalize_batches = epoch_batches(data.train, schedule.batch_size, seed, schedule.epochs, augment, device,
                                         channels_last=spec.channels_last, workers=spec.workers)
        method.finalize(model, finalize_batches, ctx)
    distributed.average_buffers(model)
    if store is not None:  # the evaluated state: an export reads it instead of replaying finalize
        store.save_final(method_spec, seed, {"version": CHECKPOINT_VERSION, "model": model.state_dict(),
                                             "method_state": method.state_dict()})
    with timer.phase("eval"):
        accuracy = evaluate_bits(model, method, data.test, spec.evaluated_bits, schedule.eval_batch_size,
                                 device, runtime, workers=spec.workers)
    passes = distributed.sum_counter(ctx.passes, device)
    record = make_record(spec, method_spec, method, seed, model, accuracy, passes, timer, device, log, world)
    record["runtime"]["onednn"] = not onednn_off
    record["regime_notes"] = list(method.regime_notes(schedule, tuple(spec.bits), len(data.train)))
    record["training_notes"] = [row["note"] for row in log if row.get("note")]
    topologies = [m.mbq_topology for m in model.modules() if hasattr(m, "mbq_topology")]
    if topologies:  # one network per bit-width (dedicated) shares one declaration: record the first
        record["topology"] = topologies[0].to_dict()
    if store is not None:
        store.save_record(method_spec, seed, record)
    return CellOutcome(record, log)


def make_record(spec: RunSpec, method_spec: str, method: Method, seed: int, model, accuracy, passes: Counter,
                timer: PhaseTimer, device: torch.device, log, world_size: int = 1) -> dict[str, Any]:
    hours = timer.hours(world_size)
    per_bits = {
        str(b): {**accuracy[b], "storage_bytes": method.storage(model, b), "sample_passes": passes.get(b, 0)}
        for b in sorted(accuracy)
    }
    return {
        "method": method_spec,
        "method_name": method.name,
        "method_config": method.cfg.to_dict(),
        "seed": seed,
        "dataset": spec.dataset,
        "model": spec.model,
        "width": spec.width,
        "bits": list(spec.bits),
        "eval_bits": list(spec.evaluated_bits),
        "epochs": spec.schedule.epochs,
        "epochs_run": log[-1]["epoch"] if log else 0,
        "schedule": spec.schedule.to_dict(),
        "runtime": {"amp": spec.amp, "channels_last": spec.channels_last, "compile": spec.compile,
                    "data_placement": spec.data_placement},
        "train_subset": spec.train_subset,
        "results": per_bits,
        "storage_total_bytes": method.storage_total(model, spec.bits),
        "seconds": {phase: timer.seconds.get(phase, 0.0) for phase in hours},
        "device_hours": sum(hours.values()),
        "device_hours_by_phase": hours,
        "device": device_name(device),
        "num_devices": world_size,
        "sample_passes_total": sum(passes.values()),
        "log": log,
    }
