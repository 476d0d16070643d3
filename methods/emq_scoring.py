"""EMQ's scoring phase (Algorithm 2) and its re-scoring during training.

Kim, An, Jeon, Ko, NeurIPS 2025, arXiv 2510.20673, Sec. 4.2 and Tables 20-21 (the cost of re-scoring).

A scoring run trains a copy of a network on the full training set for ``score_epochs`` epochs (train mode,
augmentation on, the schedule's base lr constant unless ``score_lr="compressed"``), handing each epoch's softmax
outputs to a coreset selector (:mod:`methods.quant.coreset_selectors`), which turns them into one score per
sample. Bit-wise scoring (the paper) runs one copy per bit-width; batch-wise scoring (Table 7's ablation) one
joint multi-bit run. A selector that needs no scoring (``random``) runs nothing.

Each scoring run reads its own batch stream, seeded by (run seed, bit-width, epoch at which it scores), so a
resumed run re-scores exactly as the first. The scoring phase before training is checkpointed after every scoring
epoch (``method.scoring_progress``: the finished bit-widths' scores and the running one's network, optimizers and
selector); a killed run resumes at the next scoring epoch and ends with the scores of an uninterrupted one.
Re-scoring phases during training are not checkpointed: a run killed in one repeats it from its start.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness import distributed
from harness.data import ImageSet
from harness.errors import ConfigError, TrainingDiverged
from harness.loader import epoch_batches, steps_per_epoch
from harness.method import RunContext
from harness.models import role_of
from harness.optim import build_optimizers, set_lr, step_optimizers
from methods.emq_config import scoring_lr_factor
from methods.quant.coreset_selectors import Selector, get_selector

# Scoring runs read their batches with seed + SCORING_SEED_STRIDE * (bits + 1) + RESCORING_SEED_STRIDE * epoch.
SCORING_SEED_STRIDE = 7919
RESCORING_SEED_STRIDE = 104_729
FEATURE_BATCH = 512


def scoring_seed(seed: int, bits: int, epoch: int = 0) -> int:
    """Seed of the batch stream a scoring run at ``bits`` started before training epoch ``epoch`` reads."""
    return seed + SCORING_SEED_STRIDE * (bits + 1) + RESCORING_SEED_STRIDE * epoch


@torch.no_grad()
def head_features(method: Any, network: nn.Module, train_set: ImageSet, bits: int,
                  device: torch.device) -> torch.Tensor:
    """The classifier's input for every training sample (eval mode, no augmentation) at ``bits``."""
    head = next(m for m in network.modules() if role_of(m) == "head")
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach().flatten(1)))
    was_training = network.training
    network.eval()
    method.set_bits(network, bits)
    try:
        for start in range(0, len(train_set), FEATURE_BATCH):
            network(train_set.get_batch(torch.arange(start, min(start + FEATURE_BATCH, len(train_set)))).to(device))
    finally:
        hook.remove()
        network.train(was_training)
    return torch.cat(captured)


def scoring_run(method: Any, initial: nn.Module, train_set: ImageSet, bits: tuple[int, ...], stream_seed: int,
                ctx: RunContext) -> dict[int, torch.Tensor]:
    """Train a copy of ``initial`` on the full data at ``bits`` jointly; the selector's scores per bit-width."""
    cfg, schedule = method.cfg, ctx.schedule
    selector_class = get_selector(cfg.selector)
    network = copy.deepcopy(initial)
    network.train()
    optimizers = build_optimizers(network, method.param_groups(network), schedule)
    augment = bool(schedule.augment) and ctx.data_info is not None and ctx.data_info.augment != "none"
    num_samples = len(train_set)
    steps = steps_per_epoch(num_samples, schedule.batch_size)
    selectors: dict[int, Selector] = {b: selector_class(num_samples, tdds_window=cfg.tdds_window,
                                                        tdds_beta=cfg.tdds_beta) for b in bits}
    labels = train_set.labels.to(ctx.device)
    score_epochs = cfg.scoring_epochs(schedule.epochs)
    if cfg.selector == "tdds" and cfg.tdds_window is not None and cfg.tdds_window > score_epochs - 1:
        raise ConfigError(f"emq tdds_window must be in 2..score_epochs-1 = {score_epochs - 1}, got {cfg.tdds_window}")
    progress = getattr(method, "scoring_progress", None)
    first_epoch = 0
    running = progress.get("running") if progress is not None else None
    if running is not None and tuple(running["bits"]) == tuple(bits):  # resume an interrupted scoring run
        network.load_state_dict(running["network"])
        for optimizer, saved in zip(optimizers, running["optimizers"]):
            optimizer.load_state_dict(saved)
        for b in bits:
            selectors[b].load_state_dict(running["selectors"][b])
        first_epoch = int(running["epochs_done"])
    for epoch in range(first_epoch, score_epochs):
        probabilities = {b: torch.zeros(num_samples, ctx.num_classes, device=ctx.device) for b in bits}
        batches = epoch_batches(train_set, schedule.batch_size, stream_seed, epoch, augment, ctx.device,
                                workers=ctx.workers)
        label = f"emq scoring {'/'.join(map(str, bits))}-bit ep{epoch + 1}/{score_epochs}"
        for index, batch in enumerate(tqdm(batches, total=steps, desc=label, leave=False,
                                           disable=not ctx.show_progress, dynamic_ncols=True)):
            set_lr(optimizers, scoring_lr_factor(schedule, cfg.score_lr, epoch, index, steps, score_epochs))
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            losses, outputs = method.train_bits(network, batch, bits, ctx)
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingDiverged(f"emq scoring run at {bits} bits diverged in scoring epoch {epoch + 1} "
                                       f"(try a lower --lr)")
            distributed.all_reduce_gradients(network)  # under torchrun the scoring run is data-parallel too
            step_optimizers(optimizers)
            rows = batch.indices.to(ctx.device)
            for b in bits:
                probabilities[b][rows] = F.softmax(outputs[b].float(), dim=1)
        for b in bits:
            distributed.all_reduce_sum(probabilities[b])  # each rank filled only its shards' rows
            selectors[b].add_epoch(probabilities[b], labels)
        if progress is not None:
            progress["running"] = {"bits": list(bits), "epochs_done": epoch + 1, "network": network.state_dict(),
                                   "optimizers": [o.state_dict() for o in optimizers],
                                   "selectors": {b: selectors[b].state_dict() for b in bits}}
            ctx.checkpoint_prepare()
    if selector_class.needs_features:
        for b in bits:
            selectors[b].add_features(head_features(method, network, train_set, b, ctx.device), labels)
    return {b: selectors[b].scores().cpu() for b in bits}


def score_training_set(method: Any, model: nn.Module, train_set: ImageSet, ctx: RunContext,
                       epoch: int = 0) -> torch.Tensor:
    """Scores ``(bit-widths ascending, N)`` from scoring runs that start from ``model`` before epoch ``epoch``."""
    bits = tuple(sorted(ctx.bits))
    if not get_selector(method.cfg.selector).needs_scoring:
        return torch.zeros(len(bits), len(train_set), dtype=torch.float64)
    initial = copy.deepcopy(model)  # every scoring run starts from the same state of the main network
    # Through the method, so that its scoring seeds and runs can be replaced (tests, subclasses).
    offset = RESCORING_SEED_STRIDE * epoch
    progress = getattr(method, "scoring_progress", None)
    done: dict[int, torch.Tensor] = progress.setdefault("done", {}) if progress is not None else {}
    runs = [(b,) for b in bits] if method.cfg.scoring == "bitwise" else [bits]
    for run_bits in runs:
        if all(b in done for b in run_bits):
            continue
        stream = method.scoring_seed(ctx.seed, run_bits[0] if len(run_bits) == 1 else 0) + offset
        done.update(method.scoring_run(initial, train_set, run_bits, stream, ctx))
        if progress is not None:
            progress["running"] = None
    return torch.stack([done[b] for b in bits])
