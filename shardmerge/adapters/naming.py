"""From PEFT module names to base tensor names, and PEFT's per-module pattern rule."""

from __future__ import annotations

import re

from ..arch.embeddings import find_embeddings, is_vocab_tensor
from ..arch.keymap import key_map, renamed
from ..io.checkpoint import Checkpoint
from ..io.safetensors import TensorInfo

# The prefix PeftModel.save_pretrained() gives every key (absent in some hand-made files).
KEY_PREFIX = "base_model.model."


def strip_key_prefix(key: str) -> str:
    """An adapter key without PEFT's ``base_model.model.`` prefix."""
    return key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key


def pattern_regex(key: str) -> re.Pattern:
    """The regex PEFT's ``get_pattern_key`` builds from a rank_pattern/alpha_pattern key.

    The key is embedded as it is, so a key that is only valid on its own, such
    as one starting with an inline flag ``(?i)``, fails here as it fails in
    PEFT (re.error); the config checks refuse such a key by name.
    """
    return re.compile(rf"(.*\.)?({key})$")


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key matching the module name's tail."""
    for key in patterns:
        if pattern_regex(key).match(module):
            return patterns[key]
    return default


def resolve_base_name(module: str, suffix: str, ckpt: Checkpoint) -> str | None:
    """The base tensor for ``module.suffix``, allowing the prefix differences checkpoints carry.

    Where transformers renames the checkpoint's keys at load (NemotronH's
    ``backbone.``, a VLM's ``language_model.model.``: arch/keymap.py), the
    adapter names the loaded model: its rules find the stored tensor, for
    adapters named by the loaded model and by an older transformers alike.
    A checkpoint saved from a bare backbone lacks the ``model.``/``transformer.``
    the adapter's module names start with, and old GPT-2 checkpoints do too.
    """
    name = f"{module}.{suffix}"
    if renamed(ckpt):
        origin = key_map(ckpt).origin(name)
        if origin is not None:
            return origin.disk if origin.kind == "tensor" else None
    if name in ckpt.weight_map:
        return name
    parts = module.split(".")
    if len(parts) > 1:
        stripped = ".".join(parts[1:]) + f".{suffix}"
        if stripped in ckpt.weight_map:
            return stripped
    # An adapter named the way an older transformers named the modules
    # (``language_model.model.``): renamed by the same rules.
    km = key_map(ckpt)
    origin = km.origin(km.canonical(name))
    return origin.disk if origin is not None and origin.kind == "tensor" else None


def conversion_refusal(module: str, suffix: str, ckpt: Checkpoint) -> str | None:
    """Why ``module.suffix`` cannot be merged into the checkpoint when transformers builds it
    from stored tensors by an operation shardmerge does not invert (a split, a permutation)."""
    km = key_map(ckpt)
    name = f"{module}.{suffix}"
    origin = km.origin(name) or km.origin(km.canonical(name))
    if origin is None or origin.kind == "tensor":
        return None
    if origin.kind == "refused":
        return origin.reason
    return f"transformers builds {name} from the stored tensors of {origin.disk or origin.module} at load"


def resolve_lora_target(module: str, suffix: str, ckpt: Checkpoint) -> str | None:
    """``resolve_base_name``, and a tied base's lm_head, which it stores as the embedding.

    The name returned for that lm_head is not in the checkpoint: read it with
    ``base_tensor``; planner/embeddings.py decides whether the output writes it apart.
    """
    name = resolve_base_name(module, suffix, ckpt)
    if name is None and suffix == "weight" and is_vocab_tensor(f"{module}.weight"):
        emb, wanted = find_embeddings(ckpt), f"{module}.weight"
        if emb.tied and not emb.head_stored and wanted in (emb.head, f"model.{emb.head}"):
            return emb.head
    return name


def base_tensor(ckpt: Checkpoint, name: str) -> TensorInfo:
    """A base tensor's header entry; a tied base's unstored lm_head is its embedding's."""
    if name not in ckpt.weight_map:
        emb = find_embeddings(ckpt)
        if emb.tied and name == emb.head and emb.embed:
            return ckpt.tensor(emb.embed)
    return ckpt.tensor(name)
