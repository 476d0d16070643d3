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

import functools
import types

import torch
from torch import nn

from methods.quant.branches import BranchConv2d
from methods.quant.modules import QuantConv2d
from methods.quant.sat_layers import SATLayer

PARTS = ("weight", "input")


def _same(t: torch.Tensor) -> torch.Tensor:
    """The removed part: its input goes on as it is."""
    return t


def _one_pass(t: torch.Tensor) -> torch.Tensor:
    """The one-pass stand-in: the same values in a new tensor, forward and backward."""
    return t * 1.0


def _quantizer(t: torch.Tensor, bits: int, *, through) -> torch.Tensor:
    return through(t)


def _sat_weight(layer: SATLayer, *, through) -> torch.Tensor:
    return through(layer.weight)


def _no_batch_terms(layer: SATLayer) -> None:
    return None


def _module_input(module: nn.Module, x: torch.Tensor, *, through) -> torch.Tensor:
    return through(x)


def _branch_weight_unquantized(method_name: str):
    """``BranchConv2d.active_weight`` (or ``active_partial_weight``) as the layer computes it unquantized."""
    def unquantized(layer: BranchConv2d) -> torch.Tensor:
        quantized, layer.quantized = layer.quantized, False
        try:
            return getattr(type(layer), method_name)(layer)
        finally:
            layer.quantized = quantized

    return unquantized


def _branch_weight(layer: BranchConv2d, *, method_name: str, through) -> torch.Tensor:
    return through(_branch_weight_unquantized(method_name)(layer))


def _replace(model: nn.Module, parts: tuple[str, ...], through) -> int:
    """The ``parts`` quantizers of every quantized layer of ``model`` become ``through`` (``_same`` or
    ``_one_pass``); returns how many layers changed."""
    changed = 0
    for layer in model.modules():
        if isinstance(layer, QuantConv2d):
            stand_in = functools.partial(_quantizer, through=through)
            if "weight" in parts and layer.weight_quantizer is not None:
                layer.weight_quantizer = stand_in
            if "input" in parts and layer.input_quantizer is not None:
                layer.input_quantizer = stand_in
        elif isinstance(layer, SATLayer):
            if "weight" in parts:
                layer.quantized_weight = types.MethodType(functools.partial(_sat_weight, through=through), layer)
                layer.batch_terms = types.MethodType(_no_batch_terms, layer)
            if "input" in parts and layer.input_quantizer is not None:
                if through is _same:
                    layer.input_quantizer = None  # removed: the layer skips it
                else:  # the PACT module keeps its bit-width bookkeeping, and only its forward pass changes
                    pact = layer.input_quantizer
                    pact.forward = types.MethodType(functools.partial(_module_input, through=through), pact)
        elif isinstance(layer, BranchConv2d) and layer.quantized:
            if "weight" in parts:
                for name in ("active_weight", "active_partial_weight"):
                    weight = functools.partial(_branch_weight, method_name=name, through=through)
                    setattr(layer, name, types.MethodType(weight, layer))
            if "input" in parts:
                layer.quantize_input = types.MethodType(functools.partial(_module_input, through=through), layer)
        else:
            continue
        changed += 1
    return changed


def remove_quantizers(model: nn.Module, parts: tuple[str, ...]) -> int:
    """Replace the ``parts`` (``"weight"``, ``"input"``) quantizers of every quantized layer of ``model`` by the
    identity, in place, before its first forward pass; returns how many layers changed."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    return _replace(model, parts, _same)


def one_pass_quantizers(model: nn.Module) -> int:
    """Replace every quantizer of ``model``'s quantized layers, weight and input, by a product by 1.0, in place, before
    its first forward pass; returns how many layers changed."""
    return _replace(model, PARTS, _one_pass)
