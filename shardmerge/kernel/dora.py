"""DoRA (weight-decomposed LoRA): merged tensors, correctly rounded.

PEFT (tuners/lora/variants.py ``DoraLinearVariant`` / ``DoraEmbeddingVariant``
``merge_*``, dora.py ``get_weight_norm``) merges the active adapters of a
layer one after another: a plain LoRA adapter adds its delta, a DoRA adapter
``j`` replaces the weight so far with ``f_j * (weight so far + delta_j)``,
where ``f_j = m_j / ||W + delta_j||`` is one factor per output channel, its
norm taken on the *unmerged* base ``W`` (``_unmerged_base_weight``). PEFT's
forward with several active adapters (eval mode) composes the same way. The
L2 norm runs over the input dimension: along each row of a Linear weight
(``norm_dim=1``), down each stored column of a Conv1D weight [in, out] or an
embedding [vocab, dim] (``norm_dim=0``).

We evaluate that composition in three steps and round once:

1. float64 over a row block, with a rigorous elementwise error bound (the
   norms' summation, the square root and every product and sum). An element
   whose float64 value is farther than the bound from every rounding boundary
   of the output dtype rounds as the exact value does.
2. The rare elements left in doubt, and whole channels whose norm float64
   cannot pin down (near zero), go to an exact path: exact sums of squares
   from integers, square roots bracketed with ``math.isqrt`` at growing
   precision until the value's rounding is settled, and an exact algebraic
   test for a value sitting exactly on a rounding boundary.
3. A zero norm (the whole channel of ``W + delta`` is zero), where PEFT
   divides by zero, is refused by name.

With ``norm_dim=1`` a row block holds whole channels. With ``norm_dim=0`` a
first pass over the tensor's row blocks sums each column's squares (pairwise
within a block, compensated across blocks, with an error bound); the exact
path's column sums re-read the tensor, block by block, for the doubted
columns only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from operator import mul

import torch

from ..errors import (
    ShardmergeError,
    UnsupportedAdapterError,
)
from ..terms import TensorEdit
from .merge import FORMAT, _in_doubt, cast, round_exact

_U = 2.0**-53  # float64 unit roundoff
_TINY = 2.0**-1074  # float64's smallest subnormal: the absolute error of an underflow
# A channel whose float64 sum of squares is more uncertain than this
# (relative) goes to the exact path whole: then the bounds below stay first order.
_MAX_REL = 1e-3
# Positions per chunk of the exact sums of squares (bounds their Python lists).
_CHUNK = 4096
# Working memory of a merged element beyond the plain kernel's (see plan.py):
# float64 base, value, bound, delta and its bound, and the norm's temporaries.
BYTES_PER_ELEMENT = 96


def has_dora(edit: TensorEdit | None) -> bool:
    return edit is not None and any(t.magnitude is not None for t in edit.terms)


def bytes_per_element(edit: TensorEdit | None) -> int:
    """Extra working bytes per merged element for a tensor with DoRA terms (0 otherwise)."""
    return BYTES_PER_ELEMENT if has_dora(edit) else 0


def fixed_bytes(edit: TensorEdit | None) -> int:
    """Memory held per tensor beyond the factors: |right| copies and magnitudes, in float64."""
    if not has_dora(edit):
        return 0
    return sum(
        8 * (t.right.numel if t.right else 0) + 24 * (t.magnitude.numel if t.magnitude else 0)
        for t in edit.terms
    )


def plan_problems(name: str, edit: TensorEdit) -> list[ShardmergeError]:
    """What a tensor with DoRA terms cannot also have (found at plan time, before any byte)."""
    if not has_dora(edit):
        return []
    others = sorted(
        {
            t.adapter
            for t in edit.terms
            if t.right is None or t.rows is not None or t.form != "lowrank"
        }
    )
    if getattr(edit, "scaling", None) is not None:
        others.append(edit.scaling.adapter)
    others += sorted({r.adapter for r in getattr(edit, "token_rows", ())})
    if not others:
        return []
    return [
        UnsupportedAdapterError(
            f"{name}: a DoRA adapter and {', '.join(others)} (IA3, LoHa, LoKr, trainable "
            "tokens, a bias or expert term) both change it; shardmerge does not combine "
            "DoRA with those on one tensor.",
            hint="Merge these adapters in separate runs.",
        )
    ]


def _gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of n float64 roundings in a row."""
    return n * _U / (1 - n * _U)


@dataclass
class DoraPart:
    """One term of a tensor that has DoRA terms: float64 factors on the compute device.

    ``left`` (rows, r) and ``right`` (r, cols) make the delta ``scale * left @ right``,
    oriented like the base tensor as stored. ``magnitude`` (one per channel)
    makes it a DoRA term; None is a plain LoRA term.
    """

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    norm_dim: int = 1
    name: str = ""  # "adapter label, module", for messages
    right_abs: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.right_abs = self.right.abs()

    @property
    def rank(self) -> int:
        return self.left.shape[1]


class DoraMerger:
    """Merges the row blocks of one tensor whose terms include DoRA terms.

    ``read_rows(r0, r1)`` returns base rows as stored (any float dtype); it is
    used for the column pass of ``norm_dim=0`` terms and their exact column
    sums. ``block_rows`` bounds the rows those passes hold at once.
    """

    def __init__(
        self,
        tensor: str,
        shape: tuple[int, ...],
        parts: Sequence[DoraPart],
        out_dtype: torch.dtype,
        read_rows: Callable[[int, int], torch.Tensor] | None = None,
        block_rows: int = 0,
    ):
        if len(shape) != 2:
            raise UnsupportedAdapterError(
                f"{tensor}: DoRA on a {len(shape)}-D tensor {list(shape)} is not supported; "
                "shardmerge merges DoRA into Linear, Conv1D and embedding weights."
            )
        self.tensor = tensor
        self.rows, self.cols = shape
        self.parts = list(parts)
        self.out_dtype = out_dtype
        self.read_rows = read_rows
        self.block_rows = max(1, min(block_rows or self.rows, self.rows))
        self.device = self.parts[0].left.device
        # Elements the exact path settled (for tests and curiosity).
        self.exact_elements = 0
        # norm_dim=0 terms: per part index, (f, eps, bad) per column; exact sums on demand.
        self._col: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._col_exact: dict[int, dict[int, Fraction | None]] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        for p in self.parts:
            if p.magnitude is not None:
                channels = self.rows if p.norm_dim == 1 else self.cols
                if tuple(p.magnitude.shape) != (channels,):
                    raise UnsupportedAdapterError(
                        f"{tensor}: the DoRA magnitude of {p.name} has shape "
                        f"{list(p.magnitude.shape)}, expected [{channels}]."
                    )
        if any(p.magnitude is not None and p.norm_dim == 0 for p in self.parts):
            if read_rows is None:
                raise ValueError("DoRA terms with norm_dim=0 need read_rows")
            self._column_pass()

    # ----------------------------------------------------------------- fast path

    def _buf(self, name: str, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
        """A scratch tensor kept across blocks: no page faults for every temporary."""
        n = math.prod(shape)
        t = self._scratch.get(name)
        if t is None or t.numel() < n:
            t = self._scratch[name] = torch.empty(n, dtype=dtype, device=self.device)
        return t[:n].view(shape)

    def _delta(self, p: DoraPart, row0: int, row1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 delta rows and a bound on their error (any BLAS summation order)."""
        left = p.left[row0:row1]
        shape = (row1 - row0, self.cols)
        d = torch.mm(left, p.right, out=self._buf("d", shape))
        d.mul_(p.scale)
        err = torch.mm(left.abs(), p.right_abs, out=self._buf("ed", shape))
        err.mul_(2.0 * abs(p.scale) * _gamma(p.rank + 1))
        # Products that underflow lose up to _TINY each, times the scale.
        err.add_((p.rank + 2) * _TINY * max(1.0, abs(p.scale)))
        return d, err

    def _column_pass(self) -> None:
        """Per-column sums of squares of W + delta_j over all rows, with error bounds."""
        parts = [j for j, p in enumerate(self.parts) if p.magnitude is not None and p.norm_dim == 0]
        zeros = lambda: torch.zeros(self.cols, dtype=torch.float64, device=self.device)  # noqa: E731
        total = {j: zeros() for j in parts}
        comp = {j: zeros() for j in parts}
        err = {j: zeros() for j in parts}
        blocks = 0
        for row0 in range(0, self.rows, self.block_rows):
            row1 = min(self.rows, row0 + self.block_rows)
            w = self.read_rows(row0, row1).to(device=self.device, dtype=torch.float64)
            blocks += 1
            for j in parts:
                d, ed = self._delta(self.parts[j], row0, row1)
                s, e = _sum_squares(w, d, ed, 0, self._buf)
                # Neumaier's compensated sum across blocks.
                t = total[j] + s
                comp[j] += torch.where(
                    total[j].abs() >= s.abs(), (total[j] - t) + s, (s - t) + total[j]
                )
                total[j] = t
                err[j] += e
        for j in parts:
            s = total[j] + comp[j]
            # Compensated summation of nonnegative terms: within (2u + O(n u^2)) of
            # the sum, plus the final addition; doubled for safety.
            err[j] += (4 * _U + 4 * blocks * blocks * _U * _U) * s
            self._col[j] = _factor(self.parts[j].magnitude, s, err[j])
            self._col_exact[j] = {}

    def merge(self, base: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) merged and correctly rounded to the output dtype (on the device)."""
        shape = (row1 - row0, self.cols)
        w = self._buf("w", shape)
        w.copy_(base)
        value = self._buf("value", shape)
        value.copy_(w)
        bound = self._buf("bound", shape)
        bound.zero_()
        a = self._buf("abs", shape)
        force_rows = torch.zeros(shape[0], dtype=torch.bool, device=self.device)
        force_cols = torch.zeros(shape[1], dtype=torch.bool, device=self.device)
        for j, p in enumerate(self.parts):
            d, ed = self._delta(p, row0, row1)
            if p.magnitude is None:
                value.add_(d)
                bound.add_(ed).add_(torch.abs(value, out=a), alpha=2 * _U)
                continue
            if p.norm_dim == 1:
                s, e = _sum_squares(w, d, ed, 1, self._buf)
                f, eps, bad = _factor(p.magnitude[row0:row1], s, e)
                f, eps = f[:, None], eps[:, None]
                force_rows |= bad
            else:
                f, eps, bad = self._col[j]
                f, eps = f[None, :], eps[None, :]
                force_cols |= bad
            # y = value + d, then f * y. With eps bounding |f^ - f| / |f|:
            # |f^ y^ - f y| <= |f| (eps |y^| + err(y)), |f| <= |f^| / (1 - eps),
            # and the product's rounding adds u |f^ y^| (1 + u).
            value.add_(d)
            bound.add_(ed).add_(torch.abs(value, out=a), alpha=2 * _U)
            bound.addcmul_(a, eps)
            bound.mul_(f.abs() / (1 - eps))
            bound.addcmul_(a, f.abs(), value=2.001 * _U).add_(_TINY)
            value.mul_(f)
        # Twice the bound covers the rounding of the bound's own arithmetic.
        bound.mul_(2.0)
        out = cast(value, self.out_dtype)
        if out.data_ptr() == value.data_ptr():
            out = out.clone()  # value is scratch, reused by the next block
        doubt = self._doubt(value, out, bound, a)
        doubt[force_rows] = True
        doubt[:, force_cols] = True
        idx = doubt.view(-1).nonzero().squeeze(1)
        if idx.numel():
            self._exact(w, out, idx, row0)
        # Zeros are written as +0.0 whatever the float64 path's sign: bytes then
        # do not depend on the summation order.
        out.masked_fill_(out == 0, 0.0)
        return out

    def _doubt(
        self, value: torch.Tensor, out: torch.Tensor, bound: torch.Tensor, a: torch.Tensor
    ) -> torch.Tensor:
        """Elements whose rounding float64 cannot settle, as a mask.

        As kernels' first tier: rounding to the output drops the value's low
        ``drop`` bits, and it lies ``|low - 2^(drop-1)|`` float64 ulps (at
        least |value| 2^-53 each) from the midpoint of its binade, the other
        midpoints at least 2^(drop-2) away. Values near the output's subnormal
        or overflow range, and non-finite ones, take kernels' general check.
        """
        if self.out_dtype not in FORMAT or self.out_dtype == torch.float64:
            # float64 outputs: as kernels, within a few ulp; only an unknown bound is doubted.
            return ~torch.isfinite(bound) & torch.isfinite(value)
        precision, emin = FORMAT[self.out_dtype]
        drop = 53 - precision
        mid = 1 << (drop - 1)
        dist = torch.bitwise_and(
            value.view(torch.int64),
            (1 << drop) - 1,
            out=self._buf("bits", value.shape, torch.int64),
        )
        dist.sub_(mid).abs_().clamp_(max=mid // 2)
        torch.abs(value, out=a)
        lhs = self._buf("d", value.shape)
        lhs.copy_(dist).mul_(a).mul_(2.0**-53)
        doubt = ~(lhs > bound)  # also a NaN bound
        fmax = torch.finfo(self.out_dtype).max
        special = ~((a >= 2.0 ** (emin - 1)) & (a < fmax / 2))  # also NaN values
        idx = special.view(-1).nonzero().squeeze(1)
        if idx.numel():
            flat = doubt.view(-1)
            v = value.view(-1)[idx]
            again = _in_doubt(v, out.view(-1)[idx], bound.view(-1)[idx], 1.0)
            unknown = ~torch.isfinite(bound.view(-1)[idx]) & torch.isfinite(v)
            flat[idx] = unknown
            if again is not None:
                flat[idx[again]] = True
        return doubt

    # ----------------------------------------------------------------- exact path

    def _exact(self, w: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, row0: int) -> None:
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
                sums.append(self._exact_row_sums(p, w_cpu, sorted(set(rows_i)), row0))
            else:
                cache = self._col_exact[j]
                missing = sorted(set(cols_j) - set(cache))
                if missing:
                    cache.update(self._exact_column_sums(p, missing))
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

    def _exact_row_sums(
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
            part = _exact_sumsq(wm[:, c0:c1], left, right[:, c0:c1].T, p.scale)
            total = [
                None if a is None or b is None else a + b for a, b in zip(total, part, strict=True)
            ]
        return {row0 + r: s for r, s in zip(rows, total, strict=True)}

    def _exact_column_sums(self, p: DoraPart, cols: list[int]) -> dict[int, Fraction | None]:
        """Exact sums of squares of W + delta down the given columns: re-reads the tensor."""
        sel = torch.tensor(cols, dtype=torch.long)
        left = p.left.cpu()
        right = p.right.cpu()[:, sel].T  # (len(cols), r)
        total: list[Fraction | None] = [Fraction(0)] * len(cols)
        step = max(1, min(self.block_rows, _CHUNK))
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            wm = self.read_rows(r0, r1).to(torch.float64)[:, sel].T  # (len(cols), rows)
            part = _exact_sumsq(wm, right, left[r0:r1], p.scale)
            total = [
                None if a is None or b is None else a + b for a, b in zip(total, part, strict=True)
            ]
        return dict(zip(cols, total, strict=True))


class _NonFinite(Exception):
    pass


def _sum_squares(
    w: torch.Tensor, d: torch.Tensor, ed: torch.Tensor, dim: int, buf: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum along ``dim`` of (w + d)^2 in float64, and a bound on its error.

    ``ed`` bounds |d^ - d| elementwise. x^ = w + d^ is off by ed + u|x^|; its
    square by e(2|x^| + e) + u x^2; a pairwise sum of height h by gamma_h of
    the (nonnegative) total. Everything doubled for the bound's own rounding.
    ``buf(name, shape)`` gives scratch tensors (fresh ones if None).
    """
    buf = buf or (lambda name, shape: torch.empty(shape, dtype=w.dtype, device=w.device))
    x = torch.add(w, d, out=buf("x", w.shape))
    ax = torch.abs(x, out=buf("ax", w.shape))
    ex = torch.add(ed, ax, alpha=2 * _U, out=buf("ex", w.shape))
    q = torch.mul(x, x, out=x)
    terms = torch.add(ex, ax, alpha=2.0, out=ax).mul_(ex).add_(q, alpha=2 * _U).add_(_TINY)
    err = terms.sum(dim)
    s, height = _pairwise_sum(q, dim)
    err.add_(s, alpha=_gamma(height)).mul_(2.0)
    return s, err


def _pairwise_sum(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """Sum along ``dim`` pairwise, in place (``x`` is overwritten); the sum and a tree height.

    Each level adds the upper half onto the lower one, and an odd last
    element onto the first: at most two additions per level on any path.
    """
    n = x.shape[dim]
    if n == 0:
        shape = list(x.shape)
        del shape[dim]
        return torch.zeros(shape, dtype=x.dtype, device=x.device), 0
    height = 0
    while n > 1:
        half, odd = divmod(n, 2)
        x.narrow(dim, 0, half).add_(x.narrow(dim, half, half))
        if odd:
            x.narrow(dim, 0, 1).add_(x.narrow(dim, n - 1, 1))
        n = half
        height += 1 + odd
    return x.select(dim, 0).clone(), height


def _factor(
    magnitude: torch.Tensor, s: torch.Tensor, err: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f = m / sqrt(s), its relative error bound, and the channels float64 cannot settle.

    With y = err / s <= 1e-3, sqrt(S/s) is within 0.51 y of 1, and the square
    root and the division add 2u: eps = y + 3u bounds |f^ - f| / |f|.
    """
    y = err / s
    bad = ~(y <= _MAX_REL)  # also a zero, infinite or NaN sum
    f = magnitude / torch.sqrt(s)
    eps = torch.where(bad, torch.zeros_like(y), y + 3 * _U)
    return f, eps, bad


# --------------------------------------------------------------------------- exact arithmetic


def _ints(t: torch.Tensor) -> tuple[list[int], int]:
    """Integers n_i and one exponent e with t_i = n_i * 2^e exactly (t finite float64)."""
    ratios = [v.as_integer_ratio() for v in t.reshape(-1).tolist()]
    if not ratios:
        return [], 0
    k = max(den.bit_length() - 1 for _, den in ratios)
    return [num << (k - (den.bit_length() - 1)) for num, den in ratios], -k


def _exact_sumsq(
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


# --------------------------------------------------------------------------- verify's reference


def reference_column_sums(
    read_rows: Callable[[int, int], torch.Tensor],
    rows: int,
    block_rows: int,
    parts: Sequence[DoraPart],
) -> dict[int, torch.Tensor]:
    """Plain float64 column sums of (W + delta_j)^2 for the norm_dim=0 DoRA parts (verify)."""
    wanted = [j for j, p in enumerate(parts) if p.magnitude is not None and p.norm_dim == 0]
    sums: dict[int, torch.Tensor] = {}
    for row0 in range(0, rows, max(block_rows, 1)):
        row1 = min(rows, row0 + max(block_rows, 1))
        w = read_rows(row0, row1).to(torch.float64)
        for j in wanted:
            p = parts[j]
            x = w + p.scale * (p.left[row0:row1] @ p.right)
            s = (x * x).sum(0)
            sums[j] = sums[j] + s if j in sums else s
    return sums


def reference_rows(
    base: torch.Tensor,
    parts: Sequence[DoraPart],
    column_sums: dict[int, torch.Tensor],
    row0: int,
    row1: int,
) -> torch.Tensor:
    """PEFT's sequential merge of rows [row0, row1) in plain float64 (verify's reference)."""
    w = base.to(torch.float64)
    value = w.clone()
    for j, p in enumerate(parts):
        d = p.scale * (p.left[row0:row1] @ p.right)
        if p.magnitude is None:
            value = value + d
        elif p.norm_dim == 1:
            norm = torch.linalg.vector_norm(w + d, dim=1)
            value = (p.magnitude[row0:row1] / norm)[:, None] * (value + d)
        else:
            value = (p.magnitude / column_sums[j].sqrt())[None, :] * (value + d)
    return value


def parts_for(tensor: str, terms: Sequence, factors: Sequence, load: Callable) -> list[DoraPart]:
    """The DoraParts of a tensor's terms and their loaded factors (worker.Factors)."""
    parts = []
    for term, f in zip(terms, factors, strict=True):
        if f.right is None or term.rows is not None or term.form != "lowrank":
            raise UnsupportedAdapterError(
                f"{tensor}: its {term.kind} term from adapter {term.adapter} cannot be combined "
                "with DoRA terms on the same tensor.",
                hint="Merge these adapters in separate runs.",
            )
        left = f.left.to(torch.float64)
        mag = None
        if term.magnitude is not None:
            mag = load(term.magnitude).to(device=left.device, dtype=torch.float64).reshape(-1)
        parts.append(
            DoraPart(
                left,
                f.right.to(torch.float64),
                f.scale,
                mag,
                term.norm_dim,
                f"adapter {term.adapter}, module {term.module}",
            )
        )
    return parts


def merger_for(
    tensor: str,
    shape: tuple[int, ...],
    terms: Sequence,
    factors: Sequence,
    load: Callable,
    out_dtype: torch.dtype,
    read_rows: Callable[[int, int], torch.Tensor] | None,
    block_rows: int,
) -> DoraMerger:
    """A DoraMerger from a tensor's terms and their loaded factors (worker.Factors)."""
    parts = parts_for(tensor, terms, factors, load)
    return DoraMerger(tensor, shape, parts, out_dtype, read_rows, block_rows)
