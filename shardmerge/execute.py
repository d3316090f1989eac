"""Runs a MergePlan: shard by shard, tensor by tensor, big tensors in row blocks."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .checkpoint import CONFIG_NAME, INDEX_NAME
from .errors import Interrupted, ResourceError
from .journal import Journal, OutputLock, check_resumable, crashpoint, crc32_file
from .kernels import BlockTerm, accumulation_dtype, merge_block
from .output import OutputDir
from .plan import MergePlan, ShardJob, TensorJob
from .safetensors_io import DTYPES, ITEMSIZE, StreamWriter, TensorInfo, read_rows
from .sources import RefLoader
from .terms import TensorRef, Term

Progress = Callable[[int], None]


def execute(
    plan: MergePlan,
    *,
    overwrite: bool = False,
    resume: bool = True,
    progress: Progress | None = None,
) -> int:
    """Write the merged model described by ``plan`` into ``plan.out``; returns shards resumed.

    Holds OUT's lock throughout. Shards a previous run of the same job
    finished (and that still check out) are kept; the rest are written, each
    recorded in the journal once it is safely in place. Ctrl-C, SIGTERM and a
    full disk stop the merge with a message; a rerun of the same command
    resumes.
    """
    out = OutputDir(Path(plan.out))
    out.create()
    lock = OutputLock(out.work)
    lock.acquire()
    current: list[Path] = []
    try:
        with _sigterm_as_interrupt():
            return _execute_locked(plan, out, overwrite, resume, progress, current)
    except KeyboardInterrupt:
        _discard(current)
        done = len((Journal.load(out.work) or Journal(out.work)).shards)
        raise Interrupted(
            f"interrupted; {done} of {len(plan.shards)} shards are finished and kept in {plan.out}, "
            "which does not look like a complete model.",
            hint="Rerun the same command to resume.",
        ) from None
    except OSError as e:
        _discard(current)
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(out.path).free
        raise ResourceError(
            f"the disk is full while writing to {plan.out}: the merged model needs "
            f"{plan.out_bytes / 2**30:.2f} GiB in all and {free / 2**30:.2f} GiB is free now.",
            hint="Free some space and rerun the same command: finished shards are kept.",
        ) from None
    finally:
        lock.release()


def _execute_locked(
    plan: MergePlan,
    out: OutputDir,
    overwrite: bool,
    resume: bool,
    progress: Progress | None,
    current: list[Path],
) -> int:
    journal = Journal.load(out.work)
    if journal is not None and journal.fingerprint != plan.fingerprint and not overwrite:
        # The plan checked this too; another job may have started since.
        check_resumable(out.path, plan.fingerprint, overwrite=False, resume=resume)
    planned = [s.name for s in plan.shards] + list(plan.extra_files) + [CONFIG_NAME]
    if journal is None or journal.fingerprint != plan.fingerprint or not resume or overwrite:
        out.clear(planned)
        journal = Journal(out.work)
        journal.fingerprint = plan.fingerprint
    done = {s.name for s in plan.shards if journal.verified(out.path, s.name)}
    journal.shards = {n: e for n, e in journal.shards.items() if n in done}
    if len(done) < len(plan.shards):
        # Until every shard is back in place OUT must not look complete.
        (out.path / INDEX_NAME).unlink(missing_ok=True)
        journal.status = "running"
    journal.save()

    base = Path(plan.base)
    for name in plan.extra_files:
        out.copy_file(base / name, name)
    if plan.config_update:
        config = json.loads((base / CONFIG_NAME).read_text(encoding="utf-8"))
        config.update(dict(plan.config_update))
        out.write_bytes(CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    else:
        out.copy_file(base / CONFIG_NAME, CONFIG_NAME)
    crashpoint()
    device = torch.device(plan.device)
    for shard in plan.shards:
        if shard.name in done:
            if progress:
                progress(sum(t.end - t.start for t in shard.tensors))
            continue
        tmp = out.temp_path(shard.name)
        current[:] = [tmp]
        run_shard(shard, tmp, device, progress)
        crc = crc32_file(tmp)
        out.commit(tmp, shard.name)
        current.clear()
        crashpoint()
        journal.record(shard.name, (out.path / shard.name).stat().st_size, crc)
        crashpoint()
    if plan.index is not None:
        out.write_bytes(
            INDEX_NAME, (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
        )
        crashpoint()
    journal.status = "complete"
    journal.save()
    return len(done)


def _discard(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C while merging (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_shard(
    job: ShardJob, dest: Path, device: torch.device, progress: Progress | None = None
) -> None:
    """Stream one base shard into the output file ``dest`` (header first, then tensors)."""
    loader = RefLoader()
    largest = max(
        (
            t.block_rows * (t.end - t.start) // max(t.rows, 1)
            for t in job.tensors
            if t.action != "copy"
        ),
        default=0,
    )
    buffer = torch.empty(largest, dtype=torch.uint8)
    with open(job.in_path, "rb") as src, open(dest, "wb") as dst:
        writer = StreamWriter(dst, job.out_entries, dict(job.metadata))
        for t in job.tensors:
            writer.begin(t.name)
            if t.action == "copy":
                writer.copy_from(src, t.start, t.end - t.start)
            else:
                for block in _process(t, src, buffer, loader, device):
                    writer.write(block)
            if progress:
                progress(t.end - t.start)
            crashpoint()
        writer.close()


def _process(
    t: TensorJob, src: BinaryIO, buffer: torch.Tensor, loader: RefLoader, device: torch.device
):
    """Yield the output bytes of one tensor, a row block at a time."""
    out_dtype = DTYPES[t.out_dtype]
    edit = t.edit
    terms = edit.terms if edit else ()
    reader = _base_reader(t, src, buffer, loader)
    in_dtype = edit.replacement.source.dtype if edit and edit.replacement else t.in_dtype
    acc = accumulation_dtype(
        out_dtype, [DTYPES[in_dtype]] + [DTYPES[r.dtype] for term in terms for r in _refs(term)]
    )
    factors = [load_factors(term, loader, acc, device) for term in terms]
    for row0 in range(0, t.rows, t.block_rows):
        row1 = min(t.rows, row0 + t.block_rows)
        base = reader(row0, row1).to(device, non_blocking=False)
        block_terms = [_slice_term(f, row0, row1) for f in factors]
        merged = merge_block(base, block_terms, out_dtype, acc)
        yield merged.cpu() if merged.device.type != "cpu" else merged


def _refs(term: Term) -> list[TensorRef]:
    return [term.left] + ([term.right] if term.right is not None else [])


def _base_reader(t: TensorJob, src: BinaryIO, buffer: torch.Tensor, loader: RefLoader):
    """A function (row0, row1) -> base rows: from the shard, or from the adapter that replaces it."""
    repl = t.edit.replacement if t.edit else None
    if repl is None:
        info = TensorInfo(t.name, t.in_dtype, t.shape, t.start, t.end)
        return lambda r0, r1: read_rows(src, info, r0, r1, buffer)
    ref = repl.source
    if ref.fmt == "torch":
        whole = loader.load(ref)
        return lambda r0, r1: whole[r0:r1] if whole.dim() else whole
    info = TensorInfo(ref.key, ref.dtype, ref.shape, ref.start, ref.end)
    f = open(ref.path, "rb")  # noqa: SIM115 - lives as long as the generator using it
    row_bytes = info.row_bytes
    own = torch.empty(max(t.block_rows, 1) * max(row_bytes, ITEMSIZE[ref.dtype]), dtype=torch.uint8)
    return lambda r0, r1: read_rows(f, info, r0, r1, own)


class Factors:
    """A term's factors on the device in the accumulation dtype, with their bound vectors."""

    def __init__(self, term: Term, left: torch.Tensor, right: torch.Tensor | None):
        self.scale = term.scale
        self.left = left
        self.right = right
        if right is not None:
            self.left_absmax = left.abs().amax(dim=1)
            self.right_abssum = right.abs().sum(dim=0)


def load_factors(term: Term, loader: RefLoader, acc: torch.dtype, device: torch.device) -> Factors:
    """A term's factors, oriented so rows align with the base's, in ``acc`` on ``device``."""
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


def _slice_term(f: Factors, row0: int, row1: int) -> BlockTerm:
    if f.right is None:
        return BlockTerm(f.left[row0:row1], None, f.scale)
    return BlockTerm(f.left[row0:row1], f.right, f.scale, f.left_absmax[row0:row1], f.right_abssum)
