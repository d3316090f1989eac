"""The merge of one tensor, block by block, as its policy (policy.py) says."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError, UnsupportedAdapterError
from ..io.safetensors import DTYPES, TensorInfo, block_shape, matrix_rows, read_rows
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
from .survival import ChangeMeter, TensorStats, compare, distance_sq

RowReader = Callable[[int, int], torch.Tensor]


class TensorMerger:
    """The per-tensor part of merging: factors on the device, replacement source, dtypes."""

    def __init__(
        self,
        t: TensorJob,
        loader: RefLoader,
        device: torch.device,
        in_path: str | None = None,
        allow_nonfinite: bool = False,
    ):
        self.t = t
        self.device = device
        self.policy = p = policy_for(t)
        self.out_dtype = p.out_dtype
        self.acc = p.acc
        self.quant = t.quant.decoder(t.shape, loader.load) if p.quant else None
        self.encoder = t.encode.encoder(t.shape, loader.load) if p.encode else None
        # Kept FP8 scales: the report counts the blocks that needed a new one.
        self.counts_fresh = getattr(t.encode, "kept", None) is not None
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
        self.allow_nonfinite = allow_nonfinite
        self.stats = TensorStats()  # survival figures, block by block (survival.py)
        self.meter = ChangeMeter()
        self._measured_finite: bool | None = None

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

    def merge(
        self,
        base: torch.Tensor,
        row0: int,
        row1: int,
        original: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows [row0, row1) merged and rounded to the output dtype, on the CPU.

        ``base`` is what the merge starts from: the stored rows as decoded, or a
        replacement's. Given ``original`` (the stored rows as decoded), a touched
        tensor's survival figures (survival.py) are added to ``self.stats``.
        A non-finite output from finite inputs is refused unless allowed.
        """
        same = original is base
        orig = original if self.kind else None
        if self.dora is not None:
            merged = self.dora.merge(base, row0, row1)
            if orig is not None:
                o = orig.to(merged.device)
                self._measure(merged, o, lambda: distance_sq(self.dora.last_value, o))
            self._check_finite(merged, base, row0)
            return merged.cpu() if merged.device.type != "cpu" else merged
        fed = base.to(self.device, non_blocking=True)
        start = fed
        if self.patch is not None:
            start = self.patch(start, row0, row1)
        if self.scaling is not None:
            start = scale_rows(start, self.scaling, self.policy.scaling.axis, row0, row1)
        meeting = self.spans.meeting(row0, row1)
        terms = [b for f in meeting if (b := block_term(f, row0, row1)) is not None]
        if self.encoder is not None:  # stored codes, correctly rounded from the exact value
            merged = self.encoder(start, terms, row0, row1)
            values = self.encoder.values(merged, row0, row1)  # what the codes decode to
            if self.counts_fresh:
                self.stats.fresh_scales = self.encoder.fresh_blocks
        else:
            merged = values = merge_block(start, terms, self.out_dtype, self.acc)
        if orig is not None:
            o = fed if same else orig.to(self.device)
            plain = start is fed and same and all(t.right is not None for t in terms)
            change = (
                (lambda: self.meter.lowrank_sq(terms))
                if plain
                else (lambda: self.meter.explicit_sq(start, o, terms))
            )
            self._measure(values, o, change)
        self._check_finite(values, fed, row0)
        return merged.cpu() if merged.device.type != "cpu" else merged

    def _measure(
        self, merged: torch.Tensor, original: torch.Tensor, change_sq: Callable[[], float]
    ) -> None:
        """Add one block's survival figures; note whether its output holds non-finite values."""
        c = compare(merged, original)
        self.stats.add(c, change_sq(), merged.numel())
        self._measured_finite = not c.nonfinite

    def _check_finite(self, merged: torch.Tensor, start: torch.Tensor, row0: int) -> None:
        """Refuse a non-finite output element whose input rows were finite (an overflow)."""
        measured, self._measured_finite = self._measured_finite, None
        if self.allow_nonfinite or measured or merged.numel() == 0:
            return
        if measured is None and not (self.kind or _narrows(start.dtype, merged.dtype)):
            return  # a conversion that cannot overflow
        out = merged.reshape(-1)
        bad = ~torch.isfinite(out)
        if not bool(bad.any()):
            return
        bad &= torch.isfinite(start.reshape(-1).to(out.device))
        hits = bad.nonzero()
        if hits.numel():
            raise nonfinite_output(self.t, int(hits[0, 0]), float(out[hits[0, 0]]), row0)


def value_name(value: float) -> str:
    """NaN, Inf or -Inf as people write them."""
    return "NaN" if value != value else ("Inf" if value > 0 else "-Inf")


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Can converting ``src`` values to ``dst`` overflow?"""
    if not (src.is_floating_point and dst.is_floating_point):
        return False
    return torch.finfo(dst).max < torch.finfo(src).max


def nonfinite_output(t: TensorJob, flat: int, value: float, row0: int) -> InputError:
    """The refusal of an output element the merge made non-finite from finite inputs."""
    row_numel = math.prod(t.shape) // t.rows if t.rows else 1  # rows as matrix_rows counts them
    index = [int(i) for i in torch.unravel_index(torch.tensor(row0 * row_numel + flat), t.shape)]
    dtype = DTYPES[t.out_dtype]
    name = str(dtype).removeprefix("torch.")
    why = (
        f"beyond {name}'s range, largest {torch.finfo(dtype).max:g}"
        if value == value
        else "Inf - Inf in the sum"
    )
    return InputError(
        f"{t.name}: the merge made {value_name(value)} at index {index} from finite inputs "
        f"({why}); the output was not completed.",
        hint=(
            "Merge to a wider --dtype (bfloat16 or float32), or pass"
            if dtype.itemsize < 4
            else "Check the adapter's scale (lora_alpha, weights), or pass"
        )
        + " --allow-nonfinite to write it anyway; add --overwrite to start the output folder over.",
    )


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
