"""One output tensor checked against its reference, recomputed from base + adapters in float64.

What applies to the tensor comes from the merge policy (execute/policy.py);
the arithmetic here is verify's own: plain float64 BLAS, PEFT's formulas.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import torch

from ..execute.factors import Factors, load_factors
from ..execute.jobs import TensorJob
from ..execute.policy import TensorPolicy, builds_factors, joins_dora, policy_for
from ..io.safetensors import TensorInfo, pread_into, read_rows
from ..io.sources import RefLoader
from ..kernel.dora_parts import parts_for
from ..kernel.merge import FORMAT, cast
from ..kernel.rows import RowPatch
from ..kernel.spans import RowSpans
from .dequant import reference_decoder
from .dora_reference import reference_column_sums, reference_rows
from .fp8 import codes_over_scales, scale_problems
from .reference import reference_delta

# Correct rounding puts every element within 0.5 ulp of the exact value; the
# float64 reference is itself off by ~1e-13 ulp of a 16/32-bit output.
ULP_LIMIT = 0.5 + 1e-6
ULP_LIMIT_F64 = 4.0
# DoRA's float64 reference also sums squares over a whole row or column.
ULP_LIMIT_DORA = 0.5 + 1e-5
# Rows read at once when comparing a copied tensor.
COPY_BLOCK_BYTES = 64 << 20
CPU = torch.device("cpu")


def check_tensor(
    t: TensorJob,
    src: BinaryIO,
    dst: BinaryIO,
    got: TensorInfo,
    loader: RefLoader,
    report,
    sides: list[TensorInfo] = (),
) -> None:
    """Compare tensor ``t`` of the output, block by block; problems go to ``report``.

    ``sides``: the output's side tensors of ``t`` (an FP8 tensor's scales).
    """
    report.tensors[t.action] += 1
    rows = (
        max(t.block_rows, 1)
        if t.action != "copy"
        else max(1, COPY_BLOCK_BYTES // max(got.row_bytes, 1))
    )
    out_buf = torch.empty(rows * max(got.row_bytes, 1) + 8, dtype=torch.uint8)
    ref = _Reference(t, loader, src, rows)
    policy = ref.policy
    encoded = _Encoded(t, dst, sides, loader) if t.encode is not None else None
    for row0 in range(0, t.rows, rows):
        row1 = min(t.rows, row0 + rows)
        out_rows = read_rows(dst, got, row0, row1, out_buf)
        base_rows = ref.base_rows(row0, row1)
        if encoded is not None:
            if not encoded.check(out_rows, ref.rows(base_rows, row0, row1), row0, row1, report):
                return
            continue
        if not policy.arithmetic:
            expected = (
                cast(base_rows, policy.out_dtype)
                if base_rows.dtype != policy.out_dtype
                else base_rows
            )
            if not torch.equal(expected.view(torch.uint8), out_rows.view(torch.uint8)):
                report.problems.append(f"{t.name}: rows {row0}-{row1} differ from the base.")
                return
            continue
        err = ulp_error(out_rows, ref.rows(base_rows, row0, row1))
        kind = policy.verify_kind
        report.max_ulp[kind] = max(report.max_ulp.get(kind, 0.0), err)
        limit = ulp_limit(policy)
        if err > limit:
            report.problems.append(
                f"{t.name}: off by {err:.3g} ulp from the formula (limit {limit})."
            )
            return


class _Encoded:
    """An FP8 output tensor's scales (written and kept), and the check of its row blocks."""

    def __init__(self, t: TensorJob, dst: BinaryIO, sides: list[TensorInfo], loader: RefLoader):
        self.t, self.spec = t, t.encode
        info = sides[0]
        buf = torch.empty(max(info.nbytes, 1) + 8, dtype=torch.uint8)
        self.scales = read_rows(dst, info, 0, info.rows, buf).to(torch.float64)
        self.kept = loader.load(self.spec.kept).double() if self.spec.kept is not None else None
        self.kind = "fp8:" + (",".join(policy_for(t).kinds) or "converted")

    def check(self, codes, ref64: torch.Tensor, row0: int, row1: int, report) -> bool:
        """Scales and codes of rows [row0, row1); False after the first problem."""
        bm = self.spec.block[0]
        r0, r1 = row0 // bm, -(-row1 // bm)
        ref64 = ref64.reshape(row1 - row0, -1)
        kept = self.kept[r0:r1] if self.kept is not None else None
        problems = scale_problems(self.t.name, self.scales[r0:r1], ref64, self.spec, kept)
        if problems:
            report.problems.extend(problems)
            return False
        y, r = codes_over_scales(codes, self.scales[r0:r1], ref64, self.spec.block)
        err = ulp_error(y, r)
        report.max_ulp[self.kind] = max(report.max_ulp.get(self.kind, 0.0), err)
        if err > ULP_LIMIT:
            report.problems.append(
                f"{self.t.name}: a code is off by {err:.3g} e4m3 ulp from reference / scale "
                f"(limit {ULP_LIMIT})."
            )
            return False
        return True


def ulp_limit(policy: TensorPolicy) -> float:
    if policy.out_dtype == torch.float64:
        return ULP_LIMIT_F64
    return ULP_LIMIT_DORA if policy.dora else ULP_LIMIT


class _Reference:
    """The float64 reference of one tensor: its base rows and the merge's formula over them."""

    def __init__(self, t: TensorJob, loader: RefLoader, src: BinaryIO, rows: int):
        self.t = t
        self.policy = p = policy_for(t)
        self.src = src
        self.info = TensorInfo(t.name, t.in_dtype, t.shape, t.start, t.end)
        self.in_buf = torch.empty(rows * max(self.info.row_bytes, 1) + 8, dtype=torch.uint8)
        self.source = _replacement(p, loader, t.rows)
        terms = p.terms
        self.factors: list[Factors] = [
            load_factors(term, loader, torch.float64, CPU)
            for term in terms
            if not builds_factors(term)
        ]
        # LoHa/LoKr: PEFT's formula evaluated directly (not the merge's exact factors).
        self.deltas = [reference_delta(term, loader) for term in terms if builds_factors(term)]
        self.vector = None
        if p.scaling is not None:
            self.vector = loader.load(p.scaling.vector).reshape(-1).to(torch.float64)
        self.quant = reference_decoder(t.quant, t.shape, loader.load) if p.quant else None
        self.patch = RowPatch(p.token_rows, loader.load, CPU) if p.token_rows else None
        self.dora_parts = None
        if p.dora:  # norms down columns need every row first
            self.dora_parts = parts_for(t.name, terms, self.factors, loader.load, joins_dora)
            self.column_sums = reference_column_sums(
                self._stored_rows, t.rows, rows, self.dora_parts
            )
            self.factors = []
        self.spans = RowSpans(self.factors)  # expert terms: each block takes the few it meets

    def _stored_rows(self, row0: int, row1: int) -> torch.Tensor:
        """Base rows as the adapter saw them: replaced, decoded from 4 bits, or as stored."""
        if self.source is not None:
            return self.source[row0:row1] if self.source.dim() else self.source
        if self.quant is not None:  # a quantized base: the values the adapter saw
            raw = _read_raw(self.src, self.info, row0, row1, self.in_buf, self.t)
            return self.quant(raw, row0, row1)
        return read_rows(self.src, self.info, row0, row1, self.in_buf)

    def base_rows(self, row0: int, row1: int) -> torch.Tensor:
        """The rows the terms are added to: stored rows with trainable tokens' rows copied in."""
        rows = self._stored_rows(row0, row1)
        return self.patch(rows, row0, row1) if self.patch is not None else rows

    def rows(self, base_rows: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """The merged rows [row0, row1) in plain float64."""
        if self.dora_parts is not None:  # PEFT's sequential DoRA merge, plain float64
            ref64 = reference_rows(base_rows, self.dora_parts, self.column_sums, row0, row1)
        else:
            ref64 = base_rows.to(torch.float64, copy=True)
        scaling = self.policy.scaling
        if scaling is not None:  # IA3: W * l, exact in float64
            v = self.vector[row0:row1] if scaling.axis == 0 else self.vector
            ref64 *= v.view(-1, *[1] * (ref64.dim() - 1)) if scaling.axis == 0 else v
        for delta in self.deltas:
            ref64 += delta(row0, row1)
        for f in self.spans.meeting(row0, row1) if self.factors else ():
            # A term may cover only some base rows (one expert of a fused expert tensor).
            lo, hi = f.rows if f.rows is not None else (0, self.t.rows)
            a, b = max(row0, lo), min(row1, hi)
            if a >= b:
                continue
            left = f.left[a - lo : b - lo]
            ref64[a - row0 : b - row0] += f.scale * (left if f.right is None else left @ f.right)
        return ref64


def _replacement(p: TensorPolicy, loader: RefLoader, rows: int) -> torch.Tensor | None:
    """The tensor an adapter saves whole, as rows of the base's matrix view (or None)."""
    if p.replacement is None:
        return None
    source = loader.load(p.replacement)  # replacements are adapter tensors: modest in size
    if source.dim() >= 3:
        source = source.reshape(rows, -1)  # the matrix view the rows are counted in
    return source


def _read_raw(src, info: TensorInfo, row0: int, row1: int, buf, t: TensorJob) -> torch.Tensor:
    """Base rows as stored: 16-bit rows, or packed 4-bit bytes."""
    if not t.quant.packed:
        return read_rows(src, info, row0, row1, buf)
    view = buf[: (row1 - row0) * info.row_bytes]
    pread_into(src, info.start + row0 * info.row_bytes, view)
    return view


def ulp_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max |out - ref| in units of the output dtype's spacing at each element."""
    if out.numel() == 0:
        return 0.0
    y = out.to(torch.float64)
    precision, emin = FORMAT[out.dtype]
    if out.dtype != torch.float64:
        # A finite value at or past the overflow threshold (max + half an ulp)
        # correctly rounds to infinity (a huge lora_alpha, say).
        fmax = torch.finfo(out.dtype).max
        threshold = fmax + 2.0 ** (math.frexp(fmax)[1] - precision - 1)
        ref64 = torch.where(ref64.abs() >= threshold, ref64.sign() * math.inf, ref64)
    finite = torch.isfinite(y) & torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(y), torch.isfinite(ref64)) or not torch.equal(
        y[~finite].nan_to_num(0.0), ref64[~finite].nan_to_num(0.0)
    ):
        return float("inf")
    y, r = y[finite], ref64[finite]
    # The spacing between y and its neighbour on r's side: correctly rounded
    # means |y - r| is at most half of it.
    mant, exp = torch.frexp(y)
    normal = exp > emin
    gap = torch.ldexp(torch.ones_like(y), exp.clamp(min=emin) - precision)
    toward_zero = r.abs() < y.abs()
    gap = torch.where(toward_zero & normal & (mant.abs() == 0.5), gap / 2, gap)
    return float(((y - r).abs() / gap).max()) if y.numel() else 0.0
