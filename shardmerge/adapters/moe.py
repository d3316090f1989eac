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
Where the base keeps each parameter is arch/experts.py's knowledge (from
transformers' conversion rules, arch/keymap.py); a parameter transformers
builds by an operation that cannot be inverted (an interleave, a split) is
refused by name with that operation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..arch.experts import (
    PARAM_ORDER,
    TRANSPOSED,
    ParamPlace,
    expert_numbers,
    locate_param,
)
from ..errors import (
    CorruptFileError,
    IncompatibleAdapterError,
    ShardmergeError,
    UnsupportedAdapterError,
)
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES
from ..terms import TensorRef, Term


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
    transposed = str(ckpt.config.get("model_type", "")) in TRANSPOSED
    by_owner: dict[str, dict[int, str]] = {}
    for module in modules:
        owner, depth = _owner(module)
        if _targeted(owner, targets):
            by_owner.setdefault(owner, {})[depth] = module

    numbers = expert_numbers(ckpt) if by_owner else {}
    for owner, wrappers in sorted(by_owner.items()):
        params = _targeted(owner, targets)
        places = {p: locate_param(owner, p, ckpt, numbers) for p in params}
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
                    transposed, rank_of(key), scale_of, out,
                )
            )  # fmt: skip
    return out


def _plain_linear(owner: str, ckpt: Checkpoint) -> bool:
    tail = owner.split(".", 1)[-1]
    return f"{owner}.weight" in ckpt.weight_map or f"{tail}.weight" in ckpt.weight_map


@dataclass(frozen=True)
class _Wrapper:
    """One ParamWrapper of an adapter: its module, the parameter it wraps, and where problems go."""

    wfile: str
    module: str
    key: str  # the wrapped parameter's full name
    out: ExpertEdits

    def incompatible(self, msg: str) -> None:
        self.out.errors.append(
            IncompatibleAdapterError(
                f"{self.wfile}: LoRA on {self.key} (module {self.module}): {msg}",
                hint="Is this adapter made for this base model?",
            )
        )


def _param_terms(
    label: str,
    wfile: str,
    module: str,
    key: str,
    roles: dict[str, TensorRef],
    place: ParamPlace,
    weight: float,
    transposed: bool,
    r: int,
    scale_of: Callable[[str, int], float],
    out: ExpertEdits,
) -> list[tuple[str, Term]]:
    """The terms of one wrapped parameter ``key`` (adapter module ``module``)."""
    w = _Wrapper(wfile, module, key, out)
    pair = _checked_pair(w, roles, place)
    if pair is None:
        return []
    a, b = pair
    layout = _expert_layout(w, place, a, b, transposed, r)
    if layout is None:
        return []
    experts, out_f, in_f, transposed = layout
    scale = weight * scale_of(key, r)
    if len(place.shape) == 2:
        out.counts["linear"] += 1
        return [(place.names[0], Term("linear", label, module, b, a, scale))]
    made: list[tuple[str, Term]] = []
    for e in range(experts):
        made += _one_expert(
            label, module, a, b, place, e, experts, out_f, in_f, r, transposed, scale
        )
        out.counts["expert"] += 1
    return made


def _checked_pair(
    w: _Wrapper, roles: dict[str, TensorRef], place: ParamPlace
) -> tuple[TensorRef, TensorRef] | None:
    """The wrapper's lora_A and lora_B when they and the base's tensors can make terms."""
    if place.base_fault:
        w.out.errors.append(
            CorruptFileError(
                f"LoRA on {w.key} ({w.wfile}): {place.problem}",
                hint="Re-download the base model; merging would leave these experts unmerged.",
            )
        )
        return None
    if place.refused:
        w.out.errors.append(
            UnsupportedAdapterError(
                f"{w.wfile}: LoRA on {w.key} (module {w.module}): {place.problem}.",
                hint="Merge this adapter with PEFT (merge_and_unload), or re-save the base "
                "with save_pretrained(save_original_format=False) and merge into that.",
            )
        )
        return None
    if place.problem:
        w.incompatible(f"the base's expert tensors cannot form it: {place.problem}.")
        return None
    if "lora_A" not in roles or "lora_B" not in roles:
        w.incompatible("lora_A or lora_B is missing.")
        return None
    extra = sorted(set(roles) - {"lora_A", "lora_B"})
    if extra:
        w.incompatible(f"it also holds {', '.join(extra)}, which LoRA on parameters has not.")
        return None
    a, b = roles["lora_A"], roles["lora_B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        w.incompatible(
            f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not make a LoRA pair."
        )
        return None
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        w.out.errors.append(
            CorruptFileError(f"{w.wfile}: LoRA factors of {w.module} are not floating point.")
        )
        return None
    if not place.dtypes <= set(FLOAT_DTYPES):
        w.incompatible(f"base tensor {place.names[0]} is not floating point.")
        return None
    return a, b


def _expert_layout(
    w: _Wrapper,
    place: ParamPlace,
    a: TensorRef,
    b: TensorRef,
    transposed: bool,
    r: int,
) -> tuple[int, int, int, bool] | None:
    """(experts, out features, in features, stored transposed) of the parameter, checked against A and B.

    ``transposed``: the model holds the parameter [E, in, out] (is_transposed).
    """
    shape = place.shape
    # Per-expert tensors are nn.Linear weights [out, in] whatever the fused layout.
    transposed = transposed and place.fused is not None
    if place.flipped == "always":
        transposed = not transposed  # transformers swaps the stored tensor's last two dimensions
    elif place.flipped == "by_shape" and len(shape) == 3:
        # As the parameter unless the shape differs (then swapped): transformers' check_dims.
        stored = (b.shape[0], a.shape[1]) if not transposed else (a.shape[1], b.shape[0])
        transposed = transposed != (shape[1:] != stored)
    names = ", ".join(place.names[:2]) + (", ..." if len(place.names) > 2 else "")
    if len(shape) == 2:
        experts, out_f, in_f = 1, shape[0], shape[1]
    elif len(shape) == 3:
        experts = shape[0]
        out_f, in_f = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    else:
        w.incompatible(f"base tensor {names} has shape {list(shape)}, not 2-D or 3-D.")
        return None
    if experts == 0:
        w.incompatible(f"base tensor {names} has shape {list(shape)}: no experts.")
        return None
    total = a.shape[0]
    if total != r * experts:
        have = f"{total // r}" if total % r == 0 else f"{total / r:g}"
        w.incompatible(
            f"lora_A has {total} rows, which at r={r} is LoRA for {have} expert{'' if have == '1' else 's'}, but the "
            f"base has {experts} experts ({names})."
        )
        return None
    if (b.shape[0], a.shape[1]) != (out_f, in_f):
        layout = "[experts, in, out]" if transposed else "[experts, out, in]"
        w.incompatible(
            f"each expert's delta is {[b.shape[0], a.shape[1]]} (out, in) but the base parameter "
            f"is {list(shape)}, which this model type stores as {layout} ({names})."
        )
        return None
    return experts, out_f, in_f, transposed


def _one_expert(
    label: str,
    module: str,
    a: TensorRef,
    b: TensorRef,
    place: ParamPlace,
    e: int,
    experts: int,
    out_f: int,
    in_f: int,
    r: int,
    transposed: bool,
    scale: float,
) -> list[tuple[str, Term]]:
    """The terms of expert ``e``: its rows of A and columns of B, on its base rows."""
    a_e = _part(a, (e * r, (e + 1) * r, 1))  # rows expert-major
    cols = (e, r * experts, experts)  # columns rank-major: B[:, e::E]
    if place.fused and transposed:
        term = Term(
            "expert", label, module, a_e, _part(b, (0, out_f, 1), cols), scale,
            left_t=True, right_t=True, rows=(e * in_f, (e + 1) * in_f),
        )  # fmt: skip
        return [(place.fused, term)]
    if place.fused:
        term = Term(
            "expert", label, module, _part(b, (0, out_f, 1), cols), a_e, scale,
            rows=(e * out_f, (e + 1) * out_f),
        )  # fmt: skip
        return [(place.fused, term)]
    made = []
    for name, first, stop in place.experts[e]:
        # A stacked tensor [E, rows, cols] holds expert e at rows e*rows.. of its matrix view.
        rows = (e * (stop - first), (e + 1) * (stop - first)) if place.stacked else None
        b_e = _part(b, (first, stop, 1), cols)
        made.append((name, Term("expert", label, module, b_e, a_e, scale, rows=rows)))
    return made
