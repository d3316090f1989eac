"""A term's factors on the compute device, and their rows for one block."""

from __future__ import annotations

import torch

from ..io.sources import RefLoader
from ..kernel.factors import build_factors
from ..kernel.merge import BlockTerm, underflow_risk
from ..terms import Term
from .policy import builds_factors


class Factors:
    """A term's factors on the device in the accumulation dtype, with their bound vectors."""

    def __init__(self, term: Term, left: torch.Tensor, right: torch.Tensor | None):
        self.scale = term.scale
        self.left = left
        self.right = right
        self.rows = term.rows  # base rows (of the matrix view) the term covers; None: all
        self.may_underflow = underflow_risk(left, right, term.scale, left.dtype)
        if right is not None:
            self.left_absmax = left.abs().amax(dim=1)
            self.right_abssum = right.abs().sum(dim=0)


def load_factors(term: Term, loader: RefLoader, acc: torch.dtype, device: torch.device) -> Factors:
    """A term's factors, oriented so rows align with the base's, in ``acc`` on ``device``.

    Terms whose factors are built (LoHa/LoKr) get exact float64 ones, whatever ``acc``.
    """
    if builds_factors(term):
        left, right = build_factors(term, loader)
        if right is not None:
            right = right.to(device).contiguous()
        return Factors(term, left.to(device).contiguous(), right)
    left = loader.load(term.left)
    if term.left_t:
        left = left.T
    right = None
    if term.right is not None:
        right = loader.load(term.right)
        if term.right_t:
            right = right.T
        right = right.to(device=device, dtype=acc).contiguous()
    return Factors(term, left.to(device=device, dtype=acc).contiguous(), right)


def block_term(f: Factors, row0: int, row1: int) -> BlockTerm | None:
    """The term on base rows [row0, row1); None when it covers none of them.

    A term covering only part of the block (one expert of a fused expert
    tensor) gets zero rows elsewhere: they add exact zeros.
    """
    if f.rows is None:
        lo, start, stop = 0, row0, row1
    else:
        lo, hi = f.rows
        start, stop = max(row0, lo), min(row1, hi)
        if start >= stop:
            return None
    left = f.left[start - lo : stop - lo]
    absmax = f.left_absmax[start - lo : stop - lo] if f.right is not None else None
    if (start, stop) != (row0, row1):
        left = _pad_rows(left, start - row0, row1 - row0)
        absmax = _pad_rows(absmax, start - row0, row1 - row0) if absmax is not None else None
    if f.right is None:
        return BlockTerm(left, None, f.scale, may_underflow=f.may_underflow)
    return BlockTerm(left, f.right, f.scale, absmax, f.right_abssum, f.may_underflow)


def _pad_rows(t: torch.Tensor, at: int, rows: int) -> torch.Tensor:
    """``t`` placed at row ``at`` of ``rows`` rows of zeros."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[at : at + t.shape[0]] = t
    return out
