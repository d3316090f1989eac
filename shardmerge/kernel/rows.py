"""Whole rows of a tensor replaced by stored values (trainable tokens), one row block at a time."""

from __future__ import annotations

import torch

from ..terms import TokenRows


class RowPatch:
    """The replaced rows of one tensor, held whole (a few tokens' rows), applied per block.

    A block holding replaced rows is widened to a dtype that holds both the
    base's and the stored rows' values exactly, so the only rounding left is
    the merge's one rounding to the output dtype.
    """

    def __init__(self, rows: tuple[TokenRows, ...], load, device: torch.device):
        values = [load(r.source) for r in rows]
        self.dtype = values[0].dtype
        for v in values[1:]:
            self.dtype = torch.promote_types(self.dtype, v.dtype)
        index = torch.tensor([i for r in rows for i in r.indices], dtype=torch.int64)
        order = torch.argsort(index)
        self.index = index[order].to(device)
        self.values = torch.cat([v.to(self.dtype) for v in values])[order].to(device)

    def __call__(self, base: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """``base`` (rows [row0, row1)) with the replaced rows written in; may widen its dtype."""
        lo = int(torch.searchsorted(self.index, row0))
        hi = int(torch.searchsorted(self.index, row1))
        if lo == hi:
            return base
        wide = torch.promote_types(base.dtype, self.dtype)
        out = base.to(wide, copy=True)  # never write into the reader's buffer
        out[self.index[lo:hi] - row0] = self.values[lo:hi].to(wide)
        return out
