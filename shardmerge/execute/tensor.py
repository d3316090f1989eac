"""The merge of one tensor, block by block, as its policy (policy.py) says."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedAdapterError
from ..io.safetensors import TensorInfo, block_shape, matrix_rows, read_rows
from ..io.sources import RefLoader
from ..kernel.dora import DoraMerger
from ..kernel.dora import merger_for as dora_merger_for
from ..kernel.factors import load_scaling, scale_rows
from ..kernel.merge import merge_block
from ..kernel.rows import RowPatch
from ..kernel.spans import RowSpans
from ..terms import TensorRef
from .factors import block_term, load_factors
from .jobs import TensorJob
from .policy import joins_dora, policy_for

RowReader = Callable[[int, int], torch.Tensor]


class TensorMerger:
    """The per-tensor part of merging: factors on the device, replacement source, dtypes."""

    def __init__(
        self, t: TensorJob, loader: RefLoader, device: torch.device, in_path: str | None = None
    ):
        self.t = t
        self.device = device
        self.policy = p = policy_for(t)
        self.out_dtype = p.out_dtype
        self.acc = p.acc
        self.quant = t.quant.decoder(t.shape, loader.load) if p.quant else None
        self.patch = RowPatch(p.token_rows, loader.load, device) if p.token_rows else None
        if not p.keeps_parts:
            loader.release()  # whole tensors kept for expert parts are not needed here
        self.factors = [load_factors(term, loader, self.acc, device) for term in p.terms]
        self.spans = RowSpans(self.factors)  # expert terms: each block takes the few it meets
        self.scaling = load_scaling(p.scaling, loader, device) if p.scaling else None
        self._repl_reader: RowReader | None = None
        if p.replacement is not None:
            self._repl_reader = replacement_reader(p.replacement, loader)
        self.dora: DoraMerger | None = None
        if p.dora:
            self.dora = self._dora_merger(loader, in_path)
        # The kind reported in max_delta; None for a dtype conversion only.
        self.kind = p.delta_kind

    def replacement_rows(self, row0: int, row1: int) -> torch.Tensor:
        return self._repl_reader(row0, row1)

    def _dora_merger(self, loader: RefLoader, in_path: str | None) -> DoraMerger:
        """DoRA terms: the base rows again (norms down columns need every row first)."""
        t = self.t
        if self.scaling is not None or self.patch is not None:
            raise UnsupportedAdapterError(
                f"{t.name}: DoRA with IA3 scaling or trainable tokens on the same tensor is "
                "not supported.",
                hint="Merge these adapters in separate runs.",
            )
        if t.base_shape is not None and self._repl_reader is None:
            raise UnsupportedAdapterError(
                f"{t.name}: DoRA on a tensor the base does not store at this shape "
                f"({list(t.shape)}) is not supported.",
                hint="Merge this adapter with PEFT (merge_and_unload) instead.",
            )

        # Locals, not self: a cycle through self would keep the merger's
        # scratch buffers alive until the garbage collector runs.
        repl, quant = self._repl_reader, self.quant

        def read(row0: int, row1: int) -> torch.Tensor:
            if repl is not None:
                return repl(row0, row1)
            rows = read_base_rows(in_path, t, row0, row1)
            return quant(rows, row0, row1) if quant is not None else rows

        return dora_merger_for(
            t.name, t.shape, self.policy.terms, self.factors, loader.load, self.out_dtype,
            read if in_path is not None or repl is not None else None,
            t.block_rows, joins_dora,
        )  # fmt: skip

    def merge(self, base: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) merged and rounded to the output dtype, on the CPU."""
        if self.dora is not None:
            merged = self.dora.merge(base, row0, row1)
            return merged.cpu() if merged.device.type != "cpu" else merged
        base = base.to(self.device, non_blocking=True)
        if self.patch is not None:
            base = self.patch(base, row0, row1)
        if self.scaling is not None:
            base = scale_rows(base, self.scaling, self.policy.scaling.axis, row0, row1)
        meeting = self.spans.meeting(row0, row1)
        terms = [b for f in meeting if (b := block_term(f, row0, row1)) is not None]
        merged = merge_block(base, terms, self.out_dtype, self.acc)
        return merged.cpu() if merged.device.type != "cpu" else merged


def max_delta(merged: torch.Tensor, base: torch.Tensor) -> float:
    """max |merged - base| over a block.

    Same dtypes: the difference in that dtype (for 16-bit dtypes each
    difference is rounded to it, and so is the maximum: rounding is monotone,
    so this equals torch.dist(p=inf), which is ~7x slower for bfloat16 on CPUs).
    Otherwise a wide copy, exact. NaN anywhere gives NaN.
    """
    if merged.numel() == 0:
        return 0.0
    if merged.dtype == base.dtype:
        lo, hi = torch.aminmax(torch.sub(merged, base))
        return max(float(hi), -float(lo))
    wide = torch.promote_types(torch.promote_types(merged.dtype, base.dtype), torch.float32)
    d = merged.to(wide, copy=True)
    d.sub_(base)
    lo, hi = torch.aminmax(d)
    return max(float(hi), -float(lo))


def read_base_rows(path: str, t: TensorJob, row0: int, row1: int) -> torch.Tensor:
    """Rows of a base tensor read on their own (a replaced one for max_delta, DoRA's passes)."""
    return _read_once(path, TensorInfo(t.name, t.in_dtype, t.shape, t.start, t.end), row0, row1)


def _read_once(path: str, info: TensorInfo, row0: int, row1: int) -> torch.Tensor:
    """Rows [row0, row1) of a tensor, read into a fresh buffer."""
    buf = torch.empty((row1 - row0) * info.row_bytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        return read_rows(f, info, row0, row1, buf)


def replacement_reader(ref: TensorRef, loader: RefLoader) -> RowReader:
    """Rows of a tensor an adapter saves whole (read from its file block by block)."""
    if ref.fmt == "torch":
        whole = loader.load(ref)
        if whole.dim() >= 3:  # rows of the matrix view, as the base's (safetensors_io.matrix_rows)
            whole = whole.reshape(block_shape(tuple(whole.shape), matrix_rows(tuple(whole.shape))))
        return lambda r0, r1: whole[r0:r1] if whole.dim() else whole
    info = TensorInfo(ref.key, ref.dtype, ref.shape, ref.start, ref.end)
    return lambda r0, r1: _read_once(ref.path, info, r0, r1)
