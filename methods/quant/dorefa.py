"""DoReFa weight and activation quantizers as used by Any-Precision DNNs.

Zhou et al., "DoReFa-Net" (arXiv 1606.06160), Eq. 9 (weights) and Sec. 2.3 (activations), in the form of
Yu et al., "Any-Precision Deep Neural Networks" (AAAI 2021, arXiv 1911.07346):

* weights, k < 32:  ``u = tanh(w) / (2 max|tanh(w)|) + 1/2``;  ``W_q = E * (2 q_k(u) - 1)``,
  ``E = mean(|w|)`` over the layer as a constant (no gradient); the gradient flows through tanh and the max.
  At k = 1 this gives ``W_q = +-E``.
* weights, k = 32:  ``W = E * tanh(w) / max|tanh(w)|`` (no rounding).
* activations, k < 32:  ``q_k(clamp(x, 0, 1))``; k = 32: ReLU (the authors' code) or the clamp (the paper).

``q_k`` is :func:`methods.quant.ste.quantize_unit`. Every bit-width re-quantizes from the latent weights.

The weight quantizer computes ``E``, ``t``, ``max|t|``, ``u``, the elements at the max and the backward pass's
``(t / D) / D`` once per version of the latent weight (:mod:`methods.quant.version_cache`), not once per
bit-width: one training step runs every bit-width on the same weights, and those terms do not depend on the
bit-width. What remains per bit-width is the rounding forward and the scaling by the upstream gradient backward,
the same float operations on the same values as the uncached node (:class:`_DoReFaWeight`, which runs under
``torch.compile`` and with the cache off), so both give the same bits.

The activation quantizer runs, on float32 CPU tensors in eager mode, as one native operator with a C++ autograd
node (:mod:`methods.quant.native`: one pass forward, ``hardtanh_backward`` backward, the same bits); elsewhere as
``hardtanh``'s autograd node with the rounding applied to its fresh output in place, without autograd (under
``torch.compile``: one autograd function, :class:`_ClampQuantize`): the composed
formula records seven elementwise operations per call, each with its own full-size output, and it runs at every
quantized convolution of every bit-width of every step. (Forward-mode AD would see the rounding's zero tangent;
nothing here uses it.) The fused forward is bit-identical to the composition (STE rounding
``t + (round(t) - t)`` equals ``round(t)`` exactly in floating point: ``round(t) - t`` is exact), and its backward
is the composition's gradient, ``g`` where ``0 < x < 1`` (the mask of ``torch.clamp`` with scalar bounds, which
passes no gradient at the bounds themselves), else 0, computed by ``hardtanh_backward`` from the saved input; the
composition computes ``(g / L) * L``, which can differ from ``g`` in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.quant import native
from methods.quant.backward_ops import clamp_unit_backward
from methods.quant.ste import clamp_ste, quantize_unit
from methods.quant.version_cache import TermsNode, WeightTerms
from methods.quant.weight_batch import quantize_batched_or_cached, register_batchable

FULL_PRECISION = 32
DOREFA_TERMS = "dorefa_weight"  # the version cache's name for the terms below


class _DoReFaWeight(torch.autograd.Function):
    """Eq. 9 in one autograd node: the composition's float operations, in its order, forward and backward.

    With ``t = tanh(w)``, ``M = max|t|`` and ``E`` a constant, the straight-through rounding makes the gradient
    below 32 bits that of ``E (2 (t / 2M + 1/2) - 1)``; at 32 bits it is that of ``E t / M``. The backward pass
    replays autograd's own formulas for those graphs (division, the max's gradient shared among ties as
    ``torch.max`` shares it, ``|t|``, tanh) so the gradients are bit-identical to the unrounded composition. The
    composition records about a dozen nodes per call, each with a weight-sized output; this saves ``t`` alone.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int) -> torch.Tensor:
        scale = weight.abs().mean()
        normalized = torch.tanh(weight)
        max_abs = normalized.abs().max()
        ctx.save_for_backward(normalized, max_abs, scale)
        ctx.bits = bits
        if bits >= FULL_PRECISION:
            return scale * normalized / max_abs
        levels = 2**bits - 1
        unit = normalized / (2 * max_abs) + 0.5
        return scale * (2 * (torch.round(unit * levels) / levels) - 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        normalized, max_abs, scale = ctx.saved_tensors
        if ctx.bits >= FULL_PRECISION:  # scale * t / M: the division's gradients, then the product's
            numerator = scale * normalized
            grad_normalized = grad_output / max_abs * scale
            grad_max = (-grad_output * ((numerator / max_abs) / max_abs)).sum()
        else:  # E * (2 * (t / D + 0.5) - 1) with D = 2M
            denominator = 2 * max_abs
            grad_unit = grad_output * scale * 2
            grad_normalized = grad_unit / denominator
            grad_max = (-grad_unit * ((normalized / denominator) / denominator)).sum() * 2
        return tanh_max_backward(grad_normalized, grad_max, normalized, *max_ties(normalized, max_abs)), None


def max_ties(normalized: torch.Tensor, max_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``|t|`` is ``max|t|``, and how many elements are: the elements ``torch.max``'s gradient is shared by."""
    at_max = normalized.abs() == max_abs
    return at_max, at_max.sum()


def tanh_max_backward(grad_normalized: torch.Tensor, grad_max: torch.Tensor, normalized: torch.Tensor,
                      at_max: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """The gradient at ``w`` of ``t = tanh(w)`` from the gradient reaching ``t`` directly and the one reaching
    ``max|t|``: autograd's own formulas (the max's gradient shared among ties as ``torch.max`` shares it, ``|t|``,
    tanh), operation for operation."""
    # where, not masked_fill_ with a tensor value, which reads the value back to the host (a sync on CUDA)
    shared = torch.where(at_max, grad_max / ties, 0.0)
    grad_normalized = grad_normalized + shared * normalized.sgn()
    return torch.ops.aten.tanh_backward(grad_normalized, normalized)  # autograd's own tanh kernel


def tanh_max_backward_many(grad_squashed: list[torch.Tensor], grad_max: list[torch.Tensor], terms: list[WeightTerms],
                           tanh_w: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`tanh_max_backward` over a list of layers with ``tanh(w)`` each; ``terms`` hold ``max_abs``, and the
    elements at the max, their count and ``sgn(tanh(w))`` are cached in them."""
    ties = [t.lazy("ties", lambda t=t, s=s: max_ties(s, t.max_abs)) for t, s in zip(terms, tanh_w)]
    signs = [t.lazy("sign", lambda s=s: s.sgn()) for t, s in zip(terms, tanh_w)]
    at_max, counts = [mask for mask, _ in ties], [count for _, count in ties]
    native_result = native.list_loop("tanh_max_backward", grad_squashed, grad_max, at_max, counts, signs, tanh_w)
    if native_result is not None:  # one loop per layer, the same operations (methods.quant.native)
        return native_result
    per_tie = torch._foreach_div(grad_max, counts)
    shared = [torch.where(mask, value, 0.0) for mask, value in zip(at_max, per_tie)]
    to_squashed = torch._foreach_mul(shared, signs)
    grad_squashed = torch._foreach_add(grad_squashed, to_squashed)
    return [torch.ops.aten.tanh_backward(grad, s) for grad, s in zip(grad_squashed, tanh_w)]


class _DoReFaTerms(WeightTerms):
    """The bit-width-independent terms of Eq. 9 for one version of a latent weight: ``E``, ``t``, ``max|t|``, and,
    when first needed, ``u``, the elements at the max and the backward pass's ``(t / D) / D`` factors (about
    3.3 weight-sized float32 tensors in all, held until the weight changes or goes).

    The forward and backward passes are written over lists of layers (``quantized_many``, ``backward_many``): a
    forward pass of the whole network quantizes every layer's weight in one autograd node
    (:mod:`methods.quant.weight_batch`), where each list operation is one ``torch._foreach_*`` call instead of one
    Python-level call per layer. A ``_foreach`` operation applies the plain operation to each tensor, so a list of
    one gives the single-layer path, and every layer gets the same bits either way."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            native_terms = native.list_loop("dorefa_weight_terms", weight)
            if native_terms is not None:  # every term below in one call (methods.quant.native), the same bits
                self.scale, self.normalized, self.max_abs, twice_max, unit, factor, at_max, ties, sign = native_terms
                self._lazy.update(twice_max=twice_max, unit=unit, max_factor=factor, ties=(at_max, ties), sign=sign)
                return
            self.scale = weight.abs().mean()
            self.normalized = torch.tanh(weight)
            self.max_abs = self.normalized.abs().max()

    def quantized(self, bits: int) -> torch.Tensor:
        return self.quantized_many([self], bits)[0]

    def backward(self, grad_output: torch.Tensor, bits: int) -> torch.Tensor:
        return self.backward_many([self], [grad_output], bits)[0]

    def _twice_max(self) -> torch.Tensor:
        return self.lazy("twice_max", lambda: 2 * self.max_abs)

    @staticmethod
    def quantized_many(terms: list[_DoReFaTerms], bits: int) -> list[torch.Tensor]:
        """Eq. 9's forward pass, the composition's float operations in its order (bit for bit)."""
        scales = [t.scale for t in terms]
        if bits >= FULL_PRECISION:  # (E * t) / M
            out = torch._foreach_mul([t.normalized for t in terms], scales)
            torch._foreach_div_(out, [t.max_abs for t in terms])
            return out
        levels = 2**bits - 1
        units = [t.lazy("unit", lambda t=t: t.normalized / t._twice_max() + 0.5) for t in terms]
        native_result = native.list_loop("dorefa_weight_forward", units, scales, float(levels))
        if native_result is not None:  # one loop per layer, the same operations (methods.quant.native)
            return native_result
        out = torch._foreach_mul(units, levels)  # round(u L) / L, then E (2 q - 1)
        torch._foreach_round_(out)
        torch._foreach_div_(out, levels)
        torch._foreach_mul_(out, 2)
        torch._foreach_sub_(out, 1)
        torch._foreach_mul_(out, scales)
        return out

    @staticmethod
    def backward_many(terms: list[_DoReFaTerms], grads: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
        """:class:`_DoReFaWeight`'s backward pass with the terms above read from the cache: the same operations on
        the same values, so the same bits (signed zeros and non-finite values included)."""
        scales, max_abs = [t.scale for t in terms], [t.max_abs for t in terms]
        if bits >= FULL_PRECISION:  # E * t / M
            factors = [t.lazy("max_factor_32", lambda t=t: ((t.scale * t.normalized) / t.max_abs) / t.max_abs)
                       for t in terms]
            grad_normalized = torch._foreach_div(grads, max_abs)
            torch._foreach_mul_(grad_normalized, scales)
            to_max = torch._foreach_neg(grads)
            torch._foreach_mul_(to_max, factors)
            grad_max = [part.sum() for part in to_max]
        else:  # E * (2 * (t / D + 0.5) - 1) with D = 2M
            factors = [t.lazy("max_factor", lambda t=t: (t.normalized / t._twice_max()) / t._twice_max())
                       for t in terms]
            twice_max = [t._twice_max() for t in terms]
            native_result = native.list_loop("dorefa_weight_backward", grads, scales, twice_max, factors)
            if native_result is not None:  # one loop per layer, the same operations (methods.quant.native)
                grad_normalized, grad_max = native_result
            else:
                grad_unit = torch._foreach_mul(grads, scales)
                torch._foreach_mul_(grad_unit, 2)
                grad_normalized = torch._foreach_div(grad_unit, twice_max)
                torch._foreach_neg_(grad_unit)
                torch._foreach_mul_(grad_unit, factors)
                grad_max = torch._foreach_mul([part.sum() for part in grad_unit], 2)
        return tanh_max_backward_many(grad_normalized, grad_max, terms, [t.normalized for t in terms])


class _CachedDoReFaWeight(TermsNode):
    """:class:`_DoReFaWeight` from :class:`_DoReFaTerms`, bit for bit."""


def dorefa_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize a latent weight tensor to ``bits`` (1..31) or return its 32-bit normalized form."""
    return quantize_batched_or_cached(weight, DOREFA_TERMS, _DoReFaTerms, _CachedDoReFaWeight, _DoReFaWeight.apply,
                                      bits)


register_batchable(dorefa_weight, DOREFA_TERMS, _DoReFaTerms)


def dorefa_weight_reference(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`dorefa_weight` as the composed formula (the reference the fused node is tested against)."""
    scale = weight.detach().abs().mean()
    normalized = torch.tanh(weight)
    max_abs = normalized.abs().max()
    if bits >= FULL_PRECISION:
        return scale * normalized / max_abs
    unit = normalized / (2 * max_abs) + 0.5
    return scale * (2 * quantize_unit(unit, bits) - 1)


class _ClampQuantize(torch.autograd.Function):
    """``round(L clamp(x, 0, 1)) / L`` forward; straight-through inside ``(0, 1)`` backward.

    It saves ``x`` rather than a mask, so the forward skips the three passes (two comparisons and an and) that
    built the mask. In the harness's ResNets ``x`` is a ReLU's output, which the ReLU keeps for its own backward,
    so saving it costs no memory there (elsewhere, e.g. after a ViT's layer norm, a float where a bool was). The
    backward is ``hardtanh_backward``, one fused pass that gives ``g`` where ``0 < x < 1`` and 0 elsewhere, the
    same values as ``g * mask``; on CPU through :func:`~methods.quant.backward_ops.clamp_unit_backward`, which keeps
    the comparison in the compiled backward graph (the partitioner would otherwise save bool masks, which inductor
    writes slowly on CPU).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        # out of place (the same values): torch 2.11 compiles an autograd function whose forward works in place on
        # its own intermediate into a backward that returns zeros (fixed by 2.14; GPU images may still run 2.11)
        return torch.round(x.clamp(0.0, 1.0) * levels) / levels

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return clamp_unit_backward(grad_output, x), None


def dorefa_activation(x: torch.Tensor, bits: int, full_precision_act: str = "relu") -> torch.Tensor:
    """Quantize an activation to ``bits``; at 32 bits apply ``full_precision_act`` ("relu" or "clamp")."""
    if bits >= FULL_PRECISION:
        return torch.relu(x) if full_precision_act == "relu" else torch.clamp(x, 0.0, 1.0)
    levels = 2**bits - 1
    if torch.compiler.is_compiling():
        return _ClampQuantize.apply(x, levels)
    quantized = native.clamp_round_unit(x, levels)  # one pass and a C++ node (methods.quant.native)
    if quantized is not None:
        return quantized
    # hardtanh(x, 0, 1) is the clamp, and its autograd node (C++, no Python call) saves x and backs through
    # hardtanh_backward, the straight-through mask above; rounding its fresh output in place without autograd
    # leaves that node as the gradient, as _ClampQuantize does, with no Python on the forward or backward path.
    out = F.hardtanh(x, 0.0, 1.0)
    with torch.no_grad():
        return out.mul_(levels).round_().div_(levels)


def dorefa_activation_reference(x: torch.Tensor, bits: int, full_precision_act: str = "relu") -> torch.Tensor:
    """:func:`dorefa_activation` as the composed formula (the reference the fused function is tested against)."""
    if bits >= FULL_PRECISION:
        return torch.relu(x) if full_precision_act == "relu" else torch.clamp(x, 0.0, 1.0)
    return quantize_unit(clamp_ste(x, 0.0, 1.0), bits)
