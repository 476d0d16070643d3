"""StatsQ weight quantizer for vision transformers, as EMQ uses it for ViTs (Kim et al., NeurIPS 2025).

Per output row r of a weight matrix (row = output feature of ``nn.Linear``)::

    s_r = 2 mean_j |w_rj|                         (statistic of the weights, no gradient)
    c   = clip(w / s_r, -1, 1)                    (the upper end 1 itself is excluded: see below)
    n   = 2^(k-1)
    w_q = s_r (round(n c - 1/2) + 1/2) / n        (symmetric, 2^k levels, no zero level)

``round(n c - 1/2)`` is computed as ``floor(n c)``: the two agree except on exact ties, where ``floor`` keeps the
level inside ``[-n, n-1]`` (half-to-even rounding would send ``c = -1`` at k = 1 to level -2, outside the
grid); excluding ``c = 1`` from the clip range means clamping the level at ``n - 1``. So the levels are
``(-n + 1/2) / n ... (n - 1/2) / n`` times ``s_r``. The straight-through estimator passes the gradient of the
rounding unchanged, so ``d w_q / d w = 1`` inside the clip range and 0 outside it. k = 32 returns ``w``.
"""

from __future__ import annotations

import torch

FULL_PRECISION = 32


def statsq_scale(weight: torch.Tensor) -> torch.Tensor:
    """``2 mean|w|`` per output row (dim 0), shaped to broadcast against ``weight``; no gradient."""
    with torch.no_grad():
        dims = tuple(range(1, weight.dim()))
        return 2 * weight.abs().mean(dim=dims, keepdim=True)


def statsq_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize ``weight`` to ``bits`` (1..31) with StatsQ; 32 bits returns it unchanged."""
    if bits >= FULL_PRECISION:
        return weight
    levels_per_side = 2 ** (bits - 1)
    # A row of zeros has scale 0; any positive scale maps it to the smallest levels, which rounds to +-s/2n = 0.
    scale = statsq_scale(weight).clamp_min(torch.finfo(weight.dtype).tiny)
    unit = torch.clamp(weight / scale, -1.0, 1.0) * levels_per_side
    level = torch.clamp(torch.floor(unit), -levels_per_side, levels_per_side - 1)
    level = unit + (level - unit).detach()  # straight-through: forward the level, backward the identity
    return scale * (level + 0.5) / levels_per_side
