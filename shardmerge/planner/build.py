"""The planner: headers and configs in, a schedule of shard jobs out. Pure: writes nothing.

Every check that can be made without reading weight bytes is made here, and
all problems are reported together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..adapters.peft import CONV1D_MODULES, Adapter, adapter_edits, open_adapter
from ..codecs.quant import (
    Bnb4Base,
    QuantSpec,
    base_quantization,
    dequantized_view,
    nf4_targets,
    open_bnb4,
)
from ..errors import InputError, PlanErrors, ResourceError, ShardmergeError, UnsupportedAdapterError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.output import check_free_space, check_output_dir, fmt_bytes
from ..io.safetensors import (
    FLOAT_DTYPES,
    ITEMSIZE,
    NAME_OF,
    OutEntry,
    block_shape,
    encode_header,
    matrix_rows,
)
from ..io.sources import PART_CACHE_BYTES
from ..kernel import dora, factors
from ..options import DTYPE_CHOICES, TORCH_DTYPE_NAMES, check_merge_args, check_qlora_choice
from ..terms import TensorEdit
from ..version import __version__
from . import embeddings
from .resources import Resources, cgroup_memory_limit
from .resources import probe as probe_resources

# What the interpreter, torch and our own bookkeeping take before any buffer,
# for a merge in one process (measured: 0.22-0.3 GiB RSS).
BASELINE_BYTES = 320 << 20
# One more Python process with torch loaded (the parent, when workers run shards).
PROCESS_BYTES = 256 << 20
# The share of a memory cgroup's limit the default budget takes.
CGROUP_SHARE = 0.85
# The least working memory worth starting a worker process for.
MIN_WORKER_WORKING = 96 << 20
# Bytes of working memory per element of a merged row block: the input
# blocks read ahead, a wide accumulator, its error bound, the matmul product,
# the rounded output, the blocks waiting to be written and the temporaries of
# the rounding check.
MERGE_BYTES_PER_ELEMENT = 80
# Blocks beyond this gain nothing in speed and fall out of the CPU caches.
MAX_BLOCK_BYTES = 64 << 20
# Below this total size, starting a worker process costs more than it saves.
SMALL_MODEL_BYTES = 256 << 20
# The share of a GPU's free memory that row blocks may use.
VRAM_SHARE = 0.8
MIN_BUDGET = 512 << 20
# Extra working memory per element of a block whose base is NF4 round-tripped or
# dequantized first (float32 copies, code indices).
QUANT_BYTES_PER_ELEMENT = 16


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
    quant: QuantSpec | None = None
    # The shape of the base bytes [start, end) when it is not ``shape``: a
    # vocabulary resized by a replacement, or (0, ...) for a tensor the base
    # does not store (an untied lm_head; embeddings.py). Such a tensor is never
    # read from the base.
    base_shape: tuple[int, ...] | None = None

    @property
    def action(self) -> str:
        if self.edit is not None:
            worked = self.edit.terms or self.edit.scaling or self.edit.token_rows
            return "merge" if worked else "replace"
        return "copy" if self.in_dtype == self.out_dtype and not self.quant else "convert"

    @property
    def rows(self) -> int:
        """Rows in row blocks: N-D tensors are viewed as matrices (safetensors_io.matrix_rows)."""
        return matrix_rows(self.shape)

    @property
    def out_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ITEMSIZE[self.out_dtype]


@dataclass(frozen=True)
class ShardJob:
    """One input shard and the output shard made from it."""

    name: str  # relative file name, the same in base and output
    in_path: str
    tensors: tuple[TensorJob, ...]  # in file order, which is also output order
    metadata: tuple[tuple[str, str], ...]

    @property
    def out_entries(self) -> list[OutEntry]:
        return [OutEntry(t.name, t.out_dtype, t.shape) for t in self.tensors]

    @property
    def out_size(self) -> int:
        return len(encode_header(self.out_entries, dict(self.metadata))) + sum(
            t.out_bytes for t in self.tensors
        )

    @property
    def in_size(self) -> int:
        return os.path.getsize(self.in_path)


@dataclass(frozen=True)
class AdapterSpec:
    path: str
    label: str
    weight: float
    sha256: str


@dataclass(frozen=True)
class MergePlan:
    """Everything the executor needs; plain data that prints and pickles."""

    base: str
    out: str
    adapters: tuple[AdapterSpec, ...]
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


def parse_size(text: str | int | None) -> int | None:
    """'4GiB' or '4G' (binary), '4GB' (decimal), or a number of bytes -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if not m or (m.group(3) and not m.group(2)):
        raise InputError(f"cannot read memory size {text!r}; write it like 4GiB, 512MiB or 2G.")
    number, unit, binary, b = m.groups()
    base = 1024 if binary or not b else 1000
    return int(float(number) * base ** "_kmgt".index(unit or "_"))


def default_budget() -> int:
    """Half the available RAM, or most of a memory cgroup's limit; between 512 MiB and 8 GiB.

    A cgroup's limit is memory set aside for this job, so we may use most of
    it; the machine's free RAM is shared, so we take half.
    """
    shared = psutil.virtual_memory().available // 2
    limit = cgroup_memory_limit()
    dedicated = int(limit * CGROUP_SHARE) if limit else shared
    return max(MIN_BUDGET, min(8 << 30, shared, dedicated))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device} was asked for but no CUDA GPU is available.",
                hint="Use --device cpu or --device auto.",
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible."
            )
        return device
    raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def build_plan(
    base: str | os.PathLike,
    adapters: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: list[float] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_memory: int | str | None = None,
    overwrite: bool = False,
    resume: bool = True,
    check_out: bool = True,
    workers: int | None = None,
    outputs: int = 1,
    qlora_base: str = "none",
) -> MergePlan:
    """Read headers and configs, check everything, and return the schedule.

    Raises PlanErrors (or a single ShardmergeError) listing every problem.
    ``check_out=False`` skips the checks of OUT (for verifying a finished OUT).
    ``workers``: shard jobs run in that many worker processes at once (0: in
    this process; None: 1, or 0 for models under 256 MiB), capped by the
    budget, the shard count and the CPU count. ``outputs``: this plan is one
    of that many written together from one read of the base (merge
    --separate); they share the working memory. ``qlora_base`` "nf4": merge
    into the weights as a QLoRA run saw them (quant.py); a bitsandbytes 4-bit
    base folder is dequantized whatever it says.
    """
    weights = check_merge_args(adapters, weights, dtype)
    budget = parse_size(max_memory) if max_memory is not None else default_budget()
    if budget <= BASELINE_BYTES:
        raise ResourceError(
            f"the memory budget {fmt_bytes(budget)} (--max-memory) is below the {fmt_bytes(BASELINE_BYTES)} "
            "shardmerge needs before any buffer.",
            hint=f"Raise --max-memory to at least {fmt_bytes(MIN_BUDGET)}.",
        )
    device = resolve_device(device)

    errors: list[ShardmergeError] = []
    ckpt: Checkpoint | None = None
    bnb4: Bnb4Base | None = None
    try:
        ckpt, bnb4 = _open_base(base, qlora_base)
    except ShardmergeError as e:
        errors.append(e)
    opened: list[Adapter] = []
    labels: Counter = Counter()
    for path in adapters:
        try:
            a = open_adapter(path)
        except ShardmergeError as e:
            errors.append(e)
            continue
        labels[a.label] += 1
        if labels[a.label] > 1:
            a = Adapter(
                a.path,
                f"{a.label}#{labels[a.label]}",
                a.config,
                a.weights_file,
                a.tensors,
                a.sha256,
            )
        opened.append(a)
    complete_inputs = ckpt is not None and len(opened) == len(adapters)
    fingerprint = (
        job_fingerprint(ckpt, opened, weights, dtype, qlora_base) if complete_inputs else ""
    )
    journal = None
    try:
        if check_out:
            journal = check_output_dir(
                Path(out),
                Path(base),
                [Path(p) for p in adapters],
                fingerprint=fingerprint,
                overwrite=overwrite,
                resume=resume,
            )
    except ShardmergeError as e:
        errors.append(e)
    if ckpt is None or len(opened) != len(adapters):
        raise PlanErrors(errors)

    edits: dict[str, TensorEdit] = {}
    counts: Counter = Counter()
    for adapter, weight in zip(opened, weights, strict=True):
        adapter_edit, adapter_counts, adapter_errors = adapter_edits(adapter, weight, ckpt)
        errors.extend(adapter_errors)
        counts.update(adapter_counts)
        for name, edit in adapter_edit.items():
            errors.extend(_combine(edits, name, edit))
    for name, edit in edits.items():
        errors.extend(dora.plan_problems(name, edit))
    # Tied embeddings, resized vocabularies, trainable tokens: settled for all adapters at once.
    settled = embeddings.resolve(ckpt, edits) if not errors else None
    if settled is not None:
        errors.extend(settled.errors)
        edits = settled.edits
    if errors:
        raise PlanErrors(errors)

    out_dtype = DTYPE_CHOICES[dtype]
    resources = probe_resources(Path(out))
    if max_memory is not None and budget > resources.ram_available:
        errors.append(
            ResourceError(
                f"the memory budget {fmt_bytes(budget)} (--max-memory) is more than the "
                f"{fmt_bytes(resources.ram_available)} of RAM available now.",
                hint="Lower --max-memory, or leave it out to use half the available RAM.",
            )
        )
    workers = _worker_count(workers, budget, ckpt)
    working = (
        budget - BASELINE_BYTES
        if workers == 0
        else (budget - BASELINE_BYTES - PROCESS_BYTES * workers) // workers
    )
    working //= outputs
    if device.startswith("cuda"):
        # Row blocks live on the GPU while merged: keep them inside its free memory.
        _, free_vram, _ = resources.gpus[int(device.split(":")[1]) if ":" in device else 0]
        working = min(working, int(free_vram * VRAM_SHARE) // max(workers, 1))
    shards: list[ShardJob] = []
    nf4 = set(nf4_targets(ckpt, edits)) if qlora_base == "nf4" else set()
    if qlora_base == "nf4" and not nf4:
        errors.append(
            InputError(
                f"--qlora-base nf4: {ckpt.path} has none of the weights a QLoRA setup quantizes "
                "(2-D Linear weights inside a numbered layer stack such as model.layers.N), so "
                "shardmerge cannot tell which weights the adapter saw quantized.",
                hint="Merge without --qlora-base (into the 16-bit weights).",
            )
        )
    if nf4 and str(ckpt.config.get("model_type", "")) in CONV1D_MODULES:
        errors.append(
            InputError(
                f"--qlora-base nf4: {ckpt.config['model_type']} models use Conv1D layers, which "
                "bitsandbytes quantizes transposed; that layout is not supported.",
                hint="Merge without --qlora-base (into the 16-bit weights).",
            )
        )
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        jobs = []
        for t in header.tensors.values():
            target = out_dtype if (out_dtype and t.dtype in FLOAT_DTYPES) else t.dtype
            edit = edits.get(t.name)
            quant = _quant_spec(t.name, t.dtype, edit, nf4, bnb4, errors)
            shape = embeddings.output_shape(t.shape, edit)  # a resized vocabulary
            block_rows = 0
            if edit is not None or target != t.dtype or quant:
                room = working - (quant.state_bytes(t.shape) if quant else 0)
                block_rows = _block_rows(t.name, shape, edit, room, errors)
                if quant:
                    fit = block_rows
                    block_rows = _quant_block_rows(block_rows, quant.row_align(t.shape))
                    errors.extend(
                        _quant_rows_fit(t.name, shape, edit, quant, block_rows, fit, room)
                    )
            in_dtype = t.dtype
            if quant and quant.packed:  # the bytes are packed codes; t has the real shape
                in_dtype = bnb4.storage[t.name]
            jobs.append(
                TensorJob(
                    t.name, shape, in_dtype, target, t.start, t.end, edit, block_rows, quant,
                    base_shape=t.shape if shape != t.shape else None,
                )
            )  # fmt: skip
            if settled.new_tensor and settled.new_tensor[0] == t.name:
                # An untied lm_head the base does not store: written after the embedding.
                _, name, new_edit = settled.new_tensor
                new_shape = embeddings.output_shape(t.shape, new_edit)
                rows = _block_rows(name, new_shape, new_edit, working, errors)
                base_shape = (0, *new_shape[1:])
                jobs.append(
                    TensorJob(
                        name, new_shape, t.dtype, target, t.end, t.end, new_edit, rows,
                        base_shape=base_shape,
                    )
                )  # fmt: skip
        shards.append(ShardJob(shard, str(header.path), tuple(jobs), ()))
    if errors:
        raise PlanErrors(errors)

    adapter_specs = tuple(
        AdapterSpec(str(a.path), a.label, float(w), a.sha256)
        for a, w in zip(opened, weights, strict=True)
    )
    provenance = json.dumps(
        {
            "tool": "shardmerge",
            "version": __version__,
            "adapters": [
                {"name": s.label, "weight": s.weight, "sha256": s.sha256} for s in adapter_specs
            ],
            "dtype": dtype,
            **({"qlora_base": qlora_base} if qlora_base != "none" else {}),
        },
        separators=(",", ":"),
    )
    shards = [_with_metadata(s, ckpt, provenance) for s in shards]
    config_update: tuple[tuple[str, object], ...] = ()
    if out_dtype:
        keys = [k for k in ("torch_dtype", "dtype") if k in ckpt.config] or ["torch_dtype"]
        config_update = tuple((k, TORCH_DTYPE_NAMES[out_dtype]) for k in keys)
    config_update += tuple(settled.config)  # tie_word_embeddings, vocab_size
    plan = MergePlan(
        base=str(ckpt.path),
        out=str(out),
        adapters=adapter_specs,
        shards=tuple(shards),
        # The base's model card describes the base; the merge writes its own.
        extra_files=tuple(n for n in ckpt.extra_files if n != "README.md"),
        config_update=config_update,
        # A dequantized 4-bit base is an ordinary model now.
        config_drop=("quantization_config",) if bnb4 else (),
        qlora_base="bnb4" if bnb4 else qlora_base,
        index=settled.update_index(_output_index(ckpt, shards, provenance)),
        device=device,
        max_memory=budget,
        counts=dict(counts),
        provenance=provenance,
        fingerprint=fingerprint,
        workers=workers,
        resources=resources,
        resumable=tuple(sorted(journal.shards)) if journal else (),
    )
    if check_out:
        reusable = sum(
            (Path(out) / s.name).stat().st_size for s in shards if (Path(out) / s.name).is_file()
        )
        # Shards, plus the files copied beside them, the index, the journal and
        # filesystem rounding (a block per file).
        extras = sum((ckpt.path / n).stat().st_size for n in (*ckpt.extra_files, "config.json"))
        index = len(json.dumps(plan.index, indent=2)) if plan.index else 0
        slack = (len(shards) + len(ckpt.extra_files) + 8) * 4096
        check_free_space(Path(out), plan.out_bytes + extras + index + slack, reusable)
    return plan


def _open_base(base: str | os.PathLike, qlora_base: str) -> tuple[Checkpoint, Bnb4Base | None]:
    """The base folder; a bitsandbytes 4-bit one as its dequantized view (quant.py)."""
    check_qlora_choice(qlora_base)
    ckpt = open_checkpoint(base)
    if base_quantization(ckpt) != "bnb4":
        return ckpt, None
    if qlora_base != "none":
        raise InputError(
            f"--qlora-base {qlora_base}: the base {ckpt.path} is already a bitsandbytes 4-bit "
            "model; it is dequantized exactly as stored.",
            hint="Leave out --qlora-base for a 4-bit base folder.",
        )
    bnb4 = open_bnb4(ckpt)
    return dequantized_view(ckpt, bnb4), bnb4


def job_fingerprint(
    ckpt: Checkpoint,
    adapters: list[Adapter],
    weights: list[float],
    dtype: str,
    qlora_base: str = "none",
) -> str:
    """A hash of everything that decides the output bytes, and nothing else.

    Base shards by name, size and header hash; the base config; adapters by
    weights-file hash and config; weights; dtype; our version (it is in the
    output's metadata); --qlora-base when set. Device, memory budget and block
    size do not change the bytes, so a resume may use other values.
    """
    doc = {
        "version": __version__,
        "base": [[n, ckpt.headers[n].size, ckpt.headers[n].sha256] for n in ckpt.shards],
        "config": ckpt.config,
        "adapters": [[a.sha256, a.config] for a in adapters],
        "weights": [float(w) for w in weights],
        "dtype": dtype,
    }
    if qlora_base != "none":  # absent otherwise: earlier jobs keep their fingerprints
        doc["qlora_base"] = qlora_base
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _worker_count(requested: int | None, budget: int, ckpt: Checkpoint) -> int:
    if requested is None:
        # A worker costs an interpreter: not worth it for tiny models, nor
        # affordable in the smallest budgets (the merge then runs in-process).
        fits = budget - BASELINE_BYTES - PROCESS_BYTES >= MIN_WORKER_WORKING
        return 1 if ckpt.total_bytes >= SMALL_MODEL_BYTES and fits else 0
    if requested < 0:
        raise InputError(f"--workers must be 0 or more, not {requested}.")
    if requested <= 1:
        return requested
    # Each extra worker brings its own interpreter and at least one big block.
    affordable = (budget - BASELINE_BYTES) // (PROCESS_BYTES + MAX_BLOCK_BYTES)
    return max(1, min(requested, len(ckpt.shards), os.cpu_count() or 1, affordable))


def _combine(edits: dict[str, TensorEdit], name: str, edit: TensorEdit) -> list[ShardmergeError]:
    """Fold one adapter's edit of ``name`` into the edits so far."""
    old = edits.get(name)
    if old is None:
        edits[name] = edit
        return []
    if edit.scaling is not None or old.scaling is not None:
        who = [e.scaling.adapter for e in (old, edit) if e.scaling] + [
            x.adapter for e in (old, edit) for x in (e.replacement, *e.terms) if x is not None
        ]
        return [
            UnsupportedAdapterError(
                f"adapters {', '.join(sorted(set(who)))} both change {name}, and at least one "
                "scales it (IA3); PEFT defines no merge of an IA3 scaling with another adapter "
                "on the same tensor.",
                hint="Merge these adapters in separate runs, or drop one of them.",
            )
        ]
    if edit.replacement is not None or old.replacement is not None:
        who = [e.replacement.adapter for e in (old, edit) if e.replacement] + [
            t.adapter for e in (old, edit) for t in (*e.terms, *e.token_rows)
        ]
        return [
            UnsupportedAdapterError(
                f"adapters {', '.join(sorted(set(who)))} both change {name}, and at least one "
                "replaces it whole (modules_to_save or a saved tensor); the result would be ambiguous.",
                hint="Merge these adapters in separate runs, or drop one of them.",
            )
        ]
    edits[name] = TensorEdit(
        None, old.terms + edit.terms, token_rows=old.token_rows + edit.token_rows
    )
    return []


def _block_rows(
    name: str,
    shape: tuple[int, ...],
    edit: TensorEdit | None,
    working: int,
    errors: list[ShardmergeError],
) -> int:
    rows = matrix_rows(shape)
    cols = _row_elements(shape)
    factors = _factor_bytes(edit)
    per_row = cols * (MERGE_BYTES_PER_ELEMENT + dora.bytes_per_element(edit))
    room = working - factors
    if room < per_row:
        need, have = per_row + factors + BASELINE_BYTES, working + BASELINE_BYTES
        need_s, have_s = fmt_bytes(need), fmt_bytes(have)
        if need_s == have_s:  # too close to tell apart once rounded
            need_s, have_s = f"{need:,} bytes", f"{have:,} bytes"
        errors.append(
            ResourceError(
                f"the memory budget is too small for tensor {name} {list(shape)}: one row block "
                f"needs {need_s} and the budget is {have_s}.",
                hint="Raise --max-memory.",
            )
        )
        return 1
    # A block meeting many terms' rows (the experts of a fused expert tensor) would
    # hold a zero-padded copy of each one's factors (worker._slice): meet two at most.
    span = (
        min((t.rows[1] - t.rows[0] for t in edit.terms if t.rows), default=rows) if edit else rows
    )
    return max(1, min(rows, span, room // per_row, MAX_BLOCK_BYTES // per_row or 1))


def _factor_bytes(edit: TensorEdit | None) -> int:
    """Factors are held whole, in float64 at most, plus their bound vectors."""
    if edit is None:
        return 0
    return (
        sum(
            16 * (t.left.loaded_numel + (t.right.loaded_numel if t.right else 0))
            if t.form == "lowrank"
            else factors.factor_bytes(t)  # LoHa/LoKr: the built factors, often larger
            for t in edit.terms
        )
        + _part_bytes(edit)
        + factors.scaling_bytes(edit)
        + dora.fixed_bytes(edit)
        + sum(16 * r.source.numel for r in edit.token_rows)  # replaced rows, held whole
    )


def _part_bytes(edit: TensorEdit) -> int:
    """Whole adapter tensors held while parts are taken of them (sources.RefLoader)."""
    wholes = [
        r.numel * ITEMSIZE[r.dtype]
        for t in edit.terms
        for r in _term_refs(t)
        if r.part and not (len(r.part) == 1 and r.part[0][2] == 1)
    ]
    if not wholes:
        return 0
    return PART_CACHE_BYTES + max((n for n in wholes if n > PART_CACHE_BYTES), default=0)


def _term_refs(term):
    return [term.left] + ([term.right] if term.right is not None else [])


def _row_elements(shape: tuple[int, ...]) -> int:
    """Elements per row of the matrix view of a tensor (safetensors_io.block_shape)."""
    return math.prod(block_shape(shape, 1)[1:])


def tensor_working_bytes(t: TensorJob) -> int:
    """Memory a tensor job needs beyond the process baseline."""
    if t.action == "copy":
        return 0
    quant = t.quant.state_bytes(t.shape) if t.quant else 0
    return (
        t.block_rows
        * _row_elements(t.shape)
        * (
            MERGE_BYTES_PER_ELEMENT
            + dora.bytes_per_element(t.edit)
            + (QUANT_BYTES_PER_ELEMENT if t.quant else 0)
        )
        + _factor_bytes(t.edit)
        + quant
    )


def _quant_spec(
    name: str,
    dtype: str,
    edit: TensorEdit | None,
    nf4: set[str],
    bnb4: Bnb4Base | None,
    errors: list[ShardmergeError],
) -> QuantSpec | None:
    """How tensor ``name``'s base values are made (quant.py), or None: as stored."""
    if bnb4 is not None and name in bnb4.specs:
        if edit is not None and edit.replacement is not None:
            errors.append(
                UnsupportedAdapterError(
                    f"an adapter replaces {name} whole, but it is a packed 4-bit tensor of the "
                    "base; replacing a 4-bit tensor is not supported.",
                    hint="Merge into the original 16-bit base instead.",
                )
            )
        return bnb4.specs[name]
    if name in nf4 and not (edit is not None and edit.replacement is not None):
        # A replaced tensor is the adapter's own full-precision copy: no round trip.
        return QuantSpec("nf4", dtype)
    return None


def _quant_rows_fit(
    name: str,
    shape: tuple[int, ...],
    edit: TensorEdit | None,
    quant: QuantSpec,
    block_rows: int,
    fit: int,
    room: int,
) -> list[ShardmergeError]:
    """Refuse a tensor whose whole quantization blocks span more rows than the budget holds
    (a large stored blocksize over an awkward row width)."""
    held = min(block_rows, matrix_rows(shape))
    per_row = _row_elements(shape) * (
        MERGE_BYTES_PER_ELEMENT + dora.bytes_per_element(edit) + QUANT_BYTES_PER_ELEMENT
    )
    need = held * per_row + _factor_bytes(edit)
    if held <= fit or need <= room:
        return []
    return [
        ResourceError(
            f"the memory budget is too small for 4-bit tensor {name} {list(shape)}: its "
            f"quantization blocks of {quant.blocksize} values span {held} rows, which need "
            f"{fmt_bytes(need + BASELINE_BYTES)} at once; the budget is "
            f"{fmt_bytes(room + BASELINE_BYTES)}.",
            hint="Raise --max-memory.",
        )
    ]


def _quant_block_rows(rows: int, align: int) -> int:
    """Rows per block for a 4-bit base: whole quantization blocks, room for their temporaries."""
    rows = rows * MERGE_BYTES_PER_ELEMENT // (MERGE_BYTES_PER_ELEMENT + QUANT_BYTES_PER_ELEMENT)
    return max(align, rows - rows % align)


# Rough rates for the time estimate (read+write of the files; merged elements).
DISK_BYTES_PER_S = 500e6
CPU_ELEMENTS_PER_S_PER_CORE = 150e6
GPU_ELEMENTS_PER_S = 3e9


def describe(plan: MergePlan) -> dict:
    """The plan as plain data for people and for --json: shards, memory, resources, time."""
    shards = []
    for s in plan.shards:
        actions = Counter(t.action for t in s.tensors)
        worked = [t for t in s.tensors if t.action != "copy"]
        shards.append(
            {
                "name": s.name,
                "bytes_in": s.in_size,
                "bytes_out": s.out_size,
                "tensors_merged": actions["merge"] + actions["replace"],
                "tensors_converted": actions["convert"],
                "tensors_copied": actions["copy"],
                "max_block_rows": max((t.block_rows for t in worked), default=0),
                "peak_memory": BASELINE_BYTES + max(map(tensor_working_bytes, worked), default=0),
            }
        )
    per_worker = max((sh["peak_memory"] for sh in shards), default=BASELINE_BYTES)
    peak = per_worker * max(plan.workers, 1) + (PROCESS_BYTES if plan.workers else 0)
    merged_elements = sum(
        math.prod(t.shape) for s in plan.shards for t in s.tensors if t.action != "copy"
    )
    r = plan.resources
    if plan.device.startswith("cuda"):
        compute = merged_elements / GPU_ELEMENTS_PER_S
    else:
        compute = merged_elements / (CPU_ELEMENTS_PER_S_PER_CORE * (r.cpus if r else 1))
    io = sum(sh["bytes_in"] + sh["bytes_out"] for sh in shards) / DISK_BYTES_PER_S
    return {
        "base": plan.base,
        "out": plan.out,
        "adapters": [{"path": a.path, "weight": a.weight} for a in plan.adapters],
        # "nf4": these base tensors NF4 round-tripped; "bnb4": dequantized from a 4-bit folder.
        "qlora_base": plan.qlora_base,
        "quantized_tensors": sum(1 for s in plan.shards for t in s.tensors if t.quant),
        "device": plan.device,
        "workers": plan.workers,
        "budget": plan.max_memory,
        "estimated_peak_memory": peak,
        "fits": peak <= plan.max_memory,
        "bytes_out": plan.out_bytes,
        "estimated_seconds": round(max(io, compute), 1),
        "resumable_shards": list(plan.resumable),
        "modules": plan.counts,
        "tensors": plan.summary,
        "resources": None
        if r is None
        else {
            "ram_available": r.ram_available,
            "ram_total": r.ram_total,
            "disk_free": r.disk_free,
            "cpus": r.cpus,
            "gpus": [{"name": n, "free": f, "total": t} for n, f, t in r.gpus],
        },
        "shards": shards,
    }


def _with_metadata(shard: ShardJob, ckpt: Checkpoint, provenance: str) -> ShardJob:
    meta = dict(ckpt.headers[shard.name].metadata)
    meta["shardmerge"] = provenance
    return ShardJob(shard.name, shard.in_path, shard.tensors, tuple(meta.items()))


def _output_index(ckpt: Checkpoint, shards: list[ShardJob], provenance: str) -> dict | None:
    if ckpt.index is None:
        return None
    index = json.loads(json.dumps(ckpt.index))
    # Only the tensors written (a 4-bit base's quantization tensors are not).
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in ckpt.weight_map}
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(t.out_bytes for s in shards for t in s.tensors)
    metadata["shardmerge"] = json.loads(provenance)
    index["metadata"] = metadata
    return index


__all__ = ["MergePlan", "ShardJob", "TensorJob", "build_plan", "parse_size", "NAME_OF"]
