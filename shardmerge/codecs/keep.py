"""Keeping a quantized base's untouched modules packed: the mixed view and its config change.

Without ``--dtype`` a GPTQ-family or MXFP4 base is written in its own format
wherever no adapter reaches: those modules' stored tensors are copied byte for
byte, side tensors and all. A module an adapter touches is dequantized,
merged and rounded once in the model's 16-bit dtype, its side tensors
dropped, and named in ``quantization_config`` as not quantized (the format's
``keep_setting``: ``modules_to_not_convert`` or compressed-tensors'
``ignore``). A format without such a setting has no ``keep_setting`` and is
refused without ``--dtype`` (planner/inputs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError
from .protocol import BaseFormat, StoredBase
from .view import decoded_view

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# config.json dtype names -> the safetensors dtype touched modules are written in.
MODEL_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class Kept:
    """A base as a mixed merge sees it: packed where untouched, decoded where touched."""

    view: Checkpoint
    stored: StoredBase  # only the modules that are dequantized
    setting: tuple[str, list[str]]  # dotted config.json key, its new value (as JSON has it)
    dtype: str  # safetensors dtype of the dequantized, merged modules


def keeps_untouched(fmt: BaseFormat) -> bool:
    """Whether the format can say in its config that single modules are not quantized."""
    return hasattr(fmt, "keep_setting")


def keep_untouched(
    ckpt: Checkpoint, stored: StoredBase, fmt: BaseFormat, touched: set[str]
) -> Kept:
    """The mixed view of the folder ``ckpt`` as stored: every module holding a tensor of
    ``touched`` decoded (all its coded tensors), the others as stored."""
    modules = sorted({fmt.module_of(n) for n in touched if n in stored.specs})
    decoded = {n for n in stored.specs if fmt.module_of(n) in modules}
    aux = {a for n in decoded for a in stored.parts[n]} & stored.aux
    only = StoredBase(
        stored.format,
        {n: stored.specs[n] for n in decoded},
        {n: stored.shapes[n] for n in decoded},
        {n: stored.storage[n] for n in decoded},
        frozenset(aux),
        {s: d for s, d in stored.names.items() if d in decoded},
        {n: stored.parts[n] for n in decoded},
    )
    setting = fmt.keep_setting(ckpt.config["quantization_config"], modules)
    return Kept(decoded_view(ckpt, only), only, setting, model_dtype(ckpt, fmt))


def model_dtype(ckpt: Checkpoint, fmt: BaseFormat) -> str:
    """The dtype config.json names for the model (its unquantized tensors)."""
    name = ckpt.config.get("torch_dtype", ckpt.config.get("dtype"))
    if name not in MODEL_DTYPES:
        raise InputError(
            f"{ckpt.path / 'config.json'}: names no model dtype (torch_dtype {name!r}), so "
            f"shardmerge cannot tell in which dtype to write the {fmt.title} modules an adapter "
            "touches.",
            hint="Pass --dtype bfloat16 (or float16): a fully dequantized model.",
        )
    return MODEL_DTYPES[name]


def listed(settings: dict, key: str, modules: list[str]) -> tuple[str, list[str]]:
    """``quantization_config.key`` with ``modules`` added to its list (kept in order)."""
    have = settings.get(key) or []
    have = [str(m) for m in have] if isinstance(have, list) else []
    return f"quantization_config.{key}", have + [m for m in modules if m not in have]
