"""Values derived from a tensor, computed once per version of that tensor.

A multi-bit training step runs every bit-width's forward and backward pass on the same latent weights: the
optimizer steps only after the last one. Much of a weight quantizer's work does not depend on the bit-width
(DoReFa's ``tanh(w)``, ``max|tanh(w)|`` and ``mean|w|``, the full-precision reference of EMQ's bias correction),
so it can be done once per step instead of once per bit-width. :func:`derived` keeps such values keyed on the
tensor object, its storage (held by a weak reference, so a freed storage's address cannot be mistaken for it) and
its version counter: ``load_state_dict``, ``copy_`` and any other in-place update bump the version, so the next
call recomputes. Two writes leave the version alone: a fused optimizer kernel, and anything written through
``tensor.data``; the harness bumps the versions itself after every optimizer step
(:func:`harness.optim.step_optimizers`) and after broadcasting weights (:func:`harness.distributed.broadcast_model`).
Assigning ``tensor.data = other`` changes the storage, which is a miss.

A quantizer whose backward pass also reads the cached terms subclasses :class:`WeightTerms` and calls
:func:`quantize_with_terms`, which runs one :class:`TermsNode` per call over them.

Entries live in a weak-keyed table: they go when their tensor goes, and are never part of a module's state, a
checkpoint or a deep copy. ``torch.compile`` tracing, inference mode and inference tensors, and ``torch.func``'s
wrapped tensors bypass the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")


class CacheSwitch:
    """Whether a cache is on, and a context manager that turns it off for a while (the reference path that the
    cached one is tested against)."""

    def __init__(self) -> None:
        self.enabled = True

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
_switch = CacheSwitch()
#: Recompute every derived value on every call (the reference the cached path is tested against).
version_cache_disabled = _switch.off


def _version_key(tensor: torch.Tensor) -> tuple[int, int, int]:
    return tensor.untyped_storage()._cdata, tensor.data_ptr(), tensor._version


def caching(tensor: torch.Tensor) -> bool:
    """Whether :func:`derived` would cache values of ``tensor`` here (not while compiling, not in inference mode or
    for inference tensors, not for tensors without storage such as ``torch.func``'s wrappers, and not inside
    :func:`version_cache_disabled`)."""
    if not _switch.enabled or torch.compiler.is_compiling():
        return False
    if torch.is_inference_mode_enabled() or tensor.is_inference():
        return False
    try:
        tensor.data_ptr()
    except RuntimeError:  # functorch's wrapped tensors have no data pointer
        return False
    return True


def derived(tensor: torch.Tensor, name: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or the value it returned for ``name`` (any hashable key: a string, or a tuple naming the
    quantizer and its options) on this version of ``tensor``."""
    if not caching(tensor):
        return compute()
    return _stored(tensor, name, compute)


def _stored(tensor: torch.Tensor, name: Hashable, compute: Callable[[], T]) -> T:
    key = _version_key(tensor)
    slot = _entries.get(tensor)
    if slot is None or slot[0] != key:
        # the weak reference keeps the storage's bookkeeping object alive, so its address in the key stays unique
        slot = (key, {}, StorageWeakRef(tensor.untyped_storage()))
        _entries[tensor] = slot
    values = slot[1]
    if name not in values:
        values[name] = compute()
    return values[name]


class WeightTerms:
    """The bit-width-independent terms of a weight quantizer for one version of its latent weight.

    A subclass computes its eager terms in ``__init__(weight)`` and the rest through :meth:`lazy` when first
    needed; ``quantized(*args)`` is the forward pass and ``backward(grad_output, *args)`` the gradient with respect
    to the latent weight, ``args`` being the quantizer's other arguments (the bit-width, a scheme).
    """

    def __init__(self) -> None:
        self._lazy: dict[str, object] = {}

    def lazy(self, name: str, compute: Callable[[], T]) -> T:
        if name not in self._lazy:
            self._lazy[name] = compute()
        return self._lazy[name]

    def quantized(self, *args) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, grad_output: torch.Tensor, *args) -> torch.Tensor:
        raise NotImplementedError


class TermsNode(torch.autograd.Function):
    """One autograd node per call whose forward and backward read a :class:`WeightTerms`; each quantizer
    subclasses it under its own name, which is what a profile shows."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, terms: WeightTerms, *args) -> torch.Tensor:
        ctx.terms, ctx.args = terms, args
        return terms.quantized(*args)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (ctx.terms.backward(grad_output, *ctx.args), None, *(None for _ in ctx.args))


def quantize_with_terms(weight: torch.Tensor, name: Hashable, terms_class: type[WeightTerms],
                        node: type[TermsNode], uncached: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``node`` over ``terms_class(weight)``, built once per version of ``weight`` and kept under ``name``; where
    the cache is bypassed (:func:`caching`), ``uncached(weight, *args)`` (a self-contained node or the composed
    formula) instead."""
    if not caching(weight):
        return uncached(weight, *args)
    return node.apply(weight, cached_terms(weight, name, terms_class), *args)


def cached_terms(weight: torch.Tensor, name: Hashable, terms_class: type[WeightTerms]) -> WeightTerms:
    """``terms_class(weight)``, built once per version of ``weight`` and kept under ``name`` (the caller has checked
    :func:`caching`)."""
    return _stored(weight, name, lambda: terms_class(weight))


def cached_entries(tensor: torch.Tensor) -> tuple[Hashable, ...]:
    """Names cached for the current version of ``tensor`` (for tests and debugging)."""
    slot = _entries.get(tensor)
    if slot is None or slot[0] != _version_key(tensor):
        return ()
    return tuple(slot[1])
