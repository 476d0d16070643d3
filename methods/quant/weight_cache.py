"""Quantized weights computed once per evaluation, not once per batch.

A quantized layer recomputes its quantized weight on every forward pass, which training needs (the latent
weights change every step) but evaluation does not: across the batches of one evaluation at one bit-width the
weights are fixed. :func:`cached_in_eval` wraps a layer's weight method so that, in eval mode with autograd off,
the result is kept and returned again while nothing it depends on has changed: the layer's bit-width and the
storage and version counter of each of its own parameters. An optimizer step, ``load_state_dict`` or any other
in-place update bumps a parameter's version, so the next evaluation recomputes. Training (``module.training`` or
autograd on) and ``torch.compile`` tracing never read or write the cache.

One entry per wrapped method and layer: evaluation runs one bit-width after another, so one entry is all a pass
reuses, and memory stays at one extra copy of the quantized weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from methods.quant.version_cache import CacheSwitch

_CACHE_ATTRIBUTE = "_eval_weight_cache"
_switch = CacheSwitch()
#: Evaluate without the cache (the reference the cached path is tested against).
weight_cache_disabled = _switch.off

LayerT = TypeVar("LayerT", bound=nn.Module)


def _key(layer: nn.Module) -> tuple:
    versions = tuple((p.data_ptr(), p._version) for p in layer.parameters(recurse=False))
    return getattr(layer, "bits", None), versions


def cached_in_eval(method: Callable[[LayerT], torch.Tensor]) -> Callable[[LayerT], torch.Tensor]:
    """Decorate a layer's ``() -> Tensor`` weight method with the evaluation cache."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: LayerT) -> torch.Tensor:
        if not _switch.enabled or self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return method(self)
        cache = self.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
        key = _key(self)
        entry = cache.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = method(self)
        cache[name] = (key, value)
        return value

    return wrapper


def clear_weight_caches(model: nn.Module) -> None:
    """Drop every cached weight of ``model`` (e.g. before serializing it)."""
    for module in model.modules():
        module.__dict__.pop(_CACHE_ATTRIBUTE, None)
