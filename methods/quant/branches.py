"""Multi-branch convolutions (MBQuant): layers that run only a bit-width's branches (their channel layout:
:mod:`methods.quant.branch_layout`; BN and the glue between branch layers: :mod:`methods.quant.branch_norm`; the
deployed 2-bit codes: :mod:`methods.quant.branch_codes`).

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117, Sec. 3.1 (multi-branch topology).

``G`` branches share one module per layer: a body convolution holds ``G`` groups of output channels, group ``g``
being branch ``g``. A bit-width ``b`` runs the window of full branches ``(start, count)`` of its selection
(:mod:`methods.quant.branch_selection`); a layer slices those output groups out of its weight and runs a grouped
convolution with ``count`` groups, so activations only ever carry the active branches' channels.

An odd ``b`` also runs the *partial branch*: the first ``partial_out`` output channels of branch ``start + count``,
reading the first ``partial_in`` channels of that branch's input (the previous layer's partial output). Its
output is appended after the full branches', so a ``b``-bit activation has ``count * C + partial`` channels. It has
its own activation bounds (one more pair per odd bit-width), its own weight bounds (a pair per branch whose slice
serves as a partial branch; with ``bounds_by="position"`` the pair of window position ``count``, as the authors'
code) and, through the per-bit-width switchable BN, its own BN. The quantizers are those of
:mod:`methods.quant.bounded`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.export import Codes, assign_tensors
from methods.quant.bounded import (
    WEIGHT_BITS,
    activation_bounds_init,
    bounded_quantize,
    quantize_activation,
    quantize_weight_2bit,
    weight_bounds_init,
)
from methods.quant.branch_codes import StoredBranchLevels, codes_to_levels, levels_to_codes, write_stored_levels
from methods.quant.branch_layout import BranchSwitchable, ChannelSliced, active_channels, needs_partial
from methods.quant.branch_selection import (
    Selection,
    amortized_selection,
    full_branches,
    has_partial,
    num_branches,
    partial_branch,
    serial_selection,
)
from methods.quant.modules import FLOAT_BITS
from methods.quant.weight_cache import cached_in_eval

__all__ = [
    "BranchConv2d", "BranchStemConv2d", "BranchSwitchable", "ChannelSliced", "Selection", "active_channels",
    "amortized_selection", "bounded_quantize", "full_branches", "has_partial", "num_branches", "partial_branch",
    "quantize_activation", "quantize_weight_2bit", "serial_selection",
]


class BranchConv2d(BranchSwitchable, nn.Module):
    """``num_branches`` independent convolutions stored as one grouped weight; runs the active branches only.

    ``quantized=True``: 2-bit weights with bounds per branch (or per position in the active window,
    ``bounds_by="position"``, the authors' code) and ``b``-bit inputs with bounds per bit-width and branch.
    ``quantized=False``: a full-precision branch convolution (e.g. a full-precision shortcut).
    ``depthwise=True``: every channel of a branch is its own group (MobileNet); ``in == out`` and
    ``partial_in == partial_out``.
    """

    def __init__(self, in_per_branch: int, out_per_branch: int, kernel_size: int, stride: int, padding: int,
                 num_branches: int, selection: Selection, *, quantized: bool = True, bounds_by: str = "branch",
                 backward_scaling: float = 0.0, partial_in: int | None = None, partial_out: int | None = None,
                 depthwise: bool = False) -> None:
        super().__init__()
        if depthwise and (in_per_branch != out_per_branch or partial_in != partial_out):
            raise ConfigError("a depthwise branch convolution keeps its channels "
                              "(in == out, partial_in == partial_out)")
        needs_partial(selection, partial_in=partial_in, partial_out=partial_out)
        self.in_per_branch, self.out_per_branch = in_per_branch, out_per_branch
        self.partial_in, self.partial_out = partial_in, partial_out
        self.stride, self.padding, self.num_branches, self.depthwise = stride, padding, num_branches, depthwise
        self.selection = dict(selection)
        self.quantized, self.bounds_by, self.backward_scaling = quantized, bounds_by, backward_scaling
        self.bits = max(self.selection)
        self.calibrating = False
        self.odd = any(has_partial(b) for b in self.selection)
        self.weight = nn.Parameter(torch.empty(num_branches * out_per_branch, 1 if depthwise else in_per_branch,
                                               kernel_size, kernel_size))
        # Kaiming fan-out per branch (a grouped weight's size(0) would count every branch's outputs).
        fan_out = kernel_size * kernel_size * (1 if depthwise else out_per_branch)
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))
        if quantized:
            self.weight_lower = nn.Parameter(torch.zeros(num_branches))
            self.weight_upper = nn.Parameter(torch.zeros(num_branches))
            if self.odd and bounds_by == "branch":
                self.partial_weight_lower = nn.Parameter(torch.zeros(num_branches))
                self.partial_weight_upper = nn.Parameter(torch.zeros(num_branches))
            self.initialize_weight_bounds()
            # One pair per branch the bit-width runs, in window order (the partial branch last).
            sizes = {str(b): count + has_partial(b) for b, (_, count) in self.selection.items()}
            self.act_lower = nn.ParameterDict({k: nn.Parameter(torch.zeros(n)) for k, n in sizes.items()})
            self.act_upper = nn.ParameterDict({k: nn.Parameter(torch.full((n,), 3.0)) for k, n in sizes.items()})

    @property
    def quantizes_weight(self) -> bool:
        return self.quantized

    @property
    def quantizes_input(self) -> bool:
        return self.quantized

    def bound_parameters(self) -> list[nn.Parameter]:
        if not self.quantized:
            return []
        partial = ([self.partial_weight_lower, self.partial_weight_upper] if hasattr(self, "partial_weight_lower")
                   else [])
        return [self.weight_lower, self.weight_upper, *partial, *self.act_lower.values(), *self.act_upper.values()]

    def partial_slice(self, branch: int) -> torch.Tensor:
        """Weight of ``branch``'s partial slice: its first ``partial_out`` filters over the first ``partial_in``
        inputs (all of a depthwise filter)."""
        rows = slice(branch * self.out_per_branch, branch * self.out_per_branch + self.partial_out)
        return self.weight[rows] if self.depthwise else self.weight[rows, :self.partial_in]

    @torch.no_grad()
    def initialize_weight_bounds(self) -> None:
        # Position p's bounds start from branch p's weights (its window at the highest bit-width).
        lower, upper = weight_bounds_init(self.weight.view(self.num_branches, -1))
        self.weight_lower.copy_(lower)
        self.weight_upper.copy_(upper)
        if hasattr(self, "partial_weight_lower"):
            slices = torch.stack([self.partial_slice(g).flatten() for g in range(self.num_branches)])
            lower, upper = weight_bounds_init(slices)
            self.partial_weight_lower.copy_(lower)
            self.partial_weight_upper.copy_(upper)

    def _weight_bound_index(self, start: int, count: int) -> slice:
        return slice(start, start + count) if self.bounds_by == "branch" else slice(0, count)

    @cached_in_eval
    def active_weight(self) -> torch.Tensor:
        """The (quantized) weight of the active full branches, shape ``(count * out, in, k, k)``."""
        start, count = self.window
        weight = self.weight[start * self.out_per_branch:(start + count) * self.out_per_branch]
        if not self.quantized:
            return weight
        index = self._weight_bound_index(start, count)
        shape = (count, 1, 1, 1, 1)
        per_branch = weight.view(count, self.out_per_branch, *weight.shape[1:])
        quantized = quantize_weight_2bit(per_branch, self.weight_lower[index].view(shape),
                                         self.weight_upper[index].view(shape), self.backward_scaling)
        return quantized.view_as(weight)

    @cached_in_eval
    def active_partial_weight(self) -> torch.Tensor:
        """The (quantized) weight of the active bit-width's partial branch."""
        start, count = self.window
        weight = self.partial_slice(start + count)
        if not self.quantized:
            return weight
        if self.bounds_by == "branch":
            lower, upper = self.partial_weight_lower[start + count], self.partial_weight_upper[start + count]
        else:
            lower, upper = self.weight_lower[count], self.weight_upper[count]
        return quantize_weight_2bit(weight, lower, upper, self.backward_scaling)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.window
        key = str(self.bits)
        partial = has_partial(self.bits)
        if self.calibrating:
            with torch.no_grad():
                lower, upper = activation_bounds_init(x[:, :count * self.in_per_branch], count)
                if partial:
                    part_lower, part_upper = activation_bounds_init(x[:, count * self.in_per_branch:], 1)
                    lower, upper = torch.cat((lower, part_lower)), torch.cat((upper, part_upper))
                self.act_lower[key].copy_(lower)
                self.act_upper[key].copy_(upper)
        # one bound pair per branch, spread over its input channels (the partial branch has partial_in of them)
        repeats = (torch.tensor([self.in_per_branch] * count + [self.partial_in], device=x.device) if partial
                   else self.in_per_branch)
        lower = self.act_lower[key].repeat_interleave(repeats).view(1, -1, 1, 1)
        upper = self.act_upper[key].repeat_interleave(repeats).view(1, -1, 1, 1)
        return quantize_activation(x, lower, upper, self.bits, self.backward_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.window
        if self.quantized:
            x = self.quantize_input(x)
        groups = count * self.out_per_branch if self.depthwise else count
        if not has_partial(self.bits):
            return F.conv2d(x, self.active_weight(), None, self.stride, self.padding, 1, groups)
        split = count * self.in_per_branch
        full = F.conv2d(x[:, :split], self.active_weight(), None, self.stride, self.padding, 1, groups)
        part = F.conv2d(x[:, split:], self.active_partial_weight(), None, self.stride, self.padding, 1,
                        self.partial_out if self.depthwise else 1)
        return torch.cat((full, part), dim=1)

    def _weights_per_branch(self) -> int:
        return self.weight.numel() // self.num_branches

    def _weights_per_partial(self) -> int:
        return self.partial_slice(0).numel() if self.odd else 0

    def _weight_bits(self) -> int:
        return WEIGHT_BITS if self.quantized else FLOAT_BITS

    def storage_bits(self, bits: int) -> int:
        return self.storage_bits_total((bits,))

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        """Quantized: one copy of 2-bit codes per code set some bit-width runs (:meth:`_code_sets`) and each
        bit-width's activation bounds (l and u per branch it runs). No weight bounds: the 2-bit levels are
        -1, -1/3, 1/3, 1 whatever the bounds, so deployment needs the codes alone. Full precision: the rows of every
        branch some bit-width runs whole and the partial slices outside them, 32 bits each."""
        bits_set = tuple(bits_set)
        if not self.quantized:
            weights = (len(self._branches_used(bits_set)) * self._weights_per_branch()
                       + len(self._extra_partials(bits_set)) * self._weights_per_partial())
            return weights * FLOAT_BITS
        copies = {name: partial for b in bits_set for name, _, partial in self._code_sets(b)}
        weights = sum(self._weights_per_partial() if partial else self._weights_per_branch()
                      for partial in copies.values())
        act_bounds = sum(2 * (self._window_of(b)[1] + has_partial(b)) for b in bits_set)
        return weights * WEIGHT_BITS + act_bounds * FLOAT_BITS

    # -- export (harness.export) ------------------------------------------------------------------------------
    def _code_sets(self, bits: int) -> list[tuple[str, int, bool]]:
        """``(name, branch, is_partial)`` of each distinct set of 2-bit codes bit-width ``bits`` runs. Codes depend
        on the bounds they were quantized with: a full branch's are the same at every bit-width under
        ``bounds_by="branch"`` but depend on its window position under ``"position"``, and a partial slice has bounds
        of its own, so its codes are not the full branch's even where that branch is stored whole."""
        start, count = self._window_of(bits)
        by_position = self.bounds_by == "position"
        sets = [(f"branch{g}" + (f".pos{g - start}" if by_position else ""), g, False)
                for g in range(start, start + count)]
        if has_partial(bits):
            sets.append((f"branch{start + count}.partial" + (f".pos{count}" if by_position else ""),
                         start + count, True))
        return sets

    @contextmanager
    def _at_bits(self, bits: int) -> Iterator[None]:
        saved = self.bits
        self.set_bits(bits)
        try:
            yield
        finally:
            self.bits = saved

    def _branch_rows(self, branch: int) -> torch.Tensor:
        return self.weight[branch * self.out_per_branch:(branch + 1) * self.out_per_branch]

    def export_tensors(self, bits: int) -> dict[str, object]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, object]:
        bits_set = tuple(bits_set)
        if not self.quantized:
            tensors: dict[str, object] = {f"branch{g}.weight": self._branch_rows(g)
                                          for g in sorted(self._branches_used(bits_set))}
            tensors.update({f"branch{g}.partial.weight": self.partial_slice(g)
                            for g in sorted(self._extra_partials(bits_set))})
            return tensors
        tensors = {}
        for b in bits_set:
            start, _ = self._window_of(b)
            with self._at_bits(b):  # the layer's own quantization at b
                full = self.active_weight()
                partial = self.active_partial_weight() if has_partial(b) else None
            for name, g, is_partial in self._code_sets(b):
                rows = (g - start) * self.out_per_branch
                levels = partial if is_partial else full[rows:rows + self.out_per_branch]
                tensors[f"{name}.codes"] = Codes(levels_to_codes(levels), WEIGHT_BITS)
            tensors[f"act_lower.{b}"] = self.act_lower[str(b)]
            tensors[f"act_upper.{b}"] = self.act_upper[str(b)]
        return tensors

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        self.load_exported_total(tensors, (bits,))

    @torch.no_grad()
    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        """Rebuild from the codes: the layer keeps its code; before each forward a hook writes the active bit-width's
        levels into the rows it runs, and every weight bound is set to [-1, 1], under which the 2-bit quantizer maps
        each level to itself."""
        bits_set = tuple(bits_set)
        if not self.quantized:
            for g in self._branches_used(bits_set):
                self._branch_rows(g).copy_(tensors[f"branch{g}.weight"])
            for g in self._extra_partials(bits_set):
                self.partial_slice(g).copy_(tensors[f"branch{g}.partial.weight"])
            return
        stored = StoredBranchLevels()
        for b in bits_set:
            assign_tensors(self, {f"act_lower.{b}": tensors[f"act_lower.{b}"],
                                  f"act_upper.{b}": tensors[f"act_upper.{b}"]})
            for name, _, _ in self._code_sets(b):
                stored.add(name, codes_to_levels(tensors[f"{name}.codes"]))
        for name in ("weight_lower", "partial_weight_lower"):
            if hasattr(self, name):
                getattr(self, name).fill_(-1.0)
        for name in ("weight_upper", "partial_weight_upper"):
            if hasattr(self, name):
                getattr(self, name).fill_(1.0)
        self.stored_levels = stored
        if getattr(self, "_levels_hook", None) is None:
            self._levels_hook = self.register_forward_pre_hook(write_stored_levels)


class BranchStemConv2d(ChannelSliced, nn.Module):
    """Full-precision first convolution: every branch reads the whole input and owns ``out_per_branch``
    output channels; the active branches' rows of the weight are run (the partial branch: the first ``partial``
    rows of the next branch)."""

    def __init__(self, in_chans: int, out_per_branch: int, kernel_size: int, num_branches: int,
                 selection: Selection, partial: int | None = None) -> None:
        super().__init__()
        needs_partial(selection, partial=partial)
        self.out_per_branch, self.num_branches, self.partial = out_per_branch, num_branches, partial
        self.channels_per_branch = out_per_branch
        self.selection = dict(selection)
        self.bits = max(self.selection)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(num_branches * out_per_branch, in_chans, kernel_size, kernel_size))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (out_per_branch * kernel_size * kernel_size)))
        self.mbq_role = "stem"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[self.active_slice()], None, 1, self.padding)

    def _per_channel_bits(self) -> int:
        return self.weight[0].numel() * FLOAT_BITS

    def _per_channel_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}
