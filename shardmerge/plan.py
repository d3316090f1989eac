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

from . import __version__
from .adapters.peft import Adapter, adapter_edits, open_adapter
from .checkpoint import Checkpoint, open_checkpoint
from .errors import InputError, PlanErrors, ResourceError, ShardmergeError, UnsupportedAdapterError
from .output import check_free_space, check_output_dir, fmt_bytes
from .resources import Resources, cgroup_memory_limit
from .resources import probe as probe_resources
from .safetensors_io import FLOAT_DTYPES, ITEMSIZE, NAME_OF, OutEntry, encode_header
from .terms import TensorEdit

DTYPE_CHOICES = {"auto": None, "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

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

    @property
    def action(self) -> str:
        if self.edit is not None:
            return "merge" if self.edit.terms else "replace"
        return "copy" if self.in_dtype == self.out_dtype else "convert"

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

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
    config_update: tuple[tuple[str, str], ...]  # keys of config.json to set
    index: dict | None  # the output index (weight_map + metadata), None for one file
    device: str
    max_memory: int
    counts: dict[str, int] = field(default_factory=dict)
    provenance: str = ""
    fingerprint: str = ""
    workers: int = 0  # worker processes running shard jobs; 0 runs them in this process
    resources: Resources | None = None
    resumable: tuple[str, ...] = ()  # shards an earlier run of this job recorded as finished

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
) -> MergePlan:
    """Read headers and configs, check everything, and return the schedule.

    Raises PlanErrors (or a single ShardmergeError) listing every problem.
    ``check_out=False`` skips the checks of OUT (for verifying a finished OUT).
    ``workers``: shard jobs run in that many worker processes at once (0: in
    this process; None: 1, or 0 for models under 256 MiB), capped by the
    budget, the shard count and the CPU count. ``outputs``: this plan is one
    of that many written together from one read of the base (merge
    --separate); they share the working memory.
    """
    if not adapters:
        raise InputError("no adapter given; name at least one adapter folder.")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(
            f"{len(weights)} weights given for {len(adapters)} adapters; give one per adapter."
        )
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"adapter weights must be finite numbers, not {list(weights)}.")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}.")
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
    try:
        ckpt = open_checkpoint(base)
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
    fingerprint = job_fingerprint(ckpt, opened, weights, dtype) if complete_inputs else ""
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
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        jobs = []
        for t in header.tensors.values():
            target = out_dtype if (out_dtype and t.dtype in FLOAT_DTYPES) else t.dtype
            edit = edits.get(t.name)
            block_rows = 0
            if edit is not None or target != t.dtype:
                block_rows = _block_rows(t.name, t.shape, edit, working, errors)
            jobs.append(
                TensorJob(t.name, t.shape, t.dtype, target, t.start, t.end, edit, block_rows)
            )
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
        },
        separators=(",", ":"),
    )
    shards = [_with_metadata(s, ckpt, provenance) for s in shards]
    config_update: tuple[tuple[str, str], ...] = ()
    if out_dtype:
        keys = [k for k in ("torch_dtype", "dtype") if k in ckpt.config] or ["torch_dtype"]
        config_update = tuple((k, TORCH_DTYPE_NAMES[out_dtype]) for k in keys)
    plan = MergePlan(
        base=str(ckpt.path),
        out=str(out),
        adapters=adapter_specs,
        shards=tuple(shards),
        # The base's model card describes the base; the merge writes its own.
        extra_files=tuple(n for n in ckpt.extra_files if n != "README.md"),
        config_update=config_update,
        index=_output_index(ckpt, shards, provenance),
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


def job_fingerprint(
    ckpt: Checkpoint, adapters: list[Adapter], weights: list[float], dtype: str
) -> str:
    """A hash of everything that decides the output bytes, and nothing else.

    Base shards by name, size and header hash; the base config; adapters by
    weights-file hash and config; weights; dtype; our version (it is in the
    output's metadata). Device, memory budget and block size do not change
    the bytes, so a resume may use other values.
    """
    doc = {
        "version": __version__,
        "base": [[n, ckpt.headers[n].size, ckpt.headers[n].sha256] for n in ckpt.shards],
        "config": ckpt.config,
        "adapters": [[a.sha256, a.config] for a in adapters],
        "weights": [float(w) for w in weights],
        "dtype": dtype,
    }
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
    if edit.replacement is not None or old.replacement is not None:
        who = [e.replacement.adapter for e in (old, edit) if e.replacement] + [
            t.adapter for e in (old, edit) for t in e.terms
        ]
        return [
            UnsupportedAdapterError(
                f"adapters {', '.join(sorted(set(who)))} both change {name}, and at least one "
                "replaces it whole (modules_to_save or a saved tensor); the result would be ambiguous.",
                hint="Merge these adapters in separate runs, or drop one of them.",
            )
        ]
    edits[name] = TensorEdit(None, old.terms + edit.terms)
    return []


def _block_rows(
    name: str,
    shape: tuple[int, ...],
    edit: TensorEdit | None,
    working: int,
    errors: list[ShardmergeError],
) -> int:
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:])
    factors = _factor_bytes(edit)
    per_row = cols * MERGE_BYTES_PER_ELEMENT
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
    return max(1, min(rows, room // per_row, MAX_BLOCK_BYTES // per_row or 1))


def _factor_bytes(edit: TensorEdit | None) -> int:
    """Factors are held whole, in float64 at most, plus their bound vectors."""
    if edit is None:
        return 0
    return sum(16 * (t.left.numel + (t.right.numel if t.right else 0)) for t in edit.terms)


def tensor_working_bytes(t: TensorJob) -> int:
    """Memory a tensor job needs beyond the process baseline."""
    if t.action == "copy":
        return 0
    return t.block_rows * math.prod(t.shape[1:]) * MERGE_BYTES_PER_ELEMENT + _factor_bytes(t.edit)


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
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(t.out_bytes for s in shards for t in s.tensors)
    metadata["shardmerge"] = json.loads(provenance)
    index["metadata"] = metadata
    return index


__all__ = ["MergePlan", "ShardJob", "TensorJob", "build_plan", "parse_size", "NAME_OF"]
