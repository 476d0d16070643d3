"""SAT-style nested weight quantization (AdaBits' weights): the quantizer, its codes and the rescale factor.

Jin, Liu, Liao, "Towards Efficient Training for Neural Network Quantization" (SAT, arXiv 1912.10207), in the form
of Jin, Yang, Liao, "AdaBits: Neural Network Quantization with Adaptive Bit-Widths" (CVPR 2020,
arXiv 1912.09666), Sec. 3.2 ("modified" weight scheme):

* ``w~ = tanh(w) / max|tanh(w)|``; ``u = (w~ + 1) / 2``;
* ``q = min(floor(2^b u), 2^b - 1) / 2^b``; ``W_q = 2q - 1``. The levels are ``-1 + 2j / 2^b`` (``j = 0..2^b-1``):
  they include -1 and 0 but not +1. The floor (and its clamp) pass the gradient straight through; the gradient
  flows into ``w`` through tanh and the max.
* Nesting: ``floor(2^b u) = floor(floor(2^8 u) / 2^(8-b))``, so the b-bit integer code is the 8-bit code shifted
  right by ``8 - b``; one stored highest-bit copy serves every lower bit-width. In float32 the property is exact:
  multiplying by a power of two is exact and the straight-through sum reproduces the floor exactly.
* At 32 bits the weight is ``w~`` itself (the authors' code: "no quantizing but only clamping").
* SAT rescaling: ``W_q * 1 / (sqrt(n_out) * std(W_q))``, the std treated as a constant (no gradient). For a
  convolution ``n_out = out_channels * kh * kw`` and the rescale applies in training and evaluation (a BN follows;
  no bias to compensate). For the classifier ``n_out = out_features`` and the rescale applies during training
  only; in evaluation the bias is divided by the factor instead, out of place, so eval logits are the training
  logits divided by the (positive) factor and the argmax is unchanged.

The layers that use these quantizers (per-layer weight precision, the rescale, storage and export) are in
:mod:`methods.quant.sat_layers`.

Weight schemes (:data:`WEIGHT_SCHEMES`, keyword ``weight_scheme`` of :func:`sat_weight` and of the layers):

* ``"original"`` (the default): the scheme above, the one of the AdaBits paper. The authors' code calls it
  ``'modified'``; their ``'original'`` is DoReFa's ``round((2^b - 1) u) / (2^b - 1)``, which is not offered here.
* ``"centered"``: added later to the authors' repository (github.com/deJQK/AdaBits, commit 0d62640 "centered
  scheme", Dec 2022: ``models/quant_ops.py`` lines 29-32 and the README section "Centered Weight Quantization for
  Low Precision", which recommends it for convergent low-precision training because the weights then have zero
  mean). The code is the same, ``j = min(floor(2^b u), 2^b - 1)``; it is read as the centre of its bucket,
  ``q = (j + 1/2) / 2^b``, so ``W_q = 2q - 1 = (2j + 1) / 2^b - 1``. The 2^b levels are the odd multiples of
  ``2^-b`` in ``(-1, 1)``, symmetric about 0, with neither 0 nor +-1: ``+-1/2`` at 1 bit, ``{+-1/4, +-3/4}`` at
  2 bits, ``+-1/8 .. +-7/8`` at 3 bits, ``+-1/256 .. +-255/256`` at 8 bits. Equivalently, the paper's ``W_q``
  plus ``2^-b``: the same std, hence the same rescale factor, and the same straight-through gradient (the
  half-step is a constant). The 32-bit path is the same for both schemes.
* Nesting under ``"centered"``: the level *values* do not nest (the 2-bit level 1/4 = 64/256 is not among the
  8-bit levels, which are odd multiples of 1/256), but the *codes* do, exactly as before:
  ``j_b = j_8 >> (8 - b)``. A b-bit level is the mean of the 2^(8-b) 8-bit levels that share its top b code bits,
  and it is a fixed function of those bits and of b alone: ``(2 j_b + 1 - 2^b) / 2^b``; the half-step offset is
  a per-bit-width constant, not stored per weight (an integer kernel computes ``2 sum j_b x + (1 - 2^b) sum x``,
  the second term once per output position). So a deployed switchable set still needs one copy of the codes at
  the highest bit-width and ``storage_bits`` / ``storage_bits_total`` count the same under both schemes.
  Floats remain exact: the code is formed as before, ``j + 1/2`` and the division by ``2^b`` are exact for
  ``b <= 8``, and ``(2j + 1) / 2^b - 1`` is a multiple of ``2^-b`` in ``[-1, 1]``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from harness.errors import ConfigError
from methods.quant import native
from methods.quant.dorefa import FULL_PRECISION, tanh_max_backward_many
from methods.quant.version_cache import TermsNode, WeightTerms
from methods.quant.weight_batch import quantize_batched_or_cached

SAT_TERMS = "sat_weight"  # the version cache's name for the terms below
WeightScheme = Literal["original", "centered"]
WEIGHT_SCHEMES: tuple[str, ...] = ("original", "centered")


def sat_normalize(weight: torch.Tensor) -> torch.Tensor:
    """``tanh(w) / max|tanh(w)|`` in [-1, 1] (the max element maps to exactly +-1)."""
    squashed = torch.tanh(weight)
    return squashed / squashed.abs().max()


def check_weight_scheme(scheme: str) -> str:
    """``scheme`` if it is one of :data:`WEIGHT_SCHEMES`, else a :class:`ConfigError`."""
    if scheme not in WEIGHT_SCHEMES:
        raise ConfigError(f"unknown SAT weight scheme {scheme!r}; choose one of {', '.join(WEIGHT_SCHEMES)}")
    return scheme


def nested_quantize_unit(unit: torch.Tensor, bits: int, scheme: str = "original") -> torch.Tensor:
    """The b-bit value of ``u`` in [0, 1], gradient straight through: ``j / 2^b`` (``"original"``) or
    ``(j + 1/2) / 2^b`` (``"centered"``), with the nested code ``j = min(floor(2^b u), 2^b - 1)``."""
    check_weight_scheme(scheme)
    steps = 2**bits
    scaled = unit * steps
    code = torch.clamp(torch.floor(scaled), max=steps - 1)
    # scaled - code is exact in float32 (Sterbenz), so the straight-through sum equals the code bit for bit.
    code = scaled + (code - scaled).detach()
    if scheme == "centered":
        code = code + 0.5  # a constant: the straight-through gradient is unchanged, and j + 1/2 is exact
    return code / steps


class _SATTerms(WeightTerms):
    """The bit-width-independent terms of the SAT weight for one version of a latent weight: ``s = tanh(w)``,
    ``M = max|s|``, ``w~ = s / M`` and, when first needed, ``u = (w~ + 1) / 2``, the elements at the max and the
    division's ``(s / M) / M``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            native_terms = native.list_loop("sat_weight_terms", weight)
            if native_terms is not None:  # every term below in one call (methods.quant.native), the same bits
                self.squashed, self.max_abs, self.normalized, unit, factor, at_max, ties, sign = native_terms
                self._lazy.update(unit=unit, max_factor=factor, ties=(at_max, ties), sign=sign)
                return
            self.squashed = torch.tanh(weight)
            self.max_abs = self.squashed.abs().max()
            self.normalized = self.squashed / self.max_abs

    def quantized(self, bits: int, scheme: str) -> torch.Tensor:
        return self.quantized_many([self], bits, scheme)[0]

    def backward(self, grad_output: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
        return self.backward_many([self], [grad_output], bits, scheme)[0]

    @staticmethod
    def quantized_many(terms: list[_SATTerms], bits: int, scheme: str) -> list[torch.Tensor]:
        """:func:`sat_quantize_normalized` of each ``w~``, the same float operations (bit for bit); in list form for
        :mod:`methods.quant.weight_batch` (a ``_foreach`` operation applies the plain one to each tensor)."""
        if bits >= FULL_PRECISION:
            return [t.normalized.clone() for t in terms]
        steps = 2**bits
        units = [t.lazy("unit", lambda t=t: (t.normalized + 1) / 2) for t in terms]
        native_result = native.list_loop("sat_weight_forward", units, float(steps), scheme == "centered")
        if native_result is not None:  # one loop per layer, the same operations (methods.quant.native)
            return native_result
        # floor, clamp: the code the straight-through sum reproduces exactly (nested_quantize_unit)
        codes = torch._foreach_mul(units, steps)
        torch._foreach_floor_(codes)
        torch._foreach_clamp_max_(codes, steps - 1)
        if scheme == "centered":
            torch._foreach_add_(codes, 0.5)
        torch._foreach_div_(codes, steps)
        torch._foreach_mul_(codes, 2)
        torch._foreach_sub_(codes, 1)
        return codes

    @staticmethod
    def backward_many(terms: list[_SATTerms], grads: list[torch.Tensor], bits: int, scheme: str) -> list[torch.Tensor]:
        """Autograd's backward pass through the composition (``2 q - 1``, ``/ 2^b``, the straight-through code,
        ``* 2^b``, ``(w~ + 1) / 2``, ``s / M``, the max, ``|s|``, tanh), operation for operation, with the
        bit-width-independent factors read from the cache (the scheme's half step is a constant: no gradient)."""
        factors = [t.lazy("max_factor", lambda t=t: (t.squashed / t.max_abs) / t.max_abs) for t in terms]
        max_abs = [t.max_abs for t in terms]
        native_result = (native.list_loop("sat_weight_backward", grads, max_abs, factors, float(2**bits))
                         if bits < FULL_PRECISION else None)
        if native_result is not None:  # one loop per layer, the same operations (methods.quant.native)
            grad_squashed, grad_max = native_result
        else:
            grad_normalized = grads
            if bits < FULL_PRECISION:
                steps = 2**bits
                grad_normalized = torch._foreach_mul(grads, 2)
                torch._foreach_div_(grad_normalized, steps)
                torch._foreach_mul_(grad_normalized, steps)
                torch._foreach_div_(grad_normalized, 2)
            to_max = torch._foreach_neg(grad_normalized)
            torch._foreach_mul_(to_max, factors)
            grad_max = [part.sum() for part in to_max]
            grad_squashed = torch._foreach_div(grad_normalized, max_abs)
        return tanh_max_backward_many(grad_squashed, grad_max, terms, [t.squashed for t in terms])


class _CachedSATWeight(TermsNode):
    """The SAT weight from :class:`_SATTerms`: one autograd node per bit-width instead of about fifteen, with the
    composition's forward values and gradients bit for bit."""


def _composed_sat_weight(weight: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    return sat_quantize_normalized(sat_normalize(weight), bits, scheme)


def sat_weight(weight: torch.Tensor, bits: int, scheme: str = "original") -> torch.Tensor:
    """The AdaBits/SAT weight at ``bits`` (1..31) under ``scheme`` (module docstring), or the normalized weight
    at 32 bits (either scheme); no rescaling.

    ``tanh(w)``, its max and ``w~`` are computed once per version of the latent weight
    (:mod:`methods.quant.version_cache`) and shared by every bit-width of a training step; under ``torch.compile``
    and with the cache off the composed formula runs, which gives the same bits."""
    check_weight_scheme(scheme)
    return quantize_batched_or_cached(weight, SAT_TERMS, _SATTerms, _CachedSATWeight, _composed_sat_weight, bits,
                                      scheme)


def sat_quantize_normalized(normalized: torch.Tensor, bits: int, scheme: str = "original") -> torch.Tensor:
    """:func:`sat_weight` of the normalized weight ``w~`` (``normalized`` itself at 32 bits)."""
    if bits >= FULL_PRECISION:
        return normalized
    return 2 * nested_quantize_unit((normalized + 1) / 2, bits, scheme) - 1


def sat_codes(normalized: torch.Tensor, bits: int) -> torch.Tensor:
    """The nested code ``j = min(floor(2^b u), 2^b - 1)``, ``u = (w~ + 1) / 2``, as int64 (the forward pass's steps)."""
    steps = 2**bits
    return torch.clamp(torch.floor((normalized + 1) / 2 * steps), max=steps - 1).long()


def sat_levels(codes: torch.Tensor, bits: int, scheme: str = "original") -> torch.Tensor:
    """``W_q`` from the ``bits``-bit codes: ``2 j / 2^b - 1`` or, centered, ``(2 j + 1) / 2^b - 1`` (the same float
    operations as :func:`nested_quantize_unit`, so the levels equal the forward pass's bit for bit)."""
    code = codes.float()
    if scheme == "centered":
        code = code + 0.5
    return 2 * (code / 2**bits) - 1


class SATStoredWeights(nn.Module):
    """An exported SAT layer's weights: codes at ``code_bits`` (every lower bit-width's codes are their top bits,
    ``j_b = j >> (code_bits - b)``) or, at 32 bits, the normalized weight ``w~``; called with a weight precision,
    it returns ``W_q`` at that precision."""

    def __init__(self, values: torch.Tensor, code_bits: int, scheme: str) -> None:
        super().__init__()
        self.register_buffer("values", values.detach().clone())
        self.code_bits, self.scheme = code_bits, check_weight_scheme(scheme)

    def forward(self, bits: int) -> torch.Tensor:
        if bits > self.code_bits:
            raise ConfigError(f"this exported layer holds {self.code_bits}-bit weights, not {bits}-bit ones")
        if self.code_bits >= FULL_PRECISION:
            return sat_quantize_normalized(self.values, bits, self.scheme)
        return sat_levels(self.values >> (self.code_bits - bits), bits, self.scheme)


def sat_rescale_factor(quantized_weight: torch.Tensor, fan_out: int) -> torch.Tensor:
    """``1 / (sqrt(fan_out) * std(W_q))`` with the std taken as a constant (unbiased, as ``torch.std``)."""
    return 1.0 / (math.sqrt(fan_out) * quantized_weight.detach().std())
