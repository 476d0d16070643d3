"""Where a multi-branch layer's channels live (MBQuant): the active window of branches for a bit-width, and the
per-channel tensors sliced by it.

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117, Sec. 3.1 (multi-branch topology). A bit-width runs the
window ``(start, count)`` of full branches that its selection (:mod:`methods.quant.branch_selection`) gives, and an
odd bit-width also the first ``partial`` channels of branch ``start + count``. The layers built on this are the branch
convolutions (:mod:`methods.quant.branches`) and the branch BN (:mod:`methods.quant.branch_norm`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from harness.errors import ConfigError
from methods.quant.branch_selection import Selection, has_partial, partial_branch
from methods.quant.modules import BitSwitchable

__all__ = ["BranchSwitchable", "ChannelSliced", "active_channels", "needs_partial"]


def active_channels(per_branch: int, partial: int | None, bits: int, count: int) -> int:
    """Channels a ``bits``-bit activation carries: ``count`` full branches plus the partial one if ``bits`` is odd."""
    return count * per_branch + (partial or 0) * has_partial(bits)


def needs_partial(selection: Selection, **widths: int | None) -> None:
    if any(has_partial(b) for b in selection):
        missing = [name for name, width in widths.items() if width is None]
        if missing:
            raise ConfigError(f"odd bit-widths need the partial branch's width ({', '.join(missing)}) for this layer")


class BranchSwitchable(BitSwitchable):
    """A layer whose active branch window follows the bit-width; ``set_bits`` only picks the window."""

    selection: Selection

    def set_bits(self, bits: int) -> None:
        if int(bits) not in self.selection:
            raise ConfigError(f"this multi-branch model has no {bits}-bit setting; it was built for bits "
                              f"{tuple(sorted(self.selection))}")
        self.bits = int(bits)

    @property
    def window(self) -> tuple[int, int]:
        """``(first full branch, number of full branches)`` of the active bit-width."""
        return self.selection[self.bits]

    def _window_of(self, bits: int) -> tuple[int, int]:
        if int(bits) not in self.selection:
            raise ConfigError(f"no {bits}-bit setting in this model (bits {tuple(sorted(self.selection))})")
        return self.selection[int(bits)]

    def _branches_used(self, bits_set: Iterable[int]) -> set[int]:
        """Full branches some bit-width of ``bits_set`` runs (the others need not be stored)."""
        return {branch for b in bits_set for branch in range(self._window_of(b)[0], sum(self._window_of(b)))}

    def _partials_used(self, bits_set: Iterable[int]) -> set[int]:
        """Branches whose partial slice some odd bit-width of ``bits_set`` runs."""
        bits_set = tuple(bits_set)
        for b in bits_set:
            self._window_of(b)
        return {partial_branch(self.selection, b) for b in bits_set if has_partial(b)}

    def _extra_partials(self, bits_set: Iterable[int]) -> set[int]:
        """Partial slices outside every stored full branch (a slice inside one costs no extra storage)."""
        bits_set = tuple(bits_set)
        return self._partials_used(bits_set) - self._branches_used(bits_set)


class ChannelSliced(BranchSwitchable):
    """A layer whose per-channel tensors hold ``channels_per_branch`` channels per branch; a bit-width uses the
    contiguous channels of its window and, when odd, the first ``partial`` channels of the next branch."""

    channels_per_branch: int
    partial: int | None

    def _per_channel_bits(self) -> int:
        raise NotImplementedError

    def active_slice(self) -> slice:
        start, count = self.window
        first = start * self.channels_per_branch
        return slice(first, first + active_channels(self.channels_per_branch, self.partial, self.bits, count))

    def storage_bits(self, bits: int) -> int:
        _, count = self._window_of(bits)
        return active_channels(self.channels_per_branch, self.partial, bits, count) * self._per_channel_bits()

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        bits_set = tuple(bits_set)
        channels = (len(self._branches_used(bits_set)) * self.channels_per_branch
                    + len(self._extra_partials(bits_set)) * (self.partial or 0))
        return channels * self._per_channel_bits()

    # -- export (harness.export): the channels storage counts, one block per stored branch or partial slice ------
    def _per_channel_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors indexed by channel along dim 0 (their values per channel make ``_per_channel_bits``)."""
        raise NotImplementedError

    def _channel_blocks(self, bits_set: tuple[int, ...]) -> dict[str, tuple[int, int]]:
        width = self.channels_per_branch
        blocks = {f"branch{g}": (g * width, width) for g in sorted(self._branches_used(bits_set))}
        blocks.update({f"branch{g}.partial": (g * width, self.partial or 0)
                       for g in sorted(self._extra_partials(bits_set))})
        return blocks

    def export_tensors(self, bits: int) -> dict[str, torch.Tensor]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, torch.Tensor]:
        blocks = self._channel_blocks(tuple(bits_set))
        return {f"{name}.{block}": tensor[first:first + count] for name, tensor in self._per_channel_tensors().items()
                for block, (first, count) in blocks.items()}

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        self.load_exported_total(tensors, (bits,))

    @torch.no_grad()
    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        blocks = self._channel_blocks(tuple(bits_set))
        for name, tensor in self._per_channel_tensors().items():
            for block, (first, count) in blocks.items():
                tensor[first:first + count] = tensors[f"{name}.{block}"]
