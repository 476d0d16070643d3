"""AdaBits' quantized convolution and linear layers: SAT weights (:mod:`methods.quant.sat`), a PACT quantizer on the
input (:mod:`methods.quant.pact`), SAT's rescale, per-layer weight precision, storage and export.

Jin, Yang, Liao, "AdaBits: Neural Network Quantization with Adaptive Bit-Widths" (CVPR 2020, arXiv 1912.09666),
Sec. 3.2; the rescale is SAT's (Jin, Liu, Liao, arXiv 1912.10207): ``W_q / (sqrt(n_out) * std(W_q))``, in training
and evaluation for a convolution, in training only for the classifier, whose bias is divided by the factor in
evaluation instead.

Per-layer weight precision follows a rule (:data:`WEIGHT_BITS_RULES`): ``same`` (b), ``highest`` (the highest
bit-width of the set) or ``max8`` (``max(b, 8)``); AdaBits uses them for the first and last layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.export import Codes, assign_tensors, take_prefixed, with_prefix
from methods.quant.modules import FLOAT_BITS, BitSwitchable, QuantizedSite, copy_weight_and_bias
from methods.quant.pact import SwitchablePACT
from methods.quant.sat import (
    SAT_TERMS,
    SATStoredWeights,
    _SATTerms,
    check_weight_scheme,
    sat_codes,
    sat_normalize,
    sat_rescale_factor,
    sat_weight,
)
from methods.quant.version_cache import WeightTerms, cached_terms
from methods.quant.weight_cache import cached_in_eval

__all__ = ["WEIGHT_BITS_RULES", "SATConv2d", "SATLayer", "SATLinear", "weight_bits_for"]

WeightBitsRule = Literal["same", "highest", "max8"]
WEIGHT_BITS_RULES: tuple[str, ...] = ("same", "highest", "max8")


def weight_bits_for(rule: str, bits: int, bits_set: tuple[int, ...]) -> int:
    """Precision of a layer's weights when the network runs at ``bits``."""
    if rule == "same":
        return bits
    if rule == "highest":
        return max(bits_set)
    if rule == "max8":
        return max(bits, 8)
    raise ConfigError(f"unknown weight-bits rule {rule!r}; choose one of {', '.join(WEIGHT_BITS_RULES)}")


class SATLayer(QuantizedSite, BitSwitchable):
    """Shared bit-width bookkeeping and storage of :class:`SATConv2d` and :class:`SATLinear`.

    Storage: weights at the layer's weight precision (one highest copy for the whole set, since codes nest under
    both weight schemes; module docstring), a 32-bit bias if any, and the input quantizer's clipping levels. The
    rescale factor and the centered scheme's half-step offset are functions of the stored codes and the
    bit-width, so they cost nothing.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    bits_set: tuple[int, ...]
    weight_bits_rule: str
    weight_scheme: str
    input_quantizer: SwitchablePACT | None

    stored_weights: SATStoredWeights | None

    def _set_up(self, bits_set: Iterable[int], weight_bits_rule: str, rescale: bool,
                input_quantizer: SwitchablePACT | None, weight_scheme: str) -> None:
        """What both layers' constructors set after their ``nn`` base's (which registers the weights)."""
        self.bits_set = tuple(sorted(set(int(b) for b in bits_set)))
        weight_bits_for(weight_bits_rule, self.bits_set[-1], self.bits_set)  # reject an unknown rule now
        self.weight_bits_rule = weight_bits_rule
        self.weight_scheme = check_weight_scheme(weight_scheme)
        self.rescale = rescale
        self.input_quantizer = input_quantizer
        self.stored_weights = None  # an export loader's SATStoredWeights replaces the latent weights
        self.bits = self.bits_set[-1]

    @cached_in_eval
    def quantized_weight(self) -> torch.Tensor:
        """The SAT weight at the current weight precision under the layer's scheme, before any rescale (from the
        stored codes in a layer loaded from an export)."""
        if self.stored_weights is not None:
            return self.stored_weights(self.weight_bits())
        return sat_weight(self.weight, self.weight_bits(), self.weight_scheme)

    def batch_terms(self) -> tuple[str, WeightTerms, tuple] | None:
        """What :mod:`methods.quant.weight_batch` needs to quantize this layer's weight with the network's others at
        the current weight precision and scheme (None for a layer loaded from an export)."""
        if self.stored_weights is not None:
            return None
        return SAT_TERMS, cached_terms(self.weight, SAT_TERMS, _SATTerms), (self.weight_bits(), self.weight_scheme)

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

    # -- export (harness.export): one copy of the codes at the highest precision, bias, clipping levels --------
    def export_tensors(self, bits: int) -> dict[str, object]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, object]:
        bits_set = tuple(bits_set)
        highest = max(min(self.weight_bits(b), FLOAT_BITS) for b in bits_set)
        normalized = sat_normalize(self.weight)
        tensors: dict[str, object] = ({"weight": normalized} if highest >= FLOAT_BITS
                                      else {"weight_codes": Codes(sat_codes(normalized, highest), highest)})
        if self.bias is not None:
            tensors["bias"] = self.bias
        if self.input_quantizer is not None:
            tensors.update(with_prefix("input_quantizer.", self.input_quantizer.export_tensors_total(bits_set)))
        return tensors

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        self.load_exported_total(tensors, (bits,))

    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        bits_set = tuple(bits_set)
        tensors = dict(tensors)
        highest = max(min(self.weight_bits(b), FLOAT_BITS) for b in bits_set)
        values = tensors.pop("weight") if highest >= FLOAT_BITS else tensors.pop("weight_codes")
        self.stored_weights = SATStoredWeights(values, highest, self.weight_scheme)
        if self.input_quantizer is not None:
            self.input_quantizer.load_exported_total(take_prefixed(tensors, "input_quantizer."), bits_set)
        assign_tensors(self, tensors)


class SATConv2d(SATLayer, nn.Conv2d):
    """A convolution with SAT weights (``weight_scheme`` "original" or "centered") and, unless
    ``input_quantizer`` is None, a PACT quantizer on its input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, *,
                 bits_set: Iterable[int], weight_bits_rule: str = "same", rescale: bool = True,
                 input_quantizer: SwitchablePACT | None = None, weight_scheme: str = "original") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._set_up(bits_set, weight_bits_rule, rescale, input_quantizer, weight_scheme)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> SATConv2d:
        """A quantized copy of ``conv`` with the same shape and initial weights."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, **kwargs)
        return copy_weight_and_bias(conv, layer)

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution uses at the current bit-width (quantized, then rescaled if enabled)."""
        weight = self.quantized_weight()
        if self.rescale:
            fan_out = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
            weight = weight * sat_rescale_factor(weight, fan_out)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SATLinear(SATLayer, nn.Linear):
    """The classifier: SAT weights (``weight_scheme`` as in :class:`SATConv2d`), PACT on its input, SAT rescaling
    in training and bias division in eval."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits_set: Iterable[int],
                 weight_bits_rule: str = "max8", rescale: bool = True,
                 input_quantizer: SwitchablePACT | None = None, weight_scheme: str = "original") -> None:
        super().__init__(in_features, out_features, bias)
        self._set_up(bits_set, weight_bits_rule, rescale, input_quantizer, weight_scheme)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> SATLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        return copy_weight_and_bias(linear, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.quantized_weight()
        bias = self.bias
        if self.rescale:
            factor = sat_rescale_factor(weight, self.out_features)
            if self.training:
                weight = weight * factor
            elif bias is not None:
                bias = bias / factor  # a new tensor: the parameter itself is never modified
        return F.linear(x, weight, bias)
