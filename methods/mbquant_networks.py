"""MBQuant's multi-branch networks: ResNet-20, pre-activation ResNet-20, ResNet-18 and MobileNetV1 bodies of
``G`` 2-bit branches (Zhong et al., Pattern Recognition 2025, arXiv 2305.08117, Sec. 3.1 and Fig. 2).

Every body layer is a branch layer of :mod:`methods.quant.branches`; a bit-width runs its window of full branches
and, when odd, the partial branch (a narrower slice of the next branch). The partial branch's widths are the
authors' code's (at width 1): ResNet-20 16/24/48 channels in stages 1-3, ResNet-18 40/76/184/396, MobileNetV1
52, 40, 101, 148, 223, 373, 404, 236, 376, 419, 233, 892 after its blocks; each scaled by the run's width. The
partial branch reads the whole stem output (a full branch's share), and the network's last layer widens it back
to a full branch, so that the branch mean counts it as one branch (as the code does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from harness.models import MOBILENETV1_BLOCKS, InputNorm, ResNet18, mobilenetv1_widths, stage_widths, tag
from methods.quant.branch_norm import (
    BranchAverage,
    BranchSwitchableBatchNorm2d,
    BranchTile,
    SharedBranchBatchNorm2d,
    channel_shuffle,
    resize_partial,
)
from methods.quant.branch_selection import Selection, has_partial
from methods.quant.branches import BranchConv2d, BranchStemConv2d

RESNET20_PARTIAL = (16, 24, 48)
RESNET18_PARTIAL = (40, 76, 184, 396)
MOBILENETV1_PARTIAL = (52, 40, 101, 148, 223, 373, 404, 236, 376, 419, 233, 892)


def partial_widths(widths: Sequence[int], reference: Sequence[int], width: float) -> tuple[int, ...]:
    """Partial-branch channels at ``width``: the code's counts at width 1 (``reference``), scaled, within 1 and the
    full branch's channels."""
    return tuple(max(1, min(full, int(round(p * width)))) for full, p in zip(widths, reference))


def _branch_conv(cfg: Any, num_branches: int, selection: Selection):
    def conv(cin: int, cout: int, kernel: int, stride: int, partial_in: int | None, partial_out: int | None,
             quantized: bool = True, depthwise: bool = False) -> BranchConv2d:
        return BranchConv2d(cin, cout, kernel, stride, kernel // 2, num_branches, selection, quantized=quantized,
                            bounds_by=cfg.bounds_by, backward_scaling=cfg.ste_scale, partial_in=partial_in,
                            partial_out=partial_out, depthwise=depthwise)
    return conv


def _projection(conv, cfg: Any, selection: Selection, in_per_branch: int, out_per_branch: int, stride: int,
                partial_in: int | None, partial_out: int | None) -> nn.Module | None:
    """The downsampling shortcut (1x1 branch conv + switchable BN; 2-bit unless ``shortcut=full_precision``), or
    None where the block keeps its width and resolution."""
    if stride == 1 and in_per_branch == out_per_branch:
        return None
    return nn.Sequential(
        tag(conv(in_per_branch, out_per_branch, 1, stride, partial_in, partial_out,
                 quantized=cfg.shortcut == "quantized"), "shortcut"),
        BranchSwitchableBatchNorm2d(out_per_branch, selection, partial_out),
    )


class MultiBranchBlock(nn.Module):
    """ResNet basic block of branch convs: conv-BN-ReLU-conv-BN plus shortcut, then ReLU, per branch.

    ``shuffle``: in a block with a projection shortcut, the residual output's full branches are channel-shuffled
    over the active branches before the add (the authors' ResNet-18), which mixes branches. ``partial_in`` /
    ``partial`` / ``partial_out``: the partial branch's channels at the block input, after ``conv1``, at the output.
    """

    def __init__(self, in_per_branch: int, out_per_branch: int, stride: int, num_branches: int,
                 selection: Selection, cfg: Any, shuffle: bool, partial_in: int | None = None,
                 partial: int | None = None, partial_out: int | None = None) -> None:
        super().__init__()
        conv = _branch_conv(cfg, num_branches, selection)
        self.conv1 = conv(in_per_branch, out_per_branch, 3, stride, partial_in, partial)
        self.bn1 = BranchSwitchableBatchNorm2d(out_per_branch, selection, partial)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_per_branch, out_per_branch, 3, 1, partial, partial_out)
        self.bn2 = BranchSwitchableBatchNorm2d(out_per_branch, selection, partial_out)
        self.relu2 = nn.ReLU()
        self.downsample = _projection(conv, cfg, selection, in_per_branch, out_per_branch, stride, partial_in,
                                      partial_out)
        self.shuffle = shuffle and self.downsample is not None
        self.in_per_branch, self.out_per_branch, self.partial_out = in_per_branch, out_per_branch, partial_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.conv1.window
        odd = has_partial(self.conv1.bits)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shuffle:
            full = count * self.out_per_branch
            out = torch.cat((channel_shuffle(out[:, :full], count), out[:, full:]), dim=1) if odd else \
                channel_shuffle(out, count)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        else:
            shortcut = resize_partial(x, count * self.in_per_branch, self.partial_out) if odd else x
        return self.relu2(out + shortcut)


class MultiBranchPreActBlock(nn.Module):
    """Pre-activation block of branch convs (as :class:`harness.models.PreActBlock`): BN-ReLU-conv-BN-ReLU-conv
    plus shortcut, per branch; a downsampling shortcut reads the first ReLU's output."""

    def __init__(self, in_per_branch: int, out_per_branch: int, stride: int, num_branches: int,
                 selection: Selection, cfg: Any, shuffle: bool = False, partial_in: int | None = None,
                 partial: int | None = None, partial_out: int | None = None) -> None:
        super().__init__()
        conv = _branch_conv(cfg, num_branches, selection)
        self.bn1 = BranchSwitchableBatchNorm2d(in_per_branch, selection, partial_in)
        self.act1 = nn.ReLU()
        self.conv1 = conv(in_per_branch, out_per_branch, 3, stride, partial_in, partial)
        self.bn2 = BranchSwitchableBatchNorm2d(out_per_branch, selection, partial)
        self.act2 = nn.ReLU()
        self.conv2 = conv(out_per_branch, out_per_branch, 3, 1, partial, partial_out)
        self.shortcut = _projection(conv, cfg, selection, in_per_branch, out_per_branch, stride, partial_in,
                                    partial_out)
        self.in_per_branch, self.partial_out = in_per_branch, partial_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(activated))))
        if self.shortcut is not None:
            return out + self.shortcut(activated)
        if has_partial(self.conv1.bits):
            x = resize_partial(x, self.conv1.window[1] * self.in_per_branch, self.partial_out)
        return out + x


class MultiBranchDepthwiseSeparable(nn.Module):
    """MobileNetV1 block of branch convs: 3x3 depthwise conv-BN-ReLU, 1x1 pointwise (grouped by branch)
    conv-BN-ReLU; both convolutions 2-bit."""

    def __init__(self, in_per_branch: int, out_per_branch: int, stride: int, num_branches: int,
                 selection: Selection, cfg: Any, partial_in: int | None = None,
                 partial_out: int | None = None) -> None:
        super().__init__()
        conv = _branch_conv(cfg, num_branches, selection)
        self.depthwise = conv(in_per_branch, in_per_branch, 3, stride, partial_in, partial_in, depthwise=True)
        self.bn1 = BranchSwitchableBatchNorm2d(in_per_branch, selection, partial_in)
        self.relu1 = nn.ReLU()
        self.pointwise = conv(in_per_branch, out_per_branch, 1, 1, partial_in, partial_out)
        self.bn2 = BranchSwitchableBatchNorm2d(out_per_branch, selection, partial_out)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.pointwise(self.relu1(self.bn1(self.depthwise(x))))))


class MultiBranchNetwork(nn.Module):
    """A network whose body is ``num_branches`` 2-bit branches; ``set_model_bits`` selects the active window.

    ``stem`` maps the normalized input to the active branches' channels; the ``blocks``; an optional final
    per-bit-width BN; branch mean, global pool, FC.
    """

    def __init__(self, *, stem: nn.Module, blocks: Sequence[nn.Module], out_per_branch: int, num_classes: int,
                 mean, std, num_branches: int, selection: Selection, final_norm: bool = False,
                 residual: bool = True) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.selection = dict(selection)
        self.residual = residual
        self.input_norm = InputNorm(mean, std)
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        # Pre-activation networks end with a BN (per bit-width and branch here) before pooling, no ReLU.
        partial = out_per_branch if any(has_partial(b) for b in selection) else None
        self.final_norm = (BranchSwitchableBatchNorm2d(out_per_branch, selection, partial) if final_norm
                           else nn.Identity())
        self.branch_mean = BranchAverage(out_per_branch, selection)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = tag(nn.Linear(out_per_branch, num_classes), "head")

    def branch_convs(self) -> list[BranchConv2d]:
        return [m for m in self.modules() if isinstance(m, BranchConv2d)]

    def bound_parameters(self) -> list[nn.Parameter]:
        return [p for conv in self.branch_convs() for p in conv.bound_parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input_norm(x))
        x = self.pool(self.branch_mean(self.final_norm(self.blocks(x))))
        return self.fc(torch.flatten(x, 1))


def _resnet_blocks(block: type[nn.Module], widths: Sequence[int], partials: Sequence[int] | None, stem_partial,
                   blocks_per_stage: int, num_branches: int, selection: Selection, cfg: Any,
                   shuffle: bool) -> list[nn.Module]:
    """Stages of ``blocks_per_stage`` blocks (stride 2 at the first block of every stage after the first); with
    ``partials``, the last block widens the partial branch to a full branch."""
    blocks: list[nn.Module] = []
    in_width, partial_in = widths[0], stem_partial
    total = len(widths) * blocks_per_stage
    for stage, out_width in enumerate(widths):
        for index in range(blocks_per_stage):
            stride = 2 if stage > 0 and index == 0 else 1
            partial = partials[stage] if partials else None
            last = len(blocks) == total - 1
            partial_out = (out_width if last else partial) if partials else None
            blocks.append(block(in_width, out_width, stride, num_branches, selection, cfg, shuffle,
                                partial_in=partial_in, partial=partial, partial_out=partial_out))
            in_width, partial_in = out_width, partial_out
    return blocks


def _odd(selection: Selection) -> bool:
    return any(has_partial(b) for b in selection)


def multi_branch_resnet20(num_classes: int, data_info: Any, width: float, num_branches: int, selection: Selection,
                          cfg: Any, blocks_per_stage: int = 3) -> MultiBranchNetwork:
    """CIFAR ResNet-20 (16/32/64 x width per branch): every branch has its own slice of the full-precision
    3x3 stem (in -> 16G) and of one plain BN shared by all bit-widths. ``blocks_per_stage=1``: ResNet-8, the same
    network with one block per stage (not in the paper; the harness's CPU-sized ``resnet8``)."""
    widths = stage_widths(width)
    partials = partial_widths(widths, RESNET20_PARTIAL, width) if _odd(selection) else None
    stem_partial = widths[0] if partials else None
    stem = nn.Sequential(BranchStemConv2d(data_info.in_chans, widths[0], 3, num_branches, selection, stem_partial),
                         SharedBranchBatchNorm2d(widths[0], num_branches, selection, stem_partial), nn.ReLU())
    blocks = _resnet_blocks(MultiBranchBlock, widths, partials, stem_partial, blocks_per_stage, num_branches,
                            selection, cfg, bool(cfg.shuffle))
    return MultiBranchNetwork(stem=stem, blocks=blocks, out_per_branch=widths[-1], num_classes=num_classes,
                              mean=data_info.mean, std=data_info.std, num_branches=num_branches, selection=selection)


def multi_branch_preact_resnet20(num_classes: int, data_info: Any, width: float, num_branches: int,
                                 selection: Selection, cfg: Any) -> MultiBranchNetwork:
    """Pre-activation ResNet-20 (as ``harness.models``' ``preact_resnet20``; not in the paper, built by analogy with
    its ResNet-20): each branch its own slice of the full-precision stem, no BN or ReLU after it, pre-activation
    branch blocks, a final per-bit-width BN, then the branch mean, pooling and the FC."""
    widths = stage_widths(width)
    partials = partial_widths(widths, RESNET20_PARTIAL, width) if _odd(selection) else None
    stem_partial = widths[0] if partials else None
    stem = BranchStemConv2d(data_info.in_chans, widths[0], 3, num_branches, selection, stem_partial)
    blocks = _resnet_blocks(MultiBranchPreActBlock, widths, partials, stem_partial, 3, num_branches, selection,
                            cfg, False)
    return MultiBranchNetwork(stem=stem, blocks=blocks, out_per_branch=widths[-1], num_classes=num_classes,
                              mean=data_info.mean, std=data_info.std, num_branches=num_branches, selection=selection,
                              final_norm=True)


def _shared_stem(data_info: Any, channels: int, large: bool, kernel_large: int, stride_large: int,
                 max_pool: bool, selection: Selection, partial: int | None) -> nn.Sequential:
    kernel, stride = (kernel_large, stride_large) if large else (3, 1)
    conv = nn.Conv2d(data_info.in_chans, channels, kernel, stride, kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(tag(conv, "stem"), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1) if large and max_pool else nn.Identity(), BranchTile(selection, partial))


def multi_branch_resnet18(num_classes: int, data_info: Any, width: float, num_branches: int, selection: Selection,
                          cfg: Any) -> MultiBranchNetwork:
    """ResNet-18 (64/128/256/512 x width per branch): one shared full-precision stem (as ``harness.models``:
    7x7 stride 2 + max-pool at 128 pixels and more, else 3x3 stride 1) and plain BN, whose output every active
    branch receives a copy of; channel shuffle in the downsampling blocks unless ``shuffle=false``."""
    base = max(1, int(round(64 * width)))
    widths = (base, 2 * base, 4 * base, 8 * base)
    large = (getattr(data_info, "image_size", None) or 0) >= ResNet18.SMALL_INPUT_LIMIT
    partials = partial_widths(widths, RESNET18_PARTIAL, width) if _odd(selection) else None
    stem_partial = base if partials else None
    stem = _shared_stem(data_info, base, large, 7, 2, True, selection, stem_partial)
    blocks = _resnet_blocks(MultiBranchBlock, widths, partials, stem_partial, 2, num_branches, selection, cfg,
                            True if cfg.shuffle is None else cfg.shuffle)
    return MultiBranchNetwork(stem=stem, blocks=blocks, out_per_branch=widths[-1], num_classes=num_classes,
                              mean=data_info.mean, std=data_info.std, num_branches=num_branches, selection=selection)


def multi_branch_mobilenetv1(num_classes: int, data_info: Any, width: float, num_branches: int,
                             selection: Selection, cfg: Any) -> MultiBranchNetwork:
    """MobileNetV1 (as ``harness.models``' ``mobilenetv1``, channels per branch): one shared full-precision 3x3
    stem (stride 2 at 128 pixels and more, else 1) and plain BN, copied to every active branch; 13 branch
    depthwise-separable blocks (no channel shuffle: the code's is commented out)."""
    stem_width, widths = mobilenetv1_widths(width)
    large = (getattr(data_info, "image_size", None) or 0) >= ResNet18.SMALL_INPUT_LIMIT
    partials: tuple[int | None, ...] = (None,) * len(widths)
    stem_partial = None
    if _odd(selection):
        partials = partial_widths(widths[:-1], MOBILENETV1_PARTIAL, width) + (widths[-1],)
        stem_partial = stem_width
    stem = _shared_stem(data_info, stem_width, large, 3, 2, False, selection, stem_partial)
    blocks, in_width, partial_in = [], stem_width, stem_partial
    for out_width, partial_out, (_, stride) in zip(widths, partials, MOBILENETV1_BLOCKS):
        blocks.append(MultiBranchDepthwiseSeparable(in_width, out_width, stride, num_branches, selection, cfg,
                                                    partial_in, partial_out))
        in_width, partial_in = out_width, partial_out
    return MultiBranchNetwork(stem=stem, blocks=blocks, out_per_branch=widths[-1], num_classes=num_classes,
                              mean=data_info.mean, std=data_info.std, num_branches=num_branches, selection=selection,
                              residual=False)


def multi_branch_resnet8(num_classes: int, data_info: Any, width: float, num_branches: int, selection: Selection,
                         cfg: Any) -> MultiBranchNetwork:
    """ResNet-8: :func:`multi_branch_resnet20` with one block per stage."""
    return multi_branch_resnet20(num_classes, data_info, width, num_branches, selection, cfg, blocks_per_stage=1)


BUILDERS = {"resnet8": multi_branch_resnet8, "resnet20": multi_branch_resnet20,
            "preact_resnet20": multi_branch_preact_resnet20, "resnet18": multi_branch_resnet18,
            "mobilenetv1": multi_branch_mobilenetv1}
