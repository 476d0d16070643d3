"""Multi-branch building blocks (MBQuant): branch selection, bounded quantizers, branch-sliced layers.

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117.

Topology. ``G`` branches share one module per layer: a body convolution holds ``G`` groups of output channels,
group ``g`` being branch ``g``. A bit-width ``b`` runs the contiguous window of ``b / 2`` branches
``start .. start + count - 1`` given by a *selection* (``{bits: (start, count)}``); a layer slices those output
groups out of its weight and runs a grouped convolution with ``count`` groups, so activations only ever carry
the active branches' channels (``count * channels_per_branch``).

Quantizers (the EWGS form, Lee et al., CVPR 2021, which the authors' code builds on), with learnable bounds:

* weights, fixed 2 bits, bounds ``l_W, u_W`` per layer and branch:
  ``w_n = clamp((w - l_W) / (u_W - l_W), 0, 1)``, ``q = round(3 w_n) / 3``, ``W_q = 2 q - 1``
  (levels -1, -1/3, 1/3, 1);
* activations at ``b`` bits, bounds ``l_A, u_A`` per branch and bit-width:
  ``x_n = clamp((x - l_A) / (u_A - l_A), 0, 1)``, ``x_q = round((2^b - 1) x_n) / (2^b - 1)``.

Rounding has a straight-through gradient; with a backward scaling factor ``delta > 0`` it is EWGS's element-wise
gradient scaling ``g_n = g_q (1 + delta sign(g_q) (x_n - x_q))`` (``delta = 0``: plain STE, the code's default).

Bounds initialization (one batch, done by the method before training): ``u_W = 3 std(w_branch)``,
``l_W = -3 std(w_branch)``; ``u_A = 3 std(x) / sqrt(1 - 2/pi)``, ``l_A = min(x)`` over the branch's slice of the
layer input at that bit-width. ``std`` is torch's default (unbiased, Bessel-corrected).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from methods.quant.modules import FLOAT_BITS, BitSwitchable, batchnorm_storage_bits

Selection = Mapping[int, tuple[int, int]]  # bits -> (first branch, number of branches)
WEIGHT_BITS = 2
# Keeps (x - l) / (u - l) finite if a bound pair collapses (e.g. a dead input whose std is 0).
MIN_BOUND_GAP = 1e-8
HALF_NORMAL_STD_FACTOR = math.sqrt(1.0 - 2.0 / math.pi)


# ---------------------------------------------------------------------------------------------------------------
# Branch selection
# ---------------------------------------------------------------------------------------------------------------


def branches_for_bits(bits: int) -> int:
    """Two-bit branches a ``bits``-bit network needs (``b / 2``; ``b`` must be even)."""
    if bits % 2:
        raise ConfigError(f"{bits} bits is odd; multi-branch networks need even bit-widths")
    return bits // WEIGHT_BITS


def serial_selection(bits_set: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Every bit-width starts at branch 0 (the ablation of Fig. 3): branch 0 serves every bit-width."""
    return {b: (0, branches_for_bits(b)) for b in sorted(set(bits_set))}


def amortized_selection(bits_set: Iterable[int]) -> dict[int, tuple[int, int]]:
    """The amortization rule: contiguous windows whose starts spread branch usage as evenly as possible.

    ``G = max(bits) / 2``. Bit-widths are placed in ascending order; each takes the window start that, after
    counting it, gives (1) the smallest maximum number of bit-widths using any one branch, (2) then the smallest
    sum of squared usage counts (the most even spread), (3) then the smallest start. For {2, 4, 6, 8} this gives
    the paper's table: 2 -> {0}, 4 -> {1, 2}, 6 -> {1, 2, 3}, 8 -> {0, 1, 2, 3}.
    """
    ordered = sorted(set(bits_set))
    num_branches = branches_for_bits(ordered[-1])
    usage = [0] * num_branches
    selection: dict[int, tuple[int, int]] = {}
    for bits in ordered:
        count = branches_for_bits(bits)

        def spread(start: int, count: int = count) -> tuple[int, int, int]:
            after = [used + (start <= branch < start + count) for branch, used in enumerate(usage)]
            return max(after), sum(u * u for u in after), start

        start = min(range(num_branches - count + 1), key=spread)
        for branch in range(start, start + count):
            usage[branch] += 1
        selection[bits] = (start, count)
    return selection


# ---------------------------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------------------------


class _BoundedQuantize(torch.autograd.Function):
    """``q = round(L clamp((x - l) / (u - l), 0, 1)) / L`` with a hand-written backward.

    Autograd through the composed formula builds about a dozen full-size tensors per call; one fused backward
    makes the quantizers a much smaller share of a CPU training step. Gradients are those of the composition:
    STE through the rounding (EWGS-scaled if ``delta > 0``), the clamp's mask (inclusive, like ``torch.clamp``),
    ``dn/dx = 1 / (u - l)``, ``dn/dl = (n - 1) / (u - l)``, ``dn/du = -n / (u - l)`` with ``n`` unclamped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                delta: float) -> torch.Tensor:
        inverse_gap = 1.0 / (upper - lower).clamp_min(MIN_BOUND_GAP)
        normalized = (x - lower) * inverse_gap
        ctx.save_for_backward(normalized, lower, upper, inverse_gap)
        ctx.levels, ctx.delta = levels, delta
        return torch.round(normalized.clamp(0.0, 1.0) * levels) / levels

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        normalized, lower, upper, inverse_gap = ctx.saved_tensors
        grad_unit = grad_output
        if ctx.delta:
            unit = normalized.clamp(0.0, 1.0)
            error = unit - torch.round(unit * ctx.levels) / ctx.levels
            grad_unit = grad_output * (1 + ctx.delta * torch.sign(grad_output) * error)
        inside = (normalized >= 0) & (normalized <= 1)
        grad_normalized = torch.where(inside, grad_unit * inverse_gap, 0.0)
        grad_x = grad_normalized if ctx.needs_input_grad[0] else None
        grad_lower = grad_upper = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dn/dl = (n - 1) / (u - l) and dn/du = -n / (u - l); the n-terms vanish where the gap is clamped.
            gap = upper - lower
            weighted = (grad_normalized * normalized).sum_to_size(gap.shape) * (gap >= MIN_BOUND_GAP)
            grad_lower = (weighted - grad_normalized.sum_to_size(gap.shape)).sum_to_size(lower.shape)
            grad_upper = (-weighted).sum_to_size(upper.shape)
        return grad_x, grad_lower, grad_upper, None, None


def bounded_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                     backward_scaling: float = 0.0) -> torch.Tensor:
    """``round((2^bits - 1) clamp((x - l) / (u - l), 0, 1)) / (2^bits - 1)``; straight-through gradient (EWGS's
    ``g (1 + delta sign(g) (x_n - x_q))`` if ``backward_scaling = delta > 0``). Bounds broadcast against ``x``."""
    return _BoundedQuantize.apply(x, lower, upper, 2**bits - 1, float(backward_scaling))


def quantize_weight_2bit(weight: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                         backward_scaling: float = 0.0) -> torch.Tensor:
    """``2 round(3 w_n) / 3 - 1``: levels -1, -1/3, 1/3, 1 (bounds broadcast against ``weight``)."""
    return 2 * bounded_quantize(weight, lower, upper, WEIGHT_BITS, backward_scaling) - 1


def quantize_activation(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                        backward_scaling: float = 0.0) -> torch.Tensor:
    """``round((2^b - 1) x_n) / (2^b - 1)`` in [0, 1] (the following BN absorbs the scale)."""
    return bounded_quantize(x, lower, upper, bits, backward_scaling)


def weight_bounds_init(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-3 std(w_g), 3 std(w_g))`` of each row ``g`` of ``weight`` viewed as ``(branches, -1)``."""
    spread = 3 * weight.detach().flatten(1).std(dim=1)
    return -spread, spread


def activation_bounds_init(x: torch.Tensor, branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(x_g), 3 std(x_g) / sqrt(1 - 2/pi))`` of each branch's channel slice ``x_g`` of a layer input
    ``(N, branches * C, ...)``."""
    per_branch = x.detach().unflatten(1, (branches, -1)).transpose(0, 1).flatten(1)
    return per_branch.min(dim=1).values, 3 * per_branch.std(dim=1) / HALF_NORMAL_STD_FACTOR


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


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
        """``(first branch, number of branches)`` of the active bit-width."""
        return self.selection[self.bits]

    def _window_of(self, bits: int) -> tuple[int, int]:
        if int(bits) not in self.selection:
            raise ConfigError(f"no {bits}-bit setting in this model (bits {tuple(sorted(self.selection))})")
        return self.selection[int(bits)]

    def _branches_used(self, bits_set: Iterable[int]) -> set[int]:
        """Branches some bit-width of ``bits_set`` runs (the others need not be stored)."""
        return {branch for b in bits_set for branch in range(self._window_of(b)[0], sum(self._window_of(b)))}


class BranchConv2d(BranchSwitchable, nn.Module):
    """``num_branches`` independent convolutions stored as one grouped weight; runs the active branches only.

    ``quantized=True``: 2-bit weights with bounds per branch (or per position in the active window,
    ``bounds_by="position"``, the authors' code) and ``b``-bit inputs with bounds per bit-width and branch.
    ``quantized=False``: a full-precision branch convolution (e.g. a full-precision shortcut).
    """

    def __init__(self, in_per_branch: int, out_per_branch: int, kernel_size: int, stride: int, padding: int,
                 num_branches: int, selection: Selection, *, quantized: bool = True, bounds_by: str = "branch",
                 backward_scaling: float = 0.0) -> None:
        super().__init__()
        self.in_per_branch, self.out_per_branch = in_per_branch, out_per_branch
        self.stride, self.padding, self.num_branches = stride, padding, num_branches
        self.selection = dict(selection)
        self.quantized, self.bounds_by, self.backward_scaling = quantized, bounds_by, backward_scaling
        self.bits = max(self.selection)
        self.calibrating = False
        self.weight = nn.Parameter(torch.empty(num_branches * out_per_branch, in_per_branch, kernel_size,
                                               kernel_size))
        # Kaiming fan-out per branch (a grouped weight's size(0) would count every branch's outputs).
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (out_per_branch * kernel_size * kernel_size)))
        if quantized:
            self.weight_lower = nn.Parameter(torch.zeros(num_branches))
            self.weight_upper = nn.Parameter(torch.zeros(num_branches))
            self.initialize_weight_bounds()
            # Indexed by position in the bit-width's window; the window of a bit-width never changes, so this is
            # the same as indexing by branch.
            self.act_lower = nn.ParameterDict(
                {str(b): nn.Parameter(torch.zeros(count)) for b, (_, count) in self.selection.items()})
            self.act_upper = nn.ParameterDict(
                {str(b): nn.Parameter(torch.full((count,), 3.0)) for b, (_, count) in self.selection.items()})

    @property
    def quantizes_weight(self) -> bool:
        return self.quantized

    @property
    def quantizes_input(self) -> bool:
        return self.quantized

    def bound_parameters(self) -> list[nn.Parameter]:
        if not self.quantized:
            return []
        return [self.weight_lower, self.weight_upper, *self.act_lower.values(), *self.act_upper.values()]

    @torch.no_grad()
    def initialize_weight_bounds(self) -> None:
        # Position p's bounds start from branch p's weights (its window at the highest bit-width).
        lower, upper = weight_bounds_init(self.weight.view(self.num_branches, -1))
        self.weight_lower.copy_(lower)
        self.weight_upper.copy_(upper)

    def _weight_bound_index(self, start: int, count: int) -> slice:
        return slice(start, start + count) if self.bounds_by == "branch" else slice(0, count)

    def active_weight(self) -> torch.Tensor:
        """The (quantized) weight of the active branches, shape ``(count * out, in, k, k)``."""
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

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.window
        key = str(self.bits)
        if self.calibrating:
            with torch.no_grad():
                lower, upper = activation_bounds_init(x, count)
                self.act_lower[key].copy_(lower)
                self.act_upper[key].copy_(upper)
        lower = self.act_lower[key].repeat_interleave(self.in_per_branch).view(1, -1, 1, 1)
        upper = self.act_upper[key].repeat_interleave(self.in_per_branch).view(1, -1, 1, 1)
        return quantize_activation(x, lower, upper, self.bits, self.backward_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.window
        if self.quantized:
            x = self.quantize_input(x)
        return F.conv2d(x, self.active_weight(), None, self.stride, self.padding, 1, count)

    def _bounds_bits(self, bits: int) -> int:
        # Deploying at b needs the active branches' weight bounds and b's activation bounds (l and u each).
        _, count = self._window_of(bits)
        return 4 * count * FLOAT_BITS if self.quantized else 0

    def _weights_per_branch(self) -> int:
        return self.weight.numel() // self.num_branches

    def storage_bits(self, bits: int) -> int:
        _, count = self._window_of(bits)
        weight_bits = WEIGHT_BITS if self.quantized else FLOAT_BITS
        return count * self._weights_per_branch() * weight_bits + self._bounds_bits(bits)

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        bits_set = tuple(bits_set)
        used = self._branches_used(bits_set)
        if not self.quantized:
            return len(used) * self._weights_per_branch() * FLOAT_BITS
        # Weight bounds: one pair per stored branch (the largest bit-width runs every branch, so as many as there
        # are window positions with bounds_by="position"); activation bounds: a pair per branch of each bit-width.
        act_bounds = sum(2 * self._window_of(b)[1] for b in bits_set)
        return len(used) * self._weights_per_branch() * WEIGHT_BITS + (2 * len(used) + act_bounds) * FLOAT_BITS


class BranchStemConv2d(BranchSwitchable, nn.Module):
    """Full-precision first convolution: every branch reads the whole input and owns ``out_per_branch``
    output channels; the active branches' rows of the weight are run."""

    def __init__(self, in_chans: int, out_per_branch: int, kernel_size: int, num_branches: int,
                 selection: Selection) -> None:
        super().__init__()
        self.out_per_branch, self.num_branches = out_per_branch, num_branches
        self.selection = dict(selection)
        self.bits = max(self.selection)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(num_branches * out_per_branch, in_chans, kernel_size, kernel_size))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (out_per_branch * kernel_size * kernel_size)))
        self.mbq_role = "stem"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, count = self.window
        rows = slice(start * self.out_per_branch, (start + count) * self.out_per_branch)
        return F.conv2d(x, self.weight[rows], None, 1, self.padding)

    def storage_bits(self, bits: int) -> int:
        _, count = self._window_of(bits)
        return count * (self.weight.numel() // self.num_branches) * FLOAT_BITS

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return len(self._branches_used(bits_set)) * (self.weight.numel() // self.num_branches) * FLOAT_BITS


class SharedBranchBatchNorm2d(BranchSwitchable, nn.BatchNorm2d):
    """One plain BN over every branch's channels, shared by all bit-widths; normalizes the active channels."""

    def __init__(self, channels_per_branch: int, num_branches: int, selection: Selection) -> None:
        nn.BatchNorm2d.__init__(self, channels_per_branch * num_branches)
        self.channels_per_branch, self.num_branches = channels_per_branch, num_branches
        self.selection = dict(selection)
        self.bits = max(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, count = self.window
        channels = slice(start * self.channels_per_branch, (start + count) * self.channels_per_branch)
        # Slices of the running statistics are views, so batch_norm updates the shared buffers in place.
        return F.batch_norm(x, self.running_mean[channels], self.running_var[channels], self.weight[channels],
                            self.bias[channels], self.training, self.momentum, self.eps)

    def _per_branch_bits(self) -> int:
        return batchnorm_storage_bits(self) // self.num_branches

    def storage_bits(self, bits: int) -> int:
        return self._window_of(bits)[1] * self._per_branch_bits()

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return len(self._branches_used(bits_set)) * self._per_branch_bits()


class BranchSwitchableBatchNorm2d(BranchSwitchable, nn.Module):
    """Switchable BN: one ``BatchNorm2d`` per bit-width over its active channels (``count * channels``)."""

    def __init__(self, channels_per_branch: int, selection: Selection) -> None:
        super().__init__()
        self.selection = dict(selection)
        self.bits = max(self.selection)
        self.norms = nn.ModuleDict({str(b): nn.BatchNorm2d(count * channels_per_branch)
                                    for b, (_, count) in sorted(self.selection.items())})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[str(self.bits)](x)

    def storage_bits(self, bits: int) -> int:
        self._window_of(bits)
        return batchnorm_storage_bits(self.norms[str(int(bits))])

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return sum(self.storage_bits(b) for b in bits_set)


class BranchAverage(BranchSwitchable, nn.Module):
    """Mean over the active branches: ``(N, count * C, ...) -> (N, C, ...)``; stores nothing."""

    def __init__(self, channels_per_branch: int, selection: Selection) -> None:
        super().__init__()
        self.channels_per_branch = channels_per_branch
        self.selection = dict(selection)
        self.bits = max(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, count = self.window
        return x.view(x.shape[0], count, self.channels_per_branch, *x.shape[2:]).mean(dim=1)

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return 0


class BranchTile(BranchSwitchable, nn.Module):
    """Copies a shared feature to every active branch: ``(N, C, ...) -> (N, count * C, ...)``; stores nothing."""

    def __init__(self, selection: Selection) -> None:
        super().__init__()
        self.selection = dict(selection)
        self.bits = max(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.window[1], *([1] * (x.dim() - 2)))

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return 0


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle (Zhang et al., CVPR 2018): ``(N, g * C, ...)`` viewed as ``(N, g, C, ...)``,
    transposed to ``(N, C, g, ...)`` and flattened back; output channel ``c * g + j`` is input channel ``j * C + c``."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)
