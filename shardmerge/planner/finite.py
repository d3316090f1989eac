"""NaN and Inf in the adapter tensors a merge uses, found before anything is written.

A NaN or Inf in a factor, a DoRA magnitude, an IA3 vector, trainable token
rows or a replacement tensor spreads into the merged weights and leaves a
useless model with exit 0. Adapters are small next to the base, so the
merge reads every adapter tensor it uses once more, in bounded chunks,
before it starts (``--allow-nonfinite`` skips this). A NaN or Inf in the
*base* is left alone: such tensors are copied as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch

from ..errors import InputError, PlanErrors
from ..execute.jobs import MergePlan
from ..io.safetensors import DTYPES, ITEMSIZE
from ..io.sources import RefLoader
from ..terms import TensorEdit, TensorRef

# Bytes of one adapter tensor checked at once.
CHUNK_BYTES = 64 << 20
# Tensors named per adapter in the refusal; the rest are counted.
SHOWN = 5


def check_adapters_finite(plans: list[MergePlan]) -> None:
    """Refuse (PlanErrors, one entry per adapter) NaN/Inf in any adapter tensor or scale used."""
    problems: dict[tuple[str, str], list[str]] = {}
    seen: set[tuple[str, str]] = set()
    loader = RefLoader()
    for plan in plans:
        for label, what in _scales(plan):
            problems.setdefault((label, "adapter_config.json"), []).append(what)
        for label, ref in _refs(plan):
            if (ref.path, ref.key) in seen:
                continue
            seen.add((ref.path, ref.key))
            found = _first_nonfinite(ref, loader)
            if found is not None:
                problems.setdefault((label, ref.path), []).append(f"{ref.key} ({found})")
    if problems:
        raise PlanErrors([_refusal(*where, found) for where, found in problems.items()])


def _refusal(label: str, path: str, found: list[str]) -> InputError:
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    n = len(found)
    return InputError(
        f"adapter {label}: {n} tensor{'s' if n > 1 else ''} in {path} hold{'' if n > 1 else 's'} "
        f"NaN or Inf: {'; '.join(found[:SHOWN])}{more}.",
        hint="A merge would spread them into the model (a diverged training run?); nothing was "
        "written. Pass --allow-nonfinite to merge them anyway.",
    )


def _edits(plan: MergePlan) -> Iterator[TensorEdit]:
    for shard in plan.shards:
        for t in shard.tensors:
            if t.edit is not None:
                yield t.edit


def _refs(plan: MergePlan) -> Iterator[tuple[str, TensorRef]]:
    """(adapter label, stored tensor) for every adapter tensor the plan reads."""
    for edit in _edits(plan):
        if edit.replacement is not None:
            yield edit.replacement.adapter, edit.replacement.source
        if edit.scaling is not None:
            yield edit.scaling.adapter, edit.scaling.vector
        for rows in edit.token_rows:
            yield rows.adapter, rows.source
        for term in edit.terms:
            refs = (term.left, term.right, *term.extra, term.magnitude)
            yield from ((term.adapter, r) for r in refs if r is not None)


def _scales(plan: MergePlan) -> Iterator[tuple[str, str]]:
    """(adapter label, description) for every term whose scale is not finite."""
    for edit in _edits(plan):
        for term in edit.terms:
            if not math.isfinite(term.scale):
                yield (
                    term.adapter,
                    f"{term.module}'s scale is {term.scale} (lora_alpha / r x weight)",
                )


def _first_nonfinite(ref: TensorRef, loader: RefLoader) -> str | None:
    """'NaN at index [i, j]' for the first non-finite value of a stored tensor, else None."""
    dtype = DTYPES.get(ref.dtype)
    if dtype is None or not dtype.is_floating_point:
        return None
    if ref.fmt != "safetensors":
        whole = loader.load(replace(ref, part=())).reshape(-1)
        return _describe(ref, whole, 0)
    step = max(1, CHUNK_BYTES // ITEMSIZE[ref.dtype])
    buf = bytearray(min(ref.end - ref.start, step * ITEMSIZE[ref.dtype]))
    with open(ref.path, "rb", buffering=0) as f:
        for first in range(0, ref.numel, step):
            n = min(step, ref.numel - first) * ITEMSIZE[ref.dtype]
            view = memoryview(buf)[:n]
            f.seek(ref.start + first * ITEMSIZE[ref.dtype])
            if f.readinto(view) != n:
                return None  # a short file is the reader's refusal, not this one's
            found = _describe(ref, torch.frombuffer(view, dtype=dtype), first)
            if found is not None:
                return found
    return None


def _describe(ref: TensorRef, values: torch.Tensor, first: int) -> str | None:
    if values.element_size() == 1:
        values = values.float()  # FP8: isfinite wants a wider type
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return None
    k = int(bad.nonzero()[0, 0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(first + k), ref.shape)]
    v = float(values[k])
    return f"{'NaN' if v != v else ('Inf' if v > 0 else '-Inf')} at index {index}"
