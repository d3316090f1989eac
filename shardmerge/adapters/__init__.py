"""PEFT adapter folders, translated into neutral TensorEdits (see shardmerge.terms).

The one place that dispatches on ``peft_type``: each supported method has a
config check (config.py) and a translation (lora.py for LoRA, DoRA, MoE
expert LoRA and trainable tokens; lycoris.py for LoHa, LoKr and IA3).
Everything else is refused by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..errors import ShardmergeError
from ..io.checkpoint import Checkpoint
from ..terms import TensorEdit
from . import lora, lycoris
from .config import (
    lora_config_problems,
    lycoris_config_problems,
    missing_peft_type,
    token_config_problems,
    unsupported_method,
)
from .folder import CONFIG_NAME, Adapter, open_adapter, peft_type_of
from .summary import adapter_summary

__all__ = [
    "CONFIG_NAME",
    "Adapter",
    "adapter_edits",
    "adapter_summary",
    "check_supported",
    "open_adapter",
]

Edits = tuple[dict[str, TensorEdit], Counter, list[ShardmergeError]]


class _Method(NamedTuple):
    """How one PEFT method is checked and translated."""

    check: Callable[[dict, Path], list[ShardmergeError]]  # (config, its path) -> problems
    translate: Callable[[Adapter, float, Checkpoint], Edits]  # run on a checked config only


_METHODS: dict[str, _Method] = {
    "LORA": _Method(lora_config_problems, lora.adapter_edits),
    "TRAINABLE_TOKENS": _Method(token_config_problems, lora.adapter_edits),
    "LOHA": _Method(lycoris_config_problems, lycoris.adapter_edits),
    "LOKR": _Method(lycoris_config_problems, lycoris.adapter_edits),
    "IA3": _Method(lycoris_config_problems, lycoris.adapter_edits),
}


def check_supported(adapter: Adapter) -> list[ShardmergeError]:
    """Refuse, by name, adapter kinds and options that shardmerge does not merge."""
    cfg, where = adapter.config, adapter.path / CONFIG_NAME
    peft_type = peft_type_of(cfg)
    if not peft_type:
        return [missing_peft_type(where)]
    method = _METHODS.get(peft_type)
    if method is None:
        return [unsupported_method(cfg, where, peft_type)]
    return method.check(cfg, where)


def adapter_edits(adapter: Adapter, weight: float, ckpt: Checkpoint) -> Edits:
    """Translate one adapter into edits of base tensors.

    Returns the edits by base tensor name, the count of modules applied per
    kind, and every problem found (empty when the adapter fits the base).
    """
    errors = check_supported(adapter)
    if errors:
        return {}, Counter(), errors
    return _METHODS[peft_type_of(adapter.config)].translate(adapter, weight, ckpt)
