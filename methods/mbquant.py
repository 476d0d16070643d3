"""MBQuant as an mbqbench method.

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117 (earlier name MultiQuant). Re-implemented from the
spec ``shared/specs/mbquant.md`` (formulas of the paper and a reading of the authors' code).

* Topology: every weight stays at 2 bits. With ``G = max(bits) / 2`` branches, each a copy of the ResNet-20 body
  (``16w/32w/64w`` channels, ``w`` = the run's width), a ``b``-bit network runs ``b / 2`` branches, so its cost
  equals one ``b``-bit network. Realized as a ``G``-times wider body of grouped convolutions (group ``g`` =
  branch ``g``, :class:`methods.quant.branches.BranchConv2d`). Full-precision stem (3x3, in -> 16G, each branch
  its own 16-channel slice) with one plain BN shared by all bit-widths; switchable BN (one per bit-width over
  the active channels); after the last block the active branches' outputs are averaged (64 channels) -> global
  average pool -> shared full-precision FC.
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
* Storage at ``b``: the ``b / 2`` active branches' 2-bit weights (``b`` bits per base weight), their slices of
  the full-precision stem and its BN, the FC, ``b``'s BN, and the active branches' bounds. The whole set: every
  branch (``2G`` bits per base weight), every bit-width's BN and activation bounds.

Supported: ``resnet20`` only (ResNet-18 with channel shuffle is not implemented); even bit-widths 2..16.

UNRESOLVED details (spec default, each a config option):

* ``bounds_by="branch"``: weight bounds belong to a branch (the paper); "position" indexes them by position in
  the active window, as the authors' code does (position p starts from branch p's init).
* ``shortcut="quantized"``: the stride-2 projection shortcut (1x1 conv + switchable BN; ResNet-20 option B of
  the harness) is a 2-bit grouped body conv like the others; "full_precision" keeps its weights and input FP.
* ``backward_scaling=0.0``: EWGS gradient scaling factor of the code, 0 = plain STE.
* ``init_batch_size=None``: the bounds are initialized on the first ``init_batch_size`` samples (None: the
  schedule's batch size, 128 without one) of a permutation seeded by the run seed.
* ``odd_bits="error"``: odd bit-widths are refused; the code's partial "1-bit" branch (``partial_branch``) is
  not implemented and requesting it is a ConfigError.
* ``distill="inplace"``; "none" trains every bit-width with CE on labels (the paper's Fig. 3 ablation).
* ``selection="amortized"``; "serial" always starts at branch 0 (Fig. 3 ablation).
* ``std`` in the initialization is the unbiased (Bessel-corrected) one, torch's default.
* Before ``prepare`` runs, activation bounds are ``[0, 3]``; weight bounds already follow the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import MethodConfig, check_positive
from harness.errors import ConfigError
from harness.method import Batch, Method, RunContext
from harness.models import InputNorm, stage_widths, tag
from harness.registry import register_method
from methods.quant.branches import (
    BranchAverage,
    BranchConv2d,
    BranchStemConv2d,
    BranchSwitchableBatchNorm2d,
    Selection,
    SharedBranchBatchNorm2d,
    amortized_selection,
    serial_selection,
)
from methods.quant.distill import soft_cross_entropy
from methods.quant.modules import set_model_bits

MAX_BITS = 16
DEFAULT_INIT_BATCH = 128
SUPPORTED_MODELS = ("resnet20",)


@dataclass(frozen=True)
class MBQuantConfig(MethodConfig):
    selection: Literal["amortized", "serial"] = "amortized"
    bounds_by: Literal["branch", "position"] = "branch"
    distill: Literal["inplace", "none"] = "inplace"
    shortcut: Literal["quantized", "full_precision"] = "quantized"
    quant_lr: float = 1e-4
    backward_scaling: float = 0.0
    init_batch_size: int | None = None
    odd_bits: Literal["error", "partial_branch"] = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("mbquant quant_lr", self.quant_lr)
        check_positive("mbquant backward_scaling", self.backward_scaling, allow_zero=True)
        if self.init_batch_size is not None:
            check_positive("mbquant init_batch_size", self.init_batch_size)
        if self.odd_bits == "partial_branch":
            raise ConfigError("mbquant odd_bits=partial_branch (the code's partial 1-bit branch) is not implemented; "
                              "use even bit-widths")


class MultiBranchBlock(nn.Module):
    """ResNet basic block of branch convs: conv-BN-ReLU-conv-BN plus shortcut, then ReLU, per branch."""

    def __init__(self, in_per_branch: int, out_per_branch: int, stride: int, num_branches: int,
                 selection: Selection, cfg: MBQuantConfig) -> None:
        super().__init__()

        def conv(cin: int, cout: int, kernel: int, stride: int, quantized: bool = True) -> BranchConv2d:
            return BranchConv2d(cin, cout, kernel, stride, kernel // 2, num_branches, selection, quantized=quantized,
                                bounds_by=cfg.bounds_by, backward_scaling=cfg.backward_scaling)

        self.conv1 = conv(in_per_branch, out_per_branch, 3, stride)
        self.bn1 = BranchSwitchableBatchNorm2d(out_per_branch, selection)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_per_branch, out_per_branch, 3, 1)
        self.bn2 = BranchSwitchableBatchNorm2d(out_per_branch, selection)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_per_branch != out_per_branch:
            self.downsample = nn.Sequential(
                conv(in_per_branch, out_per_branch, 1, stride, quantized=cfg.shortcut == "quantized"),
                BranchSwitchableBatchNorm2d(out_per_branch, selection),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class MultiBranchResNet20(nn.Module):
    """CIFAR ResNet-20 with ``num_branches`` 2-bit branches; ``set_model_bits`` selects the active window."""

    def __init__(self, num_classes: int, in_chans: int, mean, std, width: float, num_branches: int,
                 selection: Selection, cfg: MBQuantConfig) -> None:
        super().__init__()
        widths = stage_widths(width)
        self.num_branches = num_branches
        self.selection = dict(selection)
        self.input_norm = InputNorm(mean, std)
        self.stem = BranchStemConv2d(in_chans, widths[0], 3, num_branches, selection)
        self.stem_norm = SharedBranchBatchNorm2d(widths[0], num_branches, selection)
        self.stem_act = nn.ReLU()
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for stage, out_width in enumerate(widths):
            for index in range(3):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(MultiBranchBlock(in_width, out_width, stride, num_branches, selection, cfg))
                in_width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.branch_mean = BranchAverage(in_width, selection)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = tag(nn.Linear(in_width, num_classes), "head")

    def branch_convs(self) -> list[BranchConv2d]:
        return [m for m in self.modules() if isinstance(m, BranchConv2d)]

    def bound_parameters(self) -> list[nn.Parameter]:
        return [p for conv in self.branch_convs() for p in conv.bound_parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_norm(self.stem(self.input_norm(x))))
        x = self.pool(self.branch_mean(self.blocks(x)))
        return self.fc(torch.flatten(x, 1))


@torch.no_grad()
def initialize_bounds(model: MultiBranchResNet20, x: torch.Tensor) -> None:
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
        if model_name not in SUPPORTED_MODELS:
            raise ConfigError(f"mbquant builds {', '.join(SUPPORTED_MODELS)} only (its multi-branch topology), "
                              f"got model {model_name!r}")
        selection = self.selection_for(tuple(bits))
        return MultiBranchResNet20(num_classes, data_info.in_chans, data_info.mean, data_info.std, width,
                                   max(bits) // 2, selection, self.cfg)

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
            if teacher is None or self.cfg.distill == "none":
                loss = F.cross_entropy(logits, batch.y)
            else:
                loss = (soft_cross_entropy(logits, teacher) + F.cross_entropy(logits, batch.y)) / 2
            loss.backward()
            ctx.count_passes(bits, len(batch.y))
            if True:
                teacher = F.softmax(logits.detach(), dim=1)
            losses[f"loss_{bits}"] = loss.item()
        return losses
