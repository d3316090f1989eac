"""PEFT LoHa, LoKr and (IA)^3 adapters -> TensorEdits.

Semantics follow PEFT's ``merge_and_unload()`` (peft 0.21: tuners/loha/layer.py,
tuners/lokr/layer.py, tuners/ia3/layer.py, tuners/lycoris_utils.py), for the
Linear layers they apply to:

- LoHa: ``delta = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product).
- LoKr: ``delta = alpha / r * kron(w1, w2)``, each of ``w1``, ``w2`` stored whole
  (``lokr_w1``) or as a product (``lokr_w1_a @ lokr_w1_b``).
- IA3: ``W * l`` with ``l`` one factor per output feature (the layer's bias is
  scaled too), or per input feature for ``feedforward_modules``; Conv1D
  layers (fan_in_fan_out) store W transposed.

``r``/``alpha`` come per module from ``rank_pattern``/``alpha_pattern`` (first
matching key wins, as for LoRA); there is no rsLoRA for these methods.
Dropouts (``rank_dropout``, ``module_dropout``, ``rank_dropout_scale``) only
act in training. Convolution variants (``hada_t1``/``hada_t2``, ``lokr_t2``,
3-D/4-D factors or base weights) are refused by name, as are IA3 adapters
whose meaning a merge cannot keep (a weight other than 1, sharing a tensor).

The terms name their algebra (``form`` "hadamard", "kronecker"); turning
them into exact low-rank factors is kernel/factors.py's job. Factors stored
in float64 would make inexact products: they are refused.
"""

from __future__ import annotations

import re
from collections import Counter

from ..arch.layers import is_conv1d
from ..errors import ShardmergeError, UnsupportedAdapterError, count
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES
from ..terms import Replacement, Scaling, TensorEdit, TensorRef, Term
from .folder import Adapter, duplicate_keys_error, peft_type_of
from .lycoris_edits import LycorisEdits
from .naming import pattern_value, resolve_base_name, strip_key_prefix

# peft_type -> its keys: (module).(role).
_KEYS = {
    "LOHA": re.compile(r"(.+)\.(hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2))"),
    "LOKR": re.compile(r"(.+)\.(lokr_(?:w1|w1_a|w1_b|w2|w2_a|w2_b|t2))"),
    "IA3": re.compile(r"(.+)\.(ia3_l)"),
}
_SAVED = re.compile(r"(.+)\.(weight|bias)")


def _classify(
    adapter: Adapter, duplicates: list[tuple[str, str]] | None = None
) -> tuple[dict[str, dict[str, TensorRef]], list[str]]:
    """{module: {role: ref}} with roles like "hada_w1_a" or "saved.weight"; unknown keys apart.

    Two keys for one module and role (with and without the ``base_model.model.``
    prefix) are appended to ``duplicates`` as (kept, other).
    """
    pattern = _KEYS[peft_type_of(adapter.config)]
    modules: dict[str, dict[str, TensorRef]] = {}
    unknown: list[str] = []
    for key, ref in adapter.tensors.items():
        rest = strip_key_prefix(key)
        m = pattern.fullmatch(rest)
        if m:
            module, role = m.group(1), m.group(2)
        else:
            m = _SAVED.fullmatch(rest)
            # Another method's keys (lora_A.weight, ...) are not tensors saved whole.
            if not m or re.search(
                r"\.(hada_|lokr_|ia3_|lora_(A|B|embedding_[AB]|magnitude_vector)\b)", rest
            ):
                unknown.append(key)
                continue
            module, role = m.group(1), f"saved.{m.group(2)}"
        roles = modules.setdefault(module, {})
        if role in roles:
            if duplicates is not None:
                duplicates.append((roles[role].key, key))
            continue
        roles[role] = ref
    return modules, unknown


def adapter_edits(
    adapter: Adapter, weight: float, ckpt: Checkpoint
) -> tuple[dict[str, TensorEdit], Counter, list[ShardmergeError]]:
    """Translate one LoHa, LoKr or IA3 adapter, its config checked, into edits of base tensors."""
    if peft_type_of(adapter.config) == "IA3" and weight != 1.0:
        return (
            {},
            Counter(),
            [
                UnsupportedAdapterError(
                    f"{adapter.path}: an IA3 adapter scales weights (W * l); a weight of {weight} "
                    "has no defined meaning for it.",
                    hint="Give IA3 adapters weight 1.0, or merge it with PEFT.",
                )
            ],
        )
    c = LycorisEdits(adapter, ckpt)
    duplicates: list[tuple[str, str]] = []
    modules, unknown = _classify(adapter, duplicates)
    if duplicates:
        c.errors.append(duplicate_keys_error(adapter.weights_file, duplicates))
        return {}, Counter(), c.errors
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        )
        c.errors.append(
            UnsupportedAdapterError(
                f"{adapter.weights_file}: keys shardmerge does not understand in a {c.name} "
                f"adapter: {shown}.",
                hint=f"Is this a PEFT {c.name} adapter? Otherwise merge it with the tool that made it.",
            )
        )
    peft_type = peft_type_of(adapter.config)
    for module, roles in sorted(modules.items()):
        own = {r: ref for r, ref in roles.items() if not r.startswith("saved.")}
        if own and peft_type == "LOHA":
            _loha(c, module, own, weight)
        elif own and peft_type == "LOKR":
            _lokr(c, module, own, weight)
        elif own:
            _ia3(c, module, own["ia3_l"])
        for role, ref in roles.items():
            if role.startswith("saved."):
                _saved(c, module, role.split(".", 1)[1], ref, weight)

    if ckpt.config.get("tie_word_embeddings", False):
        tied = [
            n for n in c.edits if n.split(".")[-2:-1] in (["lm_head"], ["embed_tokens"], ["wte"])
        ]
        if tied:
            c.errors.append(
                UnsupportedAdapterError(
                    f"{adapter.path}: it changes {', '.join(tied)} but the base ties its input and "
                    "output embeddings (tie_word_embeddings); merging into tied embeddings is not "
                    "supported yet."
                )
            )
    if not c.edits and not c.errors:
        c.incompatible(f"it holds no {c.name} weights that apply to the base model.")
    return c.edits, c.counts, c.errors


def _rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("alpha", 8))
    return r, alpha


def _loha(c: LycorisEdits, module: str, roles: dict[str, TensorRef], weight: float) -> None:
    if "hada_t1" in roles or "hada_t2" in roles:
        c.unsupported(
            f"module {module} has hada_t1/hada_t2 (LoHa with use_effective_conv2d on a "
            "convolution); LoHa on convolution layers is not supported."
        )
        return
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    missing = [n for n in names if n not in roles]
    if missing:
        c.incompatible(f"module {module} lacks {', '.join(missing)} (an incomplete LoHa module).")
        return
    w1a, w1b, w2a, w2b = (roles[n] for n in names)
    if not c.factors_ok(module, [w1a, w1b, w2a, w2b]):
        return
    r_cfg, alpha = _rank_alpha(c.adapter.config, module)
    if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        c.incompatible(f"module {module}: the ranks of its LoHa factors do not match.")
        return
    if (w1a.shape[0], w1b.shape[1]) != (w2a.shape[0], w2b.shape[1]):
        c.incompatible(
            f"module {module}: (w1_a @ w1_b) is {w1a.shape[0]}x{w1b.shape[1]} but (w2_a @ w2_b) "
            f"is {w2a.shape[0]}x{w2b.shape[1]}."
        )
        return
    if w1a.shape[1] != r_cfg or w2a.shape[1] != r_cfg:
        c.corrupt(
            f"module {module} has LoHa rank {w1a.shape[1]}/{w2a.shape[1]} but adapter_config.json "
            f"gives r={r_cfg}."
        )
        return
    base, w = c.base_weight(module, "loha")
    if base is None:
        return
    expect = (w1a.shape[0], w1b.shape[1])
    if w.shape != expect:
        c.incompatible(
            f"target {module}: the LoHa delta has shape {list(expect)} but base tensor {base} has "
            f"shape {list(w.shape)}."
        )
        return
    term = Term(
        "loha", c.adapter.label, module, w1a, w1b, weight * (alpha / r_cfg),
        form="hadamard", extra=(w2a, w2b),
    )  # fmt: skip
    c.add(base, TensorEdit(terms=(term,)), "loha")


def _lokr(c: LycorisEdits, module: str, roles: dict[str, TensorRef], weight: float) -> None:
    if "lokr_t2" in roles:
        c.unsupported(
            f"module {module} has lokr_t2 (LoKr with use_effective_conv2d on a convolution); "
            "LoKr on convolution layers is not supported."
        )
        return
    sides = []
    for i in (1, 2):
        full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
        if full in roles and a not in roles and b not in roles:
            sides.append((roles[full],))
        elif full not in roles and a in roles and b in roles:
            sides.append((roles[a], roles[b]))
        else:
            have = ", ".join(n for n in (full, a, b) if n in roles) or "nothing"
            c.incompatible(
                f"module {module} has {have} for w{i}; LoKr needs either {full} or both {a} and {b}."
            )
            return
    if not c.factors_ok(module, [r for side in sides for r in side]):
        return
    r_cfg, alpha = _rank_alpha(c.adapter.config, module)
    dims = []
    for i, side in enumerate(sides, start=1):
        if len(side) == 2:
            a, b = side
            if a.shape[1] != b.shape[0]:
                c.incompatible(f"module {module}: lokr_w{i}_a and lokr_w{i}_b ranks differ.")
                return
            if a.shape[1] != r_cfg:
                c.corrupt(
                    f"module {module} has LoKr rank {a.shape[1]} (lokr_w{i}_a) but "
                    f"adapter_config.json gives r={r_cfg}."
                )
                return
            dims.append((a.shape[0], b.shape[1]))
        else:
            dims.append(side[0].shape)
    base, w = c.base_weight(module, "lokr")
    if base is None:
        return
    (a1, c1), (b2, d2) = dims
    expect = (a1 * b2, c1 * d2)
    if w.shape != expect:
        c.incompatible(
            f"target {module}: the LoKr delta kron(w1, w2) has shape {list(expect)} but base "
            f"tensor {base} has shape {list(w.shape)}."
        )
        return
    w1, w2 = sides
    term = Term(
        "lokr", c.adapter.label, module, w1[0], w1[1] if len(w1) == 2 else None,
        weight * (alpha / r_cfg), form="kronecker", extra=w2,
    )  # fmt: skip
    c.add(base, TensorEdit(terms=(term,)), "lokr")


def _is_feedforward(spec, module: str) -> bool | None:
    """PEFT's IA3 rule (IA3Model._check_target_module_feedforward); None when not configured."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return bool(re.fullmatch(spec, module))
    return any(module.endswith(key) for key in spec)


def _ia3(c: LycorisEdits, module: str, vec: TensorRef) -> None:
    cfg = c.adapter.config
    if len(vec.shape) < 2:
        c.corrupt(
            f"ia3_l of {module} has shape {list(vec.shape)}; IA3 on a Linear layer stores a "
            "2-D [out, 1] or [1, in] vector."
        )
        return
    if len(vec.shape) != 2:
        c.unsupported(
            f"module {module} has a {len(vec.shape)}-D ia3_l; IA3 on convolution layers is not "
            "supported."
        )
        return
    if vec.dtype not in FLOAT_DTYPES:
        c.corrupt(f"ia3_l of {module} is not floating point.")
        return
    if vec.dtype == "F64":
        c.unsupported(
            f"module {module} has its IA3 vector stored in float64; W * l is then not exact in "
            "float64, so shardmerge cannot merge it exactly.",
            hint="Save the adapter in float32, or merge it with PEFT.",
        )
        return
    base, w = c.base_weight(module, "ia3")
    if base is None:
        return
    rows, cols = vec.shape
    by_shape = True if rows == 1 and cols != 1 else False if cols == 1 and rows != 1 else None
    by_config = _is_feedforward(cfg.get("feedforward_modules"), module)
    if by_shape is not None and by_config is not None and by_shape != by_config:
        c.corrupt(
            f"ia3_l of {module} has shape {list(vec.shape)}, which is "
            f"{'' if by_shape else 'not '}the feedforward layout, but feedforward_modules says "
            f"{module} is {'' if by_config else 'not '}a feedforward module."
        )
        return
    ff = by_shape if by_shape is not None else bool(by_config)
    n = vec.numel
    # Linear weights are (out, in); Conv1D weights (in, out). A feedforward
    # vector scales the input features, any other the output features.
    feature_axis_linear = 1 if ff else 0
    conv1d = is_conv1d(str(c.ckpt.config.get("model_type", "")), module) or (
        cfg.get("fan_in_fan_out")
        and w.shape[1 - feature_axis_linear] == n
        and w.shape[feature_axis_linear] != n
    )
    axis = 1 - feature_axis_linear if conv1d else feature_axis_linear
    if w.shape[axis] != n:
        c.incompatible(
            f"target {module}: ia3_l has {count(n, 'entry')} ({'input' if ff else 'output'} features) but "
            f"base tensor {base} {list(w.shape)} has {w.shape[axis]} along that axis."
        )
        return
    scaling = Scaling(c.adapter.label, module, vec, axis)
    c.add(base, TensorEdit(scaling=scaling), "ia3")
    if ff:
        return
    bias = resolve_base_name(module, "bias", c.ckpt)
    if bias is None:
        return
    b = c.ckpt.tensor(bias)
    if b.shape != (n,) or b.dtype not in FLOAT_DTYPES or b.dtype == "F64":
        c.incompatible(
            f"IA3 scales the bias {bias} of {module} by ia3_l ({count(n, 'entry')}), but it is "
            f"{b.dtype} {list(b.shape)}."
        )
        return
    c.add(bias, TensorEdit(scaling=Scaling(c.adapter.label, module, vec, 0)), "ia3_bias")


def _saved(c: LycorisEdits, module: str, suffix: str, ref: TensorRef, weight: float) -> None:
    """A tensor saved whole (modules_to_save): it replaces the base's, as in lora.py."""
    base = resolve_base_name(module, suffix, c.ckpt)
    mts = set(c.adapter.config.get("modules_to_save") or [])
    kind = (
        "modules_to_save"
        if module in mts or module.rsplit(".", 1)[-1] in mts
        else "bias"
        if suffix == "bias"
        else "saved_tensor"
    )
    if base is None:
        c.incompatible(
            f"it saves {module}.{suffix} whole ({kind}) but the base has no such tensor."
        )
        return
    w = c.ckpt.tensor(base)
    if ref.shape != w.shape or (ref.dtype in FLOAT_DTYPES) != (w.dtype in FLOAT_DTYPES):
        c.incompatible(
            f"saved tensor {module}.{suffix} is {ref.dtype} {list(ref.shape)} but base {base} is "
            f"{w.dtype} {list(w.shape)}."
        )
        return
    if weight != 1.0:
        c.errors.append(
            UnsupportedAdapterError(
                f"{c.adapter.path}: it replaces {base} whole ({kind}); a weight of {weight} has no "
                "defined meaning for a replaced tensor.",
                hint="Give this adapter weight 1.0.",
            )
        )
        return
    c.add(base, TensorEdit(replacement=Replacement(c.adapter.label, kind, ref)), kind)
