"""Every layer's quantized weight for one training forward pass from one autograd node.

A quantized layer calls its weight quantizer when it runs, and a small network spends much of its quantizer time
in per-call overhead rather than arithmetic: at 8x8 inputs a ResNet-20 DoReFa weight is 432 to 36,864 elements, and
each layer's forward and backward pass was a dozen Python-level tensor calls plus an autograd node of its own.
:func:`batch_weights` installs a forward pre-hook on the network that, before a training forward pass, computes
the quantized weights of all its layers that use one quantizer (grouped by bit-width) through one
:class:`BatchedTermsNode`: a quantizer registered with :func:`register_batchable` has a
:class:`~methods.quant.version_cache.WeightTerms` subclass with ``quantized_many`` and ``backward_many``, written
with ``torch._foreach_*`` operations, one call per operation for all layers (DoReFa's, and EMQ's bias correction on
top of it). The results wait in a table keyed by the weight tensor; the quantizer function takes its layer's
result from there (:func:`take_batched`) instead of computing it, and a forward hook drops what was not taken.

The values are the per-layer path's bit for bit: on the CPU a ``_foreach`` operation applies the plain operation to
each tensor in turn, and the node's backward pass returns each layer's gradient to that layer's weight, which
autograd accumulates as before. (CUDA's fused ``_foreach`` kernels may round a division differently from the plain
kernel, so CUDA keeps the per-layer path until this is measured on a GPU.) The hook steps aside where the version
cache does (``torch.compile`` tracing, inference mode, :func:`~methods.quant.version_cache.version_cache_disabled`)
and wherever no gradient is taken (evaluation has its own cache, :mod:`methods.quant.weight_cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from methods.quant.module_lists import modules_where
from methods.quant.version_cache import (
    TermsNode,
    WeightTerms,
    _version_key,
    cached_terms,
    caching,
    quantize_with_terms,
)

#: weight tensor -> (terms name, quantizer arguments, weight version key, quantized weight) for the pass under way
_waiting: WeakIdKeyDictionary = WeakIdKeyDictionary()
_LAYERS_ATTRIBUTE = "_mbq_batched_weights"


class BatchedTermsNode(torch.autograd.Function):
    """The quantized weights of several layers under the same quantizer arguments (``args``: the bit-width, and a
    scheme where the quantizer has one), one output per layer; its backward pass gets every layer's upstream
    gradient at once (None for a layer that took no part) and returns each weight's gradient."""

    @staticmethod
    def forward(ctx, terms: list[WeightTerms], args: tuple, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # a layer that did not run gets no gradient, not a zero one
        ctx.terms, ctx.args = terms, args
        return tuple(type(terms[0]).quantized_many(terms, *args))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        used = [i for i, grad in enumerate(grads) if grad is not None and ctx.needs_input_grad[2 + i]]
        results: list[torch.Tensor | None] = [None] * len(grads)
        if used:
            computed = type(ctx.terms[0]).backward_many([ctx.terms[i] for i in used], [grads[i] for i in used],
                                                        *ctx.args)
            for i, grad in zip(used, computed):
                results[i] = grad
        return (None, None, *results)


def take_batched(weight: torch.Tensor, name: Hashable, *args) -> torch.Tensor | None:
    """The quantized ``weight`` the network's pre-hook computed for this forward pass, if it computed one for this
    quantizer (``name``), these arguments (the bit-width, ...) and version of the weight and autograd is on; else
    None (the caller computes it)."""
    # checked first: dynamo cannot trace a weak dictionary's length, and a graph break in every quantized layer
    # would split a compiled network into one graph per layer
    if torch.compiler.is_compiling() or not _waiting:
        return None
    entry = _waiting.get(weight)
    # another call on the same weight (EMQ's 32-bit reference statistics, without gradient) leaves it waiting
    if entry is None or not torch.is_grad_enabled() or entry[:2] != (name, args):
        return None
    del _waiting[weight]
    return entry[3] if entry[2] == _version_key(weight) else None


def quantize_batched_or_cached(weight: torch.Tensor, name: Hashable, terms_class: type[WeightTerms],
                               node: type[TermsNode], uncached: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """The quantized ``weight`` the network's pre-hook computed with the other layers (:func:`take_batched`), else
    :func:`~methods.quant.version_cache.quantize_with_terms` with the same arguments: a batchable quantizer's body."""
    batched = take_batched(weight, name, *args)
    if batched is not None:
        return batched
    return quantize_with_terms(weight, name, terms_class, node, uncached, *args)


#: quantizer function -> (the version cache's name for its terms, its WeightTerms class with list forms)
_batchable: dict[Callable, tuple[Hashable, type[WeightTerms]]] = {}


def register_batchable(quantizer: Callable, name: Hashable, terms_class: type[WeightTerms]) -> None:
    """Declare that ``quantizer(weight, bits)`` reads ``terms_class`` terms cached under ``name``, that the class has
    ``quantized_many`` and ``backward_many``, and that the quantizer returns :func:`take_batched`'s value first
    (:func:`quantize_batched_or_cached` does both)."""
    _batchable[quantizer] = (name, terms_class)


def batch_terms(quantizer: object, weight: torch.Tensor, bits: int) -> tuple[Hashable, WeightTerms, tuple] | None:
    """``(name, terms, args)`` for quantizing ``weight`` with ``quantizer`` at ``bits`` in a batch, or None: a
    registered quantizer function gives its cached terms and ``(bits,)``; a quantizer object may answer through its
    own ``batch_terms`` method (a wrapper such as EMQ's bias correction, whose terms hold its base quantizer's)."""
    own = getattr(quantizer, "batch_terms", None)
    if own is not None:
        return own(weight, bits)
    try:
        name, terms_class = _batchable[quantizer]
    except (KeyError, TypeError):  # not registered, or not hashable
        return None
    return name, cached_terms(weight, name, terms_class), (bits,)


def batch_weights(model: nn.Module) -> nn.Module:
    """Have ``model``'s training forward passes quantize, in one node per quantizer and bit-width, the weights of
    every layer whose ``weight_quantizer`` :func:`batch_terms` can batch, or that answers ``batch_terms()`` itself
    (AdaBits' SAT layers, whose weight precision and scheme are their own). The hooks hold no layer, so deep copies
    and pickles of ``model`` keep working. Returns ``model``."""
    model.register_forward_pre_hook(_quantize_together)
    # always: a forward pass that raises would otherwise leave its entries, whose graphs keep their weights alive
    model.register_forward_hook(_drop_untaken, always_call=True)
    return model


def _has_weight_quantizer(layer: nn.Module) -> bool:
    return hasattr(layer, "weight_quantizer") or hasattr(layer, "batch_terms")


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    """``model``'s layers with a ``weight_quantizer`` attribute or a ``batch_terms`` method, listed once while no
    submodule is registered anywhere (:mod:`methods.quant.module_lists`). A list that is out of date costs time,
    never values: a layer missing from it quantizes its own weight, and a removed layer's result is dropped unused
    after the pass."""
    return modules_where(model, "weight_layers", _has_weight_quantizer)


def _quantize_together(model: nn.Module, args) -> None:
    # under torch.compile every layer computes its own (caching() says no), and dynamo would stop at the weak table
    if not model.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    groups: dict[tuple[Hashable, tuple], tuple[list[torch.Tensor], list[WeightTerms]]] = {}
    for layer in _weight_layers(model):
        quantizer, weight = getattr(layer, "weight_quantizer", None), getattr(layer, "weight", None)
        own = getattr(layer, "batch_terms", None)
        if (quantizer is None and own is None) or not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
            continue
        if not caching(weight):
            return  # compiling, inference mode or the cache switched off: every layer computes its own
        found = own() if own is not None else batch_terms(quantizer, weight, int(layer.bits))
        if found is not None:
            name, terms, args = found
            weights, group = groups.setdefault((name, args), ([], []))
            weights.append(weight)
            group.append(terms)
    weights_taken = []
    for (name, args), (weights, terms) in groups.items():
        outputs = BatchedTermsNode.apply(terms, args, *weights)
        for weight, quantized in zip(weights, outputs):
            _waiting[weight] = (name, args, _version_key(weight), quantized)
        weights_taken += weights
    model.__dict__[_LAYERS_ATTRIBUTE] = weights_taken


def _drop_untaken(model: nn.Module, args, output) -> None:
    for weight in model.__dict__.pop(_LAYERS_ATTRIBUTE, ()):
        _waiting.pop(weight, None)
