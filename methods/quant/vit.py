"""Quantized linear layers for vision transformers and the swap that quantizes a timm ViT.

EMQ's ViT setting, through the harness's topology (:mod:`harness.topology`): every ``nn.Linear`` except the
classifier (role ``"head"``) gets quantized weights (StatsQ, :mod:`methods.quant.statsq`, optionally
bias-corrected) and an LSQ quantizer on its input (:mod:`methods.quant.lsq`); the patch-embedding convolution
(role ``"stem"``) and the layer norms stay full precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.export import assign_tensors, take_prefixed, with_prefix
from harness.topology import Site, Topology, quantize_model
from methods.quant.lsq import LSQActivation
from methods.quant.modules import (
    BitSwitchable,
    QuantizedSite,
    StoredWeights,
    WeightQuantizer,
    copy_weight_and_bias,
    deployed_weight,
    export_weight,
)
from methods.quant.weight_cache import cached_in_eval

FLOAT_BITS = 32


class QuantLinear(QuantizedSite, BitSwitchable, nn.Linear):
    """``nn.Linear`` with ``weight_quantizer(weight, bits)`` on its weight and an optional input quantizer.

    ``scales_per_layer`` is the number of 32-bit constants deployment at a bit-width below 32 stores beside the
    integer codes (StatsQ's per-row scale; with bias correction also Eq. 2's scale and shift).
    ``total_weight_bits``: bits per weight that the switchable set stores (32: the latent weights).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_quantizer: WeightQuantizer, input_quantizer: nn.Module | None = None,
                 bits: int = FLOAT_BITS, scales_per_layer: int = 0, total_weight_bits: int = FLOAT_BITS) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.bits = bits
        self.scales_per_layer = scales_per_layer
        self.total_weight_bits = total_weight_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuantLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        return copy_weight_and_bias(linear, layer)

    @cached_in_eval
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def _fixed_bits(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * FLOAT_BITS

    def storage_bits(self, bits: int) -> int:
        scales = self.scales_per_layer * FLOAT_BITS if bits < FLOAT_BITS else 0
        act = self.input_quantizer.storage_bits(bits) if self.input_quantizer is not None else 0
        return self.weight.numel() * min(bits, FLOAT_BITS) + scales + self._fixed_bits() + act

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        bits_set = tuple(bits_set)
        act = self.input_quantizer.storage_bits_total(bits_set) if self.input_quantizer is not None else 0
        return self.weight.numel() * self.total_weight_bits + self._fixed_bits() + act

    # -- export (harness.export): codes and row constants at b, or the latent weights for the whole set ---------
    def _with_bias_and_input(self, tensors: dict[str, object], exported_input: dict[str, object]) -> dict[str, object]:
        if self.bias is not None:
            tensors["bias"] = self.bias
        return {**tensors, **with_prefix("input_quantizer.", exported_input)}

    def export_tensors(self, bits: int) -> dict[str, object]:
        exported_input = self.input_quantizer.export_tensors(bits) if self.input_quantizer is not None else {}
        return self._with_bias_and_input(export_weight(self.weight, self.weight_quantizer, bits), exported_input)

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, object]:
        bits_set = tuple(bits_set)
        exported_input = (self.input_quantizer.export_tensors_total(bits_set) if self.input_quantizer is not None
                          else {})
        return self._with_bias_and_input({"weight": self.weight}, exported_input)

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        tensors = dict(tensors)
        if self.input_quantizer is not None:
            self.input_quantizer.load_exported(take_prefixed(tensors, "input_quantizer."), bits)
        if self.bias is not None:
            assign_tensors(self, {"bias": tensors["bias"]})
        self.weight_quantizer = StoredWeights({bits: deployed_weight(tensors, self.weight_quantizer, bits)})

    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        tensors = dict(tensors)
        if self.input_quantizer is not None:
            self.input_quantizer.load_exported_total(take_prefixed(tensors, "input_quantizer."), tuple(bits_set))
        assign_tensors(self, tensors)


def quantize_vit(model: nn.Module, topology: Topology, *, weight_quantizer: WeightQuantizer, bits: int,
                 act_bits: int | None, constants_of: Callable[[nn.Linear], int]) -> nn.Module:
    """Quantize ``model`` in place through ``topology``: every quantized linear site becomes a
    :class:`QuantLinear` with an LSQ input quantizer.

    ``constants_of(linear)``: the 32-bit constants that layer stores at a quantized bit-width (for storage).
    """

    def layer(module: nn.Module, site: Site) -> nn.Module:
        if not isinstance(module, nn.Linear) or not (site.quantize_weight and site.quantize_input):
            raise ConfigError(f"the ViT path quantizes linear layers' weights and inputs together; site {site.name} "
                              f"asks for something else")
        return QuantLinear.from_linear(module, weight_quantizer=weight_quantizer,
                                       input_quantizer=LSQActivation(bits, act_bits), bits=bits,
                                       scales_per_layer=constants_of(module))

    return quantize_model(model, topology, layer=layer)
