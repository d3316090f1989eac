"""A plan described for people and for --json: shards, memory, resources, time."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from .memory import BASELINE_BYTES, PROCESS_BYTES, tensor_working_bytes

if TYPE_CHECKING:  # `shardmerge plan` refuses bad input before torch loads (precheck.py)
    from ..execute.jobs import MergePlan, Resources, ShardJob

# Rough rates for the time estimate (read+write of the files; merged elements).
DISK_BYTES_PER_S = 500e6
CPU_ELEMENTS_PER_S_PER_CORE = 150e6
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
        # "nf4": these base tensors NF4 round-tripped; "bnb4": dequantized from a 4-bit folder.
        "qlora_base": plan.qlora_base,
        "quantized_tensors": sum(1 for s in plan.shards for t in s.tensors if t.quant),
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
    """The slower of reading+writing the files and merging the elements, at rough rates."""
    merged_elements = sum(
        math.prod(t.shape) for s in plan.shards for t in s.tensors if t.action != "copy"
    )
    r = plan.resources
    if plan.device.startswith("cuda"):
        compute = merged_elements / GPU_ELEMENTS_PER_S
    else:
        compute = merged_elements / (CPU_ELEMENTS_PER_S_PER_CORE * (r.cpus if r else 1))
    io = sum(sh["bytes_in"] + sh["bytes_out"] for sh in shards) / DISK_BYTES_PER_S
    return round(max(io, compute), 1)
