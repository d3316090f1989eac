"""Tier 3 of the row-block kernel: elements only exact arithmetic can settle.

These are values within ~1e-15 of a rounding boundary of the output format,
often exactly on one. Three steps, cheapest first; each settles what it can
prove and passes the rest on:

1. **Exact in float64** (vectorised): the element is summed in float64 with
   error-free transformations (Dekker's product, Knuth's two-sum). Where every
   error term is zero the float64 sum *is* the exact value, so rounding it once
   is the correct rounding -- on a midpoint too, which is then a true tie.
   Factors of 16-bit precision (bf16 adapters) into a float32 output are the
   common case: the exact value fits in 53 bits and 1-2% of elements sit
   exactly on a float32 midpoint.
2. **Exact pieces and fsum**: every product split exactly into two float64s,
   their sum correctly rounded by ``math.fsum``. Off a midpoint that float64
   rounds as the exact value does; on one, the sign of the exact remainder
   (another fsum) says on which side the exact value lies.
3. **Rationals**, for elements whose products leave float64's safe range.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .rounding import FORMAT, cast, on_midpoint, round_exact

# Veltkamp's constant: splits a float64 into two halves of at most 26 bits.
_SPLITTER = 2.0**27 + 1
# Within these magnitudes the splits and the products' error terms are exact
# (no overflow in the split, no error term below float64's subnormal range).
_SPLIT_MAX = 2.0**995
_PRODUCT_MIN = 2.0**-960


def two_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a * b == p + e`` exactly (Dekker), for float64 in the safe range."""
    p = a * b

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x * _SPLITTER
        hi = c - (c - x)
        return hi, x - hi

    ah, al = split(a)
    bh, bl = split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def product_is_exact(p: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """Where Dekker's split of ``p = prod(factors)`` is exact.

    That is where the product is far from both ends of float64's range, or a
    true zero (a zero factor); an underflowed product is not.
    """
    zero = torch.zeros_like(p, dtype=torch.bool)
    for f in factors:
        zero |= f == 0
    big_ok = torch.stack([f.abs() < _SPLIT_MAX for f in factors]).all(0)
    return (((p.abs() >= _PRODUCT_MIN) & torch.isfinite(p)) | zero) & big_ok


def settle_exact(
    flat_base: torch.Tensor,
    terms: list,
    out: torch.Tensor,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> None:
    """Write the correctly rounded value of each element ``idx`` (flat) of ``out``.

    ``terms`` are the block's ``BlockTerm``s; ``rows_i``/``cols_j`` the
    elements' rows and columns in the block.
    """
    left = settle_in_float64(flat_base, terms, out, idx, rows_i, cols_j)
    if left is None:
        return
    idx, rows_i, cols_j = idx[left], rows_i[left], cols_j[left]
    left = settle_by_fsum(flat_base, terms, out, idx, rows_i, cols_j)
    if left is None:
        return
    settle_by_rationals(flat_base, terms, out, idx[left], rows_i[left], cols_j[left])


def settle_in_float64(
    flat_base: torch.Tensor,
    terms: list,
    out: torch.Tensor,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> torch.Tensor | None:
    """Settle the elements whose float64 evaluation is provably exact; positions left."""
    total, exact = values_in_float64(flat_base, terms, idx, rows_i, cols_j)
    where = exact.nonzero().squeeze(1)
    if where.numel():
        out.reshape(-1)[idx[where]] = cast(total[where], out.dtype)
    left = (~exact).nonzero().squeeze(1)
    return left if left.numel() else None


def values_in_float64(
    flat_base: torch.Tensor,
    terms: list,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's value summed in float64, and where that sum is provably exact.

    One column of a factor at a time, so the working memory is a few vectors.
    An exact zero is +0.
    """
    total = flat_base[idx].to(torch.float64, copy=True)
    exact = torch.isfinite(total)
    for t in terms:
        if t.right is None:
            inner = t.left.reshape(-1)[idx].to(torch.float64)
        else:
            lft, rgt = t.left[rows_i], t.right[:, cols_j]
            # Products of float32 values are exact in float64 (at most 48 bits,
            # never below 2^-298): no need to check them one by one.
            times = _plain_product if _fits_float32(lft, rgt) else _exact_product
            inner = times(lft[:, 0], rgt[0], exact)
            for k in range(1, lft.shape[1]):
                inner = _exact_sum(inner, times(lft[:, k], rgt[k], exact), exact)
        scaled = _exact_product(inner, torch.full_like(inner, t.scale), exact)
        total = _exact_sum(total, scaled, exact)
    # An exact zero is +0 (as the rational tiers give), whatever the signs of zeros summed.
    total.add_(0.0)
    return total, exact


def _fits_float32(*factors: torch.Tensor) -> bool:
    """Does every value of ``factors`` convert to float32 and back unchanged?"""
    return all(
        f.dtype != torch.float64 or bool((f.to(torch.float32).to(torch.float64) == f).all())
        for f in factors
    )


def _plain_product(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``a * b`` in float64 for float32 values: exact; clears ``exact`` only where not finite."""
    p = a.to(torch.float64) * b.to(torch.float64)
    exact &= torch.isfinite(p)
    return p


def _exact_product(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``a * b`` in float64; clears ``exact`` wherever that product was rounded."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    p, e = two_product(a, b)
    exact &= product_is_exact(p, a, b) & (e == 0)
    return p


def _exact_sum(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``a + b`` in float64; clears ``exact`` wherever that sum was rounded (Knuth's two-sum)."""
    s = a + b
    b_part = s - a
    err = (a - (s - b_part)) + (b - b_part)
    exact &= err == 0  # NaN (an overflow on the way) is not zero either
    return s


def _exact_summands(
    flat_base: torch.Tensor,
    terms: list,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, float64 pieces whose exact sum is its exact value; and where that holds."""
    n = idx.numel()
    base = flat_base[idx].double().reshape(n, 1)
    summands = [base]
    safe = torch.isfinite(base).all(1) & (base.abs() < _SPLIT_MAX).all(1)
    for t in terms:
        if t.right is None:
            p = t.left.reshape(-1)[idx].double().reshape(n, 1)
            e = torch.zeros_like(p)
            safe &= (torch.isfinite(p) & (p.abs() < _SPLIT_MAX)).all(1)
        else:
            lft = t.left[rows_i].double()
            rgt = t.right[:, cols_j].double().T
            p, e = two_product(lft, rgt)
            safe &= product_is_exact(p, lft, rgt).all(1)
        scale = torch.full_like(p, t.scale)
        p1, e1 = two_product(p, scale)
        p2, e2 = two_product(e, scale)
        safe &= (product_is_exact(p1, p, scale) & product_is_exact(p2, e, scale)).all(1)
        summands += [p1, e1, p2, e2]
    return torch.cat(summands, dim=1), safe


def settle_by_fsum(
    flat_base: torch.Tensor,
    terms: list,
    out: torch.Tensor,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> torch.Tensor | None:
    """Settle elements from exact float64 pieces; positions (into idx) left for rationals."""
    summands, safe = _exact_summands(flat_base, terms, idx, rows_i, cols_j)
    ok_list = safe.cpu().tolist()
    precision, emin = FORMAT[out.dtype]
    results, settled, pending = [], [], []
    for k, row in enumerate(summands.cpu().tolist()):
        y = _fsum_off_midpoint(row, precision, emin) if ok_list[k] else None
        if y is None:
            pending.append(k)
            continue
        settled.append(k)
        results.append(round_exact(Fraction(y), out.dtype))
    if settled:
        where = idx[torch.tensor(settled, dtype=torch.long, device=idx.device)]
        out.reshape(-1)[where] = (
            torch.tensor(results, dtype=torch.float64).to(out.device).to(out.dtype)
        )
    if not pending:
        return None
    return torch.tensor(pending, dtype=torch.long, device=idx.device)


def _fsum_off_midpoint(row: list[float], precision: int, emin: int) -> float | None:
    """A float64 that rounds to the output format as the exact sum of ``row`` does.

    That is fsum's correctly rounded sum, or -- when it lands on a midpoint of
    the output format -- the midpoint itself if the sum is exactly there (a
    true tie), else its float64 neighbour on the side the exact remainder
    points to: between the midpoint and the next boundary, as the exact sum
    is. None when an intermediate sum overflows.
    """
    try:
        y = math.fsum(row)
        if not math.isfinite(y):
            return None
        if not on_midpoint(y, precision, emin):
            return y
        row.append(-y)
        rest = math.fsum(row)  # exact sum - y, correctly rounded: zero only when it is zero
    except OverflowError:
        return None
    return y if rest == 0.0 else math.nextafter(y, math.copysign(math.inf, rest))


def settle_by_rationals(
    flat_base: torch.Tensor,
    terms: list,
    out: torch.Tensor,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> None:
    """Exact evaluation in rationals and correct rounding; only for a handful of elements."""
    values = exact_fractions(flat_base, terms, idx, rows_i, cols_j)
    results = [round_exact(v, out.dtype) for v in values]
    out.reshape(-1)[idx] = torch.tensor(results, dtype=torch.float64).to(out.device).to(out.dtype)


def exact_fractions(
    flat_base: torch.Tensor,
    terms: list,
    idx: torch.Tensor,
    rows_i: torch.Tensor,
    cols_j: torch.Tensor,
) -> list[Fraction]:
    """The exact value of each element ``idx`` (flat) as a rational; for a handful of elements."""
    base_vals = flat_base[idx].double().cpu().tolist()
    parts = []
    for t in terms:
        if t.right is None:
            parts.append((Fraction(t.scale), t.left.reshape(-1)[idx].double().cpu().tolist(), None))
        else:
            parts.append(
                (
                    Fraction(t.scale),
                    t.left[rows_i].double().cpu().tolist(),
                    t.right[:, cols_j].double().T.cpu().tolist(),
                )
            )
    values = []
    for n, w in enumerate(base_vals):
        exact = Fraction(w)
        for scale, lft, rgt in parts:
            if rgt is None:
                exact += scale * Fraction(lft[n])
            else:
                exact += scale * sum(
                    Fraction(a) * Fraction(b) for a, b in zip(lft[n], rgt[n], strict=True)
                )
        values.append(exact)
    return values
