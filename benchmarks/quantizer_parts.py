"""Every registered method's quantizers replaced by the identity: the step-time floor their removal would reach.

A diagnostic for ``test_bench_train_step.py -k parts``, not a method: the network keeps everything else (switchable
or per-bit-width BN, MBQuant's branches, distillation, the harness), and only the quantizers of one kind, or both,
stop quantizing. The layer families:

* :class:`~methods.quant.modules.QuantConv2d` (Any-Precision, dedicated, EMQ): ``weight_quantizer`` and
  ``input_quantizer`` become the identity;
* :class:`~methods.quant.sat_layers.SATConv2d` and ``SATLinear`` (AdaBits): the PACT input quantizer goes, and the
  weight is the latent weight (rescaled as SAT rescales the quantized one), out of the network's weight batch;
* :class:`~methods.quant.branches.BranchConv2d` (MBQuant): the input goes through unchanged, and the active branches'
  weights are the latent ones.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from methods.quant.branches import BranchConv2d
from methods.quant.modules import QuantConv2d
from methods.quant.sat_layers import SATLayer

PARTS = ("weight", "input")


def _identity_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    return weight


def _identity_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x


def _latent_sat_weight(layer: SATLayer) -> torch.Tensor:
    return layer.weight


def _no_batch_terms(layer: SATLayer) -> None:
    return None


def _branch_weight_unquantized(method_name: str):
    """``BranchConv2d.active_weight`` (or ``active_partial_weight``) as the layer computes it unquantized."""
    def unquantized(layer: BranchConv2d) -> torch.Tensor:
        quantized, layer.quantized = layer.quantized, False
        try:
            return getattr(type(layer), method_name)(layer)
        finally:
            layer.quantized = quantized

    return unquantized


def _unchanged_input(layer: BranchConv2d, x: torch.Tensor) -> torch.Tensor:
    return x


def remove_quantizers(model: nn.Module, parts: tuple[str, ...]) -> int:
    """Replace the ``parts`` (``"weight"``, ``"input"``) quantizers of every quantized layer of ``model`` by the
    identity, in place, before its first forward pass; returns how many layers changed."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    changed = 0
    for layer in model.modules():
        if isinstance(layer, QuantConv2d):
            if "weight" in parts and layer.weight_quantizer is not None:
                layer.weight_quantizer = _identity_weight
            if "input" in parts and layer.input_quantizer is not None:
                layer.input_quantizer = _identity_input
        elif isinstance(layer, SATLayer):
            if "weight" in parts:
                layer.quantized_weight = types.MethodType(_latent_sat_weight, layer)
                layer.batch_terms = types.MethodType(_no_batch_terms, layer)
            if "input" in parts:
                layer.input_quantizer = None
        elif isinstance(layer, BranchConv2d) and layer.quantized:
            if "weight" in parts:
                for name in ("active_weight", "active_partial_weight"):
                    setattr(layer, name, types.MethodType(_branch_weight_unquantized(name), layer))
            if "input" in parts:
                layer.quantize_input = types.MethodType(_unchanged_input, layer)
        else:
            continue
        changed += 1
    return changed
