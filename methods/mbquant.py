"""MBQuant as an mbqbench method.

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117 (earlier name MultiQuant). Re-implemented from the
paper's formulas and a reading of the authors' code (zysxmu/MultiQuant).

* Topology: every weight stays at 2 bits. With ``G = max(bits) / 2`` branches, each a copy of the network body,
  a ``b``-bit network runs ``b / 2`` branches, so its cost equals one ``b``-bit network. Realized as a
  ``G``-times wider body of grouped convolutions (group ``g`` = branch ``g``,
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
  (:func:`methods.quant.branches.amortized_selection`); {2, 4, 6, 8}: {0}, {1, 2}, {1, 2, 3}, {0, 1, 2, 3}.
* Training step (in-place distillation), bit-widths descending: the largest with ``CE(z, y)``; its detached
  softmax is the teacher ``p``; every other ``b``: ``(soft-CE(z_b, p) + CE(z_b, y)) / 2``; backward each.
* Optimizers: model weights follow the harness schedule; the bounds are a group with Adam, lr ``quant_lr``
  (1e-4), no weight decay; the harness scales both by the same schedule curve (cosine in the paper).
* Storage at ``b``: the ``b / 2`` active branches' 2-bit weights (``b`` bits per base weight), the FP stem (for
  resnet20 only the active branches' slices of it and of its BN), the FC, ``b``'s BN, and the active branches'
  bounds. The whole set: every branch (``2G`` bits per base weight), every bit-width's BN and activation bounds.

Supported: ``resnet20``, ``preact_resnet20`` (not in the paper: pre-activation branch blocks and a final
per-bit-width BN before the branch mean, by analogy) and ``resnet18``; even bit-widths 2..16 (odd ones: see
``odd_bits`` below). The branch network follows the harness topology (:mod:`harness.topology`): its layers
carry the sites' names and are checked against the full-precision model's shapes at build time.

UNRESOLVED details (spec default, each a config option):

* ``bounds_by="branch"``: weight bounds belong to a branch (the paper); "position" indexes them by position in
  the active window, as the authors' code does (position p starts from branch p's init).
* ``shortcut="quantized"``: the stride-2 projection shortcut (1x1 conv + switchable BN; ResNet-20 option B of
  the harness) is a 2-bit grouped body conv like the others; "full_precision" keeps its weights and input FP.
* ``ste_scale=0.0``: the code's backward scaling factor (EWGS-style), 0 = plain STE.
* ``init_batch_size=None``: the bounds are initialized on the first ``init_batch_size`` samples (None: the
  schedule's batch size, 128 without one) of a permutation seeded by the run seed.
* ``odd_bits="error"``: odd bit-widths are refused; the code's partial "1-bit" branch (``partial_branch``) is
  not implemented and requesting it is a ConfigError.
* ``distill="on"`` (in-place distillation); "off" trains every bit-width with CE on labels (Fig. 3 ablation).
* ``selection="amortized"``; "serial" always starts at branch 0 (Fig. 3 ablation).
* ``std`` in the initialization is the unbiased (Bessel-corrected) one, torch's default.
* Before ``prepare`` runs, activation bounds are ``[0, 3]``; weight bounds already follow the formula.
* resnet18 (no option): the stem follows ``harness.models`` (the spec's 7x7 stride 2 + max-pool at ImageNet size,
  3x3 stride 1 below 128 pixels), and the run's width scales it (``64w`` per branch), which the harness's
  full-precision resnet18 does not allow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import MethodConfig, check_positive
from harness.errors import ConfigError
from harness.method import Batch, Method, RunContext
from harness.models import InputNorm, ResNet18, stage_widths, tag
from harness.registry import register_method
from harness.topology import Site, Topology, declare_topology, site_role, tag_blocks, tag_sites
from methods.anyprecision import create_fp_model
from methods.quant.branches import (
    BranchAverage,
    BranchConv2d,
    BranchStemConv2d,
    BranchSwitchableBatchNorm2d,
    BranchTile,
    Selection,
    SharedBranchBatchNorm2d,
    amortized_selection,
    channel_shuffle,
    serial_selection,
)
from methods.quant.distill import soft_cross_entropy
from methods.quant.modules import set_model_bits

MAX_BITS = 16
DEFAULT_INIT_BATCH = 128
SUPPORTED_MODELS = ("resnet20", "preact_resnet20", "resnet18")


@dataclass(frozen=True)
class MBQuantConfig(MethodConfig):
    selection: Literal["amortized", "serial"] = "amortized"
    bounds_by: Literal["branch", "position"] = "branch"
    distill: Literal["on", "off"] = "on"
    shortcut: Literal["quantized", "full_precision"] = "quantized"
    quant_lr: float = 1e-4
    ste_scale: float = 0.0
    init_batch_size: int | None = None
    odd_bits: Literal["error", "partial_branch"] = "error"
    shuffle: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("mbquant quant_lr", self.quant_lr)
        check_positive("mbquant ste_scale", self.ste_scale, allow_zero=True)
        if self.init_batch_size is not None:
            check_positive("mbquant init_batch_size", self.init_batch_size)
        if self.odd_bits == "partial_branch":
            raise ConfigError("mbquant odd_bits=partial_branch (the code's partial 1-bit branch) is not implemented; "
                              "use even bit-widths")


class MultiBranchBlock(nn.Module):
    """ResNet basic block of branch convs: conv-BN-ReLU-conv-BN plus shortcut, then ReLU, per branch.

    ``shuffle``: in a block with a projection shortcut, the residual output is channel-shuffled over the active
    branches before the add (the spec's ResNet-18), which mixes branches.
    """

    def __init__(self, in_per_branch: int, out_per_branch: int, stride: int, num_branches: int,
                 selection: Selection, cfg: MBQuantConfig, shuffle: bool) -> None:
        super().__init__()

        def conv(cin: int, cout: int, kernel: int, stride: int, quantized: bool = True) -> BranchConv2d:
            return BranchConv2d(cin, cout, kernel, stride, kernel // 2, num_branches, selection, quantized=quantized,
                                bounds_by=cfg.bounds_by, backward_scaling=cfg.ste_scale)

        self.conv1 = conv(in_per_branch, out_per_branch, 3, stride)
        self.bn1 = BranchSwitchableBatchNorm2d(out_per_branch, selection)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_per_branch, out_per_branch, 3, 1)
        self.bn2 = BranchSwitchableBatchNorm2d(out_per_branch, selection)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_per_branch != out_per_branch:
            self.downsample = nn.Sequential(
                tag(conv(in_per_branch, out_per_branch, 1, stride, quantized=cfg.shortcut == "quantized"), "shortcut"),
                BranchSwitchableBatchNorm2d(out_per_branch, selection),
            )
        self.shuffle = shuffle and self.downsample is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shuffle:
            out = channel_shuffle(out, self.conv1.window[1])
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class MultiBranchPreActBlock(nn.Module):
    """Pre-activation block of branch convs (as :class:`harness.models.PreActBlock`): BN-ReLU-conv-BN-ReLU-conv
    plus shortcut, per branch; a downsampling shortcut reads the first ReLU's output."""

    def __init__(self, in_per_branch: int, out_per_branch: int, stride: int, num_branches: int,
                 selection: Selection, cfg: MBQuantConfig, shuffle: bool = False) -> None:
        super().__init__()

        def conv(cin: int, cout: int, kernel: int, stride: int, quantized: bool = True) -> BranchConv2d:
            return BranchConv2d(cin, cout, kernel, stride, kernel // 2, num_branches, selection, quantized=quantized,
                                bounds_by=cfg.bounds_by, backward_scaling=cfg.ste_scale)

        self.bn1 = BranchSwitchableBatchNorm2d(in_per_branch, selection)
        self.act1 = nn.ReLU()
        self.conv1 = conv(in_per_branch, out_per_branch, 3, stride)
        self.bn2 = BranchSwitchableBatchNorm2d(out_per_branch, selection)
        self.act2 = nn.ReLU()
        self.conv2 = conv(out_per_branch, out_per_branch, 3, 1)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_per_branch != out_per_branch:
            self.shortcut = nn.Sequential(
                tag(conv(in_per_branch, out_per_branch, 1, stride, quantized=cfg.shortcut == "quantized"), "shortcut"),
                BranchSwitchableBatchNorm2d(out_per_branch, selection),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class MultiBranchResNet(nn.Module):
    """A ResNet whose body is ``num_branches`` 2-bit branches; ``set_model_bits`` selects the active window.

    ``stem`` maps the normalized input to the active branches' channels; stages of ``blocks_per_stage`` basic
    blocks (stride 2 at the first block of every stage after the first); branch mean, global pool, FC.
    """

    def __init__(self, *, stem: nn.Module, widths: Sequence[int], blocks_per_stage: int, num_classes: int, mean,
                 std, num_branches: int, selection: Selection, cfg: MBQuantConfig, shuffle: bool,
                 block: type[nn.Module] = MultiBranchBlock, final_norm: bool = False) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.selection = dict(selection)
        self.input_norm = InputNorm(mean, std)
        self.stem = stem
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for stage, out_width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_width, out_width, stride, num_branches, selection, cfg, shuffle))
                in_width = out_width
        self.blocks = nn.Sequential(*blocks)
        # Pre-activation networks end with a BN (per bit-width and branch here) before pooling, no ReLU.
        self.final_norm = BranchSwitchableBatchNorm2d(in_width, selection) if final_norm else nn.Identity()
        self.branch_mean = BranchAverage(in_width, selection)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = tag(nn.Linear(in_width, num_classes), "head")

    def branch_convs(self) -> list[BranchConv2d]:
        return [m for m in self.modules() if isinstance(m, BranchConv2d)]

    def bound_parameters(self) -> list[nn.Parameter]:
        return [p for conv in self.branch_convs() for p in conv.bound_parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input_norm(x))
        x = self.pool(self.branch_mean(self.final_norm(self.blocks(x))))
        return self.fc(torch.flatten(x, 1))


def multi_branch_resnet20(num_classes: int, data_info: Any, width: float, num_branches: int, selection: Selection,
                          cfg: MBQuantConfig) -> MultiBranchResNet:
    """CIFAR ResNet-20 (16/32/64 x width per branch): every branch has its own slice of the full-precision
    3x3 stem (in -> 16G) and of one plain BN shared by all bit-widths."""
    widths = stage_widths(width)
    stem = nn.Sequential(BranchStemConv2d(data_info.in_chans, widths[0], 3, num_branches, selection),
                         SharedBranchBatchNorm2d(widths[0], num_branches, selection), nn.ReLU())
    return MultiBranchResNet(stem=stem, widths=widths, blocks_per_stage=3, num_classes=num_classes,
                             mean=data_info.mean, std=data_info.std, num_branches=num_branches, selection=selection,
                             cfg=cfg, shuffle=bool(cfg.shuffle))


def multi_branch_preact_resnet20(num_classes: int, data_info: Any, width: float, num_branches: int,
                                 selection: Selection, cfg: MBQuantConfig) -> MultiBranchResNet:
    """Pre-activation ResNet-20 (as ``harness.models``' ``preact_resnet20``; not in the paper, built by analogy with
    its ResNet-20): each branch its own slice of the full-precision stem, no BN or ReLU after it, pre-activation
    branch blocks, a final per-bit-width BN, then the branch mean, pooling and the FC."""
    widths = stage_widths(width)
    stem = BranchStemConv2d(data_info.in_chans, widths[0], 3, num_branches, selection)
    return MultiBranchResNet(stem=stem, widths=widths, blocks_per_stage=3, num_classes=num_classes,
                             mean=data_info.mean, std=data_info.std, num_branches=num_branches, selection=selection,
                             cfg=cfg, shuffle=False, block=MultiBranchPreActBlock, final_norm=True)


def multi_branch_resnet18(num_classes: int, data_info: Any, width: float, num_branches: int, selection: Selection,
                          cfg: MBQuantConfig) -> MultiBranchResNet:
    """ResNet-18 (64/128/256/512 x width per branch): one shared full-precision stem (as ``harness.models``:
    7x7 stride 2 + max-pool at 128 pixels and more, else 3x3 stride 1) and plain BN, whose output every active
    branch receives a copy of; channel shuffle in the downsampling blocks unless ``shuffle=false``."""
    base = max(1, int(round(64 * width)))
    large = (getattr(data_info, "image_size", None) or 0) >= ResNet18.SMALL_INPUT_LIMIT
    conv = nn.Conv2d(data_info.in_chans, base, 7, 2, 3, bias=False) if large else nn.Conv2d(
        data_info.in_chans, base, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    stem = nn.Sequential(tag(conv, "stem"), nn.BatchNorm2d(base), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1) if large else nn.Identity(), BranchTile(selection))
    return MultiBranchResNet(stem=stem, widths=(base, 2 * base, 4 * base, 8 * base), blocks_per_stage=2,
                             num_classes=num_classes, mean=data_info.mean, std=data_info.std,
                             num_branches=num_branches, selection=selection, cfg=cfg,
                             shuffle=True if cfg.shuffle is None else cfg.shuffle)


BUILDERS = {"resnet20": multi_branch_resnet20, "preact_resnet20": multi_branch_preact_resnet20,
            "resnet18": multi_branch_resnet18}


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


def tag_mbquant_sites(model: MultiBranchResNet, topology: Topology, check) -> None:
    """Give the branch network's layers and blocks the names of the harness topology's sites, in order."""
    layers = [(site_role(m), m) for m in model.modules()
              if isinstance(m, (BranchConv2d, BranchStemConv2d, nn.Conv2d, nn.Linear))]
    tag_sites(topology, layers, check=check)
    tag_blocks(topology, list(model.blocks))
    model.mbq_topology = topology


@torch.no_grad()
def initialize_bounds(model: MultiBranchResNet, x: torch.Tensor) -> None:
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
        odd = [b for b in bits if b % 2]
        if odd:
            raise ConfigError(f"mbquant needs even bit-widths 2..{MAX_BITS} (each b runs b/2 two-bit branches); "
                              f"{odd[0]} is odd and the partial-branch odd bit-widths are not implemented")
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
        model = BUILDERS[model_name](num_classes, data_info, width, max(bits) // 2, selection, self.cfg)
        tag_mbquant_sites(model, topology, check)
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
