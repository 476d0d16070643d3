"""A straight-through mask that stays in the backward pass of a compiled CPU graph.

Under ``torch.compile``, AOTAutograd's partitioner chooses which forward values the backward graph reads, by size:
for a quantizer whose backward pass is ``g where 0 < x < 1`` (DoReFa's activation, :mod:`methods.quant.dorefa`) it
computes the comparison in the forward graph and saves a bool mask (1 byte an element) rather than ``x`` (4
bytes), and does the same with the ReLU before it, whose output the next convolution no longer reads (it reads the
quantized value). On CPU, inductor (torch 2.14, AVX-512) writes a vectorized bool tensor 10-14 times slower than
eager: ``x > 0`` over a 128x16x32x32 activation took 11.0 ms compiled against 0.8 ms eager, while a float result
took 0.5 ms. These masks (five bool tensors for the six quantized convolutions of a ResNet stage) made a compiled
Any-Precision step slower than the eager one.

:func:`clamp_unit_backward` is ``hardtanh_backward`` over ``[0, 1]`` as an opaque custom operator: the partitioner
cannot move its comparison into the forward graph, so the forward saves ``x``, which also covers the ReLU's mask.
The values are ``hardtanh_backward``'s, written in ``grad``'s memory layout (which the fake implementation
declares). On other devices the plain ``hardtanh_backward``, which inductor fuses, is used.
"""

from __future__ import annotations

import torch


def hardtanh_backward_like(grad: torch.Tensor, x: torch.Tensor, below: float, above: float,
                           like: torch.Tensor) -> torch.Tensor:
    """``hardtanh_backward(grad, x, below, above)`` (``grad`` where ``below < x < above``, else 0, one fused pass)
    written in ``like``'s memory layout and dtype: the eager kernel picks its output layout from its inputs, which
    a caller that needs a definite one (a consumer summing in memory order, a fake implementation) cannot rely on."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, below, above, grad_input=torch.empty_like(like))


@torch.library.custom_op("mbqbench::clamp_unit_backward", mutates_args=())
def _clamp_unit_backward_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return hardtanh_backward_like(grad, x, 0.0, 1.0, like=grad)


@_clamp_unit_backward_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad)


def _setup_context(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1])


def _double_backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    # linear in grad with the same mask, and piecewise constant in x (zeros, as hardtanh_backward's own derivative
    # gives them); reached by eager calls: AOTAutograd does not compile a double backward
    (x,) = ctx.saved_tensors
    return clamp_unit_backward(grad_output, x), torch.zeros_like(x) if ctx.needs_input_grad[1] else None


_clamp_unit_backward_op.register_autograd(_double_backward, setup_context=_setup_context)


def clamp_unit_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``0 < x < 1``, else 0 (``hardtanh_backward``); on CPU through the opaque operator above, whose
    result has ``grad``'s dtype and layout (autograd passes a gradient of ``x``'s dtype; called directly with a
    lower-precision ``grad`` than ``x``, the values are the same, each an element of ``grad`` or 0)."""
    if grad.device.type == "cpu":
        return _clamp_unit_backward_op(grad, x)
    return torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0)
