"""One shard job: read the base shard, merge, write the output shard — as a pipeline.

Three stages run at once, joined by bounded queues so memory stays fixed:
a reader thread fills reusable row-block buffers from the base shard, the
calling thread merges each block (CPU or CUDA), and a writer thread streams
the output file front to back (untouched tensors go file-to-file inside the
kernel). Wall time approaches the slowest stage instead of the sum.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import UnsupportedAdapterError
from ..io.journal import crashpoint
from ..io.safetensors import (
    DTYPES,
    StreamWriter,
    TensorInfo,
    block_shape,
    matrix_rows,
    pread_into,
    read_rows,
)
from ..io.sources import RefLoader
from ..kernel.dora import DoraMerger, has_dora
from ..kernel.dora import merger_for as dora_merger_for
from ..kernel.factors import build_factors, load_scaling, scale_rows
from ..kernel.merge import BlockTerm, accumulation_dtype, merge_block, underflow_risk
from ..kernel.rows import RowPatch
from ..kernel.spans import RowSpans
from ..planner.build import ShardJob, TensorJob
from ..terms import Term

# Called with bytes of base processed, or with the name of the shard now started.
Progress = Callable[[int | str], None]

# Row-block buffers in flight between reader and merger; each is one block.
READ_AHEAD = 2
# Output bytes in flight between merger and writer.
WRITE_BEHIND = 2
# Flush written data to disk and drop it from the page cache this often, so
# dirty pages never pile up (a memory cgroup counts them).
FLUSH_EVERY = 256 << 20
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


@dataclass(frozen=True)
class ShardResult:
    name: str
    size: int
    crc32: int
    # Per tensor kind (linear, conv1d, embedding, lora_bias, replaced): max |merged - base|.
    max_delta: dict[str, float] = field(default_factory=dict)


def run_shards(
    jobs: list[ShardJob], dests: list[Path], device: torch.device, progress: Progress | None = None
) -> list[ShardResult]:
    """Stream one base shard into several outputs at once, reading it only once.

    The jobs are the same base shard planned for different adapters (same
    tensors, same order); each writes its own file.
    """
    layouts = {tuple((t.name, t.shape, t.base_shape) for t in j.tensors) for j in jobs}
    if len(layouts) > 1:
        # An output with a tensor added or resized (embeddings.py) cannot share
        # the others' reader: each reads the base shard on its own.
        return [
            r
            for k, (job, dest) in enumerate(zip(jobs, dests, strict=True))
            for r in run_shards([job], [dest], device, progress if k == 0 else None)
        ]
    first = jobs[0]
    pin = device.type == "cuda"
    layout = _BlockLayout(jobs)
    free: queue.Queue[torch.Tensor] = queue.Queue()
    for _ in range(READ_AHEAD + 1 if layout.block_bytes else 0):
        free.put(torch.empty(layout.block_bytes, dtype=torch.uint8, pin_memory=pin))
    blocks: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    writes = [queue.Queue(maxsize=WRITE_BEHIND) for _ in jobs]
    stop = threading.Event()
    errors: list[BaseException] = []
    deltas: list[dict[str, float]] = [{} for _ in jobs]

    with contextlib.ExitStack() as files:
        src = files.enter_context(open(first.in_path, "rb"))
        _advise(src, _SEQUENTIAL)
        outs = [files.enter_context(open(d, "wb")) for d in dests]
        writers = [
            StreamWriter(f, j.out_entries, dict(j.metadata))
            for f, j in zip(outs, jobs, strict=True)
        ]
        threads = [
            threading.Thread(
                target=_guard,
                args=(_read_blocks, errors, stop, layout, first, src, free, blocks, stop),
                daemon=True,
            )
        ]
        for k, (writer, dst) in enumerate(zip(writers, outs, strict=True)):
            threads.append(
                threading.Thread(
                    target=_guard,
                    # Base bytes are counted once, by the first output's writer.
                    args=(
                        _write_blocks,
                        errors,
                        stop,
                        writer,
                        src,
                        dst,
                        writes[k],
                        progress if k == 0 else None,
                        stop,
                    ),
                    daemon=True,
                )
            )
        for t in threads:
            t.start()
        try:
            _merge_blocks(jobs, blocks, free, writes, device, stop, deltas)
        except _Stopped:
            pass
        except BaseException as e:
            errors.append(e)
            stop.set()
        finally:
            for q in writes:
                _put(q, None, stop)  # end of stream for the writers
            for t in threads[1:]:
                t.join()
            stop.set()
            _drain(blocks)
            threads[0].join()
        if errors:
            raise errors[0]
        results = []
        for job, writer, dst, dest, delta in zip(jobs, writers, outs, dests, deltas, strict=True):
            writer.close()
            dst.flush()
            _flush_and_drop(dst, 0, writer.pos)
            results.append(ShardResult(job.name, dest.stat().st_size, writer.crc, delta))
    return results


class _BlockLayout:
    """How the shared reader cuts each tensor: rows per block, and whether to read it."""

    def __init__(self, jobs: list[ShardJob]):
        self.block_rows: list[int] = []
        self.read: list[bool] = []
        for i in range(len(jobs[0].tensors)):
            worked = [j.tensors[i] for j in jobs if j.tensors[i].action != "copy"]
            self.block_rows.append(min((w.block_rows for w in worked), default=0))
            self.read.append(any(not (w.edit and w.edit.replacement) for w in worked))
        self.block_bytes = max(
            (
                rows * ((t.end - t.start) // max(t.rows, 1))
                for t, rows, read in zip(jobs[0].tensors, self.block_rows, self.read, strict=True)
                if read
            ),
            default=0,
        )


def _guard(fn, errors: list[BaseException], stop: threading.Event, *args) -> None:
    try:
        fn(*args)
    except _Stopped:
        return
    except BaseException as e:  # handed to the calling thread
        errors.append(e)
        stop.set()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping; False when it is."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if stop.is_set():
                return False


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped from None


class _Stopped(Exception):
    """Another stage failed; this one just ends."""


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _read_blocks(
    layout: _BlockLayout, job: ShardJob, src: BinaryIO, free: queue.Queue, blocks: queue.Queue, stop
) -> None:
    """Reader stage: (index, row0, row1, buffer) for every block; row0 None for copies."""
    try:
        for i, t in enumerate(job.tensors):
            rows_per_block = layout.block_rows[i]
            if not rows_per_block:
                if not _put(blocks, (i, None, None, None), stop):
                    return
                continue
            row_bytes = (t.end - t.start) // max(t.rows, 1)
            for row0 in range(0, t.rows, rows_per_block) or [0]:  # an empty tensor: one block
                row1 = min(t.rows, row0 + rows_per_block)
                buf = None
                if layout.read[i]:
                    buf = _get(free, stop)
                    pread_into(src, t.start + row0 * row_bytes, buf[: (row1 - row0) * row_bytes])
                if not _put(blocks, (i, row0, row1, buf), stop):
                    return
            if layout.read[i]:
                _advise(src, _DONTNEED, t.start, t.end - t.start)
        _put(blocks, None, stop)
    except _Stopped:
        return


def _merge_blocks(
    jobs: list[ShardJob],
    blocks: queue.Queue,
    free: queue.Queue,
    writes: list[queue.Queue],
    device: torch.device,
    stop: threading.Event,
    deltas: list[dict[str, float]] | None = None,
) -> None:
    """Merger stage (calling thread): turns base blocks into each output's bytes, in order.

    ``deltas[k]`` collects output k's largest |merged - base| per tensor kind.
    """
    loader = RefLoader()
    states: dict[int, _TensorState] = {}
    current = -1
    while True:
        item = _get(blocks, stop)
        if item is None:
            return
        i, row0, row1, buf = item
        if i != current:
            current = i
            states.clear()
        for k, job in enumerate(jobs):
            t = job.tensors[i]
            if t.action == "copy":
                if row0 in (None, 0) and not _put(writes[k], ("copy", t), stop):
                    return
                continue
            state = states.get(k)
            if state is None:
                state = states[k] = _TensorState(t, loader, device, job.in_path)
            original = _view_rows(buf, t, row0, row1) if buf is not None else None
            if original is not None and state.quant is not None:
                original = state.quant(original, row0, row1)  # as the adapter saw it (quant.py)
            if original is not None and not (t.edit and t.edit.replacement):
                base = original
            else:
                base = state.replacement_rows(row0, row1)
                if original is None and state.kind and deltas is not None and not t.base_shape:
                    original = _read_rows(job.in_path, t, row0, row1)
            merged = state.merge(base, row0, row1)
            # A tensor the base does not hold at this shape (resized, new) has no delta.
            if state.kind and deltas is not None and original is not None:
                d = state.max_delta(merged, original)
                if d > deltas[k].get(state.kind, -1.0) or d != d:  # NaN sticks
                    deltas[k][state.kind] = d
            if not _put(writes[k], ("data", t, merged, row1 == t.rows), stop):
                return
        if buf is not None:
            free.put(buf)


def _read_rows(path: str, t: TensorJob, row0: int, row1: int) -> torch.Tensor:
    """Rows of a base tensor the merge does not need (it is replaced), for max_delta."""
    return _read_once(path, TensorInfo(t.name, t.in_dtype, t.shape, t.start, t.end), row0, row1)


def _read_once(path: str, info: TensorInfo, row0: int, row1: int) -> torch.Tensor:
    """Rows [row0, row1) of a tensor, read into a fresh buffer."""
    buf = torch.empty((row1 - row0) * info.row_bytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        return read_rows(f, info, row0, row1, buf)


def _view_rows(buf: torch.Tensor, t: TensorJob, row0: int, row1: int) -> torch.Tensor:
    row_bytes = (t.end - t.start) // max(t.rows, 1)
    if t.quant is not None and t.quant.packed:
        return buf[: (row1 - row0) * row_bytes]  # packed 4-bit codes, decoded by the codec
    shape = block_shape(t.shape, row1 - row0)
    return buf[: (row1 - row0) * row_bytes].view(DTYPES[t.in_dtype]).view(shape)


class _TensorState:
    """The per-tensor part of merging: factors on the device, replacement source, dtypes."""

    def __init__(
        self, t: TensorJob, loader: RefLoader, device: torch.device, in_path: str | None = None
    ):
        self.t = t
        self.device = device
        self.out_dtype = DTYPES[t.out_dtype]
        edit = t.edit
        terms = edit.terms if edit else ()
        self.repl = edit.replacement.source if edit and edit.replacement else None
        in_dtype = self.repl.dtype if self.repl else t.in_dtype
        self.quant = t.quant.decoder(t.shape, loader.load) if t.quant else None
        if self.quant is not None:
            in_dtype = t.quant.dtype  # packed codes decode to this
        self.acc = accumulation_dtype(
            self.out_dtype,
            [DTYPES[in_dtype]] + [DTYPES[r.dtype] for term in terms for r in _refs(term)],
        )
        self.patch = (
            RowPatch(edit.token_rows, loader.load, device) if edit and edit.token_rows else None
        )
        if self.patch is not None:  # replaced rows must reach the rounding exactly
            self.acc = accumulation_dtype(self.out_dtype, [self.acc, self.patch.dtype])
        if edit and (edit.scaling or any(term.form in ("hadamard", "kronecker") for term in terms)):
            # LoHa/LoKr factors hold products of two stored values (up to 48
            # bits) and IA3 scales the base exactly: float64 keeps them exact.
            self.acc = torch.float64
        if has_dora(edit):
            self.acc = torch.float64  # dora.py works in float64 with its own error bounds
        if not any(r.part for term in terms for r in _refs(term)):
            loader.release()  # whole tensors kept for expert parts are not needed here
        self.factors = [load_factors(term, loader, self.acc, device) for term in terms]
        self.spans = RowSpans(self.factors)  # expert terms: each block takes the few it meets
        self.scaling = None
        if edit and edit.scaling:
            self.scaling = load_scaling(edit.scaling, loader, device)
        self._repl_reader: Callable[[int, int], torch.Tensor] | None = None
        if self.repl is not None:
            self._repl_reader = _replacement_reader(self.repl, loader)
        self.dora: DoraMerger | None = None
        if has_dora(edit):
            self.dora = self._dora_merger(terms, loader, in_path)
        # The kind reported in max_delta; None for a dtype conversion only.
        kinds = sorted(
            {term.kind for term in terms} | ({"ia3"} if self.scaling is not None else set())
        )
        self.kind = "replaced" if self.repl is not None else ("+".join(kinds) or None)
        if self.patch is not None and self.kind is None:
            self.kind = "trainable_tokens"

    def replacement_rows(self, row0: int, row1: int) -> torch.Tensor:
        return self._repl_reader(row0, row1)

    def _dora_merger(self, terms, loader: RefLoader, in_path: str | None) -> DoraMerger:
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
            rows = _read_rows(in_path, t, row0, row1)
            return quant(rows, row0, row1) if quant is not None else rows

        return dora_merger_for(
            t.name, t.shape, terms, self.factors, loader.load, self.out_dtype,
            read if in_path is not None or repl is not None else None,
            t.block_rows,
        )  # fmt: skip

    def merge(self, base: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        if self.dora is not None:
            merged = self.dora.merge(base, row0, row1)
            return merged.cpu() if merged.device.type != "cpu" else merged
        base = base.to(self.device, non_blocking=True)
        if self.patch is not None:
            base = self.patch(base, row0, row1)
        if self.scaling is not None:
            base = scale_rows(base, self.scaling, self.t.edit.scaling.axis, row0, row1)
        meeting = self.spans.meeting(row0, row1)
        terms = [b for f in meeting if (b := _slice(f, row0, row1)) is not None]
        merged = merge_block(base, terms, self.out_dtype, self.acc)
        return merged.cpu() if merged.device.type != "cpu" else merged

    @staticmethod
    def max_delta(merged: torch.Tensor, base: torch.Tensor) -> float:
        """max |merged - base| over a block.

        Same dtypes: one fused pass (torch.dist, p=inf; for 16-bit dtypes the
        result is rounded to that dtype). Otherwise a wide copy, exact.
        """
        if merged.numel() == 0:
            return 0.0
        if merged.dtype == base.dtype:
            return float(torch.dist(merged, base, float("inf")))
        wide = torch.promote_types(torch.promote_types(merged.dtype, base.dtype), torch.float32)
        d = merged.to(wide, copy=True)
        d.sub_(base)
        lo, hi = torch.aminmax(d)
        return max(float(hi), -float(lo))


def _refs(term: Term):
    return [term.left] + ([term.right] if term.right is not None else [])


def _replacement_reader(ref, loader: RefLoader) -> Callable[[int, int], torch.Tensor]:
    """Rows of a tensor an adapter saves whole (read from its file block by block)."""
    if ref.fmt == "torch":
        whole = loader.load(ref)
        if whole.dim() >= 3:  # rows of the matrix view, as the base's (safetensors_io.matrix_rows)
            whole = whole.reshape(block_shape(tuple(whole.shape), matrix_rows(tuple(whole.shape))))
        return lambda r0, r1: whole[r0:r1] if whole.dim() else whole
    info = TensorInfo(ref.key, ref.dtype, ref.shape, ref.start, ref.end)
    return lambda r0, r1: _read_once(ref.path, info, r0, r1)


def _write_blocks(
    writer: StreamWriter,
    src: BinaryIO,
    dst: BinaryIO,
    writes: queue.Queue,
    progress: Progress | None,
    stop: threading.Event,
) -> None:
    """Writer stage: the output file front to back."""
    flushed = 0
    started: TensorJob | None = None
    while True:
        item = _get(writes, stop)
        if item is None:
            return
        if item[0] == "copy":
            t = item[1]
            writer.begin(t.name)
            writer.copy_from(src, t.start, t.end - t.start)
            _advise(src, _DONTNEED, t.start, t.end - t.start)
            done = True
        else:
            _, t, merged, done = item
            if t is not started:
                writer.begin(t.name)
                started = t
            writer.write(merged)
        if done:
            if progress:
                progress(t.end - t.start)
            crashpoint()
        if writer.pos - flushed >= FLUSH_EVERY:
            dst.flush()
            _flush_and_drop(dst, flushed, writer.pos - flushed)
            flushed = writer.pos


def _flush_and_drop(f: BinaryIO, offset: int, length: int) -> None:
    """Write a range to disk and drop it from the page cache."""
    os.fdatasync(f.fileno())
    _advise(f, _DONTNEED, offset, length)


def _advise(f: BinaryIO, advice: int | None, offset: int = 0, length: int = 0) -> None:
    """Page-cache advice where the platform has it; advisory only."""
    if advice is not None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), offset, length, advice)


class Factors:
    """A term's factors on the device in the accumulation dtype, with their bound vectors."""

    def __init__(self, term: Term, left: torch.Tensor, right: torch.Tensor | None):
        self.scale = term.scale
        self.left = left
        self.right = right
        self.rows = term.rows  # base rows (of the matrix view) the term covers; None: all
        self.may_underflow = underflow_risk(left, right, term.scale, left.dtype)
        if right is not None:
            self.left_absmax = left.abs().amax(dim=1)
            self.right_abssum = right.abs().sum(dim=0)


def load_factors(term: Term, loader: RefLoader, acc: torch.dtype, device: torch.device) -> Factors:
    """A term's factors, oriented so rows align with the base's, in ``acc`` on ``device``.

    LoHa/LoKr terms get exact float64 factors built from theirs, whatever ``acc``.
    """
    if term.form in ("hadamard", "kronecker"):
        left, right = build_factors(term, loader)
        if right is not None:
            right = right.to(device).contiguous()
        return Factors(term, left.to(device).contiguous(), right)
    left = loader.load(term.left)
    if term.left_t:
        left = left.T
    right = None
    if term.right is not None:
        right = loader.load(term.right)
        if term.right_t:
            right = right.T
        right = right.to(device=device, dtype=acc).contiguous()
    return Factors(term, left.to(device=device, dtype=acc).contiguous(), right)


def _slice(f: Factors, row0: int, row1: int) -> BlockTerm | None:
    """The term on base rows [row0, row1); None when it covers none of them.

    A term covering only part of the block (one expert of a fused expert
    tensor) gets zero rows elsewhere: they add exact zeros.
    """
    if f.rows is None:
        lo, start, stop = 0, row0, row1
    else:
        lo, hi = f.rows
        start, stop = max(row0, lo), min(row1, hi)
        if start >= stop:
            return None
    left = f.left[start - lo : stop - lo]
    absmax = f.left_absmax[start - lo : stop - lo] if f.right is not None else None
    if (start, stop) != (row0, row1):
        left = _pad_rows(left, start - row0, row1 - row0)
        absmax = _pad_rows(absmax, start - row0, row1 - row0) if absmax is not None else None
    if f.right is None:
        return BlockTerm(left, None, f.scale, may_underflow=f.may_underflow)
    return BlockTerm(left, f.right, f.scale, absmax, f.right_abssum, f.may_underflow)


def _pad_rows(t: torch.Tensor, at: int, rows: int) -> torch.Tensor:
    """``t`` placed at row ``at`` of ``rows`` rows of zeros."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[at : at + t.shape[0]] = t
    return out
