"""The memory model of a merge: the budget, worker processes, and rows per block.

What one tensor holds whole while it is merged (factors, DoRA's vectors,
parts' sources) and its extra bytes per element come from the merge policy
(execute/policy.py); the rest of the model is here.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING

import psutil

from ..errors import InputError, ResourceError, ShardmergeError
from ..io.output import fmt_bytes
from ..io.safetensors import block_shape, matrix_rows
from ..terms import TensorEdit
from .resources import cgroup_memory_limit

if TYPE_CHECKING:  # the options and budget checks run before torch is imported (precheck.py)
    from ..codecs import OutputCodec, TensorCodec
    from ..execute.jobs import Resources, TensorJob

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
# The least budget a refusal advises: the baseline and room for a row block of a
# small model (the demo model merges in it; wider rows are the planner's refusal).
SMALLEST_BUDGET = BASELINE_BYTES + (16 << 20)
# Extra working memory per element of a block whose base is NF4 round-tripped or
# dequantized first (float32 copies, code indices).
QUANT_BYTES_PER_ELEMENT = 16


# Written bytes each writer leaves in the page cache before it syncs them to
# disk and drops them. A memory cgroup charges page cache to the job, and
# reclaiming dirty pages at its limit waits on writeback: with 256 MiB between
# flushes a 512 MiB cgroup merge took 358 s against ~45 s. So the interval is a
# share of the budget, split between the writers running at once.
MAX_FLUSH_BYTES = 256 << 20
MIN_FLUSH_BYTES = 16 << 20
FLUSH_SHARE = 8


def flush_bytes(budget: int, workers: int, outputs: int) -> int:
    """Bytes each output writer may leave unsynced in the page cache (see FLUSH_SHARE)."""
    writers = max(workers, 1) * max(outputs, 1)
    return max(MIN_FLUSH_BYTES, min(MAX_FLUSH_BYTES, budget // (FLUSH_SHARE * writers)))


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


def checked_budget(max_memory: int | str | None) -> int:
    """The budget in bytes (--max-memory, or the default); refused below the baseline."""
    budget = parse_size(max_memory) if max_memory is not None else default_budget()
    if budget <= BASELINE_BYTES:
        raise ResourceError(
            f"the memory budget {fmt_bytes(budget)} (--max-memory) is below the "
            f"{fmt_bytes(BASELINE_BYTES)} shardmerge needs before any buffer.",
            hint=f"Raise --max-memory to at least {fmt_bytes(SMALLEST_BUDGET)} (enough for a "
            "small model; the plan then says if the widest tensor needs more).",
        )
    return budget


def budget_problems(
    budget: int, max_memory: int | str | None, resources: Resources
) -> list[ShardmergeError]:
    """A budget asked for that the machine does not have now."""
    if max_memory is None or budget <= resources.ram_available:
        return []
    return [
        ResourceError(
            f"the memory budget {fmt_bytes(budget)} (--max-memory) is more than the "
            f"{fmt_bytes(resources.ram_available)} of RAM available now.",
            hint="Lower --max-memory, or leave it out to use half the available RAM.",
        )
    ]


def worker_count(requested: int | None, budget: int, total_bytes: int, shards: int) -> int:
    """Worker processes for a model of ``total_bytes`` in ``shards`` shards (0: in-process)."""
    if requested is None:
        # A worker costs an interpreter: not worth it for tiny models, nor
        # affordable in the smallest budgets (the merge then runs in-process).
        fits = budget - BASELINE_BYTES - PROCESS_BYTES >= MIN_WORKER_WORKING
        return 1 if total_bytes >= SMALL_MODEL_BYTES and fits else 0
    if requested < 0:
        raise InputError(f"--workers must be 0 or more, not {requested}.")
    if requested <= 1:
        return requested
    # Each extra worker brings its own interpreter and at least one big block.
    affordable = (budget - BASELINE_BYTES) // (PROCESS_BYTES + MAX_BLOCK_BYTES)
    return max(1, min(requested, shards, os.cpu_count() or 1, affordable))


def working_memory(
    budget: int, workers: int, outputs: int, device: str, resources: Resources
) -> int:
    """Bytes one shard job may use for blocks and held tensors, beyond the baseline."""
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
    return working


def block_rows(
    name: str,
    shape: tuple[int, ...],
    edit: TensorEdit | None,
    working: int,
    errors: list[ShardmergeError],
) -> int:
    """Rows per block of a worked tensor in ``working`` bytes; a ResourceError if none fit."""
    from ..execute import policy  # imports torch: not at module level (precheck.py)

    rows = matrix_rows(shape)
    cols = row_elements(shape)
    factors = policy.held_bytes(edit)
    per_row = cols * (MERGE_BYTES_PER_ELEMENT + policy.dora_bytes_per_element(edit))
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
    # hold a zero-padded copy of each one's factors (execute/factors.py): meet two at most.
    span = (
        min((t.rows[1] - t.rows[0] for t in edit.terms if t.rows), default=rows) if edit else rows
    )
    return max(1, min(rows, span, room // per_row, MAX_BLOCK_BYTES // per_row or 1))


def row_elements(shape: tuple[int, ...]) -> int:
    """Elements per row of the matrix view of a tensor (safetensors_io.block_shape)."""
    return math.prod(block_shape(shape, 1)[1:])


def tensor_working_bytes(t: TensorJob) -> int:
    """Memory a tensor job needs beyond the process baseline."""
    from ..execute import policy  # imports torch: not at module level (precheck.py)

    if t.action == "copy":
        return 0
    quant = t.quant.state_bytes(t.shape) if t.quant else 0
    if t.encode is not None:  # the encoder's own per-element bytes and held state
        per_element = t.encode.bytes_per_element + (QUANT_BYTES_PER_ELEMENT if t.quant else 0)
        held = policy.held_bytes(t.edit) + quant + t.encode.state_bytes(t.shape)
        return t.block_rows * row_elements(t.shape) * per_element + held
    return (
        t.block_rows
        * row_elements(t.shape)
        * (
            MERGE_BYTES_PER_ELEMENT
            + policy.dora_bytes_per_element(t.edit)
            + (QUANT_BYTES_PER_ELEMENT if t.quant else 0)
        )
        + policy.held_bytes(t.edit)
        + quant
    )


def encoded_block_rows(
    name: str,
    shape: tuple[int, ...],
    edit: TensorEdit | None,
    encode: OutputCodec,
    quant: TensorCodec | None,
    working: int,
    errors: list[ShardmergeError],
) -> int:
    """Rows per block of a tensor written through ``encode``: whole scale blocks within
    the budget; a ResourceError if one row of scale blocks does not fit."""
    from ..execute import policy  # imports torch: not at module level (precheck.py)

    per_row = row_elements(shape) * (
        encode.bytes_per_element + (QUANT_BYTES_PER_ELEMENT if quant else 0)
    )
    held = policy.held_bytes(edit) + encode.state_bytes(shape)
    held += quant.state_bytes(shape) if quant else 0
    align = encode.row_align(shape)
    fit = max(0, working - held) // max(per_row, 1)
    fit = min(fit, max(MAX_BLOCK_BYTES // max(per_row, 1), 1))
    rows = min(matrix_rows(shape), max(align, fit - fit % align))
    need = rows * per_row + held
    if need > working:
        errors.append(
            ResourceError(
                f"the memory budget is too small for tensor {name} {list(shape)} written as "
                f"{encode.method}: its scale blocks span {align} rows, which need "
                f"{fmt_bytes(need + BASELINE_BYTES)} at once; the budget is "
                f"{fmt_bytes(working + BASELINE_BYTES)}.",
                hint="Raise --max-memory.",
            )
        )
    return rows


def quant_rows_fit(
    name: str,
    shape: tuple[int, ...],
    edit: TensorEdit | None,
    quant: TensorCodec,
    block_rows: int,
    fit: int,
    room: int,
) -> list[ShardmergeError]:
    """Refuse a tensor whose whole quantization blocks span more rows than the budget holds
    (a large stored blocksize over an awkward row width)."""
    from ..execute import policy  # imports torch: not at module level (precheck.py)

    held = min(block_rows, matrix_rows(shape))
    per_row = row_elements(shape) * (
        MERGE_BYTES_PER_ELEMENT + policy.dora_bytes_per_element(edit) + QUANT_BYTES_PER_ELEMENT
    )
    need = held * per_row + policy.held_bytes(edit)
    if held <= fit or need <= room:
        return []
    return [
        ResourceError(
            f"the memory budget is too small for quantized tensor {name} {list(shape)}: its "
            f"quantization blocks of {quant.blocksize} values span {held} rows, which need "
            f"{fmt_bytes(need + BASELINE_BYTES)} at once; the budget is "
            f"{fmt_bytes(room + BASELINE_BYTES)}.",
            hint="Raise --max-memory.",
        )
    ]


def quant_block_rows(rows: int, align: int) -> int:
    """Rows per block for a 4-bit base: whole quantization blocks, room for their temporaries."""
    rows = rows * MERGE_BYTES_PER_ELEMENT // (MERGE_BYTES_PER_ELEMENT + QUANT_BYTES_PER_ELEMENT)
    return max(align, rows - rows % align)


def tensor_block_rows(
    name: str,
    shape: tuple[int, ...],
    stored_shape: tuple[int, ...],
    edit: TensorEdit | None,
    quant: TensorCodec | None,
    working: int,
    errors: list[ShardmergeError],
) -> int:
    """Rows per block of a worked tensor, whole quantization blocks for a 4-bit base."""
    room = working - (quant.state_bytes(stored_shape) if quant else 0)
    rows = block_rows(name, shape, edit, room, errors)
    if quant:
        fit = rows
        rows = quant_block_rows(rows, quant.row_align(stored_shape))
        errors.extend(quant_rows_fit(name, shape, edit, quant, rows, fit, room))
    return rows
