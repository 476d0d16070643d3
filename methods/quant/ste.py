"""Straight-through rounding (Bengio et al. 2013): the forward pass rounds, the backward pass is the identity."""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, gradient 1 in the backward pass.

    ``torch.round`` rounds halves to even; a value exactly on a half step is measure-zero for real weights.
    """
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor(x)`` in the forward pass, gradient 1 in the backward pass."""
    return x + (torch.floor(x) - x).detach()


def clamp_ste(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp(x, low, high)`` in the forward pass (NaN and -0.0 as ``torch.clamp`` keeps them), gradient 1 strictly
    inside ``(low, high)`` and 0 elsewhere, the bounds included: the straight-through mask of the fused quantizers.
    ``torch.clamp``'s own gradient at the bounds is not the same in every torch (2.11 passes it there, 2.14 does
    not), so the composed reference formulas say which one they mean."""
    inside = (x > low) & (x < high)
    return torch.where(inside, x, torch.clamp(x, low, high).detach())


def quantize_unit(u: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's k-bit quantizer of a value in [0, 1]: ``q_k(u) = round((2^k - 1) u) / (2^k - 1)`` with STE."""
    levels = 2**bits - 1
    return round_ste(u * levels) / levels
