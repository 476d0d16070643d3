"""A deployed branch convolution's 2-bit weights (MBQuant): the codes an export stores and the levels a loaded
layer writes back.

Zhong, Zhou, Chao, Ji, arXiv 2305.08117, Sec. 3.1: every branch weight is quantized to 2 bits, whose levels are
-1, -1/3, 1/3 and 1 whatever the bounds (:func:`methods.quant.bounded.quantize_weight_2bit`), so a deployed layer
needs its codes alone. :meth:`methods.quant.branches.BranchConv2d.load_exported_total` keeps the levels in a
:class:`StoredBranchLevels` and installs :func:`write_stored_levels` as a forward pre-hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from harness.errors import ConfigError

if TYPE_CHECKING:
    from methods.quant.branches import BranchConv2d

__all__ = ["StoredBranchLevels", "codes_to_levels", "levels_to_codes", "write_stored_levels"]


def levels_to_codes(levels: torch.Tensor) -> torch.Tensor:
    """The 2-bit codes 0..3 of the levels -1, -1/3, 1/3, 1 (``round(3 (W_q + 1) / 2)``)."""
    return torch.round((levels + 1) * 1.5).long()


def codes_to_levels(codes: torch.Tensor) -> torch.Tensor:
    """``2 (q / 3) - 1``: the forward pass's operations, so the levels are its values bit for bit."""
    return 2 * (codes.float() / 3) - 1


class StoredBranchLevels(nn.Module):
    """An exported branch convolution's 2-bit levels, one buffer per code set (:meth:`BranchConv2d._code_sets`)."""

    def add(self, name: str, levels: torch.Tensor) -> None:
        self.register_buffer(name.replace(".", "_"), levels.detach().clone())

    def levels(self, name: str) -> torch.Tensor:
        levels = self._buffers.get(name.replace(".", "_"))
        if levels is None:
            raise ConfigError(f"this exported branch convolution holds no codes {name!r} (a bit-width the file does "
                              f"not serve)")
        return levels


@torch.no_grad()
def write_stored_levels(layer: BranchConv2d, args: tuple) -> None:
    """Forward pre-hook of an exported :class:`BranchConv2d`: the active bit-width's stored levels into the weight
    rows it runs (full branches, then the partial slice)."""
    for name, branch, is_partial in layer._code_sets(layer.bits):
        target = layer.partial_slice(branch) if is_partial else layer._branch_rows(branch)
        target.copy_(layer.stored_levels.levels(name))
