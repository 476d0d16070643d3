"""Bounded quantizers with learnable bounds (MBQuant's weights and activations).

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117, Sec. 3.2; the EWGS form (Lee et al., CVPR 2021),
which the authors' code builds on:

* weights, fixed 2 bits, bounds ``l_W, u_W`` per layer and branch:
  ``w_n = clamp((w - l_W) / (u_W - l_W), 0, 1)``, ``q = round(3 w_n) / 3``, ``W_q = 2 q - 1``
  (levels -1, -1/3, 1/3, 1);
* activations at ``b`` bits, bounds ``l_A, u_A`` per branch and bit-width:
  ``x_n = clamp((x - l_A) / (u_A - l_A), 0, 1)``, ``x_q = round((2^b - 1) x_n) / (2^b - 1)``.

Rounding has a straight-through gradient; with a backward scaling factor ``delta > 0`` it is EWGS's element-wise
gradient scaling ``g_n = g_q (1 + delta sign(g_q) (x_n - x_q))`` (``delta = 0``: plain STE, the code's default).

Bounds initialization: ``u_W = 3 std(w_branch)``, ``l_W = -3 std(w_branch)``; ``u_A = 3 std(x) / sqrt(1 - 2/pi)``,
``l_A = min(x)`` over the branch's slice of the layer input at that bit-width. ``std`` is torch's default
(unbiased, Bessel-corrected).

The forward pass and, with plain STE, the backward's elementwise part each run as one loop where they can, with
the same bits: native C++ (:mod:`methods.quant.native`, from 131K elements), else compiled
(:mod:`methods.quant.kernels`, from 1M). With plain STE on dense float32 CPU inputs the whole quantizer is a native
operator with a C++ autograd node (the same loops, and :class:`_BoundedQuantize`'s eager passes written out in ATen
where the loops do not run), so no Python runs per call; elsewhere :class:`_BoundedQuantize`. Where the node's
forward loop runs it keeps ``x`` instead of ``x_n`` for the backward pass and computes ``x_n`` from it again there
with the same float operations: the forward pass writes ``x_q`` alone, and no ``x_n`` the size of ``x`` waits for
the backward pass.
"""

from __future__ import annotations

import math

import torch

from methods.quant import native
from methods.quant.backward_ops import hardtanh_backward_like
from methods.quant.kernels import bounded_backward, bounded_forward

WEIGHT_BITS = 2
# Keeps (x - l) / (u - l) finite if a bound pair collapses (e.g. a dead input whose std is 0).
MIN_BOUND_GAP = 1e-8
HALF_NORMAL_STD_FACTOR = math.sqrt(1.0 - 2.0 / math.pi)


def inclusive_unit_mask_backward(grad: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``0 <= n <= 1``, else 0, in one fused pass.

    ``hardtanh_backward`` passes ``grad`` strictly between its bounds; with the bounds moved one representable step
    outward (the smallest normal number of the dtype below 0, the next number above 1) that is the closed interval
    for every ``n`` but the negative subnormals (below ``finfo.tiny`` in magnitude: 1.2e-38 for float32 and
    bfloat16, 6.1e-5 for float16), which it lets through. A NaN ``n`` (a forward pass gone wrong already) gets 0 or
    ``grad`` depending on its position: torch's vectorized and scalar loops disagree. Against a comparison with the
    clamp and a ``torch.where`` (four passes, two of them slow on CPU), this takes 40-60 % off the backward pass of
    a large activation.
    """
    if torch.is_grad_enabled() and (grad.requires_grad or normalized.requires_grad):
        # a double backward records it (an out= call cannot be recorded)
        return torch.ops.aten.hardtanh_backward(grad, normalized, *_unit_bounds(normalized.dtype))
    # written in n's memory layout, as torch.where over a mask of n writes it: a weight's gradient arrives in the
    # convolution's layout, and a result in another layout changes the summation order of what consumes it
    return hardtanh_backward_like(grad, normalized, *_unit_bounds(normalized.dtype), like=normalized)


class _BoundedQuantize(torch.autograd.Function):
    """``q = round(L clamp((x - l) / (u - l), 0, 1)) / L`` with a hand-written backward.

    Autograd through the composed formula builds about a dozen full-size tensors per call; one fused backward
    makes the quantizers a much smaller share of a CPU training step. Gradients are those of the composition:
    STE through the rounding (EWGS-scaled if ``delta > 0``), the clamp's mask (inclusive: exactly at a bound it
    passes the gradient, which matters: post-ReLU zeros sit exactly on a lower bound initialized to ``min(x) = 0``;
    :func:`inclusive_unit_mask_backward`),
    ``dn/dx = 1 / (u - l)``, ``dn/dl = (n - 1) / (u - l)``, ``dn/du = -n / (u - l)`` with ``n`` unclamped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                delta: float) -> torch.Tensor:
        inverse_gap = 1.0 / (upper - lower).clamp_min(MIN_BOUND_GAP)
        ctx.levels, ctx.delta = levels, delta
        fused = bounded_forward.run_like(x, lower, inverse_gap, float(levels))  # one loop (methods.quant.kernels)
        if fused is not None:
            normalized, quantized = fused
            ctx.save_for_backward(normalized, lower, upper, inverse_gap)
            return quantized
        normalized = (x - lower) * inverse_gap
        ctx.save_for_backward(normalized, lower, upper, inverse_gap)
        # out of place, as every quantizer's autograd function here: methods.quant.dorefa._ClampQuantize says why
        return torch.round(normalized.clamp(0.0, 1.0) * levels) / levels

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        normalized, lower, upper, inverse_gap = ctx.saved_tensors
        fused = None if ctx.delta else bounded_backward.run_like(normalized, inverse_gap, grad_output,
                                                                  *_unit_bounds(normalized.dtype))
        if fused is not None:
            grad_normalized, grad_times_normalized = fused
        else:
            grad_unit = grad_output
            if ctx.delta:
                unit = normalized.clamp(0.0, 1.0)
                error = unit - torch.round(unit * ctx.levels) / ctx.levels
                grad_unit = grad_output * (1 + ctx.delta * torch.sign(grad_output) * error)
            grad_normalized = inclusive_unit_mask_backward(grad_unit * inverse_gap, normalized)
        grad_x = grad_normalized if ctx.needs_input_grad[0] else None
        grad_lower = grad_upper = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dn/dl = (n - 1) / (u - l) and dn/du = -n / (u - l); the n-terms vanish where the gap is clamped.
            gap = upper - lower
            if fused is None:
                grad_times_normalized = grad_normalized * normalized
            weighted = grad_times_normalized.sum_to_size(gap.shape) * (gap >= MIN_BOUND_GAP)
            grad_lower = (weighted - grad_normalized.sum_to_size(gap.shape)).sum_to_size(lower.shape)
            grad_upper = (-weighted).sum_to_size(upper.shape)
        return grad_x, grad_lower, grad_upper, None, None


def _unit_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """:func:`inclusive_unit_mask_backward`'s bounds: one representable step outside 0 and 1."""
    info = torch.finfo(dtype)
    return -info.tiny, 1.0 + info.eps


def bounded_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                     backward_scaling: float = 0.0) -> torch.Tensor:
    """``round((2^bits - 1) clamp((x - l) / (u - l), 0, 1)) / (2^bits - 1)``; straight-through gradient (EWGS's
    ``g (1 + delta sign(g) (x_n - x_q))`` if ``backward_scaling = delta > 0``). Bounds broadcast against ``x``."""
    levels = 2**bits - 1
    if not backward_scaling:
        # _BoundedQuantize as a C++ autograd node around the same loops and passes: no Python in either pass
        quantized = native.bounded_quantize(x, lower, upper, levels, bounded_forward.native_min_elements,
                                            bounded_backward.native_min_elements)
        if quantized is not None:
            return quantized
    return _BoundedQuantize.apply(x, lower, upper, levels, float(backward_scaling))


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
