"""DoReFa weight and activation quantizers as used by Any-Precision DNNs.

Zhou et al., "DoReFa-Net" (arXiv 1606.06160), Eq. 9 (weights) and Sec. 2.3 (activations), in the form of
Yu et al., "Any-Precision Deep Neural Networks" (AAAI 2021, arXiv 1911.07346):

* weights, k < 32:  ``u = tanh(w) / (2 max|tanh(w)|) + 1/2``;  ``W_q = E * (2 q_k(u) - 1)``,
  ``E = mean(|w|)`` over the layer as a constant (no gradient); the gradient flows through tanh and the max.
  At k = 1 this gives ``W_q = +-E``.
* weights, k = 32:  ``W = E * tanh(w) / max|tanh(w)|`` (no rounding).
* activations, k < 32:  ``q_k(clamp(x, 0, 1))``; k = 32: ReLU (the authors' code) or the clamp (the paper).

``q_k`` is :func:`methods.quant.ste.quantize_unit`. Every bit-width re-quantizes from the latent weights.
"""

from __future__ import annotations

import torch

from methods.quant.ste import quantize_unit

FULL_PRECISION = 32


def dorefa_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize a latent weight tensor to ``bits`` (1..31) or return its 32-bit normalized form."""
    scale = weight.detach().abs().mean()
    normalized = torch.tanh(weight)
    max_abs = normalized.abs().max()
    if bits >= FULL_PRECISION:
        return scale * normalized / max_abs
    unit = normalized / (2 * max_abs) + 0.5
    return scale * (2 * quantize_unit(unit, bits) - 1)


def dorefa_activation(x: torch.Tensor, bits: int, full_precision_act: str = "relu") -> torch.Tensor:
    """Quantize an activation to ``bits``; at 32 bits apply ``full_precision_act`` ("relu" or "clamp")."""
    if bits >= FULL_PRECISION:
        return torch.relu(x) if full_precision_act == "relu" else torch.clamp(x, 0.0, 1.0)
    return quantize_unit(torch.clamp(x, 0.0, 1.0), bits)
