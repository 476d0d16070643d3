"""Dedicated models: the reference row of both papers -- one independent network per bit-width.

Documentation: ``docs/methods/dedicated.md``.

Each bit-width gets its own copy of the network, quantized with the same DoReFa quantizers as Any-Precision
(:mod:`methods.quant.dorefa`) and trained with cross-entropy under the same schedule. All copies start from the
same full-precision initialization, see the same batches and follow the harness's quantized topology (options as
in :mod:`methods.anyprecision`, ``fp_shortcut`` included); their parameters are disjoint, so training them in
one loop with one optimizer is the same as training them one after the other, and the measured cost is the sum
over bit-widths. Storage at b bits is that network's; the switchable "set" is all networks together (their bits
summed, then rounded down to bytes); an export holds exactly those networks (:mod:`harness.export`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import check_positive
from harness.cost import storage_bits_of
from harness.errors import ConfigError
from harness.export import export_model, load_model, take_prefixed, with_prefix
from harness.method import Batch, Method, RunContext
from harness.method_config import MethodConfig
from harness.models import CONVOLUTIONAL_MODELS
from harness.registry import register_method
from methods.anyprecision import create_fp_model, dorefa_quantize
from methods.quant.dorefa import FULL_PRECISION


@dataclass(frozen=True)
class DedicatedConfig(MethodConfig):
    width: float | None = None
    quantizer: Literal["dorefa"] = "dorefa"
    fp_shortcut: bool = False
    full_precision_act: Literal["relu", "clamp"] = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width is not None:
            check_positive("dedicated width", self.width)


class DedicatedNetworks(nn.Module):
    """Independent networks keyed by bit-width; ``active`` selects the one ``forward`` runs."""

    def __init__(self, networks: dict[int, nn.Module]) -> None:
        super().__init__()
        self.networks = nn.ModuleDict({str(b): net for b, net in sorted(networks.items())})
        self.bits_set = tuple(sorted(networks))
        self.active = self.bits_set[-1]

    def select(self, bits: int) -> None:
        if bits not in self.bits_set:
            raise ConfigError(f"no dedicated network for {bits} bits; trained bit-widths: {self.bits_set}")
        self.active = bits

    def network(self, bits: int) -> nn.Module:
        return self.networks[str(bits)]

    def forward(self, x):
        return self.networks[str(self.active)](x)


@register_method("dedicated")
class Dedicated(Method):
    """One DoReFa network per bit-width, trained independently with cross-entropy."""

    supported_models = CONVOLUTIONAL_MODELS
    Config = DedicatedConfig
    cfg: DedicatedConfig

    def build(self, model_name: str, num_classes: int, bits: tuple[int, ...], data_info: Any, width: float):
        initial = create_fp_model(model_name, num_classes, data_info, self.cfg.width or width)
        # Same initial weights for every bit-width; only the fixed precision differs.
        fp_shortcut = self.cfg.fp_shortcut
        networks = {
            b: dorefa_quantize(copy.deepcopy(initial), model_name, (b,), fp_shortcut=fp_shortcut,
                               full_precision_act=self.cfg.full_precision_act, total_weight_bits=FULL_PRECISION)
            for b in bits
        }
        return DedicatedNetworks(networks)

    def set_bits(self, model: nn.Module, bits: int) -> None:
        model.select(bits)

    def train_step(self, model: nn.Module, batch: Batch, ctx: RunContext) -> dict[str, float]:
        losses = {}
        for bits in sorted(ctx.bits, reverse=True):
            data = batch.for_bits(bits)
            model.select(bits)
            loss = F.cross_entropy(model(data.x), data.y)
            loss.backward()
            ctx.count_passes(bits, len(data.y))
            losses[f"loss_{bits}"] = loss.item()
        return losses

    def storage(self, model: nn.Module, bits: int) -> int:
        return storage_bits_of(model.network(bits), bits) // 8

    def storage_total(self, model: nn.Module, bits: tuple[int, ...]) -> int:
        # bits summed over the networks, then rounded down to bytes once: the payload of one artifact holding them all
        return sum(storage_bits_of(model.network(b), b) for b in bits) // 8

    # -- export: network b at b bits; the whole set is every network at its own bit-width ----------------------
    def export_tensors(self, model: nn.Module, bits: int) -> dict[str, Any]:
        return with_prefix(f"networks.{bits}.", export_model(model.network(bits), bits))

    def export_tensors_total(self, model: nn.Module, bits: tuple[int, ...]) -> dict[str, Any]:
        return {name: value for b in bits for name, value in self.export_tensors(model, b).items()}

    def load_exported(self, model: nn.Module, tensors: dict[str, torch.Tensor], bits: int) -> None:
        tensors = dict(tensors)
        load_model(model.network(bits), take_prefixed(tensors, f"networks.{bits}."), bits)
        if tensors:
            raise ConfigError(f"the file holds tensors outside the {bits}-bit network, e.g. {sorted(tensors)[0]!r}")

    def load_exported_total(self, model: nn.Module, tensors: dict[str, torch.Tensor], bits: tuple[int, ...]) -> None:
        tensors = dict(tensors)
        for b in bits:
            load_model(model.network(b), take_prefixed(tensors, f"networks.{b}."), b)
        if tensors:
            raise ConfigError(f"the file holds tensors outside the networks of bits {list(bits)}, e.g. "
                              f"{sorted(tensors)[0]!r}")
