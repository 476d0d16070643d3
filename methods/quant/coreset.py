"""Bit-wise coreset sampling of EMQ: TDDS importance scores and temperature sampling (Eq. 3).

TDDS (Temporal Dual-Depth Scoring, Zhang et al., CVPR 2024), as EMQ (Kim et al., NeurIPS 2025) uses it, from
each sample's softmax output p_t after scoring epoch t = 1..T:

* ``d_t = sum_c | p_{t+1,c} (log(p_{t+1,c} + eps) - log(p_{t,c} + eps)) |`` (eps = 1e-8), t = 1..T-1;
* windows of K consecutive d's, stride 1 (default K = T - 1, one window): mean ``m_k`` and dispersion
  ``R_k = sqrt(sum_{t in window k} (d_t - m_k)^2)``;
* ``S = sum_k beta (1 - beta)^(last - k) R_k`` with beta = 0.9, so later windows weigh more.

Temperature sampling (Eq. 3): min-max normalize the scores to [0, 1] (all equal: uniform), then
``P(i) = softmax_i(s_i / tau)`` (default; the paper's exact form is UNRESOLVED) or ``s_i^(1/tau) / sum_j s_j^(1/tau)``
(``form="power"``; a tiny floor keeps the lowest-scored sample drawable), and draw ``round((1 - r) N)`` distinct
indices with :func:`torch.multinomial` (successive sampling without replacement).
"""

from __future__ import annotations

from typing import Literal

import torch

LOG_EPS = 1e-8
POWER_FLOOR = 1e-12
SamplingForm = Literal["softmax", "power"]


def output_change(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``d = sum_c |p_cur (log p_cur - log p_prev)|`` per sample (rows of ``(N, C)`` probability tensors)."""
    return (current * (torch.log(current + LOG_EPS) - torch.log(previous + LOG_EPS))).abs().sum(dim=1)


def tdds_from_changes(changes: torch.Tensor, window: int, beta: float = 0.9) -> torch.Tensor:
    """TDDS score per sample from the ``(T-1, N)`` output changes ``d_t``."""
    steps = changes.shape[0]
    if not 1 <= window <= steps:
        raise ValueError(f"TDDS window must be in 1..{steps} (number of output changes), got {window}")
    windows = changes.unfold(0, window, 1)  # (W, N, K): window k covers d_k .. d_{k+K-1}
    dispersion = torch.sqrt(((windows - windows.mean(dim=2, keepdim=True)) ** 2).sum(dim=2))  # (W, N)
    count = windows.shape[0]
    weights = beta * (1 - beta) ** torch.arange(count - 1, -1, -1, dtype=changes.dtype, device=changes.device)
    return (weights[:, None] * dispersion).sum(dim=0)


def tdds_scores(probabilities: torch.Tensor, window: int | None = None, beta: float = 0.9) -> torch.Tensor:
    """TDDS scores from the ``(T, N, C)`` softmax outputs of T epochs; ``window=None`` means K = T - 1."""
    changes = torch.stack([output_change(probabilities[t], probabilities[t + 1])
                           for t in range(probabilities.shape[0] - 1)])
    return tdds_from_changes(changes, window if window is not None else changes.shape[0], beta)


class TDDSRecorder:
    """Accumulates the output changes epoch by epoch, keeping only the last epoch's outputs in memory."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.changes: list[torch.Tensor] = []

    def add_epoch(self, probabilities: torch.Tensor) -> None:
        if self.previous is not None:
            self.changes.append(output_change(self.previous, probabilities))
        self.previous = probabilities

    def scores(self, window: int | None = None, beta: float = 0.9) -> torch.Tensor:
        if not self.changes:
            raise ValueError("TDDS needs the outputs of at least two epochs")
        changes = torch.stack(self.changes)
        return tdds_from_changes(changes, window if window is not None else changes.shape[0], beta)


def sampling_probabilities(scores: torch.Tensor, tau: float, form: SamplingForm = "softmax") -> torch.Tensor:
    """Eq. 3: min-max normalized scores turned into selection probabilities at temperature ``tau``."""
    scores = scores.double()
    low, high = scores.min(), scores.max()
    if high <= low:
        return torch.full_like(scores, 1.0 / scores.numel())
    normalized = (scores - low) / (high - low)
    if form == "softmax":
        return torch.softmax(normalized / tau, dim=0)
    if form == "power":
        weights = normalized ** (1.0 / tau) + POWER_FLOOR
        return weights / weights.sum()
    raise ValueError(f"unknown sampling form {form!r}")


def coreset_size(num_samples: int, prune: float) -> int:
    """``round((1 - prune) N)``, at least 1."""
    return max(1, min(num_samples, int(round((1.0 - prune) * num_samples))))


def draw_coreset(probabilities: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices drawn by successive sampling with ``probabilities`` (int64, draw order)."""
    return torch.multinomial(probabilities.float(), size, replacement=False, generator=generator)
