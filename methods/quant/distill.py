"""Distillation losses shared by methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_c p_c log softmax(z)_c`` averaged over the batch (temperature 1); ``target_probs`` is not detached
    here, callers pass a detached teacher."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
