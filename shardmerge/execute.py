"""Runs a MergePlan: shard by shard, tensor by tensor, big tensors in row blocks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .checkpoint import CONFIG_NAME, INDEX_NAME
from .kernels import BlockTerm, accumulation_dtype, merge_block
from .output import OutputDir
from .plan import MergePlan, ShardJob, TensorJob
from .safetensors_io import DTYPES, ITEMSIZE, StreamWriter, TensorInfo, read_rows
from .sources import RefLoader
from .terms import TensorRef, Term

Progress = Callable[[int], None]


def execute(plan: MergePlan, *, overwrite: bool = False, progress: Progress | None = None) -> None:
    """Write the merged model described by ``plan`` into ``plan.out``."""
    out = OutputDir(Path(plan.out))
    planned = [s.name for s in plan.shards] + list(plan.extra_files) + [CONFIG_NAME]
    out.prepare(overwrite=overwrite, planned=planned)
    base = Path(plan.base)
    for name in plan.extra_files:
        out.copy_file(base / name, name)
    if plan.config_update:
        config = json.loads((base / CONFIG_NAME).read_text(encoding="utf-8"))
        config.update(dict(plan.config_update))
        out.write_bytes(CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    else:
        out.copy_file(base / CONFIG_NAME, CONFIG_NAME)
    device = torch.device(plan.device)
    for shard in plan.shards:
        tmp = out.temp_path(shard.name)
        run_shard(shard, tmp, device, progress)
        out.commit(tmp, shard.name)
    if plan.index is not None:
        out.write_bytes(
            INDEX_NAME, (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
        )
    out.finish()


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
    factors = [_load_term(term, loader, acc, device) for term in terms]
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


class _Factors:
    """A term's factors on the device in the accumulation dtype, with their bound vectors."""

    def __init__(self, term: Term, left: torch.Tensor, right: torch.Tensor | None):
        self.scale = term.scale
        self.left = left
        self.right = right
        if right is not None:
            self.left_absmax = left.abs().amax(dim=1)
            self.right_abssum = right.abs().sum(dim=0)


def _load_term(term: Term, loader: RefLoader, acc: torch.dtype, device: torch.device) -> _Factors:
    left = loader.load(term.left)
    if term.left_t:
        left = left.T
    right = None
    if term.right is not None:
        right = loader.load(term.right)
        if term.right_t:
            right = right.T
        right = right.to(device=device, dtype=acc).contiguous()
    return _Factors(term, left.to(device=device, dtype=acc).contiguous(), right)


def _slice_term(f: _Factors, row0: int, row1: int) -> BlockTerm:
    if f.right is None:
        return BlockTerm(f.left[row0:row1], None, f.scale)
    return BlockTerm(f.left[row0:row1], f.right, f.scale, f.left_absmax[row0:row1], f.right_abssum)
