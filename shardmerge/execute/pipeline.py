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

from ..io.journal import crashpoint
from ..io.safetensors import DTYPES, StreamWriter, block_shape, pread_into
from ..io.sources import RefLoader
from ..runtime import tune_malloc
from .jobs import ShardJob, TensorJob
from .policy import reads_base
from .survival import ShardStats
from .tensor import TensorMerger, read_base_rows

# Called with bytes of base processed, or with the name of the shard now started.
Progress = Callable[[int | str], None]

# Row-block buffers in flight between reader and merger; each is one block.
READ_AHEAD = 2
# Output bytes in flight between merger and writer.
WRITE_BEHIND = 2
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


@dataclass(frozen=True)
class ShardResult:
    name: str
    size: int
    crc32: int
    # Per tensor kind (linear, conv1d, embedding, lora_bias, replaced): max |merged - base|.
    max_delta: dict[str, float] = field(default_factory=dict)
    # Per touched tensor: [kept, change, changed, numel] (survival.py).
    survival: dict[str, list] = field(default_factory=dict)


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
    tune_malloc()  # per-block temporaries reused, not faulted in anew (runtime.py)
    layout = _BlockLayout(jobs)
    free: queue.Queue[torch.Tensor] = queue.Queue()
    for _ in range(READ_AHEAD + 1 if layout.block_bytes else 0):
        pin = device.type == "cuda"
        free.put(torch.empty(layout.block_bytes, dtype=torch.uint8, pin_memory=pin))
    with contextlib.ExitStack() as files:
        src = files.enter_context(open(jobs[0].in_path, "rb"))
        _advise(src, _SEQUENTIAL)
        outs = [files.enter_context(open(d, "wb")) for d in dests]
        writers = [
            StreamWriter(f, j.out_entries, dict(j.metadata))
            for f, j in zip(outs, jobs, strict=True)
        ]
        deltas = _run_stages(jobs, layout, src, outs, writers, free, device, progress)
        results = []
        for job, writer, dst, dest, delta in zip(jobs, writers, outs, dests, deltas, strict=True):
            writer.close()
            dst.flush()
            _flush_and_drop(dst, 0, writer.pos)
            size = dest.stat().st_size
            results.append(ShardResult(job.name, size, writer.crc, delta.max_delta, delta.survival))
    return results


def _run_stages(
    jobs: list[ShardJob],
    layout: _BlockLayout,
    src: BinaryIO,
    outs: list[BinaryIO],
    writers: list[StreamWriter],
    free: queue.Queue,
    device: torch.device,
    progress: Progress | None,
) -> list[ShardStats]:
    """Reader and writer threads around the merger (this thread); what each output measured."""
    blocks: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    writes = [queue.Queue(maxsize=WRITE_BEHIND) for _ in jobs]
    stop = threading.Event()
    errors: list[BaseException] = []
    deltas = [ShardStats() for _ in jobs]
    reader_args = (_read_blocks, errors, stop, layout, jobs[0], src, free, blocks, stop)
    threads = [threading.Thread(target=_guard, args=reader_args, daemon=True)]
    for k, (writer, dst) in enumerate(zip(writers, outs, strict=True)):
        # Base bytes are counted once, by the first output's writer.
        counted = progress if k == 0 else None
        writer_args = (_write_blocks, errors, stop, writer, src, dst, writes[k], counted, stop)
        writer_args += (jobs[k].flush_bytes,)
        threads.append(threading.Thread(target=_guard, args=writer_args, daemon=True))
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
    return deltas


class _BlockLayout:
    """How the shared reader cuts each tensor: rows per block, and whether to read it."""

    def __init__(self, jobs: list[ShardJob]):
        self.block_rows: list[int] = []
        self.read: list[bool] = []
        for i in range(len(jobs[0].tensors)):
            worked = [j.tensors[i] for j in jobs if j.tensors[i].action != "copy"]
            self.block_rows.append(min((w.block_rows for w in worked), default=0))
            self.read.append(any(reads_base(w) for w in worked))
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
    deltas: list[ShardStats] | None = None,
) -> None:
    """Merger stage (calling thread): turns base blocks into each output's bytes, in order.

    ``deltas[k]`` collects what output k's merge measured (survival.py).
    """
    loader = RefLoader()
    mergers: dict[int, TensorMerger] = {}
    current = -1
    while True:
        item = _get(blocks, stop)
        if item is None:
            return
        i, row0, row1, buf = item
        if i != current:
            current = i
            mergers.clear()
        for k, job in enumerate(jobs):
            t = job.tensors[i]
            if t.action == "copy":
                if row0 in (None, 0) and not _put(writes[k], ("copy", t), stop):
                    return
                continue
            merger = mergers.get(k)
            if merger is None:
                merger = mergers[k] = TensorMerger(
                    t, loader, device, job.in_path, job.allow_nonfinite
                )
            original = _view_rows(buf, t, row0, row1) if buf is not None else None
            delta = deltas[k] if deltas is not None else None
            merged = _merge_rows(merger, job.in_path, original, row0, row1, delta)
            if not _put(writes[k], ("data", t, merged, row1 == t.rows), stop):
                return
            sides = merger.encoder.side_tensors() if merger.encoder and row1 == t.rows else []
            for name, side in sides:  # scales, written right after their tensor
                if not _put(writes[k], ("side", name, side), stop):
                    return
        if buf is not None:
            free.put(buf)


def _merge_rows(
    merger: TensorMerger,
    in_path: str,
    original: torch.Tensor | None,
    row0: int,
    row1: int,
    delta: ShardStats | None,
) -> torch.Tensor:
    """One block of one output merged; the tensor's figures go to ``delta`` after its last block."""
    t = merger.t
    if original is not None and merger.quant is not None:
        original = merger.quant(original, row0, row1)  # as the adapter saw it (quant.py)
    if original is not None and merger.policy.replacement is None:
        base = original
    else:
        base = merger.replacement_rows(row0, row1)
        if original is None and merger.kind and delta is not None and not t.base_shape:
            original = read_base_rows(in_path, t, row0, row1)
    # A tensor the base does not hold at this shape (resized, new) is not measured.
    measure = merger.kind and delta is not None and original is not None
    merged = merger.merge(base, row0, row1, original if measure else None)
    if measure and row1 == t.rows:
        delta.add(t.name, merger.kind, merger.stats)
    return merged


def _view_rows(buf: torch.Tensor, t: TensorJob, row0: int, row1: int) -> torch.Tensor:
    row_bytes = (t.end - t.start) // max(t.rows, 1)
    if t.quant is not None and t.quant.packed:
        return buf[: (row1 - row0) * row_bytes]  # packed 4-bit codes, decoded by the codec
    shape = block_shape(t.shape, row1 - row0)
    return buf[: (row1 - row0) * row_bytes].view(DTYPES[t.in_dtype]).view(shape)


def _write_blocks(
    writer: StreamWriter,
    src: BinaryIO,
    dst: BinaryIO,
    writes: queue.Queue,
    progress: Progress | None,
    stop: threading.Event,
    flush_every: int,
) -> None:
    """Writer stage: the output file front to back, synced and dropped every ``flush_every``."""
    flushed = 0
    started: TensorJob | None = None
    while True:
        item = _get(writes, stop)
        if item is None:
            return
        if item[0] == "side":
            writer.begin(item[1])
            writer.write(item[2])
            continue
        if item[0] == "copy":
            t = item[1]
            writer.begin(t.name)
            # In pieces: one copied embedding would leave GBs of dirty pages.
            for start in range(t.start, t.end, flush_every) or [t.start]:
                count = min(flush_every, t.end - start)
                writer.copy_from(src, start, count)
                _advise(src, _DONTNEED, start, count)
                flushed = _flush_due(dst, writer, flushed, flush_every)
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
        flushed = _flush_due(dst, writer, flushed, flush_every)


def _flush_due(dst: BinaryIO, writer: StreamWriter, flushed: int, every: int) -> int:
    """Sync and drop what was written since ``flushed`` once it reaches ``every`` bytes."""
    if writer.pos - flushed < every:
        return flushed
    dst.flush()
    _flush_and_drop(dst, flushed, writer.pos - flushed)
    return writer.pos


def _flush_and_drop(f: BinaryIO, offset: int, length: int) -> None:
    """Write a range to disk and drop it from the page cache."""
    os.fdatasync(f.fileno())
    _advise(f, _DONTNEED, offset, length)


def _advise(f: BinaryIO, advice: int | None, offset: int = 0, length: int = 0) -> None:
    """Page-cache advice where the platform has it; advisory only."""
    if advice is not None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), offset, length, advice)
