"""Learned Step Size Quantization of activations (Esser et al., "Learned Step Size Quantization", ICLR 2020).

Signed activations (the inputs of a transformer's linear layers are signed), ``Q_n = 2^(b-1)``,
``Q_p = 2^(b-1) - 1``::

    v_hat = round(clip(v / s, -Q_n, Q_p)) * s         (straight-through rounding)

and the step ``s`` learns with its gradient scaled by ``g = 1 / sqrt(N Q_p)`` (LSQ Sec. 2.2), so
``d v_hat / d s = g * (round(v/s) - v/s)`` inside the range, ``-g Q_n`` below, ``g Q_p`` above. ``N`` is the
number of features per sample (the paper's N_F: every element of one sample's activation tensor).

:class:`LSQActivation` keeps one step per bit-width (a vector indexed by ``bits - 1``, so its shape and the
state dict do not depend on which bit-widths are trained). Initialization, as the LSQ paper: on the first
training batch seen at a bit-width, ``s = 2 mean|v| / sqrt(Q_p)``; :meth:`LSQActivation.calibrate` applies the
same rule to a bit-width that was never trained (EMQ's evaluation at unseen bit-widths). 1-bit signed LSQ has
``Q_p = 0`` (no positive level) and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from harness.errors import ConfigError
from methods.quant.modules import BitSwitchable
from methods.quant.ste import clamp_ste, round_ste

FULL_PRECISION = 32


def signed_levels(bits: int) -> tuple[int, int]:
    """``(Q_n, Q_p)`` of signed LSQ at ``bits``."""
    if bits < 2:
        raise ConfigError("signed LSQ needs at least 2 bits (at 1 bit it has no positive level)")
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def features_per_sample(x: torch.Tensor) -> int:
    return x[0].numel() if x.dim() > 1 else x.numel()


class _LSQQuantize(torch.autograd.Function):
    """LSQ in one autograd node: forward ``round(clip(x / s, -Q_n, Q_p)) s``; backward the closed form.

    The composed formula saves three activation-sized tensors per call (``x``, ``x / s`` and the rounded levels)
    and records five elementwise nodes; this saves ``x`` alone and recomputes ``x / s`` in the backward pass.
    Gradients: ``x`` gets ``g`` where ``-Q_n < x / s < Q_p`` (the open range, as ``torch.clamp``'s mask), else 0;
    the step gets ``scale * sum(g * (round(v) - v))`` inside, ``g * -Q_n`` below and ``g * Q_p`` above.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, q_neg: int, q_pos: int, gradient_scale: float):
        # The composition's forward step is (s - s g) + s g (scale_gradient), which can differ from s in the last
        # bit; using the same value keeps the forward bit-identical to it.
        forward_step = (step - step * gradient_scale) + step * gradient_scale
        ctx.save_for_backward(x, forward_step)
        ctx.levels = (q_neg, q_pos)
        ctx.gradient_scale = gradient_scale
        # out of place, as every quantizer's autograd function here: methods.quant.dorefa._ClampQuantize says why
        return torch.round(torch.clamp(x / forward_step, -q_neg, q_pos)) * forward_step

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, forward_step = ctx.saved_tensors
        q_neg, q_pos = ctx.levels
        unit = x / forward_step
        inside = (unit > -q_neg) & (unit < q_pos)
        grad_x = grad_output * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, unit.round() - unit, unit.clamp(-q_neg, q_pos))
            grad_step = (grad_output * local).sum().mul(ctx.gradient_scale).reshape(forward_step.shape)
        return grad_x, grad_step, None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ forward at ``bits`` with the step-gradient scale ``1 / sqrt(N Q_p)`` (one fused autograd node)."""
    q_neg, q_pos = signed_levels(bits)
    return _LSQQuantize.apply(x, step, q_neg, q_pos, 1.0 / math.sqrt(features_per_sample(x) * q_pos))


def lsq_quantize_reference(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`lsq_quantize` as the composed formula (the reference the fused node is tested against)."""
    q_neg, q_pos = signed_levels(bits)
    step = scale_gradient(step, 1.0 / math.sqrt(features_per_sample(x) * q_pos))
    return round_ste(clamp_ste(x / step, -q_neg, q_pos)) * step


def lsq_initial_step(x: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ's initialization ``2 mean|x| / sqrt(Q_p)``."""
    _, q_pos = signed_levels(bits)
    return 2 * x.detach().abs().mean() / math.sqrt(q_pos)


class LSQActivation(BitSwitchable, nn.Module):
    """Signed LSQ of its input with a learned step per bit-width; 32 bits passes the input through.

    ``act_bits`` fixes the activation precision for every weight bit-width below 32 (``None``: same as the weights);
    the step is still kept per (weight) bit-width.
    """

    def __init__(self, bits: int = FULL_PRECISION, act_bits: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.act_bits = act_bits
        self.steps = nn.Parameter(torch.ones(FULL_PRECISION))
        self.register_buffer("initialized", torch.zeros(FULL_PRECISION, dtype=torch.bool))

    def levels_bits(self, bits: int) -> int:
        return self.act_bits if self.act_bits is not None and bits < FULL_PRECISION else bits

    def calibrate(self, x: torch.Tensor, bits: int) -> None:
        """Set the step at ``bits`` to LSQ's initial value for the activation ``x``."""
        with torch.no_grad():
            self.steps[bits - 1] = lsq_initial_step(x, self.levels_bits(bits))
            self.initialized[bits - 1] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        if not bool(self.initialized[self.bits - 1]):
            if not self.training:
                raise ConfigError(f"the LSQ step for {self.bits} bits was never trained or calibrated")
            self.calibrate(x, self.bits)
        return lsq_quantize(x, self.steps[self.bits - 1], self.levels_bits(self.bits))

    def storage_bits(self, bits: int) -> int:
        return 0 if bits >= FULL_PRECISION else FULL_PRECISION  # one 32-bit step

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return sum(self.storage_bits(b) for b in bits_set)

    def export_tensors(self, bits: int) -> dict[str, torch.Tensor]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, torch.Tensor]:
        return {f"step{b}": self.steps[b - 1] for b in bits_set if b < FULL_PRECISION}

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        self.load_exported_total(tensors, (bits,))

    @torch.no_grad()
    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        for b in bits_set:
            if b < FULL_PRECISION:
                self.steps[b - 1] = tensors[f"step{b}"]
                self.initialized[b - 1] = True
