"""PACT activation quantization with switchable clipping levels (S-CL), as used by AdaBits.

Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks" (arXiv 1805.06085), in the
form of Jin, Yang, Liao, "AdaBits: Neural Network Quantization with Adaptive Bit-Widths" (CVPR 2020,
arXiv 1912.09666), Sec. 3.3:

* ``a = |alpha|`` (alpha learnable, no weight decay);
  ``y = round((2^b - 1) * min(relu(x), a) / a) / (2^b - 1) * a``;
* gradients (straight-through rounding): ``dy/dx = 1`` for ``0 < x < a`` and 0 elsewhere;
  ``dy/da = 1`` where ``x >= a``, ``q(x/a) - x/a`` where ``0 <= x < a`` (``q`` the rounding to the grid), and 0
  where ``x < 0``; ``dy/dalpha = sign(alpha) * dy/da``. Autograd through :func:`pact_quantize` yields exactly
  these (tested against the closed form);
* S-CL: one alpha per layer per bit-width (:class:`SwitchablePACT`); at 32 bits the input passes unchanged
  (the authors' code quantizes nothing at 32 bits unless its ``pact_fp`` flag is set).

:func:`pact_quantize` runs as one autograd function (:class:`_PACTQuantize`): the composed formula
(:func:`pact_quantize_reference`) records about ten elementwise operations per call, each with its own full-size
output kept for the backward pass, at every quantized convolution of every bit-width of every step. The fused
forward repeats the composition's float operations in its order, so it is bit-identical (the straight-through sum
``t + (round(t) - t)`` is ``round(t)`` exactly, and ``clamp(x, 0, a)`` selects the same values as
``where(x < a, relu(x), a)`` for ``a > 0``); it saves ``x`` alone and its backward computes the closed-form
gradients above, which equal the composition's up to float rounding (the composition forms ``((g a) / L) L / a``
where the closed form has ``g``). Its forward and its backward's elementwise part each run as one loop where they
can, with the same bits: native C++ (:mod:`methods.quant.native`), else compiled (:mod:`methods.quant.kernels`).
On dense float32 CPU inputs the whole function is a native operator with a C++ autograd node (the same loops, and
the backward's eager passes written out in ATen where the loops do not run), so no Python runs per call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from harness.errors import ConfigError
from harness.export import assign_tensors
from methods.quant import native
from methods.quant.dorefa import FULL_PRECISION
from methods.quant.kernels import pact_backward, pact_forward
from methods.quant.modules import FLOAT_BITS, BitSwitchable
from methods.quant.ste import round_ste

SHARED_KEY = "shared"


def _clip(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """``min(relu(x), a)`` in one pass: ``clamp(x, 0, a)`` takes the same values (NaN included)."""
    if torch.compiler.is_compiling() or clip.requires_grad or clip.dim() or clip.device.type != "cpu":
        # dynamo reads a tensor bound beside a Python one back to the host, a graph break at every call, and inductor
        # made a clamp with two tensor bounds 1.7x slower than this (a compiled AdaBits step at 32x32: 1,042 against
        # 609 ms); the same values. In eager, torch.clamp takes a tensor bound beside a float only as a number, which
        # a bound with gradient (a double backward) or with dimensions is not, and which on a GPU is a copy to the
        # host that waits for the device at every call
        return torch.minimum(torch.relu(x), clip)
    return torch.clamp(x, 0.0, clip)


class _PACTQuantize(torch.autograd.Function):
    """``round(L clamp(x, 0, a) / a) / L * a`` with ``a = |alpha|``; the closed-form gradients of the module
    docstring in the backward pass, from the saved input alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor:
        clip = alpha.abs()
        ctx.save_for_backward(x, alpha)
        ctx.levels = levels
        fused = pact_forward.run_like(x, clip, float(levels))  # one pass (methods.quant.kernels), same bits
        if fused is not None:
            return fused
        # out of place, as every quantizer's autograd function here: methods.quant.dorefa._ClampQuantize says why
        return torch.round(_clip(x, clip) / clip * levels) / levels * clip

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, alpha = ctx.saved_tensors
        clip = alpha.abs()
        levels = ctx.levels
        grad_x = grad_alpha = None
        # both gradients' elementwise passes as one loop; g dy/da comes back for the sum below
        fused = pact_backward.run_like(x, clip, grad_output, float(levels)) if all(ctx.needs_input_grad[:2]) else None
        if fused is not None:
            grad_x, product = fused
            return grad_x, product.sum().reshape(alpha.shape) * alpha.sgn(), None
        if ctx.needs_input_grad[0] and torch.compiler.is_compiling():
            # the mask product inductor fuses well; the same values for a finite upstream (a signed zero aside),
            # where the eager passes below keep an infinite one local
            grad_x = grad_output * ((x > 0) & (x < clip))
        elif ctx.needs_input_grad[0]:
            # g where 0 < x < a: two fused threshold passes (x > 0, then a - x > 0, whose sign is exactly that of
            # a - x) instead of two comparisons, an and and a multiply by the mask; no host read of a
            grad_x = torch.ops.aten.threshold_backward(
                torch.ops.aten.threshold_backward(grad_output, x, 0), clip - x, 0)
        if ctx.needs_input_grad[1]:
            # dy/da: q(x/a) - x/a on [0, a) (0 at x <= 0, where the clamp gives 0), 1 at x >= a (where that term is 0)
            scaled = _clip(x, clip).div_(clip).mul_(levels)
            dy_da = (torch.round(scaled) - scaled).div_(levels).add_(x >= clip)
            grad_alpha = (grad_output * dy_da).sum().reshape(alpha.shape) * alpha.sgn()
        return grad_x, grad_alpha, None


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """Clip ``x`` to ``[0, |alpha|]`` and round it to ``2^bits - 1`` uniform steps (straight-through)."""
    # _PACTQuantize as a C++ autograd node around the same loops, where it runs: no Python in either pass
    quantized = native.pact_quantize(x, alpha, 2**bits - 1)
    if quantized is not None:
        return quantized
    return _PACTQuantize.apply(x, alpha, 2**bits - 1)


def pact_quantize_reference(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pact_quantize` as the composed formula (the reference the fused function is tested against)."""
    clip = alpha.abs()
    levels = 2**bits - 1
    # torch.where (not torch.minimum) so that alpha gets the whole gradient where x >= alpha, ties included.
    clipped = torch.where(x < clip, torch.relu(x), clip)
    return round_ste(clipped / clip * levels) / levels * clip


class SwitchablePACT(BitSwitchable, nn.Module):
    """PACT with one clipping level per bit-width (``switchable=False``: one level shared by all bit-widths).

    No alpha is kept for 32 bits: that bit-width passes its input through unchanged, so an alpha would never
    receive a gradient nor be deployed.
    """

    def __init__(self, bits_set: Iterable[int], init: float, switchable: bool = True) -> None:
        super().__init__()
        self.bits_set = tuple(sorted(set(int(b) for b in bits_set)))
        self.switchable = switchable
        quantized = [b for b in self.bits_set if b < FULL_PRECISION]
        keys = [str(b) for b in quantized] if switchable else ([SHARED_KEY] if quantized else [])
        self.alphas = nn.ParameterDict({key: nn.Parameter(torch.tensor(float(init))) for key in keys})
        self.bits = self.bits_set[-1]

    def set_bits(self, bits: int) -> None:
        if int(bits) not in self.bits_set:
            raise ConfigError(f"this model has no clipping level for {bits} bits; it was built for bits "
                              f"{self.bits_set}")
        self.bits = int(bits)

    def alpha(self, bits: int) -> nn.Parameter:
        """The clipping parameter used at ``bits`` (< 32)."""
        return self.alphas[str(bits) if self.switchable else SHARED_KEY]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        return pact_quantize(x, self.alpha(self.bits), self.bits)

    def storage_bits(self, bits: int) -> int:
        return 0 if bits >= FULL_PRECISION else FLOAT_BITS

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        quantized = {b for b in bits_set if b < FULL_PRECISION}
        if not self.switchable:
            return FLOAT_BITS if quantized else 0
        return FLOAT_BITS * len(quantized)

    def export_tensors(self, bits: int) -> dict[str, torch.Tensor]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, torch.Tensor]:
        keys = {str(b) if self.switchable else SHARED_KEY for b in bits_set if b < FULL_PRECISION}
        return {f"alphas.{key}": self.alphas[key] for key in sorted(keys)}

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        assign_tensors(self, tensors)

    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        assign_tensors(self, tensors)
