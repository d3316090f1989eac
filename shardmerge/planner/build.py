"""The planner: headers and configs in, a schedule of shard jobs out. Pure: writes nothing.

Every check that can be made without reading weight bytes is made here, and
all problems are reported together. The steps live in their own modules:
inputs (folders and edits), memory (budget, workers, blocks), schedule (the
jobs), provenance (fingerprint, record, index) and describe.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..codecs import Kept, format_named, keep_untouched, keeps_untouched
from ..errors import InputError, PlanErrors, count
from ..execute.jobs import MergePlan, ShardJob
from ..io.checkpoint import Checkpoint
from ..options import DTYPE_CHOICES, MergeOptions, check_merge_args, output_formats
from . import embeddings, memory, provenance, schedule
from .fp8_out import fp8_config, fp8_outputs, keeps_format, kept_format_outputs, touched_only
from .inputs import Inputs, open_inputs, settle_edits
from .quantized import nf4_tensors
from .resources import probe as probe_resources


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
                f"--device {device}: only {count(torch.cuda.device_count(), 'GPU')} "
                f"{'is' if torch.cuda.device_count() == 1 else 'are'} visible."
            )
        return device
    raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def build_plan(options: MergeOptions, *, check_out: bool = True, outputs: int = 1) -> MergePlan:
    """Read headers and configs, check everything, and return the schedule.

    ``options`` are resolved (local folders) and describe one output (``separate``
    is the caller's). Raises PlanErrors (or a single ShardmergeError) listing
    every problem. ``check_out=False`` skips the checks of OUT (for verifying a
    finished OUT, or ``shardmerge plan`` without -o). ``options.workers``: shard
    jobs run in that many worker processes at once (0: in this process; None:
    1, or 0 for models under 256 MiB), capped by the budget, the shard count and
    the CPU count. ``outputs``: this plan is one of that many written together
    from one read of the base (merge --separate); they share the working memory.
    """
    base, adapters, out = options.base, options.adapter_paths, options.output
    dtype, qlora_base, max_memory = options.dtype, options.qlora_base, options.max_memory
    check_merge_args(options)
    weights = options.weights
    budget = memory.checked_budget(max_memory)
    device = resolve_device(options.device)

    out_checks = {"overwrite": options.overwrite, "resume": options.resume} if check_out else None
    allow = options.allow_nonfinite
    formats = output_formats(options)
    inputs, errors = open_inputs(
        base, adapters, out, weights, dtype, qlora_base, out_checks, formats, allow
    )
    settled, counts = settle_edits(inputs, weights, errors)
    kept = _kept(inputs, dtype, set(settled.edits))
    if kept is not None:  # untouched modules stay packed: the view holds them as stored
        inputs = replace(inputs, ckpt=kept.view, bnb4=kept.stored)
    ckpt, out_dtype = inputs.ckpt, DTYPE_CHOICES[dtype]
    resources = probe_resources(Path(out))
    errors.extend(memory.budget_problems(budget, max_memory, resources))
    if options.executor == "ray":
        # Each Ray task is one process with the whole budget, for one output (the
        # (adapter, shard) pairs of --separate are tasks of their own); workers caps those in flight.
        workers = options.workers or 0
        working = memory.working_memory(budget, 0, 1, device, resources)
    else:
        workers = memory.worker_count(options.workers, budget, ckpt.total_bytes, len(ckpt.shards))
        working = memory.working_memory(budget, workers, outputs, device, resources)
    nf4 = nf4_tensors(ckpt, settled.edits, qlora_base, errors)
    stored, jobs_ckpt = inputs.bnb4, ckpt
    if keeps_format(stored, out_dtype, options.quantize):
        # Untouched tensors and their scales are copied as stored; touched ones requantized.
        jobs_ckpt = inputs.as_stored
        fp8 = kept_format_outputs(jobs_ckpt, stored, settled.edits, options.requant_scales, errors)
        stored = touched_only(stored, fp8)
    else:
        fp8 = fp8_outputs(ckpt, options.quantize, out_dtype, settled.edits, stored, errors)
    shards = schedule.shard_jobs(
        jobs_ckpt, settled.edits, settled, out_dtype, nf4, stored, working, errors, fp8,
        kept.dtype if kept else None,
    )  # fmt: skip
    if errors:
        raise PlanErrors(errors)
    flush = memory.flush_bytes(budget, workers, outputs)
    shards = [replace(s, flush_bytes=flush) for s in shards]
    run = {"out": str(out), "device": device, "max_memory": budget, "workers": workers}
    run.update(counts=dict(counts), resources=resources, allow_nonfinite=allow)
    run.update(executor=options.executor, ray_address=options.ray_address)
    run["config_update"] = schedule.config_changes(ckpt, out_dtype, settled) + (
        (kept.setting,) if kept else ()
    )
    if jobs_ckpt is ckpt:  # a kept FP8 format keeps its quantization_config
        run["config_update"] += fp8_config(ckpt, fp8)
    plan = _assemble(
        inputs, weights, dtype, qlora_base, settled, shards, run, formats, jobs_ckpt, kept
    )
    if check_out:
        schedule.check_disk_space(plan, ckpt)
    return plan


def _assemble(
    inputs: Inputs,
    weights: list[float],
    dtype: str,
    qlora_base: str,
    settled: embeddings.Resolution,
    shards: list[ShardJob],
    run: dict,
    formats: dict[str, str],
    written: Checkpoint,
    kept: Kept | None = None,
) -> MergePlan:
    """The plan: jobs stamped with the provenance record, the output's index and config.

    ``formats``: the output-format options not at their defaults (provenance).
    ``written``: the base as the jobs read it (an FP8 base as stored when its format is kept).
    """
    ckpt, bnb4 = inputs.ckpt, inputs.bnb4
    used = provenance.adapters_used(inputs.adapters, weights)
    record = provenance.provenance_record(used, dtype, qlora_base, formats)
    allow = run["allow_nonfinite"]
    shards = [
        replace(provenance.with_metadata(s, ckpt, record), allow_nonfinite=allow) for s in shards
    ]
    return MergePlan(
        base=str(ckpt.path),
        adapters=used,
        shards=tuple(shards),
        # The base's model card describes the base; the merge writes its own.
        extra_files=tuple(n for n in ckpt.extra_files if n != "README.md"),
        # A dequantized 4-bit or FP8 base is an ordinary model now; a kept one stays quantized.
        config_drop=("quantization_config",) if bnb4 and written is ckpt and not kept else (),
        qlora_base=bnb4.format if bnb4 else qlora_base,
        index=settled.update_index(provenance.output_index(written, shards, record)),
        provenance=record,
        fingerprint=inputs.fingerprint,
        job=inputs.job,
        resumable=tuple(sorted(inputs.journal.shards)) if inputs.journal else (),
        **run,
    )


def _kept(inputs: Inputs, dtype: str, touched: set[str]) -> Kept | None:
    """Without --dtype, a base whose format can keep untouched modules packed: its mixed view."""
    stored = inputs.bnb4
    if dtype != "auto" or stored is None or inputs.as_stored is None:
        return None
    fmt = format_named(stored.format)
    if not keeps_untouched(fmt):
        return None
    return keep_untouched(inputs.as_stored, stored, fmt, touched)
