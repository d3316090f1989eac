"""The schedule a merge runs: plain records the planner writes and the executor reads.

Frozen dataclasses that print and pickle (shard jobs go to worker processes).
This module imports neither the planner nor the executor: both import it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from ..codecs import OutputCodec, TensorCodec
from ..io.safetensors import OutEntry, encode_header, matrix_rows
from ..terms import TensorEdit


@dataclass(frozen=True)
class TensorJob:
    """One tensor of a shard: where it is, what it becomes, how it is processed."""

    name: str
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    start: int  # absolute offsets in the base shard
    end: int
    edit: TensorEdit | None = None
    block_rows: int = 0  # rows per block when the tensor is processed, not copied
    # A 4-bit base: the base values are NF4 round-tripped or dequantized first (quant.py).
    quant: TensorCodec | None = None
    # The shape of the base bytes [start, end) when it is not ``shape``: a
    # vocabulary resized by a replacement, or (0, ...) for a tensor the base
    # does not store (an untied lm_head; embeddings.py). Such a tensor is never
    # read from the base.
    base_shape: tuple[int, ...] | None = None
    # How the output is stored when not as plain values (FP8 codes and block scales).
    encode: OutputCodec | None = None

    @property
    def action(self) -> str:
        if self.edit is not None:
            worked = self.edit.terms or self.edit.scaling or self.edit.token_rows
            return "merge" if worked else "replace"
        plain = self.in_dtype == self.out_dtype and not self.quant and not self.encode
        return "copy" if plain else "convert"

    @property
    def rows(self) -> int:
        """Rows in row blocks: N-D tensors are viewed as matrices (safetensors_io.matrix_rows)."""
        return matrix_rows(self.shape)

    @property
    def out_entries(self) -> list[OutEntry]:
        """The tensors this job writes: itself, then its side tensors (scales)."""
        sides = self.encode.side_entries(self.shape) if self.encode else []
        return [OutEntry(self.name, self.out_dtype, self.shape)] + [OutEntry(*e) for e in sides]

    @property
    def out_bytes(self) -> int:
        return sum(e.nbytes for e in self.out_entries)


@dataclass(frozen=True)
class ShardJob:
    """One input shard and the output shard made from it."""

    name: str  # relative file name, the same in base and output
    in_path: str
    tensors: tuple[TensorJob, ...]  # in file order, which is also output order
    metadata: tuple[tuple[str, str], ...]
    allow_nonfinite: bool = False  # write non-finite values the merge makes (tensor.py)
    # Written bytes left in the page cache before they are synced and dropped
    # (planner/memory.py flush_bytes: a memory cgroup charges them to the job).
    flush_bytes: int = 256 << 20

    @property
    def out_entries(self) -> list[OutEntry]:
        return [e for t in self.tensors for e in t.out_entries]

    @property
    def out_size(self) -> int:
        return len(encode_header(self.out_entries, dict(self.metadata))) + sum(
            t.out_bytes for t in self.tensors
        )

    @property
    def in_size(self) -> int:
        return os.path.getsize(self.in_path)


@dataclass(frozen=True)
class AdapterUsed:
    """One adapter a plan merges, as its provenance records it."""

    path: str
    label: str
    weight: float
    sha256: str


@dataclass(frozen=True)
class Resources:
    """What this machine offered the merge when it was planned."""

    ram_available: int
    ram_total: int
    disk_free: int  # at the output folder (or its nearest existing parent)
    cpus: int
    gpus: tuple[tuple[str, int, int], ...] = field(default=())  # (name, free, total) bytes


@dataclass(frozen=True)
class MergePlan:
    """Everything the executor needs; plain data that prints and pickles."""

    base: str
    out: str
    adapters: tuple[AdapterUsed, ...]
    shards: tuple[ShardJob, ...]
    extra_files: tuple[str, ...]
    # keys of config.json to set; a dotted key reaches into text_config (embeddings.py)
    config_update: tuple[tuple[str, object], ...]
    index: dict | None  # the output index (weight_map + metadata), None for one file
    device: str
    max_memory: int
    counts: dict[str, int] = field(default_factory=dict)
    provenance: str = ""
    fingerprint: str = ""
    workers: int = 0  # worker processes running shard jobs; 0 runs them in this process
    resources: Resources | None = None
    resumable: tuple[str, ...] = ()  # shards an earlier run of this job recorded as finished
    config_drop: tuple[str, ...] = ()  # keys of config.json to remove
    qlora_base: str = "none"  # "nf4": round-tripped 16-bit base; "bnb4": a 4-bit base folder
    allow_nonfinite: bool = False  # --allow-nonfinite: no scan of the adapters, no refusal
    # "ray": shard jobs are Ray tasks (at most ``workers`` at once, 0: as the cluster fits),
    # each asking Ray for ``max_memory``; never part of the fingerprint.
    executor: str = "local"
    ray_address: str = "auto"
    job: dict = field(default_factory=dict)  # what the fingerprint covers, readable (journal)

    @property
    def out_bytes(self) -> int:
        return sum(s.out_size for s in self.shards)

    @property
    def summary(self) -> dict[str, int]:
        c: Counter = Counter()
        for s in self.shards:
            for t in s.tensors:
                c[t.action] += 1
        return dict(c)
