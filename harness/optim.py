"""Optimizers from the shared schedule and a method's parameter groups, and the per-step lr update."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.config import OPTIMIZERS, Schedule
from harness.errors import ConfigError


def build_optimizers(model: nn.Module, groups: list[dict[str, Any]] | None,
                     schedule: Schedule) -> list[torch.optim.Optimizer]:
    """One optimizer per optimizer kind named by the groups (default: the schedule's), in a fixed order.

    Each group's ``lr`` (default ``schedule.lr``) is stored as ``base_lr`` and scaled by the schedule each step.
    """
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for group in groups:
        group = dict(group)
        kind = group.pop("optimizer", schedule.optimizer)
        if kind not in OPTIMIZERS:
            raise ConfigError(f"parameter group asks for unknown optimizer {kind!r}")
        group.setdefault("lr", schedule.lr)
        group.setdefault("weight_decay", schedule.weight_decay)
        group["base_lr"] = group["lr"]
        group["params"] = list(group["params"])
        if group["params"]:
            by_kind.setdefault(kind, []).append(group)
    optimizers = []
    for kind in sorted(by_kind):
        if kind == "sgd":
            optimizers.append(torch.optim.SGD(by_kind[kind], lr=schedule.lr, momentum=schedule.momentum,
                                              nesterov=schedule.nesterov and schedule.momentum > 0))
        elif kind == "adam":
            optimizers.append(torch.optim.Adam(by_kind[kind], lr=schedule.lr))
        else:
            optimizers.append(torch.optim.AdamW(by_kind[kind], lr=schedule.lr))
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Scale every group's base lr by ``factor``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


def step_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    """Step every optimizer, then bump its parameters' version counters.

    Values cached per version of a parameter (``methods.quant.version_cache``, the evaluation weight cache) rely on
    an update moving the version; the for-loop and foreach optimizers move it, but a fused kernel writes the
    parameters without doing so. One bump per step makes that hold for every optimizer.
    """
    for optimizer in optimizers:
        optimizer.step()
    params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    torch.autograd.graph.increment_version(params)
