"""The one training loop every method shares, with per-epoch checkpoints and exact resume.

One *cell* is one (method spec, seed) pair of a comparison. ``run_cell`` builds the method's network from the
seed, runs the ``prepare`` phase, trains for the schedule's epochs (checkpointing after each), runs ``finalize``,
evaluates every bit-width, counts storage, and writes the cell's record. Restarted with the same arguments, it
continues after the last completed epoch and, on CPU, reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.config import RunSpec, parse_method_spec
from harness.cost import PhaseTimer, device_name
from harness.data import DataBundle
from harness.errors import ConfigError, TrainingDiverged
from harness.evaluate import evaluate_bits
from harness.loader import epoch_batches, steps_per_epoch
from harness.method import Method, RunContext
from harness.optim import build_optimizers, set_lr
from harness.registry import get_method
from harness.store import RunStore

CHECKPOINT_VERSION = 1
LOG_COLUMNS = ("method", "seed", "epoch", "loss", "lr", "seconds", "sample_passes")


def instantiate(method_spec: str) -> Method:
    """``NAME[:KEY=VALUE...]`` -> a configured method instance (errors are one-line ConfigErrors)."""
    name, options = parse_method_spec(method_spec)
    return get_method(name).from_options(options)


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


def _checkpoint(model, optimizers, method, epoch, prepared, ctx, timer, log) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "prepared": prepared,
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "method_state": method.state_dict(),
        "passes": dict(ctx.passes),
        "step": ctx.step,
        "seconds": dict(timer.seconds),
        "log": log,
        "rng": torch.get_rng_state(),
    }


def run_cell(spec: RunSpec, method_spec: str, seed: int, data: DataBundle, store: RunStore | None = None, *,
             show_progress: bool = False, stop_after: int | None = None,
             on_epoch: Callable[[list[dict[str, Any]]], None] | None = None) -> CellOutcome:
    """Train, finalize and evaluate one method under ``spec.schedule`` with ``seed``.

    ``stop_after``: return after that many epochs of this call without finishing (used to test resume).
    ``on_epoch``: called with this cell's log rows after every epoch (the caller rewrites log.csv).
    """
    schedule = spec.schedule
    method = instantiate(method_spec)
    method.check_model(spec.model)
    method.check_bits(spec.bits)
    method.check_eval_bits(spec.bits, spec.evaluated_bits)
    device = resolve_device(spec.device)
    torch.manual_seed(seed)
    model = method.build(spec.model, data.info.num_classes, spec.bits, data.info, spec.width).to(device)
    optimizers = build_optimizers(model, method.param_groups(model), schedule)
    ctx = RunContext(bits=spec.bits, device=device, num_classes=data.info.num_classes, seed=seed,
                     epochs=schedule.epochs, data_info=data.info, schedule=schedule, show_progress=show_progress,
                     eval_bits=spec.evaluated_bits)
    timer = PhaseTimer(device)
    start_epoch, prepared, log = 0, False, []
    state = store.load_checkpoint(method_spec, seed) if store else None
    if state is not None:
        model.load_state_dict(state["model"])
        for optimizer, saved in zip(optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        method.load_state_dict(state["method_state"])
        ctx.passes = Counter(state["passes"])
        ctx.step = state["step"]
        timer.seconds.update(state["seconds"])
        start_epoch, prepared, log = state["epoch"], state["prepared"], list(state["log"])
        torch.set_rng_state(state["rng"])

    def save(epoch: int) -> None:
        if store is None:
            return
        store.save_checkpoint(method_spec, seed, _checkpoint(model, optimizers, method, epoch, True, ctx, timer, log))
        artifacts = method.artifacts()
        if artifacts:
            store.save_artifacts(method_spec, seed, artifacts)

    if not prepared:
        model.train()
        with timer.phase("prepare"):
            method.prepare(model, data.train, ctx)
        save(0)

    steps = steps_per_epoch(len(data.train), schedule.batch_size)
    augment = schedule.augment and data.info.augment != "none"
    for epoch in range(start_epoch, schedule.epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            return CellOutcome(None, log)
        ctx.epoch = epoch
        per_bits = method.epoch_indices(epoch, data.train, spec.bits)
        batches = epoch_batches(data.train, schedule.batch_size, seed, epoch, augment, device, per_bits)
        epoch_steps = steps if per_bits is None else steps_per_epoch(
            min(len(v) for v in per_bits.values()), schedule.batch_size)
        model.train()
        total_loss, count, lr = 0.0, 0, 0.0
        before = timer.seconds["train"]
        with timer.phase("train"):
            progress = tqdm(batches, total=epoch_steps, desc=f"{method_spec} s{seed} ep{epoch + 1}/{schedule.epochs}",
                            leave=False, disable=not show_progress, dynamic_ncols=True)
            for index, batch in enumerate(progress):
                ctx.step += 1
                factor = schedule.lr_factor(epoch, index, epoch_steps)
                set_lr(optimizers, factor)
                lr = schedule.lr * factor  # the schedule's lr; groups with their own base lr follow the same curve
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                losses = method.train_step(model, batch, ctx)
                step_loss = sum(losses.values())
                if not math.isfinite(step_loss):
                    raise TrainingDiverged(
                        f"{method_spec} (seed {seed}) diverged: loss {step_loss} at epoch {epoch + 1} step "
                        f"{index + 1}; the last completed epoch's checkpoint is kept (try a lower --lr)")
                for optimizer in optimizers:
                    optimizer.step()
                total_loss += step_loss
                count += 1
        log.append({"method": method_spec, "seed": seed, "epoch": epoch + 1, "loss": total_loss / max(count, 1),
                    "lr": lr, "seconds": timer.seconds["train"] - before,
                    "sample_passes": sum(ctx.passes.values())})
        save(epoch + 1)
        if on_epoch is not None:
            on_epoch(log)

    model.train()
    with timer.phase("finalize"):
        finalize_batches = epoch_batches(data.train, schedule.batch_size, seed, schedule.epochs, augment, device)
        method.finalize(model, finalize_batches, ctx)
    with timer.phase("eval"):
        accuracy = evaluate_bits(model, method, data.test, spec.evaluated_bits, schedule.eval_batch_size,
                                 device)
    record = make_record(spec, method_spec, method, seed, model, accuracy, ctx, timer, device, log)
    if store is not None:
        store.save_record(method_spec, seed, record)
    return CellOutcome(record, log)


def make_record(spec: RunSpec, method_spec: str, method: Method, seed: int, model, accuracy, ctx: RunContext,
                timer: PhaseTimer, device: torch.device, log) -> dict[str, Any]:
    hours = timer.hours()
    per_bits = {
        str(b): {**accuracy[b], "storage_bytes": method.storage(model, b), "sample_passes": ctx.passes.get(b, 0)}
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
        "schedule": spec.schedule.to_dict(),
        "train_subset": spec.train_subset,
        "results": per_bits,
        "storage_total_bytes": method.storage_total(model, spec.bits),
        "seconds": {phase: timer.seconds.get(phase, 0.0) for phase in hours},
        "device_hours": sum(hours.values()),
        "device_hours_by_phase": hours,
        "device": device_name(device),
        "num_devices": 1,
        "sample_passes_total": sum(ctx.passes.values()),
        "log": log,
    }
