"""AdaBits (Jin, Yang, Liao, "AdaBits: Neural Network Quantization with Adaptive Bit-Widths", CVPR 2020,
arXiv 1912.09666) as an mbqbench method, following the paper and the authors' public code (re-implemented).
Documentation: ``docs/methods/adabits.md``.

Quantizers (weights and activations share the bit-width b):

* weights, SAT-style and nested (:mod:`methods.quant.sat`): ``w~ = tanh(w) / max|tanh(w)|``, ``u = (w~ + 1) / 2``,
  ``W_q = 2 min(floor(2^b u), 2^b - 1) / 2^b - 1``; the b-bit code is the 8-bit code shifted right by ``8 - b``,
  so one highest-bit copy of the weights serves every bit-width. SAT rescaling multiplies ``W_q`` by
  ``1 / (sqrt(n_out) std(W_q))`` (constant std): convolutions always (``conv_rescale``, the CIFAR config), the
  classifier during training only, its bias being divided by the same factor at eval (out of place).
* activations, PACT with switchable clipping levels (:mod:`methods.quant.pact`):
  ``y = round((2^b - 1) min(relu(x), a) / a) / (2^b - 1) a``, ``a = |alpha|``, one alpha per layer per bit-width,
  initialized to 8 (convolutions) and 10 (classifier), no weight decay.
* switchable BN: one BN (affine and running statistics) per bit-width.

Network: the harness's quantized topology (:mod:`harness.topology`), which is where the authors' code puts
its quantizers: every quantized layer quantizes its own *input* with its own clipping levels (the PACT quantizer
is a submodule of the layer, ``conv.input_quantizer``); the network's ReLUs stay plain ReLUs (PACT's lower clip
is that ReLU again) and residual additions, identity shortcuts and pooling carry the unquantized ReLU output in
full precision. A downsampling block's ``conv1`` and its 1x1 shortcut convolution read the same tensor through
two different alphas (the code's behaviour). By default the first convolution and the classifier keep
full-precision weights and inputs and the data set's normalization stays, like every other method's network.

Departures from that topology (the paper's CIFAR configuration; off by default, recorded in the topology):

* ``quantize_stem=true``: the first convolution's weights at ``stem_weight_bits`` (``"highest"``: the highest
  trained bit-width, the CIFAR config; ``"max8"``: the ImageNet rule ``max(b, 8)``), its input unquantized;
* ``quantize_head=true``: the classifier's weights at ``head_weight_bits`` (``max(b, 8)``) and its input, the
  pooled features, through PACT with its own alpha (in ``preact_resnet20`` that input is the final BN's output,
  which PACT rectifies; at 32 bits the code quantizes nothing, so there it is not rectified);
* ``raw_input=true``: the input is the raw image ``round(255 x)`` without mean/std normalization (the model's
  ``InputNorm`` becomes :class:`RawImageInput`); in ``resnet20`` and ``resnet18`` the bias-free first convolution
  is followed by a BN, which removes the input's scale and mean, but in ``preact_resnet20`` the first block's
  identity shortcut carries the stem output at that raw scale;
* ``fp_shortcut=true`` (an ablation): shortcut convolutions and their BN stay full precision, input included.

Training step (joint training): for b from highest to lowest, set b, forward, cross-entropy with the labels,
backward; the harness then takes one optimizer step. No distillation, no loss weights, no BN calibration.
Weight decay, as in the authors' optimizer: only on convolution (non-depthwise) and classifier weights; alphas
never, BN parameters and biases unless ``decay_norm_and_bias=True``. The alphas train with the schedule's lr like
every other parameter (the paper); ``alpha_lr`` gives them their own base lr, which the shared schedule scales.
On short schedules this matters: an alpha's gradient is small next to its size (about 1e-2 against 8), so at lr
0.05 the clipping levels barely leave their initial values in a few hundred steps.

Bit-widths: 1..8 (the nested codes are counted against the one 8-bit copy; the paper's recipes train 3..8) and
32, which runs the code's full-precision path (normalized ``w~`` weights, unquantized activations, own BN); 9..31
are refused. A bit-width the model was not built for is an error (the authors' code silently falls back to the first
entry).

Known behaviour of the paper's weight scheme (``weight_scheme=original``) at 2 bits (below the recipes' range),
measured on ``resnet20`` in the paper's CIFAR configuration (quantized first and last layers, raw input): with the
paper's alpha initialization the first 2-bit backward pass explodes (largest gradient 6e17 on digits, 1.5e27 on
Fashion-MNIST, against about 50 at 3..8 bits). The 2-bit weight levels are {-1, -0.5, 0, 0.5} and most small
weights land on -0.5 or 0, so a conv's output on non-negative input is mostly <= 0; after BN and ReLU few values
reach the first 2-bit level ``a / 6 = 1.33``, whole channels quantize to zero, the next BN sees zero variance and
multiplies its input gradient by ``1 / sqrt(eps)`` (about 316), several times over. One SGD step then saturates
``tanh`` in most shared latent weights, which hurts every bit-width.

``weight_scheme="centered"`` (the default; ``"original"`` is the paper's scheme above) uses the scheme the
authors later added to their repository for convergent low-precision training (deJQK/AdaBits,
``models/quant_ops.py``, scheme ``'centered'``; details in :mod:`methods.quant.sat`): the same nested code ``j``,
read as ``W_q = (2j + 1) / 2^b - 1``, so the 2-bit levels are {-0.75, -0.25, 0.25, 0.75}, symmetric about 0,
and a symmetric weight tensor quantizes to zero mean. Codes still nest, so storage is unchanged. Measured over 50
joint steps at bits (2, 4, 8) on digits (``resnet20``, SGD lr 0.05): the largest gradient L2 norm is 138 (width
1, batch 128) and 26 (width 0.25, batch 32) against 2.4e19 and 4.9e7 for the paper's scheme, and the 2-bit loss
falls instead of staying high.

Storage: weights at their bit-width (one copy at the highest for the whole set), per-bit BN (4 values per
channel) and per-bit alphas (32 bits each), the classifier bias at 32 bits.

UNRESOLVED choices (the paper and the code differ or are silent), each a config option (default first):

* ``head_weight_bits``: ``max(b, 8)`` (``"max8"``); the authors' CIFAR ResNet uses the highest bit-width of
  the set (``"highest"``), their ImageNet MobileNets ``max(b, 8)``.
* ``stem_weight_bits``: the CIFAR rule (``"highest"``); ``"max8"`` for the ImageNet rule.
* ``decay_norm_and_bias=False`` (no weight decay on BN parameters and biases): the ImageNet recipe names these
  exclusions, and the authors' code applies them for CIFAR too.
* Where PACT sits: on each quantized layer's input, as in the code (see the mapping above), not in place of the
  network's ReLU modules.
* The classifier keeps the harness's initialization (same initial weights for every method) instead of the
  code's ``N(0, 0.01)``; the 32-bit path follows the code (see above) but keeps no (unused) 32-bit alpha.
* Ablations beyond the paper's setting: ``switchable_clipping=False`` (one alpha per layer), ``fp_shortcut=True``,
  ``conv_rescale``/``fc_rescale`` off, ``alpha_lr``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import check_positive
from harness.errors import ConfigError
from harness.method import Batch, Method, RunContext
from harness.method_config import MethodConfig
from harness.models import CONVOLUTIONAL_MODELS, role_of
from harness.registry import register_method
from harness.topology import Site, Topology, declare_topology, quantize_model
from methods.anyprecision import create_fp_model
from methods.quant import native
from methods.quant.dorefa import FULL_PRECISION
from methods.quant.modules import SwitchableBatchNorm2d, set_model_bits
from methods.quant.pact import SwitchablePACT
from methods.quant.sat_layers import SATConv2d, SATLinear
from methods.quant.weight_batch import batch_weights

MAX_NESTED_BITS = 8
RAW_IMAGE_SCALE = 255.0


@dataclass(frozen=True)
class AdaBitsConfig(MethodConfig):
    """AdaBits options and their defaults (each explained in the module docstring and ``docs/methods/adabits.md``)."""

    width: float | None = None
    raw_input: bool = False
    conv_rescale: bool = True
    fc_rescale: bool = True
    quantize_stem: bool = False
    quantize_head: bool = False
    stem_weight_bits: Literal["highest", "max8"] = "highest"
    head_weight_bits: Literal["max8", "highest"] = "max8"
    fp_shortcut: bool = False
    switchable_clipping: bool = True
    conv_alpha_init: float = 8.0
    fc_alpha_init: float = 10.0
    decay_norm_and_bias: bool = False
    alpha_lr: float | None = None
    weight_scheme: Literal["original", "centered"] = "centered"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width is not None:
            check_positive("adabits width", self.width)
        if self.alpha_lr is not None:
            check_positive("adabits alpha_lr", self.alpha_lr)
        check_positive("adabits conv_alpha_init", self.conv_alpha_init)
        check_positive("adabits fc_alpha_init", self.fc_alpha_init)


class RawImageInput(nn.Module):
    """``round(255 x)``: the raw 8-bit pixel values, no mean/std normalization; preprocessing, stores nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.mbq_role = "input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * RAW_IMAGE_SCALE)

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set: Iterable[int]) -> int:
        return 0


def adabits_topology(model: nn.Module, model_name: str, cfg: AdaBitsConfig) -> Topology:
    """The harness topology of ``model`` with the departures ``cfg`` asks for (module docstring)."""
    topology = declare_topology(model, model_name)
    if cfg.quantize_stem:
        topology = topology.depart(f"quantize_stem: first-layer weights at {cfg.stem_weight_bits} bits (AdaBits)",
                                   roles=("stem",), quantize_weight=True)
    if cfg.quantize_head:
        topology = topology.depart(f"quantize_head: classifier weights at {cfg.head_weight_bits} bits and a PACT "
                                   f"input (AdaBits)", roles=("head",), quantize_weight=True, quantize_input=True)
    if cfg.fp_shortcut:
        topology = topology.depart("fp_shortcut: shortcut convolutions, their input and BN full precision",
                                   roles=("shortcut",), quantize_weight=False, quantize_input=False)
    if cfg.raw_input:
        topology = topology.depart("raw_input: round(255 x) input instead of the data set's normalization",
                                   roles=())
    return topology


def adabits_network(model: nn.Module, model_name: str, bits_set: tuple[int, ...], cfg: AdaBitsConfig) -> nn.Module:
    """Quantize a full-precision model from :mod:`harness.models` in place (see the module docstring)."""
    bits_set = tuple(sorted(bits_set))

    def pact(init: float) -> SwitchablePACT:
        return SwitchablePACT(bits_set, init, switchable=cfg.switchable_clipping)

    def layer(module: nn.Module, site: Site) -> nn.Module:
        if site.role == "stem":
            return SATConv2d.from_conv(module, bits_set=bits_set, weight_bits_rule=cfg.stem_weight_bits,
                                       rescale=cfg.conv_rescale, input_quantizer=None, weight_scheme=cfg.weight_scheme)
        if site.role == "head":
            return SATLinear.from_linear(module, bits_set=bits_set, weight_bits_rule=cfg.head_weight_bits,
                                         rescale=cfg.fc_rescale, input_quantizer=pact(cfg.fc_alpha_init),
                                         weight_scheme=cfg.weight_scheme)
        if not (site.quantize_weight and site.quantize_input):
            raise ConfigError(f"adabits quantizes a convolution's weights and input together; site {site.name} "
                              f"asks for something else")
        return SATConv2d.from_conv(module, bits_set=bits_set, weight_bits_rule="same", rescale=cfg.conv_rescale,
                                   input_quantizer=pact(cfg.conv_alpha_init), weight_scheme=cfg.weight_scheme)

    def norm(bn: nn.BatchNorm2d) -> nn.Module:
        if cfg.fp_shortcut and role_of(bn) == "shortcut_norm":
            return bn
        return SwitchableBatchNorm2d.from_norm(bn, bits_set)

    quantize_model(model, adabits_topology(model, model_name, cfg), layer=layer, norm=norm)
    if cfg.raw_input:
        model.input_norm = RawImageInput()
    model.mbq_bits_set = bits_set
    return model


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


@register_method("adabits")
class AdaBits(Method):
    """AdaBits: one SAT/PACT network, switchable BN and clipping levels, joint training of all bit-widths."""

    supported_models = CONVOLUTIONAL_MODELS
    Config = AdaBitsConfig
    cfg: AdaBitsConfig

    def check_bits(self, bits: tuple[int, ...]) -> None:
        unsupported = [b for b in bits if b > MAX_NESTED_BITS and b != FULL_PRECISION]
        if unsupported:
            raise ConfigError(f"adabits supports bit-widths 1..{MAX_NESTED_BITS} and {FULL_PRECISION} "
                              f"(full precision), got {unsupported[0]}")

    def build(self, model_name: str, num_classes: int, bits: tuple[int, ...], data_info: Any, width: float):
        self.check_bits(bits)
        model = create_fp_model(model_name, num_classes, data_info, self.cfg.width or width)
        native.preload()  # PACT's native loops: a first build here, not in a timed phase
        return batch_weights(adabits_network(model, model_name, bits, self.cfg))

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        alpha_ids = {id(p) for m in model.modules() if isinstance(m, SwitchablePACT) for p in m.parameters()}
        decayed_ids = {id(m.weight) for m in model.modules()
                       if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and not is_depthwise(m))}
        decayed, alphas, others = [], [], []
        for param in model.parameters():
            if not param.requires_grad:
                continue
            if id(param) in alpha_ids:
                alphas.append(param)
            elif id(param) in decayed_ids:
                decayed.append(param)
            else:
                others.append(param)
        other_group: dict[str, Any] = {"params": others}
        if not self.cfg.decay_norm_and_bias:
            other_group["weight_decay"] = 0.0
        alpha_group: dict[str, Any] = {"params": alphas, "weight_decay": 0.0}
        if self.cfg.alpha_lr is not None:
            alpha_group["lr"] = self.cfg.alpha_lr  # a base lr: the shared schedule still scales it every step
        return [{"params": decayed}, other_group, alpha_group]

    def set_bits(self, model: nn.Module, bits: int) -> None:
        built = getattr(model, "mbq_bits_set", ())
        if bits not in built:
            raise ConfigError(f"this adabits model was built for bits {list(built)}; it has no BN or clipping "
                              f"levels for {bits} bits")
        set_model_bits(model, bits)

    def train_step(self, model: nn.Module, batch: Batch, ctx: RunContext) -> dict[str, float]:
        losses: dict[str, float] = {}
        for bits in sorted(ctx.bits, reverse=True):
            data = batch.for_bits(bits)
            self.set_bits(model, bits)
            loss = F.cross_entropy(model(data.x), data.y)
            loss.backward()
            ctx.count_passes(bits, len(data.y))
            losses[f"loss_{bits}"] = loss.item()
        return losses
