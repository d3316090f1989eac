"""FP8 outputs: float8_e4m3fn codes correctly rounded from exact values, one scale per block.

Every stored code is the e4m3 value nearest (ties to even) to the exact
merged value divided by its block's scale. torch's float64 -> float8 cast goes
through float32 and rounds twice, so the codes are made here from float64
bits (``encode_e4m3``: exact for exactly known inputs).

A row block is quantized in the three tiers of merge.py: the block's value in
a wide accumulator (float32 for inputs of at most 32 bits, as the policy
loads the factors; float64 otherwise) with a rigorous error bound
(merge.accumulate); codes
and scales the bound cannot move are settled at once; the few elements within
the bound of a decision boundary (an e4m3 midpoint, zero, the 448 limit, a
rounding boundary of the scale) are recomputed exactly (exact.py: float64
where provably exact, else rationals).

Scales: a fresh scale is the block's exact amax / 448 rounded once to the
scale tensor's dtype (a power of two at or above it for ue8m0); a block with
no nonzero value, or whose scale rounds to zero, gets the dtype's epsilon as
compressed-tensors does. A kept scale is used unless some |value| / scale
exceeds 448; that block gets a fresh scale, and is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from .exact import exact_fractions, product_is_exact, two_product, values_in_float64
from .merge import BlockTerm, accumulate
from .rounding import cast, round_exact

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Half-way from 448 to the next value e4m3's exponent would reach (480): a
# quotient in (448, 464] rounds to 448 (464 is a tie, and 448's code is even).
ROUND_LIMIT = 464.0
# Per accumulator: the relative rounding error of one operation, doubled for
# safety, and an absolute one covering results in its subnormal range.
_ROUNDING = {torch.float32: (2.0**-23, 2.0**-140), torch.float64: (2.0**-52, 2.0**-1060)}
_NARROW = (torch.bfloat16, torch.float16, torch.float32)


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) as float64 values (exact)."""
    return codes.view(E4M3).to(torch.float64)


def encode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The codes (uint8) of the e4m3 values nearest to float64 ``x``, ties to even.

    ``x`` is taken as exact. |x| up to 464 rounds to at most 448; beyond
    that is a ValueError (the caller's scale is too small). A negative value
    that rounds to zero gives -0; an exact zero gives +0. NaN gives 0x7F.
    """
    a = x.abs()
    _, e = torch.frexp(a)
    # e4m3 keeps 4 significant bits; below 2^-6 the spacing stays 2^-9 (subnormals).
    ulp = torch.ldexp(torch.ones_like(a), e.clamp(min=-5) - 4)
    mag = torch.round(a / ulp).mul_(ulp)  # exact: power-of-two scaling; round() ties to even
    if bool((mag > E4M3_MAX).any()):
        raise ValueError(f"a value of {float(a.max())} exceeds the e4m3 range (448)")
    # mag is an e4m3 value: the casts through float32 are exact.
    codes = mag.to(torch.float32).to(E4M3).view(torch.uint8).clone()
    codes |= (x < 0).to(torch.uint8) << 7
    codes[torch.isnan(x)] = 0x7F
    return codes


@dataclass(frozen=True)
class ScaleRule:
    """How a fresh scale is made from a block's amax: its dtype, and powers of two (ue8m0)."""

    dtype: torch.dtype  # the scale tensor's dtype: float32, bfloat16 or float16
    pow2: bool = False

    @property
    def zero(self) -> float:
        """The scale of a block with no nonzero value (compressed-tensors: the dtype's eps)."""
        return 1.0 if self.pow2 else torch.finfo(self.dtype).eps

    def round(self, q: torch.Tensor) -> torch.Tensor:
        """The scales of float64 quotients ``q`` = amax / 448 (>= 0; monotone in q)."""
        if self.pow2:
            m, e = torch.frexp(q)
            up = torch.ldexp(torch.ones_like(q), e - (m == 0.5).to(e.dtype))
            s = torch.where(q > 0, up, torch.zeros_like(q))
        else:
            s = cast(q, self.dtype).to(torch.float64)
        return s

    def exact(self, amax: Fraction) -> float:
        """The scale of an exact amax."""
        if amax == 0:
            return self.zero
        q = amax / 448
        if self.pow2:
            k = q.numerator.bit_length() - q.denominator.bit_length()
            while Fraction(2) ** k < q:
                k += 1
            while Fraction(2) ** (k - 1) >= q:
                k -= 1
            return math.ldexp(1.0, k)
        s = round_exact(q, self.dtype)
        return s if s != 0 else self.zero


@dataclass
class Quantized:
    """One row block as stored: codes, the scales of its blocks, and which scales are fresh."""

    codes: torch.Tensor  # uint8, the block's shape
    scales: torch.Tensor  # float64 values of the scale dtype, (row blocks, column blocks)
    fresh: torch.Tensor  # bool per scale: computed here (not kept from the base)


def quantize_block(
    base: torch.Tensor,
    terms: list[BlockTerm],
    block: tuple[int, int],
    rule: ScaleRule,
    kept: torch.Tensor | None = None,
) -> Quantized:
    """Quantize base rows plus terms (a 2-D block starting on a block boundary).

    ``kept``: the base's scales of these rows (float64), kept where no value
    exceeds 448 times them; None makes every scale fresh.
    """
    acc_dtype = _accumulator(base, terms)
    rel, tiny = _ROUNDING[acc_dtype]
    acc, err = accumulate(base, terms, acc_dtype)
    exact = _ExactValues(base.reshape(-1), terms, acc.shape[1])
    mag = acc.abs()
    if err is None:
        lo = hi = mag
    else:  # widened by the rounding of these two operations
        lo = (mag - err).clamp_(min=0).mul_(1 - rel)
        hi = (mag + err).mul_(1 + rel)
    lo_max, hi_max = _block_max(lo, block), _block_max(hi, block)
    amax = _BlockAmax(exact, hi, lo_max, block)
    lo_max, hi_max = lo_max.double(), hi_max.double()
    if kept is None:
        fresh = torch.ones_like(lo_max, dtype=torch.bool)
        scales = _fresh_scales(lo_max, hi_max, rule, amax, fresh)
    else:
        kept = kept.to(acc.device, torch.float64)
        fresh = _overflowing(lo_max, hi_max, kept, amax)
        scales = _fresh_scales(lo_max, hi_max, rule, amax, fresh)
        scales = torch.where(fresh, scales, kept)
    s_full = _expand(scales.to(acc_dtype), block, acc.shape)  # exact: values of the scale dtype
    codes = _codes(acc, err, s_full, exact, rel, tiny)
    return Quantized(codes, scales, fresh)


def quantize_rows(
    base: torch.Tensor,
    terms: list[BlockTerm],
    block: tuple[int, int],
    rule: ScaleRule,
    kept: torch.Tensor | None = None,
    max_elements: int = 1 << 18,
) -> Quantized:
    """``quantize_block`` over column slices of whole scale blocks, so that its float64
    temporaries stay within about ``max_elements`` elements however wide the rows are."""
    rows, cols = base.shape
    step = max(block[1], (max_elements // max(rows, 1)) // block[1] * block[1])
    if cols <= step:
        return quantize_block(base, terms, block, rule, kept)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=base.device)
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    scales = torch.empty((nr, nc), dtype=torch.float64, device=base.device)
    fresh = torch.empty((nr, nc), dtype=torch.bool, device=base.device)
    for c0 in range(0, cols, step):
        c1, j0 = min(cols, c0 + step), c0 // block[1]
        j1 = -(-c1 // block[1])
        part = [column_slice(t, c0, c1) for t in terms]
        sub_kept = kept[:, j0:j1] if kept is not None else None
        q = quantize_block(base[:, c0:c1], part, block, rule, sub_kept)
        codes[:, c0:c1], scales[:, j0:j1], fresh[:, j0:j1] = q.codes, q.scales, q.fresh
    return Quantized(codes, scales, fresh)


def column_slice(t: BlockTerm, c0: int, c1: int) -> BlockTerm:
    """A block term restricted to columns [c0, c1) of the block."""
    if t.right is None:
        return BlockTerm(t.left[:, c0:c1], None, t.scale, may_underflow=t.may_underflow)
    abssum = t.right_abssum[c0:c1] if t.right_abssum is not None else None
    return BlockTerm(t.left, t.right[:, c0:c1], t.scale, t.left_absmax, abssum, t.may_underflow)


def _accumulator(base: torch.Tensor, terms: list[BlockTerm]) -> torch.dtype:
    """The first tier's dtype: the terms' (the policy loads factors in it), else float32
    for a base of at most 32 bits (exact there), else float64."""
    if terms:
        return terms[0].left.dtype
    return torch.float32 if base.dtype in _NARROW else torch.float64


def _block_max(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Max of non-negative ``x`` over each block (edge blocks partial)."""
    bm, bn = block
    rows, cols = x.shape
    nr, nc = -(-rows // bm), -(-cols // bn)
    padded = F.pad(x, (0, nc * bn - cols, 0, nr * bm - rows))
    return padded.reshape(nr, bm, nc, bn).amax(dim=(1, 3))


def _expand(s: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Per-block values spread over the elements of the block."""
    full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


class _ExactValues:
    """Exact values of chosen elements of the block (flat indices), as rationals."""

    def __init__(self, flat_base: torch.Tensor, terms: list[BlockTerm], cols: int):
        self.flat_base, self.terms, self.cols = flat_base, terms, cols

    def float64(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values summed in float64 and where that sum is exact."""
        return values_in_float64(self.flat_base, self.terms, idx, idx // self.cols, idx % self.cols)

    def float64_bounded(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values recomputed in float64 and a rigorous bound on their error."""
        rows_i, cols_j = idx // self.cols, idx % self.cols
        acc = self.flat_base[idx].to(torch.float64, copy=True)
        bound = acc.abs()
        rank = 1
        for t in self.terms:
            if t.right is None:
                v = t.left.reshape(-1)[idx].double()
                acc.add_(v, alpha=t.scale)
                bound.add_(v.abs(), alpha=abs(t.scale))
            else:
                lft, rgt = t.left[rows_i].double(), t.right[:, cols_j].double().T
                acc.add_((lft * rgt).sum(1), alpha=t.scale)
                bound.add_((lft.abs() * rgt.abs()).sum(1), alpha=abs(t.scale))
                rank = max(rank, lft.shape[1])
        # As merge.py's tolerance: any order of the r products, the scalings and
        # the additions stays within (r + n + 2) unit roundoffs, twice for safety.
        tol = 2.0 * (rank + len(self.terms) + 2) * 2.0**-53
        return acc, bound.mul_(tol).add_(tol * 2.0**-1020)

    def fractions(self, idx: torch.Tensor) -> list[Fraction]:
        total, ok = self.float64(idx)
        values = [Fraction(v) for v in total.cpu().tolist()]
        left = (~ok).nonzero().squeeze(1)
        if left.numel():
            sub = idx[left]
            rational = exact_fractions(
                self.flat_base, self.terms, sub, sub // self.cols, sub % self.cols
            )
            for k, v in zip(left.tolist(), rational, strict=True):
                values[k] = v
        return values


class _BlockAmax:
    """The max |value| of one block from its candidates only: bounds in float64, or exact."""

    def __init__(self, exact: _ExactValues, hi: torch.Tensor, lo_max: torch.Tensor, block):
        self.exact, self.hi, self.lo_max, self.block = exact, hi, lo_max, block

    def _candidates(self, i: int, j: int) -> torch.Tensor:
        bm, bn = self.block
        window = self.hi[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
        r, c = (window >= self.lo_max[i, j]).nonzero(as_tuple=True)
        return (r + i * bm) * self.hi.shape[1] + (c + j * bn)

    def bounds(self, i: int, j: int) -> tuple[float, float]:
        """Bounds on the block's amax from a float64 recomputation of its candidates."""
        acc, err = self.exact.float64_bounded(self._candidates(i, j))
        mag = acc.abs()
        rel = _ROUNDING[torch.float64][0]
        lo = float(((mag - err).clamp(min=0) * (1 - rel)).max())
        return lo, float(((mag + err) * (1 + rel)).max())

    def __call__(self, i: int, j: int) -> Fraction:
        values = self.exact.fractions(self._candidates(i, j))
        return max((abs(v) for v in values), default=Fraction(0))


def _fresh_scales(
    lo_max: torch.Tensor,
    hi_max: torch.Tensor,
    rule: ScaleRule,
    amax: _BlockAmax,
    which: torch.Tensor,
) -> torch.Tensor:
    """Fresh scales of the blocks ``which``; settled from the bounds (the first tier's,
    then float64's), else exactly."""
    s_lo, s_hi = _scale_range(lo_max, hi_max, rule)
    scales = torch.where(hi_max == 0, torch.full_like(s_lo, rule.zero), s_lo)
    scales = torch.where((s_lo == 0) & (hi_max > 0), torch.full_like(s_lo, rule.zero), scales)
    doubt = which & (s_lo != s_hi) & (hi_max > 0)
    # Both ends rounding to zero: the exact scale rounds to zero too (eps then).
    doubt &= ~((s_hi == 0) & (s_lo == 0))
    for i, j in doubt.nonzero().tolist():
        lo, hi = amax.bounds(i, j)
        a, b = _scale_range(*torch.tensor([[lo], [hi]], dtype=torch.float64), rule)
        settled = bool(a == b) and float(a) != 0
        scales[i, j] = float(a) if settled else rule.exact(amax(i, j))
    return scales


def _scale_range(
    lo_max: torch.Tensor, hi_max: torch.Tensor, rule: ScaleRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales of the lowest and highest amax the bounds allow (float64)."""
    lo_max, hi_max = lo_max.double(), hi_max.double()
    q_lo = torch.nextafter(lo_max / E4M3_MAX, torch.zeros_like(lo_max))
    q_hi = torch.nextafter(hi_max / E4M3_MAX, torch.full_like(hi_max, math.inf))
    return rule.round(q_lo), rule.round(q_hi)


def _overflowing(
    lo_max: torch.Tensor, hi_max: torch.Tensor, kept: torch.Tensor, amax: _BlockAmax
) -> torch.Tensor:
    """Blocks where some |value| / kept scale exceeds 448 (decided exactly)."""
    limit = kept * E4M3_MAX  # exact: 448 has 3 significant bits
    over = lo_max > limit
    unsure = ~over & (hi_max > limit)
    for i, j in unsure.nonzero().tolist():
        lo, hi = amax.bounds(i, j)
        cap = float(limit[i, j])
        if lo > cap or hi <= cap:
            over[i, j] = lo > cap
        else:
            over[i, j] = amax(i, j) > Fraction(cap)
    return over


def _codes(
    acc: torch.Tensor,
    err: torch.Tensor | None,
    s: torch.Tensor,
    exact: _ExactValues,
    rel: float,
    tiny: float,
) -> torch.Tensor:
    """Codes of value / scale per element: settled from the accumulator where its bound
    allows, the rest recomputed in float64 (when acc is narrower), then exactly."""
    codes, doubt = _bounded_codes(acc, err, s, rel, tiny)
    idx = doubt.reshape(-1).nonzero().squeeze(1)
    if not idx.numel():
        return codes
    s64 = s.reshape(-1)[idx].double()
    if acc.dtype != torch.float64:
        acc64, err64 = exact.float64_bounded(idx)
        sub, still = _bounded_codes(acc64, err64, s64, *_ROUNDING[torch.float64])
        left = still.nonzero().squeeze(1)
        if left.numel():
            sub[left] = _settle_codes(idx[left], s64[left], exact)
    else:
        sub = _settle_codes(idx, s64, exact)
    codes.reshape(-1)[idx] = sub
    return codes


def _bounded_codes(
    acc: torch.Tensor, err: torch.Tensor | None, s: torch.Tensor, rel: float, tiny: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of acc / s, and where the error bound ``err`` of acc leaves them in doubt.

    In units of the e4m3 spacing at |q| (``ulp``), the rounding boundaries
    around ``round(|q| / ulp)`` sit half a unit away; just above a power of
    two the one below is a quarter unit away, which matters only when the
    error bound reaches an eighth of a unit: such elements are in doubt too.
    ``rel`` and ``tiny`` bound the rounding of one operation in acc's dtype.
    """
    q = acc / s
    a = q.abs().clamp_(max=ROUND_LIMIT)
    _, e = torch.frexp(a)
    ulp = torch.ldexp(torch.ones_like(a), e.clamp_(min=-5).sub_(4))
    del e
    r = a / ulp  # exact: a power-of-two scaling
    n = torch.round(r)  # ties to even
    eb = a * rel + tiny
    if err is not None:
        eb.add_(err / s, alpha=1 + rel)
    margin = r.sub_(n).abs_().neg_().add_(0.5).mul_(ulp)  # distance to the nearest boundary
    doubt = (margin <= eb) | (eb >= ulp * 0.125)
    if err is not None:
        doubt |= a <= eb  # the sign of a value near zero
    del margin, eb, a
    # n * ulp is an e4m3 value (|q| is clamped to 464, which rounds to 448): exact casts.
    codes = n.mul_(ulp).to(torch.float32).to(E4M3).view(torch.uint8)
    codes |= (q < 0).to(torch.uint8) << 7
    return codes, doubt


def _settle_codes(idx: torch.Tensor, s: torch.Tensor, exact: _ExactValues) -> torch.Tensor:
    """Codes of the exact value / scale of elements ``idx``."""
    total, ok = exact.float64(idx)
    q = total / s
    p, e = two_product(q, s)
    # Where value / scale is exact in float64 (ties among them), encode it directly.
    ok &= (p == total) & (e == 0) & product_is_exact(p, q, s)
    codes = encode_e4m3(torch.where(ok, q, torch.zeros_like(q)))
    left = (~ok).nonzero().squeeze(1)
    if left.numel():
        values = exact.fractions(idx[left])
        scales = s[left].cpu().tolist()
        mags = [
            abs(round_exact(v / Fraction(sc), E4M3)) for v, sc in zip(values, scales, strict=True)
        ]
        sub = encode_e4m3(torch.tensor(mags, dtype=torch.float64))
        sub |= torch.tensor([v < 0 for v in values], dtype=torch.uint8) << 7  # -0 below zero
        codes[left] = sub.to(codes.device)
    return codes
