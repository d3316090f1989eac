"""What identifies a merge: the job fingerprint, the provenance record, the output index."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

from ..adapters import Adapter
from ..execute.jobs import AdapterUsed, ShardJob
from ..io.checkpoint import Checkpoint
from ..version import __version__


@dataclass(frozen=True)
class JobParts:
    """Everything that decides a job's output bytes, and nothing else.

    Base shards by name, size and header hash; the base config; adapters by
    weights-file hash and config; weights; dtype; our version (it is in the
    output's metadata); --qlora-base, --quantize, --requant-scales and
    --allow-nonfinite (``formats``: --quantize and --requant-scales where not at
    their defaults). Device, memory budget and block size do not change the
    bytes, so a resume may use other values.
    """

    ckpt: Checkpoint  # the base folder as stored
    adapters: list[Adapter]
    weights: list[float]
    dtype: str
    qlora_base: str = "none"
    formats: dict[str, str] = field(default_factory=dict)
    allow_nonfinite: bool = False

    def base_shards(self) -> list[list]:
        return [
            [n, self.ckpt.headers[n].size, self.ckpt.headers[n].sha256] for n in self.ckpt.shards
        ]

    def fingerprint(self) -> str:
        """A hash of the parts (options at their defaults left out: earlier jobs keep theirs)."""
        doc = {
            "version": __version__,
            "base": self.base_shards(),
            "config": self.ckpt.config,
            "adapters": [[a.sha256, a.config] for a in self.adapters],
            "weights": [float(w) for w in self.weights],
            "dtype": self.dtype,
        }
        if self.qlora_base != "none":
            doc["qlora_base"] = self.qlora_base
        doc.update(self.formats)
        if self.allow_nonfinite:
            doc["allow_nonfinite"] = True
        return _sha256(doc)

    def description(self) -> dict:
        """The parts, readable: the journal keeps them so that a refusal of a different job
        into the same OUT can say what differs (contents by a short hash)."""
        return {
            "base": str(self.ckpt.path),
            "base weights": _sha256(self.base_shards())[:12],
            "base config": _sha256(self.ckpt.config)[:12],
            "adapters": [f"{a.path} (sha256 {a.sha256[:12]})" for a in self.adapters],
            "adapter configs": [_sha256(a.config)[:12] for a in self.adapters],
            "--weights": [float(w) for w in self.weights],
            "--dtype": self.dtype,
            "--qlora-base": self.qlora_base,
            "--quantize": self.formats.get("quantize", "none"),
            "--requant-scales": self.formats.get("requant_scales", "kept"),
            "--allow-nonfinite": self.allow_nonfinite,
            "shardmerge version": __version__,
        }


def _sha256(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def adapters_used(adapters: list[Adapter], weights: list[float]) -> tuple[AdapterUsed, ...]:
    return tuple(
        AdapterUsed(str(a.path), a.label, float(w), a.sha256)
        for a, w in zip(adapters, weights, strict=True)
    )


def provenance_record(
    used: tuple[AdapterUsed, ...],
    dtype: str,
    qlora_base: str,
    formats: dict[str, str] | None = None,
) -> str:
    """The shardmerge record of the index (and the plan), as JSON: adapters named by folder."""
    return json.dumps(
        {
            "tool": "shardmerge",
            "version": __version__,
            "adapters": [{"name": s.label, "weight": s.weight, "sha256": s.sha256} for s in used],
            "dtype": dtype,
            **({"qlora_base": qlora_base} if qlora_base != "none" else {}),
            **(formats or {}),
        },
        separators=(",", ":"),
    )


def shard_record(provenance: str) -> str:
    """The record in each output shard's metadata: what depends on content only.

    Adapter names come from folder names; shards leave them out so that the
    same merge from differently named folders writes the same shard bytes.
    """
    record = json.loads(provenance)
    record["adapters"] = [{k: v for k, v in a.items() if k != "name"} for a in record["adapters"]]
    return json.dumps(record, separators=(",", ":"))


def with_metadata(shard: ShardJob, ckpt: Checkpoint, provenance: str) -> ShardJob:
    """The shard job carrying the base shard's metadata plus the content-only record."""
    meta = dict(ckpt.headers[shard.name].metadata)
    meta["shardmerge"] = shard_record(provenance)
    return replace(shard, metadata=tuple(meta.items()))


def output_index(ckpt: Checkpoint, shards: list[ShardJob], provenance: str) -> dict | None:
    """The output's index (None for a one-file model): the tensors written, sizes, provenance."""
    if ckpt.index is None:
        return None
    index = json.loads(json.dumps(ckpt.index))
    # The tensors written, in the index's order: a quantized base's side tensors are not
    # written, and its packed tensors may be renamed (GPTQ's m.qweight is m.weight).
    stored = index["weight_map"]
    kept = {k: v for k, v in stored.items() if k in ckpt.weight_map}
    index["weight_map"] = kept | {k: v for k, v in ckpt.weight_map.items() if k not in stored}
    # Side tensors written beside their tensor (FP8 scales).
    for s in shards:
        for t in s.tensors:
            index["weight_map"].update((e.name, s.name) for e in t.out_entries[1:])
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(t.out_bytes for s in shards for t in s.tensors)
    metadata["shardmerge"] = json.loads(provenance)
    index["metadata"] = metadata
    return index
