"""Weight bias correction of EMQ (Kim et al., NeurIPS 2025, arXiv 2510.20673, Eq. 2).

For a quantized weight ``w_q`` of the full-precision reference ``w`` (the weight the 32-bit forward pass uses)::

    w'_q = sqrt(V[w] / V[w_q]) * (w_q + (E[w] - E[w_q]))

with E the mean and V the variance: ``w'_q`` has the variance of ``w`` at every bit-width, so one batch norm can
follow all of them. Applied literally (as Eq. 2 is written), the scale multiplies the shifted weight, so the mean
becomes ``sqrt(V[w] / V[w_q]) E[w]`` (equal to E[w] only when the scale is 1; latent weights are near zero-mean,
so the difference is small). Choices the paper leaves open (each selectable by the caller):

* statistics per layer (default) or per output channel (``granularity="per_channel"``);
* population variance (divide by the count), the same estimator for both, so the corrected variance equals V[w]
  exactly whichever estimator one checks it with;
* statistics computed without gradient: the correction is an affine map with constant coefficients, and the
  gradient reaches the latent weight through ``w_q`` (its straight-through estimator) times the constant scale;
* a quantized tensor with no spread (V[w_q] = 0, e.g. one level only) keeps scale 1 rather than dividing by zero.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import torch

from methods.quant import native
from methods.quant.modules import WeightQuantizer
from methods.quant.version_cache import WeightTerms, derived
from methods.quant.weight_batch import batch_terms, take_batched

FULL_PRECISION = 32
Granularity = Literal["per_layer", "per_channel"]
# Below this variance a quantized tensor is treated as constant (its scale would blow up).
MIN_VARIANCE = 1e-20


def _stat_dims(weight: torch.Tensor, granularity: Granularity) -> tuple[int, ...]:
    if granularity == "per_layer":
        return tuple(range(weight.dim()))
    return tuple(range(1, weight.dim()))  # dim 0 is the output channel of Conv2d and Linear weights


def reference_statistics(reference: torch.Tensor,
                         granularity: Granularity = "per_layer") -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[w], V[w])`` of the full-precision reference, without gradient, shaped to broadcast against it."""
    dims = _stat_dims(reference, granularity)
    with torch.no_grad():
        return reference.mean(dim=dims, keepdim=True), reference.var(dim=dims, correction=0, keepdim=True)


def coefficients_from_statistics(quantized: torch.Tensor, mean_ref: torch.Tensor, var_ref: torch.Tensor,
                                 granularity: Granularity = "per_layer") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correction_coefficients` given the reference's :func:`reference_statistics`."""
    dims = _stat_dims(quantized, granularity)
    with torch.no_grad():
        mean_q = quantized.mean(dim=dims, keepdim=True)
        var_q = quantized.var(dim=dims, correction=0, keepdim=True)
        scale = torch.where(var_q > MIN_VARIANCE, torch.sqrt(var_ref / var_q.clamp_min(MIN_VARIANCE)),
                            torch.ones_like(var_q))
        return scale, mean_ref - mean_q


def correction_coefficients(quantized: torch.Tensor, reference: torch.Tensor,
                            granularity: Granularity = "per_layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2's ``(sqrt(V[w] / V[w_q]), E[w] - E[w_q])``, without gradient, shaped to broadcast against the weight
    (one value per layer, or one per output channel)."""
    return coefficients_from_statistics(quantized, *reference_statistics(reference, granularity), granularity)


def bias_correct(quantized: torch.Tensor, reference: torch.Tensor,
                 granularity: Granularity = "per_layer") -> torch.Tensor:
    """Eq. 2: ``sqrt(V[w] / V[w_q]) * (w_q + (E[w] - E[w_q]))`` element-wise, statistics without gradient."""
    scale, shift = correction_coefficients(quantized, reference, granularity)
    return scale * (quantized + shift)


class _CorrectedTerms(WeightTerms):
    """Eq. 2 on a base quantizer's terms for one forward pass, in list form for :mod:`methods.quant.weight_batch`:
    the forward pass is the base's, then per layer the coefficients (without gradient) and ``scale * (w_q +
    shift)``; the backward pass multiplies the upstream gradient by the scale, as autograd's product node does,
    and hands it to the base's backward pass. Same operations as :class:`BiasCorrectedQuantizer`'s, same bits;
    with per-layer statistics the forward pass's correction is one native operator over all the layers
    (``csrc/bias_correction.cpp``, the same bits) where it runs."""

    def __init__(self, base: WeightTerms, mean_ref: torch.Tensor, var_ref: torch.Tensor,
                 granularity: Granularity) -> None:
        super().__init__()
        self.base, self.mean_ref, self.var_ref, self.granularity = base, mean_ref, var_ref, granularity
        self.scale: torch.Tensor | None = None  # this forward pass's Eq. 2 scale, for the backward pass

    @staticmethod
    def quantized_many(terms: list[_CorrectedTerms], bits: int) -> list[torch.Tensor]:
        quantized = type(terms[0].base).quantized_many([t.base for t in terms], bits)
        if terms[0].granularity == "per_layer":  # one batch, one granularity: it is part of the batch's name
            # one native call for every layer's statistics and correction, the same bits (csrc/bias_correction.cpp)
            native_result = native.list_loop("bias_correct", quantized, [t.mean_ref for t in terms],
                                             [t.var_ref for t in terms], MIN_VARIANCE)
            if native_result is not None:
                corrected, scales = native_result
                for t, scale in zip(terms, scales):
                    t.scale = scale
                return list(corrected)
        shifts = []
        for t, q in zip(terms, quantized):
            t.scale, shift = coefficients_from_statistics(q, t.mean_ref, t.var_ref, t.granularity)
            shifts.append(shift)
        return torch._foreach_mul([t.scale for t in terms], torch._foreach_add(quantized, shifts))

    @staticmethod
    def backward_many(terms: list[_CorrectedTerms], grads: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
        scaled = torch._foreach_mul(grads, [t.scale for t in terms])
        return type(terms[0].base).backward_many([t.base for t in terms], scaled, bits)


class BiasCorrectedQuantizer:
    """``quantizer(w, bits)`` followed by Eq. 2 against ``quantizer(w, 32)`` for every bit-width below 32.

    A plain callable object (not a module) so that :class:`methods.quant.modules.QuantConv2d` and
    :class:`methods.quant.vit.QuantLinear` take it as their ``weight_quantizer`` and deep copies keep working.
    """

    def __init__(self, quantizer: WeightQuantizer, granularity: Granularity = "per_layer") -> None:
        if granularity not in ("per_layer", "per_channel"):
            raise ValueError(f"granularity must be per_layer or per_channel, got {granularity!r}")
        self.quantizer = quantizer
        self.granularity = granularity

    def __call__(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        if bits >= FULL_PRECISION:
            return self.quantizer(weight, FULL_PRECISION)
        batched = take_batched(weight, self._batch_name(), bits)
        if batched is not None:  # computed with the network's other layers (methods.quant.weight_batch)
            return batched
        mean_ref, var_ref = self._reference(weight)
        quantized = self.quantizer(weight, bits)
        scale, shift = coefficients_from_statistics(quantized, mean_ref, var_ref, self.granularity)
        return scale * (quantized + shift)  # as bias_correct

    def _reference(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the reference's statistics do not depend on the bit-width: once per version of the weight
        return derived(weight, ("bias_correction_reference", self.quantizer, self.granularity),
                       lambda: self._reference_statistics(weight))

    def _reference_statistics(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return reference_statistics(self.quantizer(weight, FULL_PRECISION), self.granularity)

    def _batch_name(self) -> tuple:
        return ("bias_corrected", self.quantizer, self.granularity)

    def batch_terms(self, weight: torch.Tensor, bits: int) -> tuple[Hashable, WeightTerms, tuple] | None:
        """What :mod:`methods.quant.weight_batch` needs to correct ``weight`` at ``bits`` together with the network's
        other layers: at 32 bits the base quantizer's terms (the correction is not applied there), below that a
        :class:`_CorrectedTerms` over them, or None where the base quantizer cannot be batched."""
        base = batch_terms(self.quantizer, weight, bits)
        if base is None or bits >= FULL_PRECISION:
            return base
        return self._batch_name(), _CorrectedTerms(base[1], *self._reference(weight), self.granularity), (bits,)

    def __repr__(self) -> str:
        name = getattr(self.quantizer, "__name__", repr(self.quantizer))
        return f"BiasCorrectedQuantizer({name}, {self.granularity})"
