"""One row block: base rows + low-rank terms -> merged rows, correctly rounded.

The merged value of an element is ``W + sum_t scale_t * sum_k L[i,k] R[k,j]``
evaluated exactly and rounded once to the output dtype. We get there in
three tiers:

1. The whole block in a wide accumulator (float32 for 16-bit outputs, float64
   otherwise) with BLAS. Alongside, a cheap rigorous bound on that result's
   error. An element whose computed value is farther than the bound from
   every rounding boundary of the output dtype rounds exactly as the true
   value does, whatever order BLAS summed in: its output is settled.
2. The few elements left in doubt are recomputed in float64 and checked the
   same way.
3. Any still in doubt (values within ~1e-15 of a rounding boundary) are
   settled exactly (``exact.py``): in float64 where that evaluation is
   provably exact (ties included), else from exact float64 pieces and
   ``math.fsum``, and in rationals only outside float64's safe range.

So every output element is the correctly rounded true value, and output
bytes do not depend on the device, BLAS, thread count or block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .exact import settle_exact
from .rounding import FORMAT, cast

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Working memory of one chunk of elements refined together.
_REFINE_BYTES = 64 << 20
# Products at least this large stay far from the accumulator's subnormal range.
# The accumulator's integer twin and precision, for reading its low bits.
_ACC_BITS = {torch.float32: (torch.int32, 24), torch.float64: (torch.int64, 53)}
# Output formats whose subnormal range starts above the accumulator's:
# below their smallest normal they keep fewer bits than the fast path assumes.
_MIN_NORMAL = {
    (torch.float16, torch.float32): 2.0**-14,
    (torch.float32, torch.float64): 2.0**-126,
    # 16-bit outputs of a float64 accumulator (LoHa/LoKr/IA3, float64 factors).
    (torch.float16, torch.float64): 2.0**-14,
    (torch.bfloat16, torch.float64): 2.0**-126,
}
_SAFE_PRODUCT = {torch.float32: 2.0**-100, torch.float64: 2.0**-1000}
_TINY = {torch.float32: 2.0**-149 / 2.0**-24, torch.float64: 2.0**-1074 / 2.0**-53}


@dataclass
class BlockTerm:
    """A term restricted to one row block, already on the compute device.

    ``left`` is (rows, r) and ``right`` (r, cols); or, for a bias-like term,
    ``left`` has the block's shape and ``right`` is None. ``left_absmax`` is
    max_k |left[i, k]| per row and ``right_abssum`` sum_k |right[k, j]| per
    column: their outer product bounds sum_k |left[i,k] right[k,j]|.
    """

    left: torch.Tensor
    right: torch.Tensor | None
    scale: float
    left_absmax: torch.Tensor | None = None
    right_abssum: torch.Tensor | None = None
    # False only when every nonzero product of the term is far above the
    # accumulator's underflow range (see underflow_risk); True is always safe.
    may_underflow: bool = True


def underflow_risk(
    left: torch.Tensor, right: torch.Tensor | None, scale: float, acc: torch.dtype
) -> bool:
    """Could a product of this term (or its scaling) underflow in ``acc``?

    Without underflow every rounding error is relative, so the error bound
    needs no absolute part and exact zeros are certain.
    """

    def smallest(t: torch.Tensor) -> float:
        nz = t.abs()[t != 0]
        return float(nz.min()) if nz.numel() else float("inf")

    small = smallest(left) * (smallest(right) if right is not None else 1.0)
    if small == float("inf"):
        return False  # an all-zero term contributes exact zeros
    return min(small, small * abs(scale)) < _SAFE_PRODUCT[acc]


def accumulation_dtype(out_dtype: torch.dtype, input_dtypes: list[torch.dtype]) -> torch.dtype:
    """float32 suffices as the first tier for 16-bit outputs from <= 32-bit inputs."""
    narrow = {torch.float16, torch.bfloat16, torch.float32}
    if out_dtype in (torch.float16, torch.bfloat16) and all(d in narrow for d in input_dtypes):
        return torch.float32
    return torch.float64


def merge_block(
    base: torch.Tensor,
    terms: list[BlockTerm],
    out_dtype: torch.dtype,
    acc_dtype: torch.dtype,
) -> torch.Tensor:
    """Merge one block of base rows with its terms; returns the block in ``out_dtype``.

    ``base`` may have any float dtype and 1 or 2 dimensions; terms' factors are
    in ``acc_dtype`` on ``base``'s device.
    """
    if not terms:
        return cast(base, out_dtype)
    # Never alias base (_refine rereads it), and contiguous: the exact tiers write
    # settled elements through out.reshape(-1), which copies a strided tensor.
    acc = base.to(acc_dtype, memory_format=torch.contiguous_format, copy=True)
    max_rank = 1
    for t in terms:
        if t.right is None:
            acc.add_(t.left, alpha=t.scale)
        else:
            acc.addmm_(t.left, t.right, alpha=t.scale)  # no product temporary
            max_rank = max(max_rank, t.left.shape[1])
    out = cast(acc, out_dtype)
    if out_dtype not in FORMAT or out_dtype == torch.float64:
        return out  # float64 outputs: no wider accumulator, within a few ulp
    tol = _tolerance(acc_dtype, max_rank, len(terms))
    doubt = _first_tier_doubt(base, acc, out, terms, tol)
    if doubt is not None:
        _refine(base, terms, out, doubt, acc_dtype, max_rank)
    return out


def accumulate(
    base: torch.Tensor, terms: list[BlockTerm], acc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block's value in ``acc_dtype`` and a rigorous bound on each element's error.

    For outputs that round the value by other rules than ``merge_block``'s
    (FP8 codes with block scales, fp8.py). The bound is None when the value
    is exact (no terms).
    """
    acc = base.to(acc_dtype, memory_format=torch.contiguous_format, copy=True)
    if not terms:
        return acc, None
    max_rank = 1
    for t in terms:
        if t.right is None:
            acc.add_(t.left, alpha=t.scale)
        else:
            acc.add_(t.left @ t.right, alpha=t.scale)
            max_rank = max(max_rank, t.left.shape[1])
    tol = _tolerance(acc_dtype, max_rank, len(terms))
    err = _bound(base, terms, acc_dtype).mul_(tol)
    if any(t.may_underflow for t in terms):
        err.add_(tol * _TINY[acc_dtype])
    return acc, err


def _first_tier_doubt(
    base: torch.Tensor, acc: torch.Tensor, out: torch.Tensor, terms: list[BlockTerm], tol: float
) -> torch.Tensor | None:
    """The elements of a block whose rounding the accumulator cannot settle (flat indices).

    The fast path reads the rounding position straight from the accumulator's
    bits: rounding to the output format drops its low ``drop`` bits, and the
    value lies ``|low - 2^(drop-1)|`` accumulator ulps from the rounding
    midpoint of its binade (the other midpoint is at least 2^(drop-2) ulps
    away). One accumulator ulp is at least ``|acc| * 2^-p``, so an element is
    settled when ``dist * |acc| * 2^-p`` exceeds the error bound
    ``tol * (|W| + sum |scale| u_i v_j)``, with ``|W| <= |acc| + sum |scale| u_i v_j``.
    With ``k = tol * 2^p`` that is ``(dist - k) |acc| - 2k sum |scale| u_i v_j >= k tiny``,
    one margin per element built in place (every pass over the block costs as
    much as the matmul; the bound's factor 2 covers the margin's own rounding).
    Blocks with non-finite values or near the output's overflow take the
    general path.
    """
    a = acc.abs()
    if a.numel() and not bool(a.amax() < torch.finfo(out.dtype).max / 2):  # also NaN
        return in_doubt(acc, out, _bound(base, terms, acc.dtype), tol)
    int_dtype, p_acc = _ACC_BITS[acc.dtype]
    p_out, _ = FORMAT[out.dtype]
    drop = p_acc - p_out
    mid = 1 << (drop - 1)
    dist = torch.bitwise_and(acc.view(int_dtype), (1 << drop) - 1)
    dist.sub_(mid).abs_().clamp_(max=mid // 2)
    k = tol * 2.0**p_acc
    margin = dist.to(acc.dtype).sub_(k).mul_(a)
    del dist
    for t in terms:
        if t.right is None:
            margin.sub_(t.left.abs(), alpha=2.0 * abs(t.scale) * k)
        else:
            margin.addr_(t.left_absmax, t.right_abssum, alpha=-2.0 * abs(t.scale) * k)
    floor = k * _TINY[acc.dtype] if any(t.may_underflow for t in terms) else 0.0
    idx = below(margin, floor)
    if _MIN_NORMAL.get((out.dtype, acc.dtype)):
        # Below the output's normal range it keeps fewer bits than assumed above:
        # settle those with the general check, which knows the subnormal spacing
        # (float16 outputs have many; sending them all to the exact tier is slow).
        flat = (a < _MIN_NORMAL[(out.dtype, acc.dtype)]).reshape(-1).nonzero().squeeze(1)
        if flat.numel():
            bound = _bound(base, terms, acc.dtype).reshape(-1)[flat]
            still = in_doubt(acc.reshape(-1)[flat], out.reshape(-1)[flat], bound, tol)
            doubt = torch.zeros(acc.numel(), dtype=torch.bool, device=acc.device)
            if idx is not None:
                doubt[idx] = True
            doubt[flat] = False
            if still is not None:
                doubt[flat[still]] = True
            idx = doubt.nonzero().squeeze(1)
            return idx if idx.numel() else None
    return idx


# Elements per group in ``below``: a group's minimum is one cheap reduction.
_GROUP = 64
# ``below`` looks into the groups alone while at most 1 in this many holds a hit.
_SPARSE = 8


def below(x: torch.Tensor, floor: float) -> torch.Tensor | None:
    """Flat indices (ascending) of the elements of ``x`` less than ``floor``, or None.

    A comparison and nonzero over the whole block cost more than the rest of
    the check; the minimum of each group of 64 finds the few groups to look into
    (where many groups hold one, as with exact ties, the whole block is searched).
    """
    flat = x.reshape(-1)
    n = flat.numel()
    hit = None
    if n % _GROUP == 0 and n >= 4 * _GROUP:
        hit = (flat.view(-1, _GROUP).amin(1) < floor).nonzero().squeeze(1)
        if not hit.numel():
            return None
    if hit is None or hit.numel() * _SPARSE > n // _GROUP:
        idx = (flat < floor).nonzero().squeeze(1)
        return idx if idx.numel() else None
    idx = (hit[:, None] * _GROUP + torch.arange(_GROUP, device=x.device)).reshape(-1)
    idx = idx[flat[idx] < floor]
    return idx if idx.numel() else None


def _bound(base: torch.Tensor, terms: list[BlockTerm], acc_dtype: torch.dtype) -> torch.Tensor:
    """|W| + sum |scale| * sum_k |left[i,k] right[k,j]| (bounded by the outer products)."""
    bound = base.to(acc_dtype).abs()
    for t in terms:
        if t.right is None:
            bound.add_(t.left.abs(), alpha=abs(t.scale))
        else:
            bound.addr_(t.left_absmax, t.right_abssum, alpha=abs(t.scale))
    return bound


def _tolerance(acc_dtype: torch.dtype, max_rank: int, n_terms: int) -> float:
    # Any summation order of r products, the scalings and n_terms additions
    # stays within (r + n + 2) unit roundoffs of the sum of magnitudes; the
    # factor 2 covers the rounding of the bound itself.
    return 2.0 * (max_rank + n_terms + 2) * _UNIT_ROUNDOFF[acc_dtype]


def in_doubt(
    acc: torch.Tensor, out: torch.Tensor, bound: torch.Tensor, tol: float
) -> torch.Tensor | None:
    """Flat indices of elements whose rounding the accumulator cannot settle, or None."""
    if out.dtype == torch.float64:
        return None  # no wider accumulator here: float64 outputs are within a few ulp
    precision, emin = FORMAT[out.dtype]
    wide = acc.dtype
    y = out.to(wide)
    mant, exp = torch.frexp(y)
    # frexp(0) gives exponent 0, but zero's neighbours are the smallest subnormals.
    exp.masked_fill_(y == 0, emin)
    normal = exp > emin
    exp = exp.clamp(min=emin)
    half_gap = torch.ldexp(torch.ones_like(y), exp - (precision + 1))
    # Just above a power of two the gap below is half the gap above.
    below = normal & (mant.abs() == 0.5) & (acc.abs() < y.abs())
    half_gap = torch.where(below, half_gap * 0.5, half_gap)
    margin = half_gap - (acc - y).abs()
    # The absolute term covers products that underflow in the accumulator.
    slack = bound * tol + tol * _TINY[wide]
    finite = torch.isfinite(y)
    doubt = (margin <= slack) & finite
    if not bool(finite.all()):
        # Rounded to infinity from a finite value: what matters is the distance
        # to the overflow threshold, max + ulp(max)/2.
        fmax = torch.finfo(out.dtype).max
        threshold = fmax + 2.0 ** (math.frexp(fmax)[1] - precision - 1)
        doubt |= ~finite & torch.isfinite(acc) & (acc.abs() - threshold <= slack)
        if wide != torch.float64:
            # A float32 accumulator can overflow where float64 does not: recheck.
            doubt |= ~torch.isfinite(acc)
    idx = doubt.reshape(-1).nonzero().squeeze(1)
    return idx if idx.numel() else None


def _refine(
    base: torch.Tensor,
    terms: list[BlockTerm],
    out: torch.Tensor,
    idx: torch.Tensor,
    acc_dtype: torch.dtype,
    max_rank: int,
) -> None:
    """Settle the doubtful elements ``idx`` (flat) of ``out`` in place."""
    # The gathers below take about 32 * rank bytes per element: bound them,
    # since up to most of a block can be in doubt (float16 outputs, high rank).
    chunk = max(1, _REFINE_BYTES // (32 * max_rank))
    if idx.numel() > chunk:
        for i in range(0, idx.numel(), chunk):
            _refine(base, terms, out, idx[i : i + chunk], acc_dtype, max_rank)
        return
    cols = base.shape[1] if base.dim() == 2 else 1
    rows_i, cols_j = idx // cols, idx % cols
    flat_base = base.reshape(-1)
    if acc_dtype != torch.float64:
        acc = flat_base[idx].to(torch.float64)
        bound = acc.abs()
        for t in terms:
            if t.right is None:
                v = t.left.reshape(-1)[idx].to(torch.float64)
                acc.add_(v, alpha=t.scale)
                bound.add_(v.abs(), alpha=abs(t.scale))
            else:
                lft = t.left[rows_i].to(torch.float64)
                rgt = t.right[:, cols_j].to(torch.float64).T
                acc.add_((lft * rgt).sum(1), alpha=t.scale)
                bound.add_((lft.abs() * rgt.abs()).sum(1), alpha=abs(t.scale))
        sub_out = cast(acc, out.dtype)
        out.reshape(-1)[idx] = sub_out
        tol = _tolerance(torch.float64, max_rank, len(terms))
        still = in_doubt(acc, sub_out, bound, tol)
        if still is None:
            return
        idx, rows_i, cols_j = idx[still], rows_i[still], cols_j[still]
    settle_exact(flat_base, terms, out, idx, rows_i, cols_j)
