"""How MoE checkpoints store expert parameters: fused 3-D tensors or one tensor per expert.

transformers v5 holds an MoE layer's experts as fused parameters
(``mlp.experts.gate_up_proj``, ``[E, 2I, H]``) but saves checkpoints per
expert by default and fuses at load, by its conversion rules (arch/rules.py,
arch/keymap.py): for Mixtral ``block_sparse_moe.experts.N.w1/w3`` are
concatenated along the rows into ``mlp.experts.gate_up_proj[N]`` and ``w2``
is ``down_proj[N]``; for Qwen2-MoE and its kin ``mlp.experts.N.gate_proj/up_proj``
and ``down_proj``; GraniteMoE's fused ``input_linear`` is only renamed.
``locate_param`` finds a fused parameter in any of these layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import count as count_of
from ..io.checkpoint import Checkpoint
from .keymap import NUMBERED_WEIGHT, Origin, key_map, renamed

# A module of one expert where experts are separate modules (Mixtral as saved,
# Switch Transformers, NLLB-MoE: ``experts.3.w1``, ``experts.expert_3.wi``).
EXPERT_MODULE = re.compile(r"\.experts\.(?:expert_)?\d+\.")
# config.json keys for the experts of one MoE layer (transformers' MoE configs).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# Model types whose experts store parameters [E, in, out] (use_experts_implementation(is_transposed=True)).
TRANSPOSED = frozenset({"gpt_oss", "openai_privacy_filter", "aria", "aria_text"})

# The order experts modules register their parameters in (transformers' MoE
# classes): it decides which nested ParamWrapper holds which parameter.
PARAM_ORDER = (
    "gate_up_proj",
    "gate_up_proj_bias",
    "gate_proj",
    "up_proj",
    "down_proj",
    "down_proj_bias",
    "w1",
    "v1",
    "w2",
)


@dataclass(frozen=True)
class ParamPlace:
    """Where a targeted parameter lives in the base checkpoint."""

    shape: tuple[int, ...]  # the parameter's in-memory shape
    dtypes: frozenset[str]  # of the base tensor(s)
    fused: str | None = None  # the base tensor holding it whole
    # Per expert: (base tensor, first row, stop row) within the expert's [out, in] matrix.
    experts: tuple[tuple[tuple[str, int, int], ...], ...] = ()
    problem: str = ""  # why the per-expert tensors cannot make the parameter
    base_fault: bool = False  # the problem is a damaged base (expert tensors missing)
    refused: bool = False  # transformers converts it in a way shardmerge cannot invert
    stacked: bool = False  # ``experts`` name 3-D stacked tensors: expert e is their slice e
    # The fused tensor is stored with its last two dimensions swapped ("always"),
    # or only when its shape says so ("by_shape"): transformers' Transpose(1, 2).
    flipped: str = ""

    @property
    def names(self) -> list[str]:
        if self.fused:
            return [self.fused]
        return list(dict.fromkeys(n for e in self.experts for n, _, _ in e))


def module_candidates(owner: str) -> list[str]:
    """On-disk paths of a module: as named, and without its first component."""
    parts = owner.split(".")
    return [owner, ".".join(parts[1:])] if len(parts) > 1 else [owner]


def expert_numbers(ckpt: Checkpoint) -> dict[tuple[str, str], set[int]]:
    """(module path, part) -> the numbers N of the base's ``path.N.part.weight`` tensors."""
    found: dict[tuple[str, str], set[int]] = {}
    for name in ckpt.weight_map:
        m = NUMBERED_WEIGHT.match(name)
        if m:
            found.setdefault((m[1], m[3]), set()).add(int(m[2]))
    return found


def config_experts(config: dict) -> tuple[str, int] | None:
    """The experts per MoE layer config.json gives, as (key, value): top level, else text_config."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            for key in _EXPERT_COUNT_KEYS:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return key, value
    return None


def _missing_experts(
    c: str, parts: tuple[str, ...], numbers: dict[tuple[str, str], set[int]], n: int
) -> tuple[list[str], int]:
    """The first few of the tensors ``c.E.part.weight``, E < n, the base lacks, and how many."""
    have = [numbers.get((c, p), set()) for p in parts]
    total = n * len(parts) - sum(len({e for e in h if e < n}) for h in have)
    shown: list[str] = []
    e = 0
    # Each expert passed over without a gap is a stored one: bounded by the weight map.
    while len(shown) < 6 and len(shown) < total and e < n:
        shown += [f"{c}.{e}.{p}.weight" for p, h in zip(parts, have, strict=True) if e not in h]
        e += 1
    return shown[:6], total


def locate_param(
    owner: str,
    param: str,
    ckpt: Checkpoint,
    numbers: dict[tuple[str, str], set[int]] | None = None,
) -> ParamPlace | None:
    """The base tensor(s) of parameter ``owner.param``, or None when the base has none.

    Where transformers renames or converts the checkpoint at load, its rules
    say (the loaded name first, then the name as an older transformers gave
    it); otherwise the tensor is looked up as named. ``numbers``:
    ``expert_numbers(ckpt)``, for per-expert layouts.
    """
    name = f"{owner}.{param}"
    if renamed(ckpt):
        origin = key_map(ckpt).origin(name)
        if origin is not None:
            return _place_of(origin, ckpt, numbers)
    for c in module_candidates(owner):
        if f"{c}.{param}" in ckpt.weight_map:
            info = ckpt.tensor(f"{c}.{param}")
            return ParamPlace(tuple(info.shape), frozenset([info.dtype]), fused=f"{c}.{param}")
    km = key_map(ckpt)
    origin = km.origin(km.canonical(name))
    return None if origin is None else _place_of(origin, ckpt, numbers)


def _place_of(
    origin: Origin, ckpt: Checkpoint, numbers: dict[tuple[str, str], set[int]] | None
) -> ParamPlace | None:
    """The ParamPlace of a loaded parameter stored as ``origin`` says."""
    if origin.kind == "refused":
        return ParamPlace((), frozenset(), problem=origin.reason, refused=True)
    if origin.kind in ("tensor", "transposed"):
        info = ckpt.tensor(origin.disk)
        flipped = "" if origin.kind == "tensor" else ("by_shape" if origin.by_shape else "always")
        return ParamPlace(
            tuple(info.shape), frozenset([info.dtype]), fused=origin.disk, flipped=flipped
        )
    if origin.kind == "parts":
        return _stacked_parts_place(ckpt, origin.parts)
    numbers = expert_numbers(ckpt) if numbers is None else numbers
    return _per_expert(ckpt, origin.module, origin.parts, numbers)


def _stacked_parts_place(ckpt: Checkpoint, parts: tuple[str, ...]) -> ParamPlace:
    """The parameter stacked tensors [E, rows_i, cols] make, concatenated along the rows."""
    infos = [ckpt.tensor(p) for p in parts]
    if any(len(i.shape) != 3 for i in infos) or len({(i.shape[0], i.shape[2]) for i in infos}) != 1:
        shapes = ", ".join(f"{p} {list(i.shape)}" for p, i in zip(parts, infos, strict=True))
        return ParamPlace((), frozenset(), problem=f"the stacked tensors differ in shape: {shapes}")
    rows, first = [], 0
    for p, info in zip(parts, infos, strict=True):
        rows.append((p, first, first + info.shape[1]))
        first += info.shape[1]
    experts = tuple(tuple(rows) for _ in range(infos[0].shape[0]))
    shape = (infos[0].shape[0], first, infos[0].shape[2])
    dtypes = frozenset(i.dtype for i in infos)
    return ParamPlace(shape, dtypes, experts=experts, stacked=True)


def _per_expert(
    ckpt: Checkpoint, c: str, parts: tuple[str, ...], numbers: dict[tuple[str, str], set[int]]
) -> ParamPlace | None:
    """The parameter the tensors ``c.E.part.weight`` stack into, every expert checked present."""
    stored = set().union(*(numbers.get((c, p), set()) for p in parts))
    if not stored:
        return None
    # Every expert up to the highest stored one, and up to config.json's count,
    # must have all its parts: a gap would leave an expert without its LoRA.
    count = max(stored) + 1
    declared = config_experts(ckpt.config)
    missing, total = _missing_experts(c, parts, numbers, max(count, declared[1] if declared else 0))
    if total:
        said = (
            f"config.json says {declared[0]} = {declared[1]}"
            if declared and declared[1] > count
            else f"experts 0 to {count - 1} are stored"
        )
        more = f" and {total - len(missing)} more" if total > len(missing) else ""
        return ParamPlace(
            (),
            frozenset(),
            problem=f"{ckpt.path}: the base lacks {count_of(total, 'expert tensor')} of {c} "
            f"({said}): {', '.join(missing)}{more}.",
            base_fault=True,
        )
    return _per_expert_place(ckpt, c, parts, count)


def fused_expert_tensors(ckpt: Checkpoint) -> set[str]:
    """The stored per-expert tensors transformers stacks into fused parameters at load."""
    if not renamed(ckpt):
        return set()
    stacks = {
        (o.module, p)
        for o in key_map(ckpt).origins.values()
        if o.kind == "experts"
        for p in o.parts
    }
    return {
        n for n in ckpt.weight_map
        if (m := NUMBERED_WEIGHT.match(n)) and (m[1], m[3]) in stacks
    }  # fmt: skip


def _per_expert_place(
    ckpt: Checkpoint, c: str, parts: tuple[str, ...], count: int
) -> ParamPlace | None:
    """The fused parameter the tensors ``c.E.part.weight`` (E < count) make, row by row."""
    experts: list[tuple[tuple[str, int, int], ...]] = []
    dtypes: set[str] = set()
    widths: set[int] = set()
    heights: set[int] = set()
    while len(experts) < count:
        rows, first = [], 0
        for p in parts:
            name = f"{c}.{len(experts)}.{p}.weight"
            info = ckpt.tensor(name)
            if len(info.shape) != 2:
                return ParamPlace(
                    (), frozenset(), problem=f"{name} has shape {list(info.shape)}, not 2-D"
                )
            rows.append((name, first, first + info.shape[0]))
            first += info.shape[0]
            widths.add(info.shape[1])
            dtypes.add(info.dtype)
        heights.add(first)
        experts.append(tuple(rows))
    if not experts:
        return None
    if len(widths) != 1 or len(heights) != 1:
        return ParamPlace((), frozenset(), problem=f"the per-expert tensors of {c} differ in shape")
    shape = (len(experts), heights.pop(), widths.pop())
    return ParamPlace(shape, frozenset(dtypes), experts=tuple(experts))
