"""The channel layout of multi-branch layers: how many channels a bit-width carries and which it slices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.errors import ConfigError
from methods.quant.branch_layout import ChannelSliced, active_channels, needs_partial
from methods.quant.branch_selection import amortized_selection


@pytest.mark.parametrize(("bits", "count", "expected"), [(2, 1, 16), (4, 2, 32), (3, 1, 16 + 5), (7, 3, 48 + 5)])
def test_active_channels_are_the_full_branches_plus_the_partial_one_at_odd_bits(bits, count, expected):
    assert active_channels(16, 5, bits, count) == expected


def test_an_odd_bit_width_without_a_partial_width_is_refused():
    needs_partial({2: (0, 1), 4: (0, 2)}, partial=None)  # even bit-widths need none
    with pytest.raises(ConfigError, match="partial_in, partial_out"):
        needs_partial({3: (0, 1)}, partial_in=None, partial_out=None)


class _Sliced(ChannelSliced, nn.Module):
    def __init__(self, selection, per_branch, partial):
        super().__init__()
        self.selection, self.channels_per_branch, self.partial = dict(selection), per_branch, partial
        self.bits = max(self.selection)
        self.scale = nn.Parameter(torch.arange(4.0 * per_branch))

    def _per_channel_bits(self) -> int:
        return 32

    def _per_channel_tensors(self):
        return {"scale": self.scale}


def test_a_bit_width_slices_its_window_and_its_partial_channels():
    layer = _Sliced({2: (1, 1), 3: (1, 1), 8: (0, 4)}, per_branch=4, partial=2)
    layer.set_bits(2)
    assert layer.active_slice() == slice(4, 8)
    layer.set_bits(3)
    assert layer.active_slice() == slice(4, 10)  # branch 1 and the first 2 channels of branch 2
    layer.set_bits(8)
    assert layer.active_slice() == slice(0, 16)
    assert layer.storage_bits(3) == 6 * 32
    # {2, 3}: branch 1 whole, and branch 2's partial slice, which lies outside every stored full branch
    assert layer.storage_bits_total((2, 3)) == (4 + 2) * 32
    with pytest.raises(ConfigError, match="no 5-bit setting"):
        layer.set_bits(5)


def test_export_keeps_only_the_stored_blocks_and_loads_them_back():
    layer = _Sliced(amortized_selection((2, 4, 8)), per_branch=2, partial=None)
    start, count = layer.selection[2]
    tensors = layer.export_tensors(2)
    assert list(tensors) == [f"scale.branch{start}"]
    torch.testing.assert_close(tensors[f"scale.branch{start}"], torch.arange(2.0 * start, 2.0 * start + 2), rtol=0,
                               atol=0)
    fresh = _Sliced(layer.selection, per_branch=2, partial=None)
    with torch.no_grad():
        fresh.scale.zero_()
    fresh.load_exported(tensors, 2)
    expected = torch.zeros(8)
    expected[2 * start:2 * start + 2] = torch.arange(2.0 * start, 2.0 * start + 2)
    torch.testing.assert_close(fresh.scale.detach(), expected, rtol=0, atol=0)
