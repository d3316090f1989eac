"""The shard and tensor jobs of a merge: what each base tensor becomes, in what blocks."""

from __future__ import annotations

import json
from pathlib import Path

from ..codecs import OutputCodec, StoredBase
from ..errors import ShardmergeError
from ..execute.jobs import MergePlan, ShardJob, TensorJob
from ..io.checkpoint import Checkpoint
from ..io.output import check_free_space
from ..io.safetensors import FLOAT_DTYPES, TensorInfo
from ..options import TORCH_DTYPE_NAMES
from ..terms import TensorEdit
from . import embeddings
from .memory import block_rows, encoded_block_rows, tensor_block_rows
from .quantized import quant_spec


def shard_jobs(
    ckpt: Checkpoint,
    edits: dict[str, TensorEdit],
    settled: embeddings.Resolution,
    out_dtype: str | None,
    nf4: set[str],
    bnb4: StoredBase | None,
    working: int,
    errors: list[ShardmergeError],
    encodes: dict[str, OutputCodec] | None = None,
    kept_dtype: str | None = None,
) -> list[ShardJob]:
    """One job per base shard, its tensors in file order; problems go to ``errors``.

    ``encodes``: tensors written in a quantized format (--quantize), by name.
    The side tensors they write (scales) replace base tensors of the same name,
    wherever the base stores them (an FP8 base's scale in another shard).
    ``kept_dtype``: a quantized base kept packed where untouched; its decoded
    (touched) modules are written in this dtype.
    """
    shards: list[ShardJob] = []
    encodes = encodes or {}
    sides = {e[0] for n, enc in encodes.items() for e in enc.side_entries(_shape(ckpt, n))}
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        jobs = []
        for t in header.tensors.values():
            if t.name in sides:
                continue
            target = out_dtype if (out_dtype and t.dtype in FLOAT_DTYPES) else t.dtype
            edit = edits.get(t.name)
            quant = quant_spec(t.name, t.dtype, edit, nf4, bnb4, errors)
            if quant is not None and kept_dtype and not out_dtype:
                target = kept_dtype
            shape = embeddings.output_shape(t.shape, edit)  # a resized vocabulary
            encode = encodes.get(t.name)
            rows = 0
            if edit is not None or target != t.dtype or quant or encode:
                rows = tensor_block_rows(t.name, shape, t.shape, edit, quant, working, errors)
            if encode is not None:
                target = encode.dtype
                rows = encoded_block_rows(t.name, shape, edit, encode, quant, working, errors)
            in_dtype = t.dtype
            if quant and quant.packed:  # the bytes are packed codes; t has the real shape
                in_dtype = bnb4.storage[t.name]
            jobs.append(
                TensorJob(
                    t.name, shape, in_dtype, target, t.start, t.end, edit, rows, quant,
                    base_shape=t.shape if shape != t.shape else None, encode=encode,
                )
            )  # fmt: skip
            if settled.new_tensor and settled.new_tensor[0] == t.name:
                jobs.append(_new_tensor_job(t, target, settled, working, errors))
        shards.append(ShardJob(shard, str(header.path), tuple(jobs), ()))
    return shards


def _shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    return ckpt.headers[ckpt.weight_map[name]].tensors[name].shape


def _new_tensor_job(
    t: TensorInfo,
    target: str,
    settled: embeddings.Resolution,
    working: int,
    errors: list[ShardmergeError],
) -> TensorJob:
    """An untied lm_head the base does not store: written after the embedding ``t``."""
    _, name, new_edit = settled.new_tensor
    new_shape = embeddings.output_shape(t.shape, new_edit)
    rows = block_rows(name, new_shape, new_edit, working, errors)
    base_shape = (0, *new_shape[1:])
    return TensorJob(
        name, new_shape, t.dtype, target, t.end, t.end, new_edit, rows, base_shape=base_shape
    )


def config_changes(
    ckpt: Checkpoint, out_dtype: str | None, settled: embeddings.Resolution
) -> tuple[tuple[str, object], ...]:
    """Keys of config.json the merge sets: the dtype, tie_word_embeddings, vocab_size."""
    config_update: tuple[tuple[str, object], ...] = ()
    if out_dtype:
        keys = [k for k in ("torch_dtype", "dtype") if k in ckpt.config] or ["torch_dtype"]
        config_update = tuple((k, TORCH_DTYPE_NAMES[out_dtype]) for k in keys)
    return config_update + tuple(settled.config)  # tie_word_embeddings, vocab_size


def check_disk_space(plan: MergePlan, ckpt: Checkpoint) -> None:
    """Refuse an OUT without room for everything the plan writes (less shards reusable)."""
    out = Path(plan.out)
    reusable = sum((out / s.name).stat().st_size for s in plan.shards if (out / s.name).is_file())
    # Shards, plus the files copied beside them, the index, the journal and
    # filesystem rounding (a block per file).
    extras = sum((ckpt.path / n).stat().st_size for n in (*ckpt.extra_files, "config.json"))
    index = len(json.dumps(plan.index, indent=2)) if plan.index else 0
    slack = (len(plan.shards) + len(ckpt.extra_files) + 8) * 4096
    check_free_space(out, plan.out_bytes + extras + index + slack, reusable)
