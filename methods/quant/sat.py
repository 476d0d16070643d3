"""SAT-style nested weight quantization and the quantized convolution / linear layers of AdaBits.

Jin, Liu, Liao, "Towards Efficient Training for Neural Network Quantization" (SAT, arXiv 1912.10207), in the form
of Jin, Yang, Liao, "AdaBits: Neural Network Quantization with Adaptive Bit-Widths" (CVPR 2020,
arXiv 1912.09666), Sec. 3.2 ("modified" weight scheme):

* ``w~ = tanh(w) / max|tanh(w)|``; ``u = (w~ + 1) / 2``;
* ``q = min(floor(2^b u), 2^b - 1) / 2^b``; ``W_q = 2q - 1``. The levels are ``-1 + 2j / 2^b`` (``j = 0..2^b-1``):
  they include -1 and 0 but not +1. The floor (and its clamp) pass the gradient straight through; the gradient
  flows into ``w`` through tanh and the max.
* Nesting: ``floor(2^b u) = floor(floor(2^8 u) / 2^(8-b))``, so the b-bit integer code is the 8-bit code shifted
  right by ``8 - b``; one stored highest-bit copy serves every lower bit-width. In float32 the property is exact:
  multiplying by a power of two is exact and the straight-through sum reproduces the floor exactly.
* At 32 bits the weight is ``w~`` itself (the authors' code: "no quantizing but only clamping").
* SAT rescaling: ``W_q * 1 / (sqrt(n_out) * std(W_q))``, the std treated as a constant (no gradient). For a
  convolution ``n_out = out_channels * kh * kw`` and the rescale applies in training and evaluation (a BN follows;
  no bias to compensate). For the classifier ``n_out = out_features`` and the rescale applies during training
  only; in evaluation the bias is divided by the factor instead, out of place, so eval logits are the training
  logits divided by the (positive) factor and the argmax is unchanged.

Per-layer weight precision follows a rule (:data:`WEIGHT_BITS_RULES`): ``same`` (b), ``highest`` (the highest
bit-width of the set) or ``max8`` (``max(b, 8)``); AdaBits uses them for the first and last layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from methods.quant.dorefa import FULL_PRECISION
from methods.quant.modules import FLOAT_BITS, BitSwitchable, copy_weight_and_bias
from methods.quant.pact import SwitchablePACT

WeightBitsRule = Literal["same", "highest", "max8"]
WEIGHT_BITS_RULES: tuple[str, ...] = ("same", "highest", "max8")


def sat_normalize(weight: torch.Tensor) -> torch.Tensor:
    """``tanh(w) / max|tanh(w)|`` in [-1, 1] (the max element maps to exactly +-1)."""
    squashed = torch.tanh(weight)
    return squashed / squashed.abs().max()


def nested_quantize_unit(unit: torch.Tensor, bits: int) -> torch.Tensor:
    """``min(floor(2^bits u), 2^bits - 1) / 2^bits`` for ``u`` in [0, 1], gradient straight through."""
    steps = 2**bits
    scaled = unit * steps
    code = torch.clamp(torch.floor(scaled), max=steps - 1)
    # scaled - code is exact in float32 (Sterbenz), so the straight-through sum equals the code bit for bit.
    return (scaled + (code - scaled).detach()) / steps


def sat_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The AdaBits/SAT weight at ``bits`` (1..31), or the normalized weight at 32 bits; no rescaling."""
    normalized = sat_normalize(weight)
    if bits >= FULL_PRECISION:
        return normalized
    return 2 * nested_quantize_unit((normalized + 1) / 2, bits) - 1


def sat_rescale_factor(quantized_weight: torch.Tensor, fan_out: int) -> torch.Tensor:
    """``1 / (sqrt(fan_out) * std(W_q))`` with the std taken as a constant (unbiased, as ``torch.std``)."""
    return 1.0 / (math.sqrt(fan_out) * quantized_weight.detach().std())


def weight_bits_for(rule: str, bits: int, bits_set: tuple[int, ...]) -> int:
    """Precision of a layer's weights when the network runs at ``bits``."""
    if rule == "same":
        return bits
    if rule == "highest":
        return max(bits_set)
    if rule == "max8":
        return max(bits, 8)
    raise ConfigError(f"unknown weight-bits rule {rule!r}; choose one of {', '.join(WEIGHT_BITS_RULES)}")


class SATLayer(BitSwitchable):
    """Shared bit-width bookkeeping and storage of :class:`SATConv2d` and :class:`SATLinear`.

    Storage: weights at the layer's weight precision (one highest copy for the whole set, since codes nest),
    a 32-bit bias if any, and the input quantizer's clipping levels. The rescale factor is a function of the
    stored codes, so it costs nothing.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    bits_set: tuple[int, ...]
    weight_bits_rule: str
    input_quantizer: SwitchablePACT | None

    def set_bits(self, bits: int) -> None:
        if int(bits) not in self.bits_set:
            raise ConfigError(f"this layer was built for bits {self.bits_set}, not {bits}")
        self.bits = int(bits)
        if self.input_quantizer is not None:
            self.input_quantizer.set_bits(bits)

    def weight_bits(self, bits: int | None = None) -> int:
        return weight_bits_for(self.weight_bits_rule, self.bits if bits is None else bits, self.bits_set)

    def _extra_bits(self, bits: int) -> int:
        quantizer = 0 if self.input_quantizer is None else self.input_quantizer.storage_bits(bits)
        return (0 if self.bias is None else self.bias.numel() * FLOAT_BITS) + quantizer

    def storage_bits(self, bits: int) -> int:
        return self.weight.numel() * min(self.weight_bits(bits), FLOAT_BITS) + self._extra_bits(bits)

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        bits_set = tuple(bits_set)
        highest = max(min(self.weight_bits(b), FLOAT_BITS) for b in bits_set)
        quantizer = 0 if self.input_quantizer is None else self.input_quantizer.storage_bits_total(bits_set)
        bias = 0 if self.bias is None else self.bias.numel() * FLOAT_BITS
        return self.weight.numel() * highest + bias + quantizer


class SATConv2d(SATLayer, nn.Conv2d):
    """A convolution with SAT weights and, unless ``input_quantizer`` is None, a PACT quantizer on its input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, *,
                 bits_set: Iterable[int], weight_bits_rule: str = "same", rescale: bool = True,
                 input_quantizer: SwitchablePACT | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.bits_set = tuple(sorted(set(int(b) for b in bits_set)))
        weight_bits_for(weight_bits_rule, self.bits_set[-1], self.bits_set)  # reject an unknown rule now
        self.weight_bits_rule = weight_bits_rule
        self.rescale = rescale
        self.input_quantizer = input_quantizer
        self.bits = self.bits_set[-1]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> SATConv2d:
        """A quantized copy of ``conv`` with the same shape and initial weights."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, **kwargs)
        return copy_weight_and_bias(conv, layer)

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution uses at the current bit-width (quantized, then rescaled if enabled)."""
        weight = sat_weight(self.weight, self.weight_bits())
        if self.rescale:
            fan_out = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
            weight = weight * sat_rescale_factor(weight, fan_out)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SATLinear(SATLayer, nn.Linear):
    """The classifier: SAT weights, PACT on its input, SAT rescaling in training and bias division in eval."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits_set: Iterable[int],
                 weight_bits_rule: str = "max8", rescale: bool = True,
                 input_quantizer: SwitchablePACT | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.bits_set = tuple(sorted(set(int(b) for b in bits_set)))
        weight_bits_for(weight_bits_rule, self.bits_set[-1], self.bits_set)
        self.weight_bits_rule = weight_bits_rule
        self.rescale = rescale
        self.input_quantizer = input_quantizer
        self.bits = self.bits_set[-1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> SATLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        return copy_weight_and_bias(linear, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = sat_weight(self.weight, self.weight_bits())
        bias = self.bias
        if self.rescale:
            factor = sat_rescale_factor(weight, self.out_features)
            if self.training:
                weight = weight * factor
            elif bias is not None:
                bias = bias / factor  # a new tensor: the parameter itself is never modified
        return F.linear(x, weight, bias)
