"""Any-Precision DNNs (Yu et al., AAAI 2021, arXiv 1911.07346) as an mbqbench method.

Documentation: ``docs/methods/anyprecision.md``.

* Quantizers: DoReFa weights and activations at the same bit-width (:mod:`methods.quant.dorefa`); every
  bit-width re-quantizes the latent full-precision weights; 32 bits uses tanh-normalized weights and ReLU.
* Per-bit-width parameters: only switchable BN (one BN per bit-width, Sec. 3.2).
* Training step (recursive distillation, Sec. 3.3): zero grads; the highest bit-width (32 if trained) is
  trained with cross-entropy on the labels; each lower bit-width, in descending order, with the soft
  cross-entropy to the softmax of the bit-width just above it (detached, temperature 1); one optimizer step.
* Network: the harness's quantized topology (:mod:`harness.topology`): full-precision first conv and
  classifier, DoReFa weights and a DoReFa activation quantizer at the input of every other convolution, plain
  ReLUs and a full-precision residual stream. The paper's network is the pre-activation ResNet-20
  (``preact_resnet20``, the authors' ``resnet20q``) at width 5 (``width=5``); there the activation quantizer at
  each conv input is exactly the code's quantized ReLU. Departure (off by default, on in the paper presets):
  ``fp_shortcut=true`` keeps the downsampling shortcuts' 1x1 weights full precision (input still quantized) with
  a BN shared by all bit-widths, as the authors' code does.

Choices where the sources leave room (each a config option): ``full_precision_act`` ("relu", the code; "clamp",
the paper); ``total_storage`` ("latent": the switchable set stores the 32-bit latent weights, because DoReFa's
grids do not nest; "highest": count one weight copy at the highest trained bit-width instead, a figure no single
artifact serves, so ``cli.py export --bits all`` refuses it);
``fp_shortcut`` (above). Measured before the topology was shared (digits, post-activation ResNet-20, bits 2/32,
15 epochs): the full-precision shortcut with a shared BN cost 20 points at 2 bits (61.7 vs 81.9 %) because the
shared shortcut BN sees quantized and full-precision activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import check_positive
from harness.method import Batch, Method, RunContext
from harness.method_config import MethodConfig
from harness.models import CONVOLUTIONAL_MODELS, create_model, role_of
from harness.registry import register_method
from harness.topology import Site, quantize_model
from methods.quant import native
from methods.quant.distill import soft_cross_entropy
from methods.quant.dorefa import FULL_PRECISION, dorefa_activation, dorefa_weight
from methods.quant.modules import QuantConv2d, SwitchableBatchNorm2d
from methods.quant.networks import method_topology
from methods.quant.weight_batch import batch_weights


@dataclass(frozen=True)
class AnyPrecisionConfig(MethodConfig):
    width: float | None = None
    distill: Literal["recursive", "none"] = "recursive"
    fp_shortcut: bool = False
    full_precision_act: Literal["relu", "clamp"] = "relu"
    total_storage: Literal["latent", "highest"] = "latent"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width is not None:
            check_positive("anyprecision width", self.width)


def dorefa_quantize(model: nn.Module, model_name: str, bits_set: tuple[int, ...], *, fp_shortcut: bool,
                    full_precision_act: str, total_weight_bits: int) -> nn.Module:
    """Quantize a full-precision model in place through the harness topology: DoReFa weights and DoReFa input
    activations at every quantized site, one BN per bit-width (a plain shared BN on a full-precision shortcut,
    the authors' code); set to the highest bit-width."""
    top = max(bits_set)
    activation = partial(dorefa_activation, full_precision_act=full_precision_act)
    native.preload()

    def layer(conv: nn.Conv2d, site: Site) -> nn.Module:
        return QuantConv2d.from_conv(conv, weight_quantizer=dorefa_weight if site.quantize_weight else None,
                                     input_quantizer=activation if site.quantize_input else None, bits=top,
                                     total_weight_bits=total_weight_bits)

    def norm(bn: nn.BatchNorm2d) -> nn.Module:
        if fp_shortcut and role_of(bn) == "shortcut_norm":
            return bn
        return SwitchableBatchNorm2d.from_norm(bn, bits_set)

    topology = method_topology(model, model_name, fp_shortcut=fp_shortcut)
    return batch_weights(quantize_model(model, topology, layer=layer, norm=norm))


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
        return dorefa_quantize(model, model_name, bits, fp_shortcut=self.cfg.fp_shortcut,
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
