"""Batch norm and glue of multi-branch networks (MBQuant): BN over the active branches' channels, the branch mean,
the shared stem's copy to every branch, the partial branch's identity path and channel shuffle.

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117, Sec. 3.1; the layouts of :mod:`methods.quant.branch_layout`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.branch_layout import BranchSwitchable, ChannelSliced, active_channels, needs_partial
from methods.quant.branch_selection import Selection, has_partial
from methods.quant.modules import PerBitNormExport, batchnorm_storage_bits, batchnorm_tensors


class SharedBranchBatchNorm2d(ChannelSliced, nn.BatchNorm2d):
    """One plain BN over every branch's channels, shared by all bit-widths; normalizes the active channels."""

    def __init__(self, channels_per_branch: int, num_branches: int, selection: Selection,
                 partial: int | None = None) -> None:
        nn.BatchNorm2d.__init__(self, channels_per_branch * num_branches)
        needs_partial(selection, partial=partial)
        self.channels_per_branch, self.num_branches, self.partial = channels_per_branch, num_branches, partial
        self.selection = dict(selection)
        self.bits = max(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.active_slice()
        # Slices of the running statistics are views, so batch_norm updates the shared buffers in place.
        return F.batch_norm(x, self.running_mean[channels], self.running_var[channels], self.weight[channels],
                            self.bias[channels], self.training, self.momentum, self.eps)

    def _per_channel_bits(self) -> int:
        return batchnorm_storage_bits(self) // (self.num_branches * self.channels_per_branch)

    def _per_channel_tensors(self) -> dict[str, torch.Tensor]:
        return batchnorm_tensors(self)


class BranchSwitchableBatchNorm2d(PerBitNormExport, BranchSwitchable, nn.Module):
    """Switchable BN: one ``BatchNorm2d`` per bit-width over its active channels (``count * C`` plus the partial
    branch's ``partial`` at odd bit-widths)."""

    def __init__(self, channels_per_branch: int, selection: Selection, partial: int | None = None) -> None:
        super().__init__()
        needs_partial(selection, partial=partial)
        self.selection = dict(selection)
        self.bits = max(self.selection)
        self.norms = nn.ModuleDict({str(b): nn.BatchNorm2d(active_channels(channels_per_branch, partial, b, count))
                                    for b, (_, count) in sorted(self.selection.items())})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[str(self.bits)](x)

    def storage_bits(self, bits: int) -> int:
        self._window_of(bits)
        return batchnorm_storage_bits(self.norms[str(int(bits))])

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return sum(self.storage_bits(b) for b in bits_set)


class BranchAverage(BranchSwitchable, nn.Module):
    """Mean over the active branches: ``(N, branches * C, ...) -> (N, C, ...)``; stores nothing. At an odd bit-width
    the partial branch must have widened back to ``C`` channels (the last layer's ``partial_out = C``) and counts
    as one branch of the mean, as in the authors' code."""

    def __init__(self, channels_per_branch: int, selection: Selection) -> None:
        super().__init__()
        self.channels_per_branch = channels_per_branch
        self.selection = dict(selection)
        self.bits = max(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.window
        branches = count + has_partial(self.bits)
        return x.view(x.shape[0], branches, self.channels_per_branch, *x.shape[2:]).mean(dim=1)

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return 0


class BranchTile(BranchSwitchable, nn.Module):
    """Copies a shared feature to every active branch: ``(N, C, ...) -> (N, count * C + partial, ...)`` (the
    partial branch gets the first ``partial`` channels); stores nothing."""

    def __init__(self, selection: Selection, partial: int | None = None) -> None:
        super().__init__()
        needs_partial(selection, partial=partial)
        self.selection = dict(selection)
        self.partial = partial
        self.bits = max(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiled = x.repeat(1, self.window[1], *([1] * (x.dim() - 2)))
        return torch.cat((tiled, x[:, :self.partial]), dim=1) if has_partial(self.bits) else tiled

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return 0


def resize_partial(x: torch.Tensor, full_channels: int, partial: int) -> torch.Tensor:
    """The identity path of a residual block at an odd bit-width: keep the full branches' ``full_channels`` and
    cut or zero-pad the partial branch's channels to ``partial`` (the authors' code cuts at a stage's first block
    and pads at the network's last, where the partial branch widens to a full branch)."""
    have = x.shape[1] - full_channels
    if have > partial:
        return x[:, :full_channels + partial]
    if have < partial:
        return F.pad(x, (0, 0, 0, 0, 0, partial - have))
    return x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle (Zhang et al., CVPR 2018): ``(N, g * C, ...)`` viewed as ``(N, g, C, ...)``,
    transposed to ``(N, C, g, ...)`` and flattened back; output channel ``c * g + j`` is input channel ``j * C + c``."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)
