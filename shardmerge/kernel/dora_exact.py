"""DoRA's exact tier: the elements float64 cannot round with certainty, settled exactly.

Exact sums of squares from integers, square roots bracketed with
``math.isqrt`` at growing precision until the value's rounding is settled,
and an exact algebraic test for a value sitting exactly on a rounding
boundary (see dora.py for the whole method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from operator import mul

import torch

from ..errors import UnsupportedAdapterError
from .dora_parts import DoraPart
from .rounding import FORMAT, round_exact

# Positions per chunk of the exact sums of squares (bounds their Python lists).
_CHUNK = 4096


class ExactTier:
    """Settles doubted elements of one DoRA tensor; caches exact column sums across blocks.

    ``read_rows(r0, r1)`` returns base rows as stored, for the exact column
    sums of ``norm_dim=0`` terms; ``block_rows`` bounds the rows read at once.
    """

    def __init__(
        self,
        tensor: str,
        shape: tuple[int, int],
        parts: Sequence[DoraPart],
        out_dtype: torch.dtype,
        read_rows: Callable[[int, int], torch.Tensor] | None,
        block_rows: int,
    ):
        self.tensor = tensor
        self.rows, self.cols = shape
        self.parts = list(parts)
        self.out_dtype = out_dtype
        self.read_rows = read_rows
        self.block_rows = block_rows
        # Elements the exact path settled (for tests and curiosity).
        self.exact_elements = 0
        # norm_dim=0 terms: per part index, the exact column sums found so far.
        self._col_exact: dict[int, dict[int, Fraction | None]] = {
            j: {} for j, p in enumerate(self.parts) if p.magnitude is not None and p.norm_dim == 0
        }

    def settle(self, w: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, row0: int) -> None:
        """Settle the elements ``idx`` (flat in the block) of ``out`` exactly, in place."""
        cols = self.cols
        rows_i = (idx // cols).tolist()
        cols_j = (idx % cols).tolist()
        w_cpu = w.cpu()
        sums: list[dict[int, Fraction | None]] = []
        for j, p in enumerate(self.parts):
            if p.magnitude is None:
                sums.append({})
            elif p.norm_dim == 1:
                sums.append(self._row_sums(p, w_cpu, sorted(set(rows_i)), row0))
            else:
                cache = self._col_exact[j]
                missing = sorted(set(cols_j) - set(cache))
                if missing:
                    cache.update(self._column_sums(p, missing))
                sums.append(cache)
        gi = torch.tensor(rows_i, dtype=torch.long) + row0
        gj = torch.tensor(cols_j, dtype=torch.long)
        lefts = [p.left.cpu()[gi].tolist() for p in self.parts]
        rights = [p.right.cpu()[:, gj].T.tolist() for p in self.parts]
        mags = [p.magnitude.cpu().tolist() if p.magnitude is not None else None for p in self.parts]
        base_vals = w_cpu.reshape(-1)[idx.cpu()].tolist()
        results = out.reshape(-1)[idx].to(torch.float64).cpu().tolist()
        for n, (i, c) in enumerate(zip(rows_i, cols_j, strict=True)):
            terms: list[tuple[Fraction, Fraction | None, Fraction | None]] = []
            try:
                for j, p in enumerate(self.parts):
                    d = Fraction(p.scale) * sum(
                        (
                            Fraction(a) * Fraction(b)
                            for a, b in zip(lefts[j][n], rights[j][n], strict=True)
                        ),
                        Fraction(0),
                    )
                    if p.magnitude is None:
                        terms.append((d, None, None))
                        continue
                    ch = row0 + i if p.norm_dim == 1 else c
                    s = sums[j][ch]
                    if s is None:
                        raise _NonFinite
                    if s == 0:
                        raise self._zero_norm(p, ch)
                    terms.append((d, Fraction(mags[j][ch]), s))
                wv = Fraction(base_vals[n])
            except (_NonFinite, OverflowError, ValueError):
                # Infinite or NaN inputs: the float64 (IEEE) value stands, as in PEFT.
                continue
            results[n] = round_composition(wv, terms, self.out_dtype)
        self.exact_elements += len(results)
        out.reshape(-1)[idx] = (
            torch.tensor(results, dtype=torch.float64).to(out.device).to(out.dtype)
        )

    def _zero_norm(self, p: DoraPart, channel: int) -> UnsupportedAdapterError:
        where = f"row {channel}" if p.norm_dim == 1 else f"column {channel}"
        return UnsupportedAdapterError(
            f"{self.tensor}: DoRA term of {p.name}: {where} of the base plus the LoRA delta is all "
            "zeros, so its weight norm is 0; PEFT's merge divides by it and writes NaN or inf there.",
            hint="Check that the adapter was trained on this base model.",
        )

    def _row_sums(
        self, p: DoraPart, w: torch.Tensor, rows: list[int], row0: int
    ) -> dict[int, Fraction | None]:
        """Exact sums of squares of W + delta along the given rows (block-relative) of ``w``."""
        sel = torch.tensor(rows, dtype=torch.long)
        wm = w[sel]
        left = p.left.cpu()[sel + row0]
        right = p.right.cpu()
        total: list[Fraction | None] = [Fraction(0)] * len(rows)
        for c0 in range(0, self.cols, _CHUNK):
            c1 = min(self.cols, c0 + _CHUNK)
            part = exact_sum_squares(wm[:, c0:c1], left, right[:, c0:c1].T, p.scale)
            total = [
                None if a is None or b is None else a + b for a, b in zip(total, part, strict=True)
            ]
        return {row0 + r: s for r, s in zip(rows, total, strict=True)}

    def _column_sums(self, p: DoraPart, cols: list[int]) -> dict[int, Fraction | None]:
        """Exact sums of squares of W + delta down the given columns: re-reads the tensor."""
        sel = torch.tensor(cols, dtype=torch.long)
        left = p.left.cpu()
        right = p.right.cpu()[:, sel].T  # (len(cols), r)
        total: list[Fraction | None] = [Fraction(0)] * len(cols)
        step = max(1, min(self.block_rows, _CHUNK))
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            wm = self.read_rows(r0, r1).to(torch.float64)[:, sel].T  # (len(cols), rows)
            part = exact_sum_squares(wm, right, left[r0:r1], p.scale)
            total = [
                None if a is None or b is None else a + b for a, b in zip(total, part, strict=True)
            ]
        return dict(zip(cols, total, strict=True))


class _NonFinite(Exception):
    pass


def _ints(t: torch.Tensor) -> tuple[list[int], int]:
    """Integers n_i and one exponent e with t_i = n_i * 2^e exactly (t finite float64)."""
    ratios = [v.as_integer_ratio() for v in t.reshape(-1).tolist()]
    if not ratios:
        return [], 0
    k = max(den.bit_length() - 1 for _, den in ratios)
    return [num << (k - (den.bit_length() - 1)) for num, den in ratios], -k


def exact_sum_squares(
    wm: torch.Tensor, p: torch.Tensor, q: torch.Tensor, scale: float
) -> list[Fraction | None]:
    """Exact sum over t of (wm[a, t] + scale * sum_k p[a, k] q[t, k])^2 for each a.

    None for a channel with a non-finite input (no exact value exists).
    """
    a_n, n = wm.shape
    r = p.shape[1]
    finite_q = bool(torch.isfinite(q).all())
    ok = (torch.isfinite(wm).all(1) & torch.isfinite(p).all(1)).tolist()
    wm = torch.where(torch.isfinite(wm), wm, 0.0)
    p = torch.where(torch.isfinite(p), p, 0.0)
    W, ew = _ints(wm)
    P, ep = _ints(p)
    Q, eq = _ints(torch.where(torch.isfinite(q), q, 0.0))
    sn, sd = float(scale).as_integer_ratio()
    ed = ep + eq - (sd.bit_length() - 1)
    e = min(ew, ed)
    shift_w, shift_d = ew - e, ed - e
    qrows = [Q[t * r : (t + 1) * r] for t in range(n)]
    out: list[Fraction | None] = []
    for a in range(a_n):
        if not (ok[a] and finite_q):
            out.append(None)
            continue
        pa = P[a * r : (a + 1) * r]
        wa = W[a * n : (a + 1) * n]
        total = 0
        for t in range(n):
            x = (wa[t] << shift_w) + ((sn * sum(map(mul, pa, qrows[t]))) << shift_d)
            total += x * x
        out.append(Fraction(total, 1 << (-2 * e)) if e < 0 else Fraction(total << (2 * e)))
    return out


Composition = Sequence[tuple[Fraction, Fraction | None, Fraction | None]]


def round_composition(w: Fraction, terms: Composition, dtype: torch.dtype) -> float:
    """Correctly round the exact value of PEFT's sequential merge of one element.

    ``terms`` are (delta, m, S) in merge order: a plain term adds ``delta``;
    a DoRA term (m, S not None; S > 0 the exact sum of squares of its channel)
    turns the value v into ``m / sqrt(S) * (v + delta)``.

    The square roots are bracketed at growing precision until both ends of the
    value's interval round alike. A value exactly on a rounding boundary never
    separates: from 512 bits on, an exact test settles that case.
    """
    bits = 64
    tested = False
    while True:
        lo = hi = w
        for delta, m, s in terms:
            lo, hi = lo + delta, hi + delta
            if m is not None:
                f_lo, f_hi = _factor_interval(m, s, bits)
                products = (f_lo * lo, f_lo * hi, f_hi * lo, f_hi * hi)
                lo, hi = min(products), max(products)
        a, b = round_exact(lo, dtype), round_exact(hi, dtype)
        if a == b and math.copysign(1.0, a) == math.copysign(1.0, b):
            return a
        if bits >= 512 and not tested:
            tested = True
            boundary = _boundary(a, b, dtype)
            if boundary is not None and _equals(w, terms, boundary):
                return round_exact(boundary, dtype)
        bits *= 2


def _factor_interval(m: Fraction, s: Fraction, bits: int) -> tuple[Fraction, Fraction]:
    """Bounds on m / sqrt(s) from sqrt(p q) bracketed to ``bits`` bits (s = p/q)."""
    p, q = s.numerator, s.denominator
    n = (p * q) << (2 * bits)
    g = math.isqrt(n)
    scale = q << bits
    # sqrt(s) lies in [g, g + 1] / scale; exactly g / scale for a perfect square.
    hi_root = g if g * g == n else g + 1
    a, b = m * scale / hi_root, m * scale / g
    return (a, b) if a <= b else (b, a)


def _boundary(a: float, b: float, dtype: torch.dtype) -> Fraction | None:
    """The rounding boundary between two results of ``dtype`` (the overflow threshold for inf)."""
    if math.isnan(a) or math.isnan(b):
        return None
    fmax = Fraction(torch.finfo(dtype).max)
    precision, _ = FORMAT[dtype]
    threshold = fmax + Fraction(2) ** (math.frexp(float(fmax))[1] - precision - 1)

    def value(x: float) -> Fraction:
        return threshold * (1 if x > 0 else -1) if math.isinf(x) else Fraction(x)

    return (value(a) + value(b)) / 2


def _equals(w: Fraction, terms: Composition, target: Fraction) -> bool:
    """Is the exact composed value equal to ``target``?

    The value is sum_k c_k * prod_{DoRA j >= k} m_j / sqrt(S_j) (c_0 = w, c_k
    = delta_k): a rational combination of square roots sqrt(N) of integers.
    Square roots of integers with different square-free parts are linearly
    independent over the rationals, so value - target is zero exactly when
    the coefficients of each class (N N' a perfect square) cancel.
    """
    addends: list[tuple[Fraction, Fraction]] = []  # (coefficient, radicand)
    for start, c in [(0, w)] + [(k, t[0]) for k, t in enumerate(terms)]:
        coef, rad = c, Fraction(1)
        for _, m, s in terms[start:]:
            if m is not None:
                coef, rad = coef * m, rad * s
        addends.append((coef, rad))
    addends.append((-target, Fraction(1)))
    classes: list[list] = []  # [radicand N (integer), coefficient of sqrt(N)]
    for coef, rad in addends:
        if coef == 0:
            continue
        # c / sqrt(p/q) = (c / p) * sqrt(p q)
        n = rad.numerator * rad.denominator
        coef = coef / rad.numerator
        for cls in classes:
            prod = n * cls[0]
            g = math.isqrt(prod)
            if g * g == prod:  # sqrt(n) = g / N * sqrt(N)
                cls[1] += coef * Fraction(g, cls[0])
                break
        else:
            classes.append([n, coef])
    return all(c == 0 for _, c in classes)
