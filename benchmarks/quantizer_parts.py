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

:func:`one_pass_quantizers` instead replaces every quantizer by a stand-in that costs one elementwise pass forward
and one backward (a product by 1.0, which changes no value): the floor of any quantizer that writes a new tensor,
whatever its formula, on the machine at hand.
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


def _one_pass(t: torch.Tensor, *bits: int) -> torch.Tensor:
    return t * 1.0


def _one_pass_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * 1.0


def _one_pass_sat_weight(layer: SATLayer) -> torch.Tensor:
    return layer.weight * 1.0


def _branch_weight_one_pass(method_name: str):
    unquantized = _branch_weight_unquantized(method_name)

    def one_pass(layer: BranchConv2d) -> torch.Tensor:
        return unquantized(layer) * 1.0

    return one_pass


def _one_pass_branch_input(layer: BranchConv2d, x: torch.Tensor) -> torch.Tensor:
    return x * 1.0


def one_pass_quantizers(model: nn.Module) -> int:
    """Replace every quantizer of ``model``'s quantized layers, weight and input, by a product by 1.0, in place, before
    its first forward pass (a PACT module keeps its bit-width bookkeeping, and only its forward pass changes); returns
    how many layers changed."""
    changed = 0
    for layer in model.modules():
        if isinstance(layer, QuantConv2d):
            if layer.weight_quantizer is not None:
                layer.weight_quantizer = _one_pass
            if layer.input_quantizer is not None:
                layer.input_quantizer = _one_pass
        elif isinstance(layer, SATLayer):
            layer.quantized_weight = types.MethodType(_one_pass_sat_weight, layer)
            layer.batch_terms = types.MethodType(_no_batch_terms, layer)
            if layer.input_quantizer is not None:
                layer.input_quantizer.forward = types.MethodType(_one_pass_module, layer.input_quantizer)
        elif isinstance(layer, BranchConv2d) and layer.quantized:
            for name in ("active_weight", "active_partial_weight"):
                setattr(layer, name, types.MethodType(_branch_weight_one_pass(name), layer))
            layer.quantize_input = types.MethodType(_one_pass_branch_input, layer)
        else:
            continue
        changed += 1
    return changed
