"""LoRA on MoE expert parameters (PEFT ``target_parameters``) -> terms per base tensor.

PEFT wraps an ``nn.Parameter`` in a ``ParamWrapper`` (peft/tuners/lora/layer.py).
For a 3-D expert parameter of E experts its ``lora_A`` is ``[r*E, in]`` with the
rows expert-major (expert e: ``A.reshape(E, r, in)[e]``) and ``lora_B`` is
``[out, r*E]`` with the columns rank-major (expert e: ``B[:, e::E]``, from
``B.reshape(out, r, E)``); ``get_delta_weight`` gives expert e ``scale * B_e @ A_e``
for a parameter stored ``[E, out, in]``, transposed for models that store
``[E, in, out]`` (the experts module's ``is_transposed``: gpt_oss, aria). A 2-D
parameter is one plain ``B @ A``.

Several parameters of one module are wrapped in nested ParamWrappers, in the
order ``module.named_parameters()`` yields them (registration order): the
first is innermost, so with ``gate_up_proj`` and ``down_proj`` targeted the
adapter's ``experts.lora_A`` belongs to ``down_proj`` and
``experts.base_layer.lora_A`` to ``gate_up_proj``
(tuners_utils.BaseTuner._inject_parameters).

The adapter names the fused in-memory parameter (``mlp.experts.gate_up_proj``,
``[E, 2I, H]``); transformers v5 saves checkpoints per expert by default and
fuses at load (transformers/conversion_mapping.py): for Mixtral
``block_sparse_moe.experts.N.w1/w3`` are concatenated along the rows into
``mlp.experts.gate_up_proj[N]`` and ``w2`` is ``down_proj[N]``; for Qwen2-MoE and
its kin ``mlp.experts.N.gate_proj/up_proj`` and ``down_proj``. Both layouts are
mapped here: one term per (expert, base tensor), the factors being parts of
A and B (``TensorRef.part``) and, for a fused base tensor, the term covering
that expert's rows of it (``Term.rows``, the tensor viewed as a matrix).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import CorruptFileError, IncompatibleAdapterError, ShardmergeError
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES
from ..terms import TensorRef, Term


@dataclass(frozen=True)
class ExpertFamily:
    """How a model family's checkpoints store fused expert parameters one expert at a time."""

    # (in-memory fragment, on-disk fragment) of module paths.
    renames: tuple[tuple[str, str], ...]
    # fused parameter -> the per-expert Linear modules concatenated along its rows.
    parts: dict[str, tuple[str, ...]]


_MIXTRAL = ExpertFamily(
    renames=((".mlp.", ".block_sparse_moe."),),
    parts={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
)
_QWEN2_MOE = ExpertFamily(
    renames=(),
    parts={"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
)

# Model types whose per-expert checkpoints transformers 5.23 fuses with the
# Mixtral or Qwen2-MoE rules (conversion_mapping.py: _MODEL_TO_CONVERSION_PATTERN
# and the mappings copied from "mixtral"/"qwen2_moe").
FAMILIES: dict[str, ExpertFamily] = {
    **{t: _MIXTRAL for t in ("mixtral", "minimax", "minimax_m2", "phimoe")},
    **{
        t: _QWEN2_MOE
        for t in (
            "qwen2_moe",
            "qwen3_moe",
            "qwen3_next",
            "qwen3_5_moe_text",
            "qwen3_omni_moe",
            "qwen3_omni_moe_thinker",
            "qwen3_omni_moe_text",
            "olmoe",
            "flex_olmo",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "dots1",
            "ernie4_5_moe",
            "glm4_moe",
            "glm4_moe_lite",
            "glm_moe_dsa",
            "glm4v_moe",
            "longcat_flash",
            "solar_open",
            "mellum",
            "beam",
            "hunyuan_v1_moe",
            "exaone_moe",
            "cohere2_moe",
            "afmoe",
            "kimi_k25",
            "bailing_hybrid",
            "kolibri1",
            "mimo_v2_flash",
            "flint",
            "hy_v3",
            "laguna",
            "axk1",
        )
    },
}

# A module of one expert where experts are separate modules (Mixtral as saved,
# Switch Transformers, NLLB-MoE: ``experts.3.w1``, ``experts.expert_3.wi``).
EXPERT_MODULE = re.compile(r"\.experts\.(?:expert_)?\d+\.")
# A per-expert tensor of a fused parameter on disk: (module path).(expert).(part).weight.
_NUMBERED_WEIGHT = re.compile(r"^(.+)\.(\d+)\.([^.]+)\.weight$")
# config.json keys for the experts of one MoE layer (transformers' MoE configs).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# Model types whose experts store parameters [E, in, out] (use_experts_implementation(is_transposed=True)).
TRANSPOSED = frozenset({"gpt_oss", "openai_privacy_filter", "aria", "aria_text"})
# Model types whose fused expert tensors transformers transposes at load when
# their shape differs from the parameter's (conversion_mapping.py:
# Transpose(1, 2, check_dims=True)): the disk shape decides, as it does there.
TRANSPOSED_IF_SHAPE_SAYS = frozenset({"qwen3_vl_moe"})

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
class _Place:
    """Where a targeted parameter lives in the base checkpoint."""

    shape: tuple[int, ...]  # the parameter's in-memory shape
    dtypes: frozenset[str]  # of the base tensor(s)
    fused: str | None = None  # the base tensor holding it whole
    # Per expert: (base tensor, first row, stop row) within the expert's [out, in] matrix.
    experts: tuple[tuple[tuple[str, int, int], ...], ...] = ()
    problem: str = ""  # why the per-expert tensors cannot make the parameter
    base_fault: bool = False  # the problem is a damaged base (expert tensors missing)

    @property
    def names(self) -> list[str]:
        return [self.fused] if self.fused else [n for e in self.experts for n, _, _ in e]


@dataclass
class ExpertEdits:
    """What ``expert_terms`` made of an adapter's parameter LoRA."""

    claimed: set[str] = field(default_factory=set)  # adapter modules handled here
    terms: list[tuple[str, Term]] = field(default_factory=list)  # (base tensor, term)
    counts: Counter = field(default_factory=Counter)
    errors: list[ShardmergeError] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # parameters with no base tensor


def _owner(module: str) -> tuple[str, int]:
    """The wrapped module and the nesting depth of a (possibly nested) ParamWrapper's name."""
    depth = 0
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
        depth += 1
    return module, depth


def _targeted(owner: str, targets: list[str]) -> list[str]:
    """Parameter names of ``owner`` that PEFT's target_parameters matching selects."""
    found = []
    for t in targets:
        param = t.rsplit(".", 1)[-1]
        key = f"{owner}.{param}"
        if (key == t or key.endswith(f".{t}")) and param not in found:
            found.append(param)
    return found


def _module_candidates(owner: str, family: ExpertFamily | None) -> list[str]:
    """On-disk paths of a module: as named, renamed as the family saves it, without the first component."""
    names = [owner]
    if family:
        for mem, disk in family.renames:
            renamed = f"{owner}.".replace(mem, disk)[:-1]
            if renamed not in names:
                names.append(renamed)
    for name in list(names):
        parts = name.split(".")
        if len(parts) > 1:
            names.append(".".join(parts[1:]))
    return names


def expert_numbers(ckpt: Checkpoint) -> dict[tuple[str, str], set[int]]:
    """(module path, part) -> the numbers N of the base's ``path.N.part.weight`` tensors."""
    found: dict[tuple[str, str], set[int]] = {}
    for name in ckpt.weight_map:
        m = _NUMBERED_WEIGHT.match(name)
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


def _locate(
    owner: str,
    param: str,
    ckpt: Checkpoint,
    family: ExpertFamily | None,
    numbers: dict[tuple[str, str], set[int]] | None = None,
) -> _Place | None:
    """The base tensor(s) of parameter ``owner.param``, or None when the base has none.

    ``numbers``: ``expert_numbers(ckpt)``, for per-expert layouts.
    """
    candidates = _module_candidates(owner, family)
    for c in candidates:
        name = f"{c}.{param}"
        if name in ckpt.weight_map:
            info = ckpt.tensor(name)
            return _Place(tuple(info.shape), frozenset([info.dtype]), fused=name)
    parts = family.parts.get(param) if family else None
    if not parts:
        return None
    numbers = expert_numbers(ckpt) if numbers is None else numbers
    for c in candidates:
        stored = set().union(*(numbers.get((c, p), set()) for p in parts))
        if not stored:
            continue
        # Every expert up to the highest stored one, and up to config.json's count,
        # must have all its parts: a gap would leave an expert without its LoRA.
        count = max(stored) + 1
        declared = config_experts(ckpt.config)
        missing, total = _missing_experts(
            c, parts, numbers, max(count, declared[1] if declared else 0)
        )
        if total:
            said = (
                f"config.json says {declared[0]} = {declared[1]}"
                if declared and declared[1] > count
                else f"experts 0 to {count - 1} are stored"
            )
            more = f" and {total - len(missing)} more" if total > len(missing) else ""
            return _Place(
                (),
                frozenset(),
                problem=f"{ckpt.path}: the base lacks {total} expert tensor(s) of {c} "
                f"({said}): {', '.join(missing)}{more}.",
                base_fault=True,
            )
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
                    return _Place(
                        (), frozenset(), problem=f"{name} has shape {list(info.shape)}, not 2-D"
                    )
                rows.append((name, first, first + info.shape[0]))
                first += info.shape[0]
                widths.add(info.shape[1])
                dtypes.add(info.dtype)
            heights.add(first)
            experts.append(tuple(rows))
        if experts:
            if len(widths) != 1 or len(heights) != 1:
                return _Place(
                    (), frozenset(), problem=f"the per-expert tensors of {c} differ in shape"
                )
            shape = (len(experts), heights.pop(), widths.pop())
            return _Place(shape, frozenset(dtypes), experts=tuple(experts))
    return None


def _part(ref: TensorRef, *dims: tuple[int, int, int]) -> TensorRef:
    return replace(ref, part=tuple(dims))


def expert_terms(
    targets: list[str],
    label: str,
    wfile: str,
    modules: dict[str, dict[str, TensorRef]],
    weight: float,
    ckpt: Checkpoint,
    rank_of: Callable[[str], int],
    scale_of: Callable[[str, int], float],
) -> ExpertEdits:
    """Terms for the adapter modules that are ParamWrappers of ``target_parameters``.

    ``modules`` is the adapter's {module: {role: ref}}. ``rank_of(key)`` and
    ``scale_of(key, r)`` give PEFT's r and scaling for parameter ``key`` (its
    rank/alpha patterns match the parameter's full name). Modules that are not
    parameter wrappers are left alone (not in ``claimed``).
    """
    out = ExpertEdits()
    model_type = str(ckpt.config.get("model_type", ""))
    family = FAMILIES.get(model_type)
    transposed = model_type in TRANSPOSED
    by_shape = model_type in TRANSPOSED_IF_SHAPE_SAYS
    by_owner: dict[str, dict[int, str]] = {}
    for module in modules:
        owner, depth = _owner(module)
        if _targeted(owner, targets):
            by_owner.setdefault(owner, {})[depth] = module

    numbers = expert_numbers(ckpt) if family and by_owner else {}
    for owner, wrappers in sorted(by_owner.items()):
        params = _targeted(owner, targets)
        places = {p: _locate(owner, p, ckpt, family, numbers) for p in params}
        present = [p for p in params if places[p] is not None]
        if not present and list(wrappers) == [0] and _plain_linear(owner, ckpt):
            continue  # an ordinary Linear target (owner.weight): the plain LoRA path takes it
        out.claimed.update(wrappers.values())
        if len(wrappers) > len(present):
            # PEFT nests one wrapper per parameter the model has: with fewer here, which
            # LoRA belongs to which parameter cannot be told. None is applied.
            missing = " or ".join(p for p in params if places[p] is None)
            out.unmatched += [f"{m} (LoRA on parameter {missing})" for m in wrappers.values()]
            continue
        if len(present) > 1 and any(p not in PARAM_ORDER for p in present):
            out.errors.append(
                IncompatibleAdapterError(
                    f"{wfile}: module {owner} has LoRA on several parameters "
                    f"({', '.join(present)}) and shardmerge does not know the order the model "
                    "registers them in, which decides which nested LoRA belongs to which.",
                    hint="Merge this adapter with PEFT, or target one parameter per module.",
                )
            )
            continue
        # PEFT wraps the parameters that exist in registration order; the last is outermost.
        order = sorted(present, key=PARAM_ORDER.index) if len(present) > 1 else present
        for depth, module in sorted(wrappers.items()):
            param = order[len(order) - 1 - depth] if depth < len(order) else None
            if param is None:  # nesting depths with a gap (depth 0 and 2 only, say)
                out.unmatched.append(f"{module} (LoRA on a parameter nested {depth} deep)")
                continue
            key = f"{owner}.{param}"
            out.terms.extend(
                _param_terms(
                    label, wfile, module, key, modules[module], places[param], weight,
                    transposed, by_shape, rank_of(key), scale_of, out,
                )
            )  # fmt: skip
    return out


def _plain_linear(owner: str, ckpt: Checkpoint) -> bool:
    tail = owner.split(".", 1)[-1]
    return f"{owner}.weight" in ckpt.weight_map or f"{tail}.weight" in ckpt.weight_map


def _param_terms(
    label: str,
    wfile: str,
    module: str,
    key: str,
    roles: dict[str, TensorRef],
    place: _Place,
    weight: float,
    transposed: bool,
    by_shape: bool,
    r: int,
    scale_of: Callable[[str, int], float],
    out: ExpertEdits,
) -> list[tuple[str, Term]]:
    """The terms of one wrapped parameter ``key`` (adapter module ``module``)."""

    def incompatible(msg: str) -> list[tuple[str, Term]]:
        out.errors.append(
            IncompatibleAdapterError(
                f"{wfile}: LoRA on {key} (module {module}): {msg}",
                hint="Is this adapter made for this base model?",
            )
        )
        return []

    if place.base_fault:
        out.errors.append(
            CorruptFileError(
                f"LoRA on {key} ({wfile}): {place.problem}",
                hint="Re-download the base model; merging would leave these experts unmerged.",
            )
        )
        return []
    if place.problem:
        return incompatible(f"the base's expert tensors cannot form it: {place.problem}.")
    if "lora_A" not in roles or "lora_B" not in roles:
        return incompatible("lora_A or lora_B is missing.")
    extra = sorted(set(roles) - {"lora_A", "lora_B"})
    if extra:
        return incompatible(f"it also holds {', '.join(extra)}, which LoRA on parameters has not.")
    a, b = roles["lora_A"], roles["lora_B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        return incompatible(
            f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not make a LoRA pair."
        )
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        out.errors.append(
            CorruptFileError(f"{wfile}: LoRA factors of {module} are not floating point.")
        )
        return []
    if not place.dtypes <= set(FLOAT_DTYPES):
        return incompatible(f"base tensor {place.names[0]} is not floating point.")
    shape = place.shape
    # Per-expert tensors are nn.Linear weights [out, in] whatever the fused layout.
    transposed = transposed and place.fused is not None
    if by_shape and place.fused and len(shape) == 3:
        # Stored as the parameter [E, out, in] unless the shape differs (then [E, in, out]).
        transposed = shape[1:] != (b.shape[0], a.shape[1])
    names = ", ".join(place.names[:2]) + (", ..." if len(place.names) > 2 else "")
    if len(shape) == 2:
        experts, out_f, in_f = 1, shape[0], shape[1]
    elif len(shape) == 3:
        experts = shape[0]
        out_f, in_f = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    else:
        return incompatible(f"base tensor {names} has shape {list(shape)}, not 2-D or 3-D.")
    if experts == 0:
        return incompatible(f"base tensor {names} has shape {list(shape)}: no experts.")
    total = a.shape[0]
    if total != r * experts:
        have = f"{total // r}" if total % r == 0 else f"{total / r:g}"
        return incompatible(
            f"lora_A has {total} rows, which at r={r} is LoRA for {have} expert(s), but the "
            f"base has {experts} experts ({names})."
        )
    if (b.shape[0], a.shape[1]) != (out_f, in_f):
        layout = "[experts, in, out]" if transposed else "[experts, out, in]"
        return incompatible(
            f"each expert's delta is {[b.shape[0], a.shape[1]]} (out, in) but the base parameter "
            f"is {list(shape)}, which this model type stores as {layout} ({names})."
        )
    scale = weight * scale_of(key, r)
    if len(shape) == 2:
        out.counts["linear"] += 1
        return [(place.names[0], Term("linear", label, module, b, a, scale))]
    made: list[tuple[str, Term]] = []
    for e in range(experts):
        a_e = _part(a, (e * r, (e + 1) * r, 1))  # rows expert-major
        cols = (e, r * experts, experts)  # columns rank-major: B[:, e::E]
        if place.fused and transposed:
            term = Term(
                "expert", label, module, a_e, _part(b, (0, out_f, 1), cols), scale,
                left_t=True, right_t=True, rows=(e * in_f, (e + 1) * in_f),
            )  # fmt: skip
            made.append((place.fused, term))
        elif place.fused:
            term = Term(
                "expert", label, module, _part(b, (0, out_f, 1), cols), a_e, scale,
                rows=(e * out_f, (e + 1) * out_f),
            )  # fmt: skip
            made.append((place.fused, term))
        else:
            for name, first, stop in place.experts[e]:
                term = Term("expert", label, module, _part(b, (first, stop, 1), cols), a_e, scale)
                made.append((name, term))
        out.counts["expert"] += 1
    return made
