"""Which 2-bit branches a bit-width runs in a multi-branch network (MBQuant).

Zhong, Zhou, Chao, Ji, "MBQuant: A Novel Multi-Branch Topology Method for Arbitrary Bit-width Network
Quantization", Pattern Recognition 2025, arXiv 2305.08117, Sec. 3.3 (amortization branch selection, Fig. 3).

A *selection* maps each bit-width ``b`` to a window ``(start, count)`` of ``count = floor(b / 2)`` contiguous full
branches ``start .. start + count - 1``. An odd ``b`` also runs the *partial branch*: a narrower slice of branch
``start + count`` (:func:`partial_branch`), which stands for its last bit. A network serving ``bits_set`` has
``G = ceil(max(bits_set) / 2)`` branches.

* Serial: every window starts at branch 0.
* Amortized (the paper's rule for even bit-widths): windows whose starts spread branch usage as evenly as possible
  (:func:`amortized_selection`); {2, 4, 6, 8} -> {0}, {1, 2}, {1, 2, 3}, {0, 1, 2, 3}.
* Odd bit-widths (the authors' code, bits 2..8): ``b`` takes the start of ``b - 1``'s window (0 if ``b - 1`` is not
  served), moved left as far as needed for branch ``start + count`` to exist: 3 -> {0} + part of 1,
  5 -> {1, 2} + part of 3, 7 -> {0, 1, 2} + part of 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from harness.errors import ConfigError

Selection = Mapping[int, tuple[int, int]]  # bits -> (first full branch, number of full branches)
WEIGHT_BITS = 2
MIN_BITS = 2


def full_branches(bits: int) -> int:
    """Full 2-bit branches a ``bits``-bit network runs: ``floor(b / 2)``."""
    return int(bits) // WEIGHT_BITS


def has_partial(bits: int) -> bool:
    """Whether ``bits`` runs a partial branch (odd bit-widths)."""
    return int(bits) % WEIGHT_BITS == 1


def num_branches(bits_set: Iterable[int]) -> int:
    """``G = ceil(max(bits) / 2)``: enough branches for the largest bit-width's full and partial branches."""
    return math.ceil(max(bits_set) / WEIGHT_BITS)


def partial_branch(selection: Selection, bits: int) -> int | None:
    """The branch whose slice is ``bits``'s partial branch (``start + count``), or None for an even ``bits``."""
    start, count = selection[int(bits)]
    return start + count if has_partial(bits) else None


def _check(bits_set: Iterable[int]) -> list[int]:
    ordered = sorted({int(b) for b in bits_set})
    if not ordered:
        raise ConfigError("a multi-branch network needs at least one bit-width")
    if ordered[0] < MIN_BITS:
        raise ConfigError(f"multi-branch networks need at least {MIN_BITS} bits (one 2-bit branch); got {ordered[0]}")
    return ordered


def _place_odd(ordered: list[int], even: dict[int, tuple[int, int]], branches: int) -> dict[int, tuple[int, int]]:
    selection: dict[int, tuple[int, int]] = {}
    for bits in ordered:
        if not has_partial(bits):
            selection[bits] = even[bits]
            continue
        count = full_branches(bits)
        start = even[bits - 1][0] if bits - 1 in even else 0
        selection[bits] = (min(start, branches - count - 1), count)
    return selection


def serial_selection(bits_set: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Every bit-width starts at branch 0 (the ablation of Fig. 3): branch 0 serves every bit-width."""
    ordered = _check(bits_set)
    return {b: (0, full_branches(b)) for b in ordered}


def amortized_selection(bits_set: Iterable[int]) -> dict[int, tuple[int, int]]:
    """The amortization rule: contiguous windows whose starts spread branch usage as evenly as possible.

    The even bit-widths are placed in ascending order; each takes the window start that, after counting it, gives
    (1) the smallest maximum number of bit-widths using any one branch, (2) then the smallest sum of squared usage
    counts (the most even spread), (3) then the smallest start. For {2, 4, 6, 8} this gives the paper's table:
    2 -> {0}, 4 -> {1, 2}, 6 -> {1, 2, 3}, 8 -> {0, 1, 2, 3}. Odd bit-widths then follow the module's rule.
    """
    ordered = _check(bits_set)
    branches = num_branches(ordered)
    usage = [0] * branches
    even: dict[int, tuple[int, int]] = {}
    for bits in (b for b in ordered if not has_partial(b)):
        count = full_branches(bits)

        def spread(start: int, count: int = count) -> tuple[int, int, int]:
            after = [used + (start <= branch < start + count) for branch, used in enumerate(usage)]
            return max(after), sum(u * u for u in after), start

        start = min(range(branches - count + 1), key=spread)
        for branch in range(start, start + count):
            usage[branch] += 1
        even[bits] = (start, count)
    return _place_odd(ordered, even, branches)
