"""Shared quantization building blocks for method plugins (see each module's docstring for the formulas)."""

from methods.quant.dorefa import FULL_PRECISION, dorefa_activation, dorefa_weight
from methods.quant.modules import (
    BitSwitchable,
    QuantAct,
    QuantConv2d,
    SwitchableBatchNorm2d,
    batchnorm_storage_bits,
    set_model_bits,
    swap_modules,
)
from methods.quant.ste import floor_ste, quantize_unit, round_ste

__all__ = [
    "FULL_PRECISION", "BitSwitchable", "QuantAct", "QuantConv2d", "SwitchableBatchNorm2d", "batchnorm_storage_bits",
    "dorefa_activation", "dorefa_weight", "floor_ste", "quantize_unit", "round_ste", "set_model_bits", "swap_modules",
]
