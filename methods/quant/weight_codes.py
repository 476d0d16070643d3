"""Integer codes of the weight quantizers: what a deployed ``b``-bit layer stores instead of its latent weights.

A codec turns a latent weight into ``b``-bit unsigned codes and the few 32-bit constants that map them back to
the quantized weight (``encode``), and rebuilds that weight from them (``decode``); ``decode(encode(w))`` is the
quantizer's forward value (bit for bit for DoReFa and StatsQ, whose decode repeats the forward pass's operations):

* DoReFa (:func:`methods.quant.dorefa.dorefa_weight`): code ``q = round((2^b - 1) u)`` in ``0..2^b-1``, constant
  ``E``; ``W_q = E (2 q / (2^b - 1) - 1)``.
* StatsQ (:func:`methods.quant.statsq.statsq_weight`): code ``level + 2^(b-1)`` in ``0..2^b-1``, one scale ``s_r``
  per output row; ``W_q = s_r (q - 2^(b-1) + 1/2) / 2^(b-1)``.
* Bias-corrected (:class:`methods.quant.bias_correction.BiasCorrectedQuantizer`): the inner quantizer's codes and
  constants, and Eq. 2's ``scale = sqrt(V[w] / V[w_q])`` and ``shift = E[w] - E[w_q]`` (per layer or per output
  channel); ``W'_q = scale (W_q + shift)``. Folding the two into the codes' affine map (``a q + o``) would save a
  constant but round differently from the forward pass, and a one-ulp difference in a weight can move an activation
  of the next layer across a quantization step (measured: 2e-5 in the logits of an 8-bit EMQ ResNet-20).

A plugin with its own weight quantizer registers a codec with :func:`register_weight_codec` to make its layers
exportable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from harness.errors import MbqError
from methods.quant.bias_correction import BiasCorrectedQuantizer, correction_coefficients
from methods.quant.dorefa import FULL_PRECISION, dorefa_weight
from methods.quant.statsq import statsq_scale, statsq_weight

Constants = dict[str, torch.Tensor]


class WeightCodec(Protocol):
    """Codes and constants of one weight quantizer at ``bits`` < 32."""

    def encode(self, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, Constants]:
        """``(codes, constants)``: int64 codes in ``0..2^bits-1`` of the weight's shape, float constants."""

    def decode(self, codes: torch.Tensor, constants: Constants, bits: int) -> torch.Tensor:
        """The quantized weight from its codes and constants."""


class DoReFaCodec:
    """DoReFa weights (module docstring)."""

    def encode(self, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, Constants]:
        normalized = torch.tanh(weight)  # the forward pass's steps, so the codes are its rounding exactly
        unit = normalized / (2 * normalized.abs().max()) + 0.5
        return torch.round(unit * (2**bits - 1)).long(), {"scale": weight.abs().mean()}

    def decode(self, codes: torch.Tensor, constants: Constants, bits: int) -> torch.Tensor:
        return constants["scale"] * (2 * (codes.float() / (2**bits - 1)) - 1)


class StatsQCodec:
    """StatsQ weights (module docstring)."""

    def encode(self, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, Constants]:
        per_side = 2 ** (bits - 1)
        scale = statsq_scale(weight).clamp_min(torch.finfo(weight.dtype).tiny)
        unit = torch.clamp(weight / scale, -1.0, 1.0) * per_side
        level = torch.clamp(torch.floor(unit), -per_side, per_side - 1)
        return (level + per_side).long(), {"scale": scale}

    def decode(self, codes: torch.Tensor, constants: Constants, bits: int) -> torch.Tensor:
        per_side = 2 ** (bits - 1)
        return constants["scale"] * ((codes.float() - per_side) + 0.5) / per_side


class BiasCorrectedCodec:
    """Eq. 2 of EMQ after the inner codec: its codes and constants, and the correction's scale and shift."""

    def __init__(self, inner: WeightCodec, quantizer: BiasCorrectedQuantizer) -> None:
        self.inner = inner
        self.quantizer = quantizer

    def encode(self, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, Constants]:
        codes, constants = self.inner.encode(weight, bits)
        scale, shift = correction_coefficients(self.quantizer.quantizer(weight, bits),
                                               self.quantizer.quantizer(weight, FULL_PRECISION),
                                               self.quantizer.granularity)
        return codes, {**constants, "correction_scale": scale, "correction_shift": shift}

    def decode(self, codes: torch.Tensor, constants: Constants, bits: int) -> torch.Tensor:
        inner = {name: value for name, value in constants.items() if not name.startswith("correction_")}
        quantized = self.inner.decode(codes, inner, bits)
        return constants["correction_scale"] * (quantized + constants["correction_shift"])  # as bias_correct


_CODECS: dict[Callable, WeightCodec] = {dorefa_weight: DoReFaCodec(), statsq_weight: StatsQCodec()}


def register_weight_codec(quantizer: Callable, codec: WeightCodec) -> None:
    """Make layers quantized by ``quantizer`` exportable through ``codec``."""
    _CODECS[quantizer] = codec


def weight_codec(quantizer: Callable) -> WeightCodec:
    """The codec of a layer's ``weight_quantizer``; a quantizer without one cannot be exported."""
    if isinstance(quantizer, BiasCorrectedQuantizer):
        return BiasCorrectedCodec(weight_codec(quantizer.quantizer), quantizer)
    codec = _CODECS.get(quantizer)
    if codec is None:
        raise MbqError(f"no integer codes are known for the weight quantizer {quantizer!r}, so its layers cannot be "
                       f"exported (register one with methods.quant.weight_codes.register_weight_codec)")
    return codec
