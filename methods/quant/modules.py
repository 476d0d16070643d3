"""Bit-switchable layers: quantized convolution, quantized activation and switchable batch normalization.

Every layer here implements the small protocol the harness relies on:

* ``set_bits(bits)``: select the precision of the next forward passes (stateless apart from that choice);
* ``storage_bits(bits)``: bits that must be stored to deploy this layer at ``bits``;
* ``storage_bits_total(bits_set)``: bits that must be stored to serve every bit-width of ``bits_set``;
* ``export_tensors(bits)`` / ``export_tensors_total(bits_set)`` and ``load_exported`` / ``load_exported_total``:
  exactly those bits as tensors, and the layer rebuilt from them (:mod:`harness.export`).

At 32 bits a quantized layer stores the 32-bit weight its quantizer produces and no constants (they are folded
into it); below 32 bits, the integer codes and the quantizer's constants (:mod:`methods.quant.weight_codes`).

Switchable BN follows Yu et al., "Any-Precision Deep Neural Networks" (AAAI 2021), Sec. 3.2: one BatchNorm
(affine and running statistics) per bit-width, everything else shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError, MbqError
from harness.export import Codes, assign_tensors
from methods.quant.module_lists import modules_where
from methods.quant.weight_cache import cached_in_eval

WeightQuantizer = Callable[[torch.Tensor, int], torch.Tensor]
ActQuantizer = Callable[[torch.Tensor, int], torch.Tensor]
FLOAT_BITS = 32


@torch.no_grad()
def copy_weight_and_bias(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` (a quantized layer) the initial weight and bias of ``source`` (its full-precision twin)."""
    target.weight.copy_(source.weight)
    if source.bias is not None:
        target.bias.copy_(source.bias)
    return target


class BitSwitchable:
    """Marker base for layers whose behaviour depends on the active bit-width."""

    bits: int

    def set_bits(self, bits: int) -> None:
        self.bits = int(bits)


class StoredWeights(nn.Module):
    """Deployed weights per bit-width, standing in for a layer's weight quantizer after export:
    ``StoredWeights(...)(weight, bits)`` returns the stored weight of ``bits`` and ignores the latent ``weight``."""

    def __init__(self, weights: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.bits_set = tuple(sorted(weights))
        for bits, weight in weights.items():
            self.register_buffer(f"bits{bits}", weight.detach().clone())

    def forward(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        if bits not in self.bits_set:
            raise ConfigError(f"this exported layer holds weights for bits {list(self.bits_set)}, not {bits}")
        return getattr(self, f"bits{bits}")


def export_weight(weight: torch.Tensor, quantizer: WeightQuantizer | None, bits: int) -> dict[str, object]:
    """A layer's weight as deployment at ``bits`` stores it: full precision (no quantizer), the 32-bit weight the
    quantizer produces (``bits`` >= 32), or its codes and constants."""
    from methods.quant.weight_codes import weight_codec

    if quantizer is None:
        return {"weight": weight}
    if bits >= FLOAT_BITS:
        return {"weight": quantizer(weight, FLOAT_BITS)}
    codes, constants = weight_codec(quantizer).encode(weight, bits)
    return {"weight_codes": Codes(codes, bits), **{f"weight_{name}": value for name, value in constants.items()}}


def deployed_weight(tensors: dict[str, torch.Tensor], quantizer: WeightQuantizer, bits: int) -> torch.Tensor:
    """The weight :func:`export_weight` stored for a quantized layer at ``bits``, decoded."""
    from methods.quant.weight_codes import weight_codec

    if bits >= FLOAT_BITS:
        return tensors["weight"]
    constants = {name[len("weight_"):]: value for name, value in tensors.items()
                 if name.startswith("weight_") and name != "weight_codes"}
    return weight_codec(quantizer).decode(tensors["weight_codes"], constants, bits)


class QuantizedSite:
    """What a layer at a site of the harness topology quantizes (:func:`harness.topology.layer_quantizes`):
    its weights (always, unless a subclass says otherwise) and its input when it has an input quantizer."""

    input_quantizer: object | None

    @property
    def quantizes_weight(self) -> bool:
        return True

    @property
    def quantizes_input(self) -> bool:
        return self.input_quantizer is not None


class QuantConv2d(QuantizedSite, BitSwitchable, nn.Conv2d):
    """A ``Conv2d`` that quantizes its input with ``input_quantizer(x, bits)`` and its weight with
    ``weight_quantizer(weight, bits)`` on every forward pass; either may be None (that part stays full precision,
    as a topology departure such as a full-precision shortcut asks).

    ``scales_per_layer`` is the number of 32-bit scale factors deployment below 32 bits stores beside the integer
    codes (1 for DoReFa's ``E``; at 32 bits the stored weight includes them). ``total_weight_bits`` is how many
    bits per weight the switchable set stores (32: the latent full-precision weights, because not every
    quantizer's grids nest).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        weight_quantizer: WeightQuantizer | None,
        input_quantizer: ActQuantizer | None = None,
        bits: int = FLOAT_BITS,
        scales_per_layer: int = 1,
        total_weight_bits: int = FLOAT_BITS,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.bits = bits
        self.scales_per_layer = scales_per_layer if weight_quantizer is not None else 0
        self.total_weight_bits = total_weight_bits if weight_quantizer is not None else FLOAT_BITS

    @property
    def quantizes_weight(self) -> bool:
        return self.weight_quantizer is not None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> QuantConv2d:
        """A quantized copy of ``conv`` with the same shape and the same initial weights."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, **kwargs,
        )
        return copy_weight_and_bias(conv, layer)

    @cached_in_eval
    def quantized_weight(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x, self.bits)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _bias_bits(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * FLOAT_BITS

    def storage_bits(self, bits: int) -> int:
        if self.weight_quantizer is None or bits >= FLOAT_BITS:  # 32-bit weights, constants folded in
            return self.weight.numel() * FLOAT_BITS + self._bias_bits()
        return self.weight.numel() * bits + self.scales_per_layer * FLOAT_BITS + self._bias_bits()

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return self.storage_bits(self.total_weight_bits)

    def _bias(self) -> dict[str, torch.Tensor]:
        return {} if self.bias is None else {"bias": self.bias}

    def export_tensors(self, bits: int) -> dict[str, object]:
        return {**export_weight(self.weight, self.weight_quantizer, bits), **self._bias()}

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, object]:
        if self.total_weight_bits < FLOAT_BITS:
            raise MbqError(f"this network's switchable set is counted as one {self.total_weight_bits}-bit copy of "
                           f"the weights, from which the other bit-widths' codes do not follow (their grids do not "
                           f"nest), so it cannot be exported as one artifact; export each bit-width")
        return {"weight": self.weight, **self._bias()}  # the latent weights: every bit-width quantizes them

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        if self.bias is not None:
            assign_tensors(self, {"bias": tensors["bias"]})
        if self.weight_quantizer is None:
            assign_tensors(self, {"weight": tensors["weight"]})
        else:
            self.weight_quantizer = StoredWeights({bits: deployed_weight(tensors, self.weight_quantizer, bits)})

    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        assign_tensors(self, tensors)


class QuantAct(BitSwitchable, nn.Module):
    """An activation that applies ``act_quantizer(x, bits)``; it stores nothing."""

    def __init__(self, act_quantizer: ActQuantizer, bits: int = FLOAT_BITS) -> None:
        super().__init__()
        self.act_quantizer = act_quantizer
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quantizer(x, self.bits)

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return 0


def batchnorm_tensors(norm: nn.modules.batchnorm._BatchNorm) -> dict[str, torch.Tensor]:
    """gamma, beta, running mean and running variance by name (the step counter is not deployed)."""
    tensors = {"weight": norm.weight, "bias": norm.bias, "running_mean": norm.running_mean,
               "running_var": norm.running_var}
    return {name: t for name, t in tensors.items() if t is not None}


def batchnorm_storage_bits(norm: nn.modules.batchnorm._BatchNorm) -> int:
    """gamma, beta, running mean and running variance, 32 bits each (the step counter is not deployed)."""
    return sum(t.numel() * FLOAT_BITS for t in batchnorm_tensors(norm).values())


def switchable_norm_tensors(norms: nn.ModuleDict, bits_set: Iterable[int]) -> dict[str, torch.Tensor]:
    """The BN tensors of each bit-width of ``bits_set`` in a ModuleDict of BNs keyed by bit-width, by name."""
    return {f"norms.{b}.{name}": t for b in bits_set for name, t in batchnorm_tensors(norms[str(b)]).items()}


class PerBitNormExport:
    """Export of a layer that holds one BN per bit-width in ``norms`` (keyed by ``str(bits)``): the BNs of the
    exported bit-widths, under their keys."""

    norms: nn.ModuleDict

    def export_tensors(self, bits: int) -> dict[str, torch.Tensor]:
        return self.export_tensors_total((bits,))

    def export_tensors_total(self, bits_set: Iterable[int]) -> dict[str, torch.Tensor]:
        return switchable_norm_tensors(self.norms, bits_set)

    def load_exported(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        assign_tensors(self, tensors)

    def load_exported_total(self, tensors: dict[str, torch.Tensor], bits_set: Iterable[int]) -> None:
        assign_tensors(self, tensors)


class SwitchableBatchNorm2d(PerBitNormExport, BitSwitchable, nn.Module):
    """One ``BatchNorm2d`` per bit-width; ``set_bits`` picks which one normalizes."""

    def __init__(self, num_features: int, bits_set: Iterable[int], eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.bits_set = tuple(sorted(set(int(b) for b in bits_set)))
        self.norms = nn.ModuleDict({str(b): nn.BatchNorm2d(num_features, eps, momentum) for b in self.bits_set})
        self.bits = self.bits_set[-1]

    @classmethod
    def from_norm(cls, norm: nn.BatchNorm2d, bits_set: Iterable[int]) -> SwitchableBatchNorm2d:
        return cls(norm.num_features, bits_set, norm.eps, norm.momentum)

    def set_bits(self, bits: int) -> None:
        if int(bits) not in self.bits_set:
            raise ConfigError(f"this model has no batch norm for {bits} bits; it was built for bits {self.bits_set}")
        self.bits = int(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[str(self.bits)](x)

    def storage_bits(self, bits: int) -> int:
        return batchnorm_storage_bits(self.norms[str(bits)])

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return sum(self.storage_bits(b) for b in bits_set)



def set_model_bits(model: nn.Module, bits: int) -> None:
    """Switch every bit-switchable layer of ``model`` to ``bits`` (the layers listed once while the network's
    modules stay as they are: :mod:`methods.quant.module_lists`)."""
    for module in modules_where(model, "bit_switchable", _is_bit_switchable):
        module.set_bits(bits)


def _is_bit_switchable(module: nn.Module) -> bool:
    return isinstance(module, BitSwitchable)


ModuleSwap = Callable[[nn.Module], nn.Module | None]


def swap_modules(model: nn.Module, swap: ModuleSwap) -> nn.Module:
    """Replace, depth first, every submodule for which ``swap`` returns a module; ``None`` keeps and recurses.

    A module object used at several places (e.g. one ReLU called twice) is replaced by one shared object too.
    """
    replaced: dict[int, nn.Module] = {}

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
                continue
            new = swap(child)
            if new is None:
                visit(child)
            else:
                replaced[id(child)] = new
                setattr(parent, name, new)

    visit(model)
    return model
