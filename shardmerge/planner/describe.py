"""A plan described for people and for --json: shards, memory, resources, time."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from .memory import BASELINE_BYTES, PROCESS_BYTES, tensor_working_bytes

if TYPE_CHECKING:  # `shardmerge plan` refuses bad input before torch loads (precheck.py)
    from ..execute.jobs import MergePlan, Resources, ShardJob, TensorJob

# Rates for the time estimate, calibrated on the 70B-shaped slice (see
# docs/benchmarks.md, "Plan's time estimate"): bytes read plus written per
# second, and merged elements per second per core by the work a tensor needs.
DISK_BYTES_PER_S = 550e6
CPU_ELEMENTS_PER_S_PER_CORE = {
    "lowrank": 55e6,  # plain LoRA into a 16-bit output
    "wide": 28e6,  # a float32 output or base: float64 accumulator, exact ties
    "dora": 32e6,
    "hadamard": 33e6,  # LoHa: rank-64 float64 factors
    "kronecker": 15e6,  # LoKr: rank-512 float64 factors
    "scaling": 45e6,  # IA3
    "quant": 17e6,  # an NF4 round trip (or a 4-bit base) first
    "convert": 150e6,  # a dtype conversion only
}
# torch's threads beyond this many cores gain little: the merging thread, the
# reader and the writer take turns (a merge on 2 cores used ~1.2 of them).
CORES_PER_WORKER = 2
# Interpreter and torch start-up, planning, and the final sync.
STARTUP_S = 4.0
GPU_ELEMENTS_PER_S = 3e9


def describe(plan: MergePlan) -> dict:
    """The plan as plain data for people and for --json: shards, memory, resources, time."""
    shards = [_describe_shard(s) for s in plan.shards]
    per_worker = max((sh["peak_memory"] for sh in shards), default=BASELINE_BYTES)
    peak = per_worker * max(plan.workers, 1) + (PROCESS_BYTES if plan.workers else 0)
    r = plan.resources
    return {
        "base": plan.base,
        "out": plan.out,
        "adapters": [{"path": a.path, "weight": a.weight} for a in plan.adapters],
        # "nf4": these base tensors NF4 round-tripped; "bnb4", "fp8", "ct-fp8": dequantized
        # from a stored 4-bit or FP8 (compressed-tensors FP8) folder.
        "qlora_base": plan.qlora_base,
        "quantized_tensors": sum(1 for s in plan.shards for t in s.tensors if t.quant),
        "encoded_outputs": _describe_encoded(plan),
        "device": plan.device,
        "workers": plan.workers,
        "budget": plan.max_memory,
        "estimated_peak_memory": peak,
        "fits": peak <= plan.max_memory,
        "bytes_out": plan.out_bytes,
        "estimated_seconds": estimated_seconds(plan, shards),
        "resumable_shards": list(plan.resumable),
        "modules": plan.counts,
        "tensors": plan.summary,
        "resources": None if r is None else _describe_resources(r),
        "shards": shards,
    }


def _describe_encoded(plan: MergePlan) -> dict:
    """Tensors written in a quantized format, per method: how many, and whose scales."""
    out: dict[str, dict[str, int]] = {}
    for s in plan.shards:
        for t in s.tensors:
            if t.encode is None:
                continue
            d = out.setdefault(t.encode.method, {"tensors": 0, "kept_scales": 0, "fresh_scales": 0})
            d["tensors"] += 1
            d["kept_scales" if getattr(t.encode, "kept", None) else "fresh_scales"] += 1
    return out


def _describe_shard(s: ShardJob) -> dict:
    actions = Counter(t.action for t in s.tensors)
    worked = [t for t in s.tensors if t.action != "copy"]
    return {
        "name": s.name,
        "bytes_in": s.in_size,
        "bytes_out": s.out_size,
        "tensors_merged": actions["merge"] + actions["replace"],
        "tensors_converted": actions["convert"],
        "tensors_copied": actions["copy"],
        "max_block_rows": max((t.block_rows for t in worked), default=0),
        "peak_memory": BASELINE_BYTES + max(map(tensor_working_bytes, worked), default=0),
    }


def _describe_resources(r: Resources) -> dict:
    return {
        "ram_available": r.ram_available,
        "ram_total": r.ram_total,
        "disk_free": r.disk_free,
        "cpus": r.cpus,
        "gpus": [{"name": n, "free": f, "total": t} for n, f, t in r.gpus],
    }


def estimated_seconds(plan: MergePlan, shards: list[dict]) -> float:
    """Start-up plus the slower of reading+writing the files and merging the elements."""
    io = sum(sh["bytes_in"] + sh["bytes_out"] for sh in shards) / DISK_BYTES_PER_S
    return round(STARTUP_S + max(io, merge_seconds(plan)), 1)


def merge_seconds(plan: MergePlan) -> float:
    """The arithmetic alone: every worked tensor's elements at its kind's rate."""
    worked = [t for sh in plan.shards for t in sh.tensors if t.action != "copy"]
    if plan.device.startswith("cuda"):
        return sum(math.prod(t.shape) for t in worked) / GPU_ELEMENTS_PER_S
    r = plan.resources
    cores = min(r.cpus if r else 1, CORES_PER_WORKER * max(plan.workers, 1))
    seconds = sum(math.prod(t.shape) / CPU_ELEMENTS_PER_S_PER_CORE[work_kind(t)] for t in worked)
    return seconds / max(cores, 1)


def work_kind(t: TensorJob) -> str:
    """Which of CPU_ELEMENTS_PER_S_PER_CORE's rates a worked tensor merges at (the slowest part)."""
    e = t.edit
    if t.quant is not None:
        return "quant"
    if e is None or not (e.terms or e.scaling):
        return "convert"
    forms = {term.form for term in e.terms}
    if any(term.magnitude is not None for term in e.terms):
        return "dora"
    if "kronecker" in forms:
        return "kronecker"
    if "hadamard" in forms:
        return "hadamard"
    if e.scaling is not None:
        return "scaling"
    return "wide" if "F32" in (t.out_dtype, t.in_dtype) else "lowrank"
