"""The planner's inputs: the base and adapter folders opened, their edits combined and settled."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..adapters import Adapter, adapter_edits, open_adapter
from ..adapters.mismatch import summarise
from ..codecs import StoredBase, base_format, keeps_untouched, open_base_format
from ..errors import InputError, PlanErrors, ShardmergeError, UnsupportedAdapterError
from ..execute.policy import dora_problems
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.journal import Journal
from ..io.output import check_output_dir
from ..options import check_qlora_choice
from ..terms import TensorEdit
from . import embeddings
from .provenance import JobParts

# Integer-packed bases (issue 12): only a fully dequantized output is built so far.
INT_FORMATS = ("gptq", "awq", "ct-int", "mxfp4")


@dataclass
class Inputs:
    """The opened base and adapters of a job, and what OUT holds of an earlier run."""

    ckpt: Checkpoint
    bnb4: StoredBase | None  # a bitsandbytes 4-bit base folder, dequantized
    adapters: list[Adapter]
    fingerprint: str
    journal: Journal | None
    job: dict  # the fingerprint's parts, readable (provenance.JobParts.description)
    as_stored: Checkpoint | None = None  # the base folder as stored (a quantized one undecoded)


def open_inputs(
    base: str | os.PathLike,
    adapters: list[str | os.PathLike],
    out: str | os.PathLike,
    weights: list[float],
    dtype: str,
    qlora_base: str,
    out_checks: dict | None,
    formats: dict[str, str] | None = None,
    allow_nonfinite: bool = False,
) -> tuple[Inputs, list[ShardmergeError]]:
    """Open everything, and the problems found so far; raises PlanErrors if a folder won't open.

    ``out_checks``: the keyword arguments of check_output_dir (overwrite,
    resume), or None not to check OUT. ``formats``: the output-format options
    not at their defaults (options.output_formats), for the fingerprint.
    """
    errors: list[ShardmergeError] = []
    ckpt: Checkpoint | None = None
    bnb4: StoredBase | None = None
    as_stored: Checkpoint | None = None
    try:
        ckpt, bnb4, as_stored = open_base(base, qlora_base, dtype)
    except ShardmergeError as e:
        errors.append(e)
    opened = _open_adapters(adapters, errors)
    complete_inputs = ckpt is not None and len(opened) == len(adapters)
    # The folder as stored: its shards of scales only are gone from the decoded view.
    fingerprint, job = "", {}
    if complete_inputs:
        parts = JobParts(
            as_stored, opened, weights, dtype, qlora_base, dict(formats or {}), allow_nonfinite
        )
        fingerprint, job = parts.fingerprint(), parts.description()
    journal = None
    try:
        if out_checks is not None:
            journal = check_output_dir(
                Path(out),
                Path(base),
                [Path(p) for p in adapters],
                fingerprint=fingerprint,
                job=job,
                **out_checks,
            )
    except ShardmergeError as e:
        errors.append(e)
    if ckpt is None or len(opened) != len(adapters):
        raise PlanErrors(errors)
    return Inputs(ckpt, bnb4, opened, fingerprint, journal, job, as_stored), errors


def _open_adapters(paths: list[str | os.PathLike], errors: list[ShardmergeError]) -> list[Adapter]:
    """The adapters that open, labels made unique (``name#2``); problems go to ``errors``."""
    opened: list[Adapter] = []
    labels: Counter = Counter()
    for path in paths:
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
    return opened


def open_base(
    base: str | os.PathLike, qlora_base: str, dtype: str = "auto"
) -> tuple[Checkpoint, StoredBase | None, Checkpoint]:
    """The base folder as the merge sees it (a quantized one, bitsandbytes 4-bit or FP8, as
    its decoded view), how it is stored, and the folder as stored."""
    check_qlora_choice(qlora_base)
    ckpt = open_checkpoint(base)
    stored_format = base_format(ckpt)
    if stored_format is None:
        return ckpt, None, ckpt
    if qlora_base != "none":
        raise InputError(
            f"--qlora-base {qlora_base}: the base {ckpt.path} is already a {stored_format.title} "
            "model; it is dequantized exactly as stored.",
            hint="Leave out --qlora-base for a quantized base folder.",
        )
    if stored_format.name in INT_FORMATS and dtype == "auto" and not keeps_untouched(stored_format):
        raise InputError(
            f"the base {ckpt.path} is a {stored_format.title} model, and its quantization_config "
            "has no way (that transformers reads) to mark single modules as not quantized, so "
            "untouched modules cannot stay packed beside merged 16-bit ones.",
            hint="Pass --dtype bfloat16 (or float16, float32): every tensor is dequantized, "
            "merged and rounded once, and the packed side tensors are dropped.",
        )
    view, stored = open_base_format(ckpt, stored_format)
    return view, stored, ckpt


def settle_edits(
    inputs: Inputs, weights: list[float], errors: list[ShardmergeError]
) -> tuple[embeddings.Resolution, Counter]:
    """Every adapter's edits combined per tensor, embeddings settled; module counts.

    Raises PlanErrors with ``errors`` and everything found here, if anything.
    """
    edits: dict[str, TensorEdit] = {}
    counts: Counter = Counter()
    for adapter, weight in zip(inputs.adapters, weights, strict=True):
        adapter_edit, adapter_counts, adapter_errors = adapter_edits(adapter, weight, inputs.ckpt)
        applied = sum(n for kind, n in adapter_counts.items() if kind != "lora_bias")
        errors.extend(summarise(adapter, adapter_errors, applied, inputs.ckpt))
        counts.update(adapter_counts)
        for name, edit in adapter_edit.items():
            errors.extend(combine(edits, name, edit))
    for name, edit in edits.items():
        errors.extend(dora_problems(name, edit))
    # Tied embeddings, resized vocabularies, trainable tokens: settled for all adapters at once.
    settled = embeddings.resolve(inputs.ckpt, edits) if not errors else None
    if settled is not None:
        errors.extend(settled.errors)
    if errors:
        raise PlanErrors(errors)
    return settled, counts


def combine(edits: dict[str, TensorEdit], name: str, edit: TensorEdit) -> list[ShardmergeError]:
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
