"""The one per-tensor merge policy: what applies to a tensor and how, decided in one place.

The planner sizes a tensor with it, the pipeline merges with it and the
verifier re-derives with it (with its own arithmetic). No other module looks
at a term's form, DoRA magnitudes, IA3 scaling or token rows to decide the
accumulation dtype, how factors are made, or what memory a tensor holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch

from ..codecs import OutputCodec, TensorCodec
from ..errors import ShardmergeError, UnsupportedAdapterError
from ..io.safetensors import DTYPES, ITEMSIZE
from ..io.sources import PART_CACHE_BYTES
from ..kernel.factors import built_numel
from ..kernel.merge import accumulation_dtype
from ..terms import Scaling, TensorEdit, TensorRef, Term, TokenRows
from .jobs import TensorJob

# Term forms whose factors are built exactly in float64 (kernel/factors.py)
# instead of loaded as stored: their products hold up to 48 significant bits.
BUILT_FORMS = ("hadamard", "kronecker")
# Bytes per stored factor element held while a tensor is merged: the factor
# in float64 at most, plus its share of the bound vectors.
FACTOR_BYTES_PER_ELEMENT = 16
# Bytes per element of the float64 factors built for a hadamard or kronecker
# term: the factor itself, and the temporaries of building it and of its
# error-bound vectors (abs copies, masks).
BUILT_BYTES_PER_ELEMENT = 32
# An IA3 vector, or trainable tokens' stored rows, held whole in float64 with a copy.
HELD_VECTOR_BYTES_PER_ELEMENT = 16
# Working memory of a merged element beyond the plain kernel's (kernel/dora.py):
# float64 base, value, bound, delta and its bound, and the norm's temporaries.
DORA_BYTES_PER_ELEMENT = 96
# DoRA holds |right| in float64 and each magnitude as float64 value, factor and bound.
DORA_RIGHT_BYTES = 8
DORA_MAGNITUDE_BYTES = 24


def term_refs(term: Term) -> list[TensorRef]:
    """The stored factors of a term that are loaded as they are (left, and right if any)."""
    return [term.left] + ([term.right] if term.right is not None else [])


def builds_factors(term: Term) -> bool:
    """True: the term's factors are built exactly in float64; False: loaded as stored."""
    return term.form in BUILT_FORMS


def has_dora(edit: TensorEdit | None) -> bool:
    return edit is not None and any(t.magnitude is not None for t in edit.terms)


def joins_dora(term: Term) -> bool:
    """Can this term share a tensor with DoRA terms (a plain low-rank product on all rows)?"""
    return term.right is not None and term.rows is None and term.form == "lowrank"


def dora_problems(name: str, edit: TensorEdit) -> list[ShardmergeError]:
    """What a tensor with DoRA terms cannot also have (found at plan time, before any byte)."""
    if not has_dora(edit):
        return []
    others = sorted({t.adapter for t in edit.terms if not joins_dora(t)})
    if getattr(edit, "scaling", None) is not None:
        others.append(edit.scaling.adapter)
    others += sorted({r.adapter for r in getattr(edit, "token_rows", ())})
    if not others:
        return []
    return [
        UnsupportedAdapterError(
            f"{name}: a DoRA adapter and {', '.join(others)} (IA3, LoHa, LoKr, trainable "
            "tokens, a bias or expert term) both change it; shardmerge does not combine "
            "DoRA with those on one tensor.",
            hint="Merge these adapters in separate runs.",
        )
    ]


def dora_bytes_per_element(edit: TensorEdit | None) -> int:
    """Extra working bytes per merged element for a tensor with DoRA terms (0 otherwise)."""
    return DORA_BYTES_PER_ELEMENT if has_dora(edit) else 0


def held_bytes(edit: TensorEdit | None) -> int:
    """Memory held whole while a tensor is merged: factors, parts' sources, vectors, rows."""
    if edit is None:
        return 0
    return (
        sum(_term_bytes(t) for t in edit.terms)
        + part_bytes(edit)
        + _scaling_bytes(edit)
        + _dora_fixed_bytes(edit)
        + sum(HELD_VECTOR_BYTES_PER_ELEMENT * r.source.numel for r in edit.token_rows)
    )


def _term_bytes(term: Term) -> int:
    """A term's factors as held: stored ones in float64 at most, or the built ones."""
    if builds_factors(term):  # LoHa/LoKr: the built factors, often larger
        return BUILT_BYTES_PER_ELEMENT * built_numel(term)
    return FACTOR_BYTES_PER_ELEMENT * sum(r.loaded_numel for r in term_refs(term))


def _scaling_bytes(edit: TensorEdit) -> int:
    """An IA3 vector held in float64 while its tensor is merged."""
    return HELD_VECTOR_BYTES_PER_ELEMENT * edit.scaling.vector.numel if edit.scaling else 0


def _dora_fixed_bytes(edit: TensorEdit) -> int:
    """DoRA's memory per tensor beyond the factors: |right| copies and magnitudes, in float64."""
    if not has_dora(edit):
        return 0
    return sum(
        DORA_RIGHT_BYTES * (t.right.numel if t.right else 0)
        + DORA_MAGNITUDE_BYTES * (t.magnitude.numel if t.magnitude else 0)
        for t in edit.terms
    )


def part_bytes(edit: TensorEdit) -> int:
    """Whole adapter tensors held while parts are taken of them (sources.RefLoader)."""
    wholes = [
        r.numel * ITEMSIZE[r.dtype]
        for t in edit.terms
        for r in term_refs(t)
        if r.part and not (len(r.part) == 1 and r.part[0][2] == 1)
    ]
    if not wholes:
        return 0
    return PART_CACHE_BYTES + max((n for n in wholes if n > PART_CACHE_BYTES), default=0)


@dataclass(frozen=True)
class TensorPolicy:
    """What applies to one worked tensor, in the order it applies.

    A replacement (or the codec's decoded values, or the stored base) gives
    the base rows; token rows are written in; IA3 scales them; the terms are
    added, DoRA terms composing as PEFT does; one rounding to ``out_dtype``.
    """

    name: str
    out_dtype: torch.dtype
    acc: torch.dtype  # the merge kernel's first-tier accumulator
    terms: tuple[Term, ...]
    replacement: TensorRef | None
    quant: TensorCodec | None
    scaling: Scaling | None
    token_rows: tuple[TokenRows, ...]
    dora: bool
    keeps_parts: bool  # some factor is a part of a larger stored tensor (sources.RefLoader)
    # Stored through an output codec (FP8 codes and block scales): its encoder
    # rounds the exact value instead of the merge kernel's one rounding.
    encode: OutputCodec | None = None

    @property
    def arithmetic(self) -> bool:
        """False: the output is the base rows (replaced, patched) converted, byte for byte."""
        return bool(self.terms) or self.scaling is not None or self.encode is not None

    @property
    def kinds(self) -> list[str]:
        kinds = {t.kind for t in self.terms} | ({"ia3"} if self.scaling is not None else set())
        return sorted(kinds)

    @property
    def delta_kind(self) -> str | None:
        """The kind a merge reports max |merged - base| under; None for a dtype conversion only."""
        if self.replacement is not None:
            return "replaced"
        kind = "+".join(self.kinds) or None
        if kind is None and self.token_rows:
            return "trainable_tokens"
        return kind

    @property
    def verify_kind(self) -> str:
        """The kind verify reports the largest ulp error under."""
        return ",".join(self.kinds) or "replaced"


def policy_for(t: TensorJob) -> TensorPolicy:
    """The policy of a tensor job that is processed (not copied)."""
    edit = t.edit
    terms = edit.terms if edit else ()
    replacement = edit.replacement.source if edit and edit.replacement else None
    token_rows = edit.token_rows if edit else ()
    scaling = edit.scaling if edit else None
    return TensorPolicy(
        name=t.name,
        out_dtype=DTYPES[t.out_dtype],
        acc=_accumulation(t, terms, replacement, token_rows, scaling),
        terms=terms,
        replacement=replacement,
        quant=t.quant,
        scaling=scaling,
        token_rows=token_rows,
        dora=has_dora(edit),
        keeps_parts=any(r.part for term in terms for r in term_refs(term)),
        encode=t.encode,
    )


def _accumulation(
    t: TensorJob,
    terms: tuple[Term, ...],
    replacement: TensorRef | None,
    token_rows: tuple[TokenRows, ...],
    scaling: Scaling | None,
) -> torch.dtype:
    """The first tier's accumulator: float32 where every input and the output allow it."""
    out_dtype = DTYPES[t.out_dtype]
    if t.encode is not None:
        # FP8 codes keep 4 bits: a float32 first tier settles them as it does 16-bit
        # outputs (kernel/fp8.py bounds it), given inputs of at most 32 bits.
        out_dtype = torch.bfloat16
    in_dtype = replacement.dtype if replacement else t.in_dtype
    if t.quant is not None:
        in_dtype = t.quant.dtype  # packed codes decode to this
    acc = accumulation_dtype(
        out_dtype, [DTYPES[in_dtype]] + [DTYPES[r.dtype] for term in terms for r in term_refs(term)]
    )
    if token_rows:  # replaced rows must reach the rounding exactly
        stored = reduce(torch.promote_types, (DTYPES[r.source.dtype] for r in token_rows))
        acc = accumulation_dtype(out_dtype, [acc, stored])
    if scaling is not None or any(builds_factors(term) for term in terms):
        # LoHa/LoKr factors hold products of two stored values (up to 48
        # bits) and IA3 scales the base exactly: float64 keeps them exact.
        acc = torch.float64
    if any(term.magnitude is not None for term in terms):
        acc = torch.float64  # dora.py works in float64 with its own error bounds
    return acc


def reads_base(t: TensorJob) -> bool:
    """Does merging ``t`` read its base rows (not when an adapter replaces it whole)?"""
    return not (t.edit and t.edit.replacement)
