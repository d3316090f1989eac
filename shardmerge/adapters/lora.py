"""PEFT LoRA adapters (and TRAINABLE_TOKENS ones): weights -> TensorEdits per base tensor.

Semantics follow PEFT's ``merge_and_unload()`` (tuners/lora/layer.py,
utils/save_and_load.py): scaling ``lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA), per-module ``r``/``lora_alpha`` from ``rank_pattern``/``alpha_pattern``
(first matching pattern wins), ``delta = B @ A`` (transposed for Conv1D
layers and embeddings; lowrank.py), ``lora_B.bias * scaling`` added to the
layer bias, and tensors the adapter saves whole (modules_to_save, trained
biases) replacing the base's. LoRA on MoE expert parameters is moe.py's;
trainable tokens (LoRA's trainable_token_indices, TRAINABLE_TOKENS adapters)
and tied embeddings are settled by tokens.py. Anything else is refused by name.
"""

from __future__ import annotations

from collections import Counter

from ..arch.embeddings import is_vocab_tensor
from ..errors import CorruptFileError, ShardmergeError, UnsupportedAdapterError
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES
from ..terms import Replacement, TensorEdit, TensorRef
from . import tokens
from .collect import CollectedEdits
from .config import is_standalone_tokens
from .folder import Adapter, duplicate_keys_error
from .lora_keys import LORA_ROLES, classify_lora_keys
from .lowrank import LOW_RANK_ROLES, lora_scaling, lowrank_edits
from .moe import expert_terms
from .naming import base_tensor, pattern_value, resolve_lora_target


def adapter_edits(
    adapter: Adapter, weight: float, ckpt: Checkpoint
) -> tuple[dict[str, TensorEdit], Counter, list[ShardmergeError]]:
    """Translate one LoRA or TRAINABLE_TOKENS adapter, its config checked, into edits of base tensors.

    Returns the edits by base tensor name, the count of modules applied per
    kind, and every problem found (empty when the adapter fits the base).
    """
    c = CollectedEdits(adapter)
    modules = _grouped_keys(c)
    if modules is None:
        return {}, Counter(), c.errors
    if adapter.config.get("target_parameters"):
        modules = _expert_edits(c, modules, weight, ckpt)
    for module, roles in sorted(modules.items()):
        _module_edits(c, module, roles, weight, ckpt)
    tokens.embedding_edits(
        adapter, modules, c.edits, weight, ckpt,
        lambda module, suffix: resolve_lora_target(module, suffix, ckpt), c.counts, c.errors,
    )  # fmt: skip
    c.report_unmatched()
    if not c.edits and not c.errors:
        c.incompatible("it holds no LoRA weights that apply to the base model.")
    return c.edits, c.counts, c.errors


def _grouped_keys(c: CollectedEdits) -> dict[str, dict[str, TensorRef]] | None:
    """The adapter's keys by module and role; None when they cannot be merged (problems recorded).

    Unknown keys are reported and the rest still checked, so one run lists
    every problem.
    """
    wfile = c.adapter.weights_file
    duplicates: list[tuple[str, str]] = []
    modules, unknown = classify_lora_keys(c.adapter, duplicates)
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        )
        c.errors.append(
            UnsupportedAdapterError(
                f"{wfile}: keys shardmerge does not understand: {shown}.",
                hint="Is this a PEFT LoRA adapter? Otherwise merge it with the tool that made it.",
            )
        )
    if duplicates:
        # Which of the two PEFT would load is not defined: refuse rather than pick one.
        c.errors.append(duplicate_keys_error(wfile, duplicates))
    standalone = is_standalone_tokens(c.adapter.config)
    if standalone:
        # A TRAINABLE_TOKENS adapter holds token rows (and maybe a resized embedding), no LoRA.
        lora_keys = sorted(
            ref.key for roles in modules.values() for role, ref in roles.items()
            if role in LORA_ROLES
        )  # fmt: skip
        if lora_keys:
            c.errors.append(
                CorruptFileError(
                    f"{wfile}: a TRAINABLE_TOKENS adapter (peft_type in adapter_config.json) "
                    f"holds LoRA keys: {', '.join(lora_keys[:6])}.",
                    hint="Fix peft_type in adapter_config.json, or re-save the adapter with "
                    "PeftModel.save_pretrained().",
                )
            )
    if duplicates or (c.errors and standalone):
        return None
    return modules


def _expert_edits(
    c: CollectedEdits, modules: dict[str, dict[str, TensorRef]], weight: float, ckpt: Checkpoint
) -> dict[str, dict[str, TensorRef]]:
    """Add the terms of LoRA on expert parameters (target_parameters); the modules left to do."""
    cfg = c.adapter.config
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    moe = expert_terms(
        cfg["target_parameters"], c.adapter.label, str(c.adapter.weights_file), modules, weight,
        ckpt,
        rank_of=lambda key: pattern_value(rank_pattern, key, cfg.get("r", 8)),
        scale_of=lambda key, r: lora_scaling(pattern_value(alpha_pattern, key, cfg.get("lora_alpha", 8)), r, use_rslora),
    )  # fmt: skip
    for base_name, term in moe.terms:
        c.add(base_name, term=term)
    c.counts.update(moe.counts)
    c.errors.extend(moe.errors)
    c.unmatched.extend(moe.unmatched)
    return {m: roles for m, roles in modules.items() if m not in moe.claimed}


def _module_edits(
    c: CollectedEdits, module: str, roles: dict[str, TensorRef], weight: float, ckpt: Checkpoint
) -> None:
    """The edits of one adapter module: its A/B pair, then its tensors saved whole."""
    if "dora" in roles and not c.adapter.config.get("use_dora"):
        # The weights hold DoRA vectors although the config does not say so: refuse.
        c.errors.append(
            UnsupportedAdapterError(
                f"{c.adapter.weights_file}: module {module} has DoRA magnitude vectors "
                "(lora_magnitude_vector) but adapter_config.json has no use_dora; the two disagree.",
                hint="Set use_dora: true if this is a DoRA adapter, or re-save it with "
                "PeftModel.save_pretrained().",
            )
        )
        return
    if any(r in roles for r in LOW_RANK_ROLES):
        if not lowrank_edits(c, module, roles, weight, ckpt):
            return
    elif "lora_B_bias" in roles:
        c.incompatible(f"module {module} has lora_B.bias without LoRA factors.", ask=False)
    elif "dora" in roles:
        c.incompatible(
            f"module {module} has a DoRA magnitude vector without LoRA factors.", ask=False
        )
    for role, ref in roles.items():
        _saved_tensor(c, module, role, ref, weight, ckpt)


def _saved_tensor(
    c: CollectedEdits, module: str, role: str, ref: TensorRef, weight: float, ckpt: Checkpoint
) -> None:
    """A tensor the adapter saves whole: it replaces the base's (wrapper parts are only checked)."""
    # A modules_to_save wrapper's parts (its copy, the original) are checked
    # like saved tensors: tokens.py may take the original as a tied base's value.
    wrapper_part = role.startswith(("original.", "mts_copy."))
    if not role.startswith(("saved.", "base_layer.")) and not wrapper_part:
        return
    suffix = role.split(".", 1)[1]
    base_name = resolve_lora_target(module, suffix, ckpt)
    kind = _saved_kind(c.adapter.config, module, role, suffix, wrapper_part)
    shown = ref.key if wrapper_part else f"{module}.{suffix}"
    if base_name is None:
        c.unmatched.append(f"{shown} (saved whole, {kind})")
        return
    w = base_tensor(ckpt, base_name)
    resized = (
        is_vocab_tensor(base_name)
        and len(ref.shape) == len(w.shape) == 2
        and ref.shape[1:] == w.shape[1:]
        and ref.shape[0] > 0
    )
    if ref.shape != w.shape and not resized:
        c.incompatible(
            f"saved tensor {shown} has shape {list(ref.shape)} but base {base_name} "
            f"has {list(w.shape)}."
        )
        return
    if (ref.dtype in FLOAT_DTYPES) != (w.dtype in FLOAT_DTYPES):
        c.incompatible(f"saved tensor {shown} is {ref.dtype} but base {base_name} is {w.dtype}.")
        return
    if wrapper_part:
        return
    if weight != 1.0:
        c.errors.append(
            UnsupportedAdapterError(
                f"{c.adapter.path}: it replaces {base_name} whole ({kind}); a weight of {weight} "
                "has no defined meaning for a replaced tensor.",
                hint="Give this adapter weight 1.0.",
            )
        )
        return
    if c.edits.get(base_name, TensorEdit()).replacement is not None:
        c.incompatible(f"it saves {base_name} twice.", ask=False)
        return
    c.add(base_name, repl=Replacement(c.adapter.label, kind, ref))
    c.counts[kind] += 1


def _saved_kind(cfg: dict, module: str, role: str, suffix: str, wrapper_part: bool) -> str:
    """Why a tensor is saved whole: base_layer, modules_to_save, bias or saved_tensor."""
    if role.startswith("base_layer."):
        return "base_layer"
    modules_to_save = set(cfg.get("modules_to_save") or [])
    if wrapper_part or module in modules_to_save or module.rsplit(".", 1)[-1] in modules_to_save:
        return "modules_to_save"
    return "bias" if suffix == "bias" else "saved_tensor"
