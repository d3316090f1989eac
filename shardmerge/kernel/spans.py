"""Terms that cover only some rows of a tensor (one expert each of a fused expert tensor).

A fused tensor of E experts carries E such terms per adapter and is merged
in at least E row blocks (plan.py keeps a block within one term's rows, so
the zero-padded copies worker._slice makes stay few): scanning every term
for every block would take E^2 steps. ``RowSpans`` finds the terms meeting a
block by bisection instead.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Protocol, TypeVar


class _HasRows(Protocol):
    rows: tuple[int, int] | None


T = TypeVar("T", bound=_HasRows)


class RowSpans:
    """``items`` (anything with ``rows``: (first, stop) or None for all rows), indexed by rows."""

    def __init__(self, items: Sequence[T]):
        self.items = list(items)
        spanned = sorted((it.rows[0], i) for i, it in enumerate(self.items) if it.rows is not None)
        self.starts = [start for start, _ in spanned]
        self.spanned = [i for _, i in spanned]
        self.everywhere = [i for i, it in enumerate(self.items) if it.rows is None]
        self.widest = max((it.rows[1] - it.rows[0] for it in self.items if it.rows), default=0)

    def meeting(self, row0: int, row1: int) -> list[T]:
        """The items that cover some row of [row0, row1), in their original order."""
        if not self.spanned:
            return self.items
        # An item starting at s covers rows below s + widest: only starts in
        # (row0 - widest, row1) can meet the block.
        lo = bisect_left(self.starts, row0 - self.widest + 1)
        hi = bisect_left(self.starts, row1)
        picked = [i for i in self.spanned[lo:hi] if self.items[i].rows[1] > row0]
        return [self.items[i] for i in sorted(self.everywhere + picked)]
