"""The keys of a PEFT LoRA weights file, grouped by module and named by their role."""

from __future__ import annotations

import re

from ..terms import TensorRef
from .folder import Adapter
from .naming import strip_key_prefix

# role -> key pattern; the first match wins, so the specific ones come first.
_KEY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("lora_A", r"(.+)\.lora_A\.weight"),
        ("lora_B", r"(.+)\.lora_B\.weight"),
        ("lora_B_bias", r"(.+)\.lora_B\.bias"),
        ("emb_A", r"(.+)\.lora_embedding_A"),
        ("emb_B", r"(.+)\.lora_embedding_B"),
        ("dora", r"(.+)\.lora_magnitude_vector(?:\.weight)?"),
        ("trainable_tokens", r"(.+?)(?:\.base_layer)?(?:\.token_adapter)?\.trainable_tokens_delta"),
        ("base_layer", r"(.+)\.token_adapter\.base_layer\.(weight|bias)"),
        # With a resized vocabulary PEFT also saves a modules_to_save wrapper's
        # parts: its copy (the same as module.weight) and the resized original.
        ("mts_copy", r"(.+)\.modules_to_save\.(weight|bias)"),
        ("original", r"(.+)\.original_module\.(weight|bias)"),
        ("base_layer", r"(.+)\.base_layer\.(weight|bias)"),
        ("saved", r"(.+)\.(weight|bias)"),
    )
)
# Roles whose key also names the tensor (weight or bias): the role becomes e.g. "saved.bias".
_SUFFIXED_ROLES = ("base_layer", "saved", "mts_copy", "original")
# Roles of LoRA's own factors and vectors (not tensors saved whole, not token rows).
LORA_ROLES = ("lora_A", "lora_B", "lora_B_bias", "emb_A", "emb_B", "dora")


def classify_lora_keys(
    adapter: Adapter, duplicates: list[tuple[str, str]] | None = None
) -> tuple[dict[str, dict[str, TensorRef]], list[str]]:
    """Group the adapter's keys by module: {module: {role: ref}}; unknown keys returned apart.

    Two keys for one module and role (``x.lora_A.weight`` with and without the
    ``base_model.model.`` prefix, ``lora_magnitude_vector`` with and without
    ``.weight``) are appended to ``duplicates`` as (kept, other).
    """
    modules: dict[str, dict[str, TensorRef]] = {}
    unknown: list[str] = []
    for key, ref in adapter.tensors.items():
        rest = strip_key_prefix(key)
        for role, pattern in _KEY_PATTERNS:
            m = pattern.fullmatch(rest)
            if m:
                module = m.group(1)
                if role in _SUFFIXED_ROLES:
                    role = f"{role}.{m.group(2)}"
                roles = modules.setdefault(module, {})
                if role in roles:
                    if duplicates is not None:
                        duplicates.append((roles[role].key, key))
                    break
                roles[role] = ref
                break
        else:
            unknown.append(key)
    return modules, unknown
