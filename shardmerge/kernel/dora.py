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

import torch

from ..errors import UnsupportedAdapterError
from .dora_exact import ExactTier
from .dora_parts import DoraPart, parts_for
from .merge import FORMAT, cast, in_doubt

_U = 2.0**-53  # float64 unit roundoff
# At least the absolute error of an underflow (2^-1074). float64's smallest
# normal rather than that subnormal: arithmetic on subnormal operands takes a
# slow microcode path on x86 (a third of DoRA's time on every element), and no
# output format can see the difference (< 1e-307) in the bounds.
_TINY = 2.0**-1022
# A channel whose float64 sum of squares is more uncertain than this
# (relative) goes to the exact path whole: then the bounds below stay first order.
_MAX_REL = 1e-3


def _gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of n float64 roundings in a row."""
    return n * _U / (1 - n * _U)


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
        self.last_value: torch.Tensor | None = None  # see merge
        self.out_dtype = out_dtype
        self.read_rows = read_rows
        self.block_rows = max(1, min(block_rows or self.rows, self.rows))
        self.device = self.parts[0].left.device
        # norm_dim=0 terms: per part index, (f, eps, bad) per column.
        self._col: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._exact = ExactTier(tensor, shape, self.parts, out_dtype, read_rows, self.block_rows)
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

    @property
    def exact_elements(self) -> int:
        """Elements the exact tier settled (for tests and curiosity)."""
        return self._exact.exact_elements

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
            self._exact.settle(w, out, idx, row0)
        # Zeros are written as +0.0 whatever the float64 path's sign: bytes then
        # do not depend on the summation order.
        out.masked_fill_(out == 0, 0.0)
        # The float64 value before rounding, for the survival figures (scratch:
        # valid until the next block).
        self.last_value = value
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
            again = in_doubt(v, out.view(-1)[idx], bound.view(-1)[idx], 1.0)
            unknown = ~torch.isfinite(bound.view(-1)[idx]) & torch.isfinite(v)
            flat[idx] = unknown
            if again is not None:
                flat[idx[again]] = True
        return doubt


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


# Row elements summed together in any order before the pairwise sum (see _pairwise_sum).
_ROW_CHUNK = 64


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
    if dim == 1 and x.dim() == 2 and n % _ROW_CHUNK == 0 and n > _ROW_CHUNK:
        # Halving along a row works on strided halves (a third of DoRA's time):
        # sum contiguous chunks first, in whatever order torch adds them (a tree
        # of at most chunk - 1 levels), then pairwise over the chunk sums.
        chunks = x.view(x.shape[0], n // _ROW_CHUNK, _ROW_CHUNK).sum(2)
        s, height = _pairwise_sum(chunks, 1)
        return s, height + _ROW_CHUNK - 1
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


def merger_for(
    tensor: str,
    shape: tuple[int, ...],
    terms: Sequence,
    factors: Sequence,
    load: Callable,
    out_dtype: torch.dtype,
    read_rows: Callable[[int, int], torch.Tensor] | None,
    block_rows: int,
    compatible: Callable,
) -> DoraMerger:
    """A DoraMerger from a tensor's terms and their loaded factors (execute/factors.py).

    ``compatible(term)``: may the term share a tensor with DoRA terms (the merge policy).
    """
    parts = parts_for(tensor, terms, factors, load, compatible)
    return DoraMerger(tensor, shape, parts, out_dtype, read_rows, block_rows)
