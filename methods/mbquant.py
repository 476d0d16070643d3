"""MBQuant as an mbqbench method.

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117 (earlier name MultiQuant). Re-implemented from the
paper's formulas and a reading of the authors' code (zysxmu/MultiQuant).

* Topology: every weight stays at 2 bits. With ``G = ceil(max(bits) / 2)`` branches, each a copy of the network
  body, a ``b``-bit network runs ``floor(b / 2)`` branches, and at an odd ``b`` also a partial branch (a narrower
  slice of the next branch), so its cost is about one ``b``-bit network's (:mod:`methods.mbquant_networks`).
  Realized as a ``G``-times wider body of grouped convolutions (group ``g`` = branch ``g``,
  :class:`methods.quant.branches.BranchConv2d`); switchable BN (one per bit-width over the active channels);
  after the last block the active branches' outputs are averaged -> global average pool -> shared FP FC.

  - ``resnet20`` (CIFAR, ``16w/32w/64w`` per branch, ``w`` = the run's width): full-precision stem (3x3,
    in -> 16G, each branch its own 16-channel slice) with one plain BN shared by all bit-widths.
  - ``resnet18`` (``64w..512w`` per branch): one shared FP stem (7x7 stride 2 + max-pool at 128 pixels and more,
    else 3x3 stride 1, like ``harness.models``) and plain BN, its output copied to every active branch; in the
    first block of stages 2-4 the residual output is channel-shuffled (ShuffleNet, ``g`` = active branches)
    before the shortcut add (``shuffle``, default on for resnet18, off for resnet20).
* Quantizers: ``W_q = 2 round(3 clamp((w - l_W) / (u_W - l_W), 0, 1)) / 3 - 1`` (levels -1, -1/3, 1/3, 1) with
  ``l_W, u_W`` per layer and branch; inputs of every body conv ``x_q = round((2^b - 1) x_n) / (2^b - 1)``,
  ``x_n = clamp((x - l_A) / (u_A - l_A), 0, 1)`` with ``l_A, u_A`` per layer, branch and bit-width. STE.
* Bounds initialization (``prepare``, one batch, no grad, train mode, one forward per bit-width, descending):
  ``u_W = 3 std(w_branch)``, ``l_W = -3 std(w_branch)``; ``u_A = 3 std(x) / sqrt(1 - 2/pi)``, ``l_A = min(x)``.
* Amortized branch selection: contiguous windows whose starts spread branch usage over bit-widths
  (:func:`methods.quant.branch_selection.amortized_selection`); {2, 4, 6, 8}: {0}, {1, 2}, {1, 2, 3}, {0, 1, 2, 3};
  odd bit-widths as the authors' code: 3 -> {0} + part of 1, 5 -> {1, 2} + part of 3, 7 -> {0, 1, 2} + part of 3.
  The {2, 3, 4} setting of the paper's ImageNet table uses ``selection=serial`` (the code's choice for that set).
* Training step (in-place distillation), bit-widths descending: the largest with ``CE(z, y)``; its detached
  softmax is the teacher ``p``; every other ``b``: ``(soft-CE(z_b, p) + CE(z_b, y)) / 2``; backward each.
* Optimizers: model weights follow the harness schedule; the bounds are a group with Adam, lr ``quant_lr``
  (1e-4), no weight decay; the harness scales both by the same schedule curve (cosine in the paper).
* Storage at ``b``: the ``b / 2`` active branches' 2-bit weight codes (``b`` bits per base weight), the FP stem
  (for resnet20 only the active branches' slices of it and of its BN), the FC, ``b``'s BN, and the active
  branches' activation bounds (no weight bounds: the levels are fixed, so the codes alone give the weights). The
  whole set: every branch (``2G`` bits per base weight; per window position with ``bounds_by=position``), every
  partial slice's own codes, every bit-width's BN and activation bounds (what ``cli.py export`` writes).

Supported: ``resnet8`` (ResNet-20 with one block per stage, not in the paper), ``resnet20``,
``preact_resnet20`` (not in the paper: pre-activation branch blocks and a final per-bit-width BN before the branch
mean, by analogy), ``resnet18`` and ``mobilenetv1``; bit-widths 2..16. The
branch network follows the harness topology (:mod:`harness.topology`): its layers carry the sites' names and
are checked against the full-precision model's shapes at build time. Documentation: ``docs/methods/mbquant.md``.

UNRESOLVED details (defaults, each a config option):

* ``bounds_by="branch"``: weight bounds belong to a branch (the paper); "position" indexes them by position in
  the active window, as the authors' code does (position p starts from branch p's init).
* ``shortcut="quantized"``: the stride-2 projection shortcut (1x1 conv + switchable BN; ResNet-20 option B of
  the harness) is a 2-bit grouped body conv like the others; "full_precision" keeps its weights and input FP.
* ``ste_scale=0.0``: the code's backward scaling factor (EWGS-style), 0 = plain STE.
* ``init_batch_size=None``: the bounds are initialized on the first ``init_batch_size`` samples (None: the
  schedule's batch size, 128 without one) of a permutation seeded by the run seed.
* ``odd_bits="partial_branch"``: an odd bit-width runs the partial branch (the code's "1-bit" branch: its weights
  are 2-bit like the others, with their own bounds, activation bounds and BN); "error" refuses odd bit-widths.
  Partial widths are the code's (:mod:`methods.mbquant_networks`). Where the code's first conv of a block reads
  only part of the partial branch's input channels (8 of 16 in ResNet-20's stage 1), every partial conv here reads
  all of them: the partial branch is a narrower sub-network. The code shuffles the whole residual of ResNet-18's
  downsampling blocks; here only the full branches' channels are shuffled and the partial branch's stay last.
* ``distill="on"`` (in-place distillation); "off" trains every bit-width with CE on labels (Fig. 3 ablation).
* ``selection="amortized"``; "serial" always starts at branch 0 (Fig. 3 ablation).
* ``std`` in the initialization is the unbiased (Bessel-corrected) one, torch's default.
* Before ``prepare`` runs, activation bounds are ``[0, 3]``; weight bounds already follow the formula.
* resnet18 (no option): the stem follows ``harness.models`` (the usual 7x7 stride 2 + max-pool at ImageNet size,
  3x3 stride 1 below 128 pixels), and the run's width scales it (``64w`` per branch), which the harness's
  full-precision resnet18 does not allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import check_positive
from harness.errors import ConfigError
from harness.method import Batch, Method, RunContext
from harness.method_config import MethodConfig
from harness.registry import register_method
from harness.topology import Site, Topology, declare_topology, site_role, tag_blocks, tag_sites
from methods.anyprecision import create_fp_model
from methods.mbquant_networks import BUILDERS, MultiBranchNetwork
from methods.quant import native
from methods.quant.branch_selection import MIN_BITS, amortized_selection, num_branches, serial_selection
from methods.quant.branches import BranchConv2d, BranchStemConv2d
from methods.quant.distill import soft_cross_entropy
from methods.quant.modules import set_model_bits

MAX_BITS = 16
DEFAULT_INIT_BATCH = 128
SUPPORTED_MODELS = ("resnet8", "resnet20", "preact_resnet20", "resnet18", "mobilenetv1")


@dataclass(frozen=True)
class MBQuantConfig(MethodConfig):
    selection: Literal["amortized", "serial"] = "amortized"
    bounds_by: Literal["branch", "position"] = "branch"
    distill: Literal["on", "off"] = "on"
    shortcut: Literal["quantized", "full_precision"] = "quantized"
    quant_lr: float = 1e-4
    ste_scale: float = 0.0
    init_batch_size: int | None = None
    odd_bits: Literal["partial_branch", "error"] = "partial_branch"
    shuffle: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("mbquant quant_lr", self.quant_lr)
        check_positive("mbquant ste_scale", self.ste_scale, allow_zero=True)
        if self.init_batch_size is not None:
            check_positive("mbquant init_batch_size", self.init_batch_size)


def mbquant_topology(model_name: str, num_classes: int, data_info: Any, width: float,
                     cfg: MBQuantConfig) -> tuple[Topology, Callable[[Site, nn.Module], str | None]]:
    """The harness topology of the full-precision ``model_name`` (one branch's shapes), with MBQuant's departure,
    and a check that a branch layer has its site's per-branch shape."""
    with torch.random.fork_rng():  # the reference model must not shift the branch network's initialization
        fp_model = create_fp_model(model_name, num_classes, data_info, width)
    topology = declare_topology(fp_model, model_name)
    if cfg.shortcut == "full_precision":
        topology = topology.depart("shortcut=full_precision: shortcut branch convolutions and their inputs full "
                                   "precision (MBQuant option)", roles=("shortcut",), quantize_weight=False,
                                   quantize_input=False)
    shapes = {name: m for name, m in fp_model.named_modules()}

    def check(site: Site, layer: nn.Module) -> str | None:
        reference = shapes[site.name]
        if isinstance(layer, BranchConv2d):
            ours = (layer.in_per_branch, layer.out_per_branch, layer.weight.shape[-1], layer.stride)
            theirs = (reference.in_channels, reference.out_channels, reference.kernel_size[0], reference.stride[0])
            return None if ours == theirs else f"per-branch (in, out, kernel, stride) {ours} vs {theirs}"
        if isinstance(layer, BranchStemConv2d):
            ok = layer.out_per_branch == reference.out_channels
            return None if ok else f"{layer.out_per_branch} output channels per branch vs {reference.out_channels}"
        same = tuple(layer.weight.shape) == tuple(reference.weight.shape)
        return None if same else f"weight shape {tuple(layer.weight.shape)} vs {tuple(reference.weight.shape)}"

    return topology, check


def tag_mbquant_sites(model: MultiBranchNetwork, topology: Topology, check) -> None:
    """Give the branch network's layers and blocks the names of the harness topology's sites, in order."""
    layers = [(site_role(m), m) for m in model.modules()
              if isinstance(m, (BranchConv2d, BranchStemConv2d, nn.Conv2d, nn.Linear))]
    tag_sites(topology, layers, check=check)
    tag_blocks(topology, list(model.blocks) if model.residual else [])
    model.mbq_topology = topology


@torch.no_grad()
def initialize_bounds(model: MultiBranchNetwork, x: torch.Tensor) -> None:
    """Weight bounds from each branch's weights; activation bounds from one forward of ``x`` per bit-width
    (descending), each layer setting its bounds from its own input before quantizing it."""
    convs = model.branch_convs()
    for conv in convs:
        if conv.quantized:
            conv.initialize_weight_bounds()
    try:
        for conv in convs:
            conv.calibrating = True
        for bits in sorted(model.selection, reverse=True):
            set_model_bits(model, bits)
            model(x)
    finally:
        for conv in convs:
            conv.calibrating = False


@register_method("mbquant")
class MBQuant(Method):
    """MBQuant: fixed 2-bit branches, amortized branch selection, in-place distillation."""

    Config = MBQuantConfig
    cfg: MBQuantConfig
    supported_models = SUPPORTED_MODELS

    def check_bits(self, bits: tuple[int, ...]) -> None:
        too_low = [b for b in bits if b < MIN_BITS]
        if too_low:
            raise ConfigError(f"mbquant needs at least {MIN_BITS} bits (one 2-bit branch), got {too_low[0]}")
        odd = [b for b in bits if b % 2]
        if odd and self.cfg.odd_bits == "error":
            raise ConfigError(f"mbquant with odd_bits=error needs even bit-widths (each b runs b/2 two-bit branches); "
                              f"{odd[0]} is odd (odd_bits=partial_branch serves it)")
        too_high = [b for b in bits if b > MAX_BITS]
        if too_high:
            raise ConfigError(f"mbquant supports bit-widths up to {MAX_BITS} (max(bits)/2 branches), "
                              f"got {too_high[0]}; it has no full-precision mode")

    def selection_for(self, bits: tuple[int, ...]) -> dict[int, tuple[int, int]]:
        self.check_bits(bits)
        return amortized_selection(bits) if self.cfg.selection == "amortized" else serial_selection(bits)

    def build(self, model_name: str, num_classes: int, bits: tuple[int, ...], data_info: Any,
              width: float) -> nn.Module:
        self.check_model(model_name)
        selection = self.selection_for(tuple(bits))
        topology, check = mbquant_topology(model_name, num_classes, data_info, width, self.cfg)
        model = BUILDERS[model_name](num_classes, data_info, width, num_branches(bits), selection, self.cfg)
        tag_mbquant_sites(model, topology, check)
        native.preload()  # the bounded quantizer's native loops: a first build here, not in a timed phase
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        bounds = model.bound_parameters()
        bound_ids = {id(p) for p in bounds}
        weights = [p for p in model.parameters() if id(p) not in bound_ids]
        return [
            {"params": weights},
            {"params": bounds, "optimizer": "adam", "lr": self.cfg.quant_lr, "weight_decay": 0.0},
        ]

    def prepare(self, model: nn.Module, train_set: Any, ctx: RunContext) -> None:
        batch_size = self.cfg.init_batch_size or getattr(ctx.schedule, "batch_size", DEFAULT_INIT_BATCH)
        generator = torch.Generator().manual_seed(ctx.seed)
        indices = torch.randperm(len(train_set), generator=generator)[:batch_size]
        was_training = model.training
        model.train()
        initialize_bounds(model, train_set.get_batch(indices).to(ctx.device))
        model.train(was_training)

    def train_step(self, model: nn.Module, batch: Batch, ctx: RunContext) -> dict[str, float]:
        losses: dict[str, float] = {}
        teacher: torch.Tensor | None = None
        # Every bit-width trains on the common batch: the teacher's targets must belong to the same samples.
        for bits in sorted(ctx.bits, reverse=True):
            self.set_bits(model, bits)
            logits = model(batch.x)
            if teacher is None or self.cfg.distill == "off":
                loss = F.cross_entropy(logits, batch.y)
            else:
                loss = (soft_cross_entropy(logits, teacher) + F.cross_entropy(logits, batch.y)) / 2
            loss.backward()
            ctx.count_passes(bits, len(batch.y))
            if teacher is None:
                teacher = F.softmax(logits.detach(), dim=1)
            losses[f"loss_{bits}"] = loss.item()
        return losses
