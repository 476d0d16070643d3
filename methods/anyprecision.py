"""Any-Precision DNNs (Yu et al., AAAI 2021, arXiv 1911.07346) as an mbqbench method.

* Quantizers: DoReFa weights and activations at the same bit-width (:mod:`methods.quant.dorefa`); every
  bit-width re-quantizes the latent full-precision weights; 32 bits uses tanh-normalized weights and ReLU.
* Per-bit-width parameters: only switchable BN (one BN per bit-width, Sec. 3.2).
* Training step (recursive distillation, Sec. 3.3): zero grads; the highest bit-width (32 if trained) is
  trained with cross-entropy on the labels; each lower bit-width, in descending order, with the soft
  cross-entropy to the softmax of the bit-width just above it (detached, temperature 1); one optimizer step.
* Network: pre-activation ResNet-20 (``preact_resnet20``); the paper's width is 5 (``width=5``), the unified
  recipe uses the run's width. Full-precision first conv and classifier; downsampling shortcuts are a
  full-precision 1x1 conv with a BN shared by all bit-widths (``fp_shortcut``, the authors' code).

Choices where the sources leave room (each a config option): ``full_precision_act`` ("relu", the code; "clamp",
the paper); ``total_storage`` ("latent": the switchable set stores the 32-bit latent weights, because DoReFa's
grids do not nest; "highest": count one copy at the highest trained bit-width, as the spec's storage line allows);
``fp_shortcut`` (``None`` = auto: on for ``preact_resnet20``, the authors' network where the spec keeps the quirk;
off for other models, where the spec is silent. Measured on digits, post-activation ResNet-20, bits 2/32, 15
epochs: the quirk costs 20 points at 2 bits (61.7 vs 81.9 %) because the shared shortcut BN sees clamped and
unclamped activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import MethodConfig, check_positive
from harness.method import Batch, Method, RunContext
from harness.models import CONVOLUTIONAL_MODELS, create_model
from harness.registry import register_method
from methods.quant.distill import soft_cross_entropy
from methods.quant.dorefa import FULL_PRECISION, dorefa_activation, dorefa_weight
from methods.quant.modules import QuantAct, QuantConv2d, SwitchableBatchNorm2d
from methods.quant.networks import quantize_network


@dataclass(frozen=True)
class AnyPrecisionConfig(MethodConfig):
    width: float | None = None
    distill: Literal["recursive", "none"] = "recursive"
    fp_shortcut: bool | None = None
    full_precision_act: Literal["relu", "clamp"] = "relu"
    total_storage: Literal["latent", "highest"] = "latent"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width is not None:
            check_positive("anyprecision width", self.width)


def dorefa_quantize(model: nn.Module, bits_set: tuple[int, ...], *, fp_shortcut: bool, full_precision_act: str,
                    total_weight_bits: int) -> nn.Module:
    """Quantize a full-precision model in place with DoReFa and one BN per bit-width; set to the highest."""
    top = max(bits_set)
    return quantize_network(
        model,
        conv=partial(QuantConv2d.from_conv, weight_quantizer=dorefa_weight, bits=top,
                     total_weight_bits=total_weight_bits),
        norm=partial(SwitchableBatchNorm2d.from_norm, bits_set=bits_set),
        act=lambda _: QuantAct(partial(dorefa_activation, full_precision_act=full_precision_act), bits=top),
        fp_shortcut=fp_shortcut,
    )


def resolve_fp_shortcut(option: bool | None, model_name: str) -> bool:
    """``None`` means the authors' quirk on their own network (``preact_resnet20``) and off elsewhere."""
    return model_name == "preact_resnet20" if option is None else option


def create_fp_model(model_name: str, num_classes: int, data_info: Any, width: float) -> nn.Module:
    return create_model(model_name, num_classes=num_classes, in_chans=data_info.in_chans, mean=data_info.mean,
                        std=data_info.std, width=width, image_size=data_info.image_size)


@register_method("anyprecision")
class AnyPrecision(Method):
    """Any-Precision DNNs: one DoReFa network, switchable BN, recursive distillation."""

    supported_models = CONVOLUTIONAL_MODELS
    Config = AnyPrecisionConfig
    cfg: AnyPrecisionConfig

    def build(self, model_name: str, num_classes: int, bits: tuple[int, ...], data_info: Any, width: float):
        total_bits = FULL_PRECISION if self.cfg.total_storage == "latent" else max(bits)
        model = create_fp_model(model_name, num_classes, data_info, self.cfg.width or width)
        return dorefa_quantize(model, bits, fp_shortcut=resolve_fp_shortcut(self.cfg.fp_shortcut, model_name),
                               full_precision_act=self.cfg.full_precision_act, total_weight_bits=total_bits)

    def train_step(self, model: nn.Module, batch: Batch, ctx: RunContext) -> dict[str, float]:
        losses: dict[str, float] = {}
        teacher: torch.Tensor | None = None
        for bits in sorted(ctx.bits, reverse=True):
            data = batch.for_bits(bits)
            self.set_bits(model, bits)
            logits = model(data.x)
            if teacher is None or self.cfg.distill == "none":
                loss = F.cross_entropy(logits, data.y)
            else:
                loss = soft_cross_entropy(logits, teacher)
            loss.backward()
            ctx.count_passes(bits, len(data.y))
            teacher = F.softmax(logits.detach(), dim=1)
            losses[f"loss_{bits}"] = loss.item()
        return losses
