"""Why an adapter does not fit the base, said once per adapter with the evidence.

The translations record each module that fails to fit as a ``ModuleMismatch``
(its name is not in the base, or its delta has another shape). ``summarise``
folds one adapter's mismatches and other fit problems into one short
refusal: counts per kind, the first few examples, the likely cause (a
renamed prefix, another size of the family, another architecture) and the
evidence for it. It asks "made for this base?" only when the evidence
points that way: a renamed prefix means the adapter probably is.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import IncompatibleAdapterError, ShardmergeError, count, shown
from ..io.checkpoint import Checkpoint
from ..io.hub import hub_id_of
from .folder import Adapter

EXAMPLES = 3  # examples shown per kind of mismatch
PASS_THROUGH = 3  # this many plain problems (no mismatch) are shown as they are
QUESTION = "Is this adapter made for this base model?"
INSPECT = "`shardmerge inspect` on the adapter and the base shows what each holds."
_NUMBER = re.compile(r"^\d+$")


class ModuleMismatch(IncompatibleAdapterError):
    """One adapter module that does not fit the base: its name is missing, or its shape differs."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        module: str = "",
        kind: str = "missing",
        want: tuple[int, ...] = (),
        have: tuple[int, ...] = (),
    ):
        super().__init__(message, hint=hint)
        self.module, self.kind, self.want, self.have = module, kind, tuple(want), tuple(have)


def missing(where: object, module: str) -> ModuleMismatch:
    """``module`` (a base tensor name it needs, maybe with a note) has no tensor in the base."""
    return ModuleMismatch(
        f"{where}: {module} matches no tensor of the base model.", module=module, kind="missing"
    )


def shape_differs(
    where: object, module: str, base_name: str, want: tuple[int, ...], have: tuple[int, ...]
) -> ModuleMismatch:
    """``module``'s delta has shape ``want`` where base tensor ``base_name`` has ``have``."""
    return ModuleMismatch(
        f"{where}: target {module}: the LoRA delta has shape {list(want)} but base tensor "
        f"{base_name} has shape {list(have)}.",
        module=module,
        kind="shape",
        want=want,
        have=have,
    )


def summarise(
    adapter: Adapter, errors: list[ShardmergeError], applied: int, ckpt: Checkpoint
) -> list[ShardmergeError]:
    """One adapter's problems with its fit problems folded into one summary.

    ``applied``: how many of its modules did fit. Problems of other kinds
    (unreadable files, unsupported options) are kept as they are, and so are
    up to PASS_THROUGH fit problems that are not module mismatches.
    """
    mismatches = [e for e in errors if isinstance(e, ModuleMismatch)]
    others = [
        e
        for e in errors
        if isinstance(e, IncompatibleAdapterError) and not isinstance(e, ModuleMismatch)
    ]
    if not mismatches and len(others) <= PASS_THROUGH:
        return errors
    kept = [e for e in errors if not isinstance(e, IncompatibleAdapterError)]
    return [*kept, _summary(adapter, mismatches, others, applied, ckpt)]


@dataclass(frozen=True)
class _Cause:
    text: str  # "Likely cause: ..." without the label
    ask: bool  # whether the evidence says the adapter was made for another base
    hint: str | None = None  # what to do, when the question is not asked


def _summary(
    adapter: Adapter,
    mismatches: list[ModuleMismatch],
    others: list[IncompatibleAdapterError],
    applied: int,
    ckpt: Checkpoint,
) -> IncompatibleAdapterError:
    gone = [m for m in mismatches if m.kind == "missing"]
    shapes = [m for m in mismatches if m.kind == "shape"]
    model_type = ckpt.config.get("model_type") or "unknown"
    n = len(mismatches)
    which = (
        f"{n} of its {count(n + applied, 'module')} {'does' if n == 1 else 'do'} not fit"
        if n
        else "it does not fit"
    )
    lines = [f"{adapter.path}: {which} the base {_base_label(ckpt)} (model_type {model_type}):"]
    if gone:
        lines.append(
            f"  {len(gone)} {'matches' if len(gone) == 1 else 'match'} no tensor of the base: "
            + _examples([m.module for m in gone])
        )
    if shapes:
        lines.append(
            f"  {len(shapes)} {'has' if len(shapes) == 1 else 'have'} another shape than the "
            "base tensor: "
            + _examples([f"{m.module} (delta {list(m.want)}, base {list(m.have)})" for m in shapes])
        )
    if others:
        lines.append(
            f"  {count(len(others), 'other problem')}: "
            + _examples([_without_path(str(e.message), adapter) for e in others])
        )
    cause = _likely_cause(gone, shapes, ckpt)
    named = _named_base(adapter, ckpt)
    if cause is not None:
        lines.append(f"Likely cause: {cause.text}")
    if named:
        lines.append(named)
    ask = cause.ask if cause is not None else bool(named)
    if ask:
        hint = QUESTION + " Merge it into the base it was trained on."
    else:
        hint = cause.hint if cause is not None else INSPECT
    return IncompatibleAdapterError("\n".join(lines), hint=hint)


def _examples(items: list[str]) -> str:
    shown = "; ".join(items[:EXAMPLES])
    left = len(items) - EXAMPLES
    return shown + (f"; and {left} more" if left > 0 else "") + "."


def _without_path(message: str, adapter: Adapter) -> str:
    """A problem's message without the adapter's own path in front (the summary names it)."""
    for prefix in (f"{adapter.weights_file}: ", f"{adapter.path}: "):
        if message.startswith(prefix):
            return message[len(prefix) :].rstrip(".")
    return message.rstrip(".")


def _base_label(ckpt: Checkpoint) -> str:
    return hub_id_of(ckpt.path) or str(ckpt.path)


def _named_base(adapter: Adapter, ckpt: Checkpoint) -> str | None:
    """The base adapter_config.json names, when it is not the base given (by its last name)."""
    named = adapter.config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return None
    given = _base_label(ckpt)
    if _short(named) == _short(given):
        return None
    return (
        f"Its adapter_config.json says it was trained on {shown(named)}; "
        f"the base given is {given!r}."
    )


def _short(name: str) -> str:
    return Path(name.rstrip("/")).name.lower()


def _likely_cause(
    gone: list[ModuleMismatch], shapes: list[ModuleMismatch], ckpt: Checkpoint
) -> _Cause | None:
    """The likeliest reason for these mismatches, with the evidence; None when nothing stands out."""
    if len(shapes) > len(gone):
        return _other_size(shapes, ckpt)
    if not gone:
        return None
    modules = [_module_of(m.module) for m in gone]
    base = _base_modules(ckpt)
    renamed = _renamed_prefix(modules, base)
    if renamed is not None:
        return renamed
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules} - {b.rsplit(".", 1)[-1] for b in base})
    if len(leaves) == len({m.rsplit(".", 1)[-1] for m in modules}):
        theirs = sorted({b.rsplit(".", 1)[-1] for b in base if _layer_of(b) == "0"})[:6]
        return _Cause(
            "another architecture or model type: no module of the base is named "
            f"{', '.join(leaves[:6])}"
            + (f" (its layers have {', '.join(theirs)})" if theirs else "")
            + ".",
            ask=True,
        )
    return _other_numbers(modules, base)


def _other_size(shapes: list[ModuleMismatch], ckpt: Checkpoint) -> _Cause:
    pairs = Counter((w, h) for m in shapes for w, h in zip(m.want, m.have, strict=False) if w != h)
    sizes = ", ".join(f"{w} where the base has {h}" for (w, h), _ in pairs.most_common(2))
    hidden = ckpt.config.get("hidden_size")
    return _Cause(
        "another size of the same model family: the module names exist in the base but the "
        f"adapter's dimensions differ ({sizes})"
        + (f"; the base's hidden_size is {hidden}" if isinstance(hidden, int) else "")
        + ".",
        ask=True,
    )


def _module_of(name: str) -> str:
    """A mismatch's module path: without a note in brackets and the tensor's last name."""
    name = name.split(" (", 1)[0]
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def _base_modules(ckpt: Checkpoint) -> set[str]:
    return {n.rsplit(".", 1)[0] for n in ckpt.weight_map if "." in n}


def _layer_of(module: str) -> str | None:
    return next((p for p in module.split(".") if _NUMBER.match(p)), None)


def _renamed_prefix(modules: list[str], base: set[str]) -> _Cause | None:
    """The modules exist in the base under another prefix (``backbone.`` for ``model.``)."""
    by_tail: dict[str, str] = {}
    for b in sorted(base):
        by_tail.setdefault(".".join(b.split(".")[-3:]), b)
    renames: Counter = Counter()
    for m in modules:
        b = by_tail.get(".".join(m.split(".")[-3:]))
        if b is None or b == m:
            continue
        mp, bp = m.split("."), b.split(".")
        common = 0
        while common < min(len(mp), len(bp)) and mp[-1 - common] == bp[-1 - common]:
            common += 1
        renames[(".".join(mp[: len(mp) - common]), ".".join(bp[: len(bp) - common]))] += 1
    if not renames:
        return None
    (theirs, ours), n = renames.most_common(1)[0]
    if 2 * n < len(modules):
        return None
    theirs, ours = f"{theirs}." if theirs else "(no prefix)", f"{ours}." if ours else "(no prefix)"
    return _Cause(
        f"renamed prefixes, not another model: {n} of these modules are in the base under "
        f"another prefix (the adapter's {theirs} is {ours} in the base).",
        ask=False,
        hint="The adapter probably is for this base: its checkpoint names the modules "
        f"differently. Rename the adapter's keys ({theirs} -> {ours}) in a copy of the adapter, "
        "or report the model type so shardmerge maps it.",
    )


def _other_numbers(modules: list[str], base: set[str]) -> _Cause | None:
    """The module names exist in the base, but for other layer or expert numbers."""
    patterns: dict[str, set[int]] = {}
    for b in base:
        numbers = [int(p) for p in b.split(".") if _NUMBER.match(p)]
        if numbers:
            patterns.setdefault(_pattern(b), set()).add(numbers[0])
    found = [m for m in modules if m not in base and _pattern(m) in patterns]
    if 2 * len(found) < len(modules) or not found:
        return None
    have = patterns[_pattern(found[0])]
    return _Cause(
        "another size of the same model family: the modules exist in the base but for other "
        f"layer or expert numbers (e.g. {found[0]}; the base has numbers "
        f"{min(have)}-{max(have)} there).",
        ask=True,
    )


def _pattern(module: str) -> str:
    return ".".join("#" if _NUMBER.match(p) else p for p in module.split("."))
