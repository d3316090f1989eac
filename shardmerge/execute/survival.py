"""How much of the adapters' change a merged tensor kept, measured as its row blocks go by.

Per touched tensor, in float64, summed over its blocks:

- ``kept``: ||stored(out) - stored(base)||_F on the values as decoded (a
  quantized base through its codec, and an encoded output the same way);
- ``change``: ||exact(out) - stored(base)||_F, the change the adapters ask
  for before the one rounding: every term of every adapter with its weight
  and scale, DoRA's rescaling, IA3's scaling, and for replacements and
  trainable tokens the new values minus the old;
- ``changed``: elements whose stored value differs from the base's.

``kept / change`` is the share of the change that survived the rounding to
the output's format (it may exceed 1: rounding can add to a change). For
low-rank terms on an unchanged base the change never needs the full product:
||sum_t s_t L_t R_t||^2 = sum_{t,u} s_t s_u <L_t^T L_u, R_t R_u^T>, from
rank-sized Gram matrices, so measuring costs a few passes over the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernel.merge import BlockTerm

# Elements compared at once: one fixed float64 scratch buffer (8 MiB), so
# measuring adds no memory that grows with the block.
CHUNK = 1 << 20
# A float32 sum of squares of at most CHUNK terms inside this range is not
# overflowed, and squares lost to underflow (each < 1.2e-38) change it by < 1e-8.
_SAFE_SQ = (1e-24, 1e37)


@dataclass
class BlockCompare:
    """stored(out) against stored(base) over some elements."""

    kept_sq: float = 0.0
    changed: int = 0
    max_abs: float = 0.0  # NaN when some difference is NaN
    nonfinite: bool = False  # some difference is not finite (out or base not finite)


def compare(out: torch.Tensor, base: torch.Tensor) -> BlockCompare:
    """Sum of squared differences, elements changed and max |out - base|, chunk by chunk.

    Two 16-bit values differ by an exact float32 (their exponents would have
    to be 16 binades apart to need more bits), so 16-bit blocks are compared
    in float32, half the memory traffic of float64; the squares' float32 sum
    is within a few float32 ulps. Wider dtypes, and chunks whose squares may
    overflow or underflow float32, are compared in float64.
    """
    o, b = out.reshape(-1), base.reshape(-1)
    res = BlockCompare()
    n = o.numel()
    if n == 0:
        return res
    narrow = o.element_size() <= 2 and b.element_size() <= 2
    buf = torch.empty(
        min(n, CHUNK), dtype=torch.float32 if narrow else torch.float64, device=o.device
    )
    for i in range(0, n, CHUNK):
        oc, bc = o[i : i + CHUNK], b[i : i + CHUNK]
        d = buf[: oc.numel()]
        d.copy_(oc).sub_(bc)
        lo, hi = (float(x) for x in torch.aminmax(d))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            _add_nonfinite(res, oc, bc)
            continue
        res.max_abs = max(res.max_abs, hi, -lo)
        changed = int(torch.count_nonzero(d))
        sq = float(d.square_().sum())
        if d.dtype == torch.float32 and changed and not _SAFE_SQ[0] < sq < _SAFE_SQ[1]:
            sq = distance_sq(oc.to(torch.float64), bc)  # squares near float32's limits
        res.kept_sq += sq
        res.changed += changed
    return res


def _add_nonfinite(res: BlockCompare, out: torch.Tensor, base: torch.Tensor) -> None:
    """A chunk where out or base holds NaN/Inf: finite differences only, in float64."""
    d = out.to(torch.float64).sub_(base)
    res.nonfinite = True
    if bool(torch.isnan(d).any()):
        res.max_abs = float("nan")
    elif not math.isnan(res.max_abs):
        res.max_abs = max(res.max_abs, float(d.abs().amax()))
    finite = d[torch.isfinite(d)]
    res.kept_sq += float(torch.dot(finite, finite))
    both_nan = torch.isnan(out) & torch.isnan(base)
    res.changed += int(((out != base) & ~both_nan).sum())


def distance_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||^2 in float64 (``a`` float64; non-finite differences left out)."""
    a, b = a.reshape(-1), b.reshape(-1).to(a.device)
    total = 0.0
    for i in range(0, a.numel(), CHUNK):
        d = a[i : i + CHUNK].sub(b[i : i + CHUNK])
        finite = torch.isfinite(d)
        d = d if bool(finite.all()) else d[finite]
        total += float(torch.dot(d, d))
    return total


class ChangeMeter:
    """||change||^2 of one tensor's blocks; caches the Gram matrices of its right factors."""

    def __init__(self) -> None:
        self._grams: dict[tuple[int, int], torch.Tensor] = {}

    def lowrank_sq(self, terms: list[BlockTerm]) -> float:
        """||sum_t s_t L_t R_t||^2 over a block, from Gram matrices (every term has ``right``)."""
        lefts = [t.left.to(torch.float64) for t in terms]
        total = 0.0
        for a, ta in enumerate(terms):
            for b in range(a, len(terms)):
                tb = terms[b]
                cross = lefts[a].T @ lefts[b]
                v = float((cross * self._gram(ta.right, tb.right)).sum()) * ta.scale * tb.scale
                total += v if a == b else 2.0 * v
        return max(total, 0.0)  # rounding may leave a tiny negative for a vanishing change

    def _gram(self, ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
        key = (id(ra), id(rb))
        g = self._grams.get(key)
        if g is None:
            g = self._grams[key] = ra.to(torch.float64) @ rb.to(torch.float64).T
        return g

    @staticmethod
    def explicit_sq(start: torch.Tensor, base: torch.Tensor, terms: list[BlockTerm]) -> float:
        """||(start - base) + sum_t s_t T_t||^2 with every term's full product, in float64.

        ``start`` is what the terms are added to (a replacement, patched or
        scaled rows); the rare tensors with such a start or a bias-like term
        take this path.
        """
        d = start.to(torch.float64, copy=True)
        d.sub_(base.to(d.device))
        for t in terms:
            if t.right is None:
                d.add_(t.left.to(torch.float64).reshape(d.shape), alpha=t.scale)
            else:
                prod = t.left.to(torch.float64) @ t.right.to(torch.float64)
                d.add_(prod.reshape(d.shape), alpha=t.scale)
        flat = d.reshape(-1)
        finite = torch.isfinite(flat)
        flat = flat if bool(finite.all()) else flat[finite]
        return float(torch.dot(flat, flat))


@dataclass
class TensorStats:
    """One tensor's survival figures, accumulated block by block."""

    kept_sq: float = 0.0
    change_sq: float = 0.0
    changed: int = 0
    numel: int = 0
    max_delta: float = 0.0
    fresh_scales: int | None = None  # FP8 with kept scales: blocks that needed a new one

    def add(self, c: BlockCompare, change_sq: float, numel: int) -> None:
        self.kept_sq += c.kept_sq
        self.change_sq += change_sq
        self.changed += c.changed
        self.numel += numel
        if math.isnan(c.max_abs) or math.isnan(self.max_delta):
            self.max_delta = float("nan")  # NaN sticks
        else:
            self.max_delta = max(self.max_delta, c.max_abs)

    def record(self) -> list:
        """[kept, change, changed, numel(, fresh_scales)]: the journal's compact form (norms,
        not squares)."""
        record = [math.sqrt(self.kept_sq), math.sqrt(self.change_sq), self.changed, self.numel]
        return record + ([self.fresh_scales] if self.fresh_scales is not None else [])


@dataclass
class ShardStats:
    """What one output shard's merge measured: max delta per kind, survival per tensor."""

    max_delta: dict[str, float] = field(default_factory=dict)
    survival: dict[str, list] = field(default_factory=dict)

    def add(self, name: str, kind: str, stats: TensorStats) -> None:
        d = stats.max_delta
        if d > self.max_delta.get(kind, -1.0) or d != d:  # NaN sticks
            self.max_delta[kind] = d
        self.survival[name] = stats.record()
