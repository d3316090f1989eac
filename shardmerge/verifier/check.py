"""Re-derive a merge from base + adapters and check an output folder against it, streaming.

Independent of the merge kernel: merged tensors are recomputed in float64
with plain BLAS and each output element must lie within half an ulp of that
(the correct-rounding bound, plus a hair for the reference's own error).
Untouched tensors must match the base byte for byte.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..execute.pipeline import load_factors
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, open_checkpoint
from ..io.journal import Journal
from ..io.safetensors import DTYPES, TensorInfo, pread_into, read_rows
from ..io.sources import RefLoader
from ..kernel import dora
from ..kernel.merge import FORMAT, cast
from ..kernel.rows import RowPatch
from ..kernel.spans import RowSpans
from ..planner.build import MergePlan, TensorJob, build_plan
from ..planner.embeddings import config_value
from .reference import reference_delta

# Correct rounding puts every element within 0.5 ulp of the exact value; the
# float64 reference is itself off by ~1e-13 ulp of a 16/32-bit output.
ULP_LIMIT = 0.5 + 1e-6
ULP_LIMIT_F64 = 4.0
# DoRA's float64 reference also sums squares over a whole row or column.
ULP_LIMIT_DORA = 0.5 + 1e-5


@dataclass
class VerifyReport:
    """What ``verify`` checked and found."""

    out: str
    tensors: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per action
    max_ulp: dict[str, float] = field(default_factory=dict)  # per term kind / replaced
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.tensors.items()))
        ulps = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.max_ulp.items())) or "none merged"
        head = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        lines = [
            f"verify {self.out}: {head}",
            f"tensors checked: {counts}",
            f"max error in ulp: {ulps}",
        ]
        lines += [f"- {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"- ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


def output_provenance(out: Path) -> dict:
    """The shardmerge record in OUT's index or single shard metadata ({} if none)."""
    ckpt = open_checkpoint(out)
    if ckpt.index is not None:
        record = (ckpt.index.get("metadata") or {}).get("shardmerge")
        if isinstance(record, dict):
            return record
    for header in ckpt.headers.values():
        try:
            return json.loads(header.metadata.get("shardmerge", "{}"))
        except ValueError:
            return {}
    return {}


def verify(
    out: str | Path,
    base: str | Path,
    adapters: list[str | Path],
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    max_memory: int | str | None = None,
    offline: bool | None = None,
) -> VerifyReport:
    """Check every tensor of a merged model folder against base + adapters.

    ``weights`` and ``dtype`` default to what the output's provenance records.
    ``base`` and ``adapters`` may be Hub ids, as for merge (``offline`` likewise).

    >>> report = shardmerge.verify("merged", "Llama-3-8B", ["my-lora"])   # doctest: +SKIP
    >>> report.ok                                                        # doctest: +SKIP
    True
    """
    from ..io.hub import resolve

    base = resolve(base, offline=offline)
    adapters = [resolve(a, offline=offline) for a in adapters]
    out = Path(out)
    if not out.is_dir():
        raise InputError(
            f"output folder {out} does not exist.", hint="Give the folder merge wrote."
        )
    journal = Journal.load(out / ".shardmerge")
    if journal is not None and journal.status != "complete":
        raise InputError(
            f"{out} holds an unfinished merge.", hint="Rerun the merge command to finish it first."
        )
    record = output_provenance(out)
    if weights is None:
        recorded = [a.get("weight") for a in record.get("adapters", [])]
        weights = recorded if len(recorded) == len(adapters) else None
    if dtype is None:
        dtype = record.get("dtype", "auto")
    qlora_base = record.get("qlora_base", "none")
    plan = build_plan(
        base, list(adapters), out, weights=weights, dtype=dtype, device="cpu",
        max_memory=max_memory, check_out=False, qlora_base=qlora_base,
    )  # fmt: skip
    report = VerifyReport(str(out))
    _check_layout(plan, out, report)
    if report.problems:
        return report
    got = open_checkpoint(out)
    loader = RefLoader()
    for shard in plan.shards:
        out_header = got.headers[shard.name]
        with open(shard.in_path, "rb") as src, open(out / shard.name, "rb") as dst:
            for t in shard.tensors:
                _check_tensor(t, src, dst, out_header.tensors[t.name], loader, report)
    return report


def _check_layout(plan: MergePlan, out: Path, report: VerifyReport) -> None:
    """Files, index, names, dtypes and shapes; no LoRA keys."""
    try:
        got = open_checkpoint(out)
    except InputError as e:
        report.problems.append(str(e))
        return
    if not (out / CONFIG_NAME).is_file():
        report.problems.append(f"{out / CONFIG_NAME} is missing.")
    elif plan.config_drop:
        config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
        kept = [k for k in plan.config_drop if k in config]
        if kept:
            report.problems.append(f"{out / CONFIG_NAME} still has {', '.join(kept)}.")
    if (out / CONFIG_NAME).is_file() and plan.config_update:
        config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
        for key, value in plan.config_update:  # tie_word_embeddings, vocab_size, dtype
            if config_value(config, key) != value:
                report.problems.append(f"{out / CONFIG_NAME}: {key} should be {value!r}.")
    if set(got.shards) != {s.name for s in plan.shards}:
        report.problems.append(
            f"shard files differ: expected {sorted(s.name for s in plan.shards)}, found {sorted(got.shards)}."
        )
        return
    if plan.index is not None:
        index = got.index or {}
        if index.get("weight_map") != plan.index["weight_map"]:
            report.problems.append(f"{out / INDEX_NAME}: weight_map differs from the base's.")
        size = (index.get("metadata") or {}).get("total_size")
        if size != plan.index["metadata"]["total_size"]:
            report.problems.append(
                f"{out / INDEX_NAME}: total_size is {size}, expected {plan.index['metadata']['total_size']}."
            )
    lora = [n for n in got.weight_map if "lora_" in n]
    if lora:
        report.problems.append(f"LoRA tensors remain in the output: {', '.join(lora[:5])}.")
    for shard in plan.shards:
        tensors = got.headers[shard.name].tensors
        expected = {e.name: e for e in shard.out_entries}
        if set(tensors) != set(expected):
            missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
            report.problems.append(
                f"{shard.name}: tensors missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}."
            )
            continue
        for name, e in expected.items():
            t = tensors[name]
            if (t.dtype, t.shape) != (e.dtype, e.shape):
                report.problems.append(
                    f"{shard.name}: {name} is {t.dtype} {list(t.shape)}, expected {e.dtype} {list(e.shape)}."
                )


def _check_tensor(t: TensorJob, src, dst, got: TensorInfo, loader: RefLoader, report) -> None:
    report.tensors[t.action] += 1
    base_info = TensorInfo(t.name, t.in_dtype, t.shape, t.start, t.end)
    rows = (
        max(t.block_rows, 1) if t.action != "copy" else max(1, (64 << 20) // max(got.row_bytes, 1))
    )
    in_buf = torch.empty(rows * max(base_info.row_bytes, 1) + 8, dtype=torch.uint8)
    out_buf = torch.empty(rows * max(got.row_bytes, 1) + 8, dtype=torch.uint8)
    edit = t.edit
    out_dtype = DTYPES[t.out_dtype]
    if edit and edit.replacement:
        ref = edit.replacement.source
        source = loader.load(ref)  # replacements are adapter tensors: modest in size
        if source.dim() >= 3:
            source = source.reshape(t.rows, -1)  # the matrix view the rows are counted in
    terms = edit.terms if edit else ()
    factors = [
        load_factors(term, loader, torch.float64, torch.device("cpu"))
        for term in terms
        if term.form not in ("hadamard", "kronecker")
    ]
    # LoHa/LoKr: PEFT's formula evaluated directly (not the merge's exact factors).
    deltas = [
        reference_delta(term, loader) for term in terms if term.form in ("hadamard", "kronecker")
    ]
    scaling = edit.scaling if edit else None
    if scaling is not None:
        vector = loader.load(scaling.vector).reshape(-1).to(torch.float64)
    kinds = {term.kind for term in terms} | ({"ia3"} if scaling is not None else set())
    kind = ",".join(sorted(kinds)) or "replaced"
    quant = t.quant.decoder(t.shape, loader.load) if t.quant else None
    patch = None
    if edit and edit.token_rows:
        patch = RowPatch(edit.token_rows, loader.load, torch.device("cpu"))

    def read_base(row0: int, row1: int) -> torch.Tensor:
        if edit and edit.replacement:
            return source[row0:row1] if source.dim() else source
        if quant is not None:  # a 4-bit base: the values the adapter saw (quant.py)
            return quant(_read_raw(src, base_info, row0, row1, in_buf, t), row0, row1)
        return read_rows(src, base_info, row0, row1, in_buf)

    dora_parts = (
        dora.parts_for(t.name, terms, factors, loader.load) if dora.has_dora(edit) else None
    )
    if dora_parts is not None:  # norms down columns need every row first
        column_sums = dora.reference_column_sums(read_base, t.rows, rows, dora_parts)
    spans = RowSpans(factors)  # expert terms: each block takes the few it meets
    for row0 in range(0, t.rows, rows):
        row1 = min(t.rows, row0 + rows)
        out_rows = read_rows(dst, got, row0, row1, out_buf)
        base_rows = read_base(row0, row1)
        if patch is not None:  # trainable tokens: stored rows copied in
            base_rows = patch(base_rows, row0, row1)
        if t.action in ("copy", "convert") or (edit and not edit.terms and not scaling):
            expected = cast(base_rows, out_dtype) if base_rows.dtype != out_dtype else base_rows
            if not torch.equal(expected.view(torch.uint8), out_rows.view(torch.uint8)):
                report.problems.append(f"{t.name}: rows {row0}-{row1} differ from the base.")
                return
            continue
        if dora_parts is not None:  # PEFT's sequential DoRA merge, plain float64
            ref64 = dora.reference_rows(base_rows, dora_parts, column_sums, row0, row1)
            factors = []
        else:
            ref64 = base_rows.to(torch.float64, copy=True)
        if scaling is not None:  # IA3: W * l, exact in float64
            v = vector[row0:row1] if scaling.axis == 0 else vector
            ref64 *= v.view(-1, *[1] * (ref64.dim() - 1)) if scaling.axis == 0 else v
        for delta in deltas:
            ref64 += delta(row0, row1)
        for f in spans.meeting(row0, row1) if factors else ():
            # A term may cover only some base rows (one expert of a fused expert tensor).
            lo, hi = f.rows if f.rows is not None else (0, t.rows)
            a, b = max(row0, lo), min(row1, hi)
            if a >= b:
                continue
            left = f.left[a - lo : b - lo]
            ref64[a - row0 : b - row0] += f.scale * (left if f.right is None else left @ f.right)
        err = _ulp_error(out_rows, ref64)
        report.max_ulp[kind] = max(report.max_ulp.get(kind, 0.0), err)
        limit = ULP_LIMIT_F64 if out_dtype == torch.float64 else ULP_LIMIT
        if dora_parts is not None and out_dtype != torch.float64:
            limit = ULP_LIMIT_DORA
        if err > limit:
            report.problems.append(
                f"{t.name}: off by {err:.3g} ulp from the formula (limit {limit})."
            )
            return


def _read_raw(src, info: TensorInfo, row0: int, row1: int, buf, t: TensorJob) -> torch.Tensor:
    """Base rows as stored: 16-bit rows, or packed 4-bit bytes."""
    if not t.quant.packed:
        return read_rows(src, info, row0, row1, buf)
    view = buf[: (row1 - row0) * info.row_bytes]
    pread_into(src, info.start + row0 * info.row_bytes, view)
    return view


def _ulp_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
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
