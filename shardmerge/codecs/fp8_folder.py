"""An FP8 base folder of ``quant_method: "fp8"``: found, checked, opened.

The convention of DeepSeek-V3/R1, Kimi-K2, Qwen3/GLM FP8 and transformers'
fine-grained FP8: ``W.weight`` in float8_e4m3fn with a ``W.weight_scale_inv``
(float32, or float8_e8m0fnu) of shape ``[ceil(out/bm), ceil(in/bn)]`` for
``weight_block_size`` ``[bm, bn]`` (none: one scale per tensor); a fused expert
tensor ``P`` ``[E, out, in]`` has ``P_scale_inv`` ``[E, ...]``. The value is
code times scale ("inv": the inverse of the quantizer's scale). A scale may
sit in another shard than its weight: the index finds it. With ``scale_fmt:
"ue8m0"`` every scale must be a power of two. Static activation scales are
dropped with the weight scales: the output is a dequantized model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InputError
from .detect import FIX_CONFIG, refusal
from .fp8 import Fp8Codec
from .fp8_open import Block, check_codes, check_strays, is_fp8, open_scaled
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

SCALE_SUFFIX = "_scale_inv"
# Activation scales of the static scheme: meaningless once the weights are dequantized.
ACTIVATION_SUFFIXES = (".activation_scale", "_activation_scale", ".input_scale")
# config.json ``fmt`` -> the safetensors dtype of the codes.
FORMATS = {"e4m3": "F8_E4M3", "float8_e4m3fn": "F8_E4M3", "e5m2": "F8_E5M2"}
SCALE_FORMATS = (None, "float", "ue8m0")


def scale_name(weight: str) -> str:
    """``x.weight`` -> ``x.weight_scale_inv``; a fused ``x.gate_up_proj`` -> ``x.gate_up_proj_scale_inv``."""
    return weight + SCALE_SUFFIX


class Fp8Folder:
    """The BaseFormat of ``quant_method: "fp8"`` folders (block-scaled FP8)."""

    name = "fp8"
    title = "FP8"
    quant_method = "fp8"

    def marked(self, ckpt: Checkpoint) -> bool:
        """Never by names alone: an FP8 folder needs its quantization_config."""
        return False

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """FP8 tensors in a folder whose config.json has no quantization_config."""
        coded = sorted(n for n in ckpt.weight_map if is_fp8(ckpt.tensor(n).dtype))
        if coded:
            more = f" and {len(coded) - 3} more" if len(coded) > 3 else ""
            raise CorruptFileError(
                f"{ckpt.path}: holds FP8 tensors ({', '.join(coded[:3])}{more}) but config.json "
                "has no quantization_config saying how they are scaled.",
                hint="Restore the model's original config.json (with its quantization_config).",
            )

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Every ``fp8`` config is this format; unreadable settings are refused here."""
        read_settings(ckpt, settings)
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every FP8 weight and its scale; raise on the first problem."""
        code_dtype, block, ue8m0 = read_settings(ckpt, ckpt.config["quantization_config"])
        setting = f"weight_block_size {list(block) if block else None}"
        specs: dict[str, Fp8Codec] = {}
        for name in sorted(ckpt.weight_map):
            if is_fp8(ckpt.tensor(name).dtype) and not name.endswith(SCALE_SUFFIX):
                check_codes(ckpt, name, code_dtype)
                specs[name] = open_scaled(ckpt, name, scale_name(name), [block], setting, ue8m0)
        if not specs:
            raise CorruptFileError(
                f"{ckpt.path}: config.json says FP8 (quant_method fp8) but no tensor is stored "
                "as FP8.",
                hint="Remove quantization_config from config.json, or re-save the model.",
            )
        scales = {scale_name(n) for n in specs}
        check_strays(ckpt, SCALE_SUFFIX, scales, SCALE_SUFFIX)
        aux = scales | {n for n in ckpt.weight_map if n.endswith(ACTIVATION_SUFFIXES)}
        shapes = {n: ckpt.tensor(n).shape for n in specs}
        storage = {n: ckpt.tensor(n).dtype for n in specs}
        return StoredBase(self.name, specs, shapes, storage, frozenset(aux))


FP8_FOLDER = Fp8Folder()


def read_settings(ckpt: Checkpoint, settings: dict) -> tuple[str | None, Block, bool]:
    """(code dtype named by ``fmt`` or None, weight block or None, ue8m0) from the config."""
    where = f"{ckpt.path / 'config.json'}: quantization_config"
    fmt = settings.get("fmt")
    if fmt is not None and str(fmt).lower() not in FORMATS:
        raise refusal(ckpt, f"FP8 in the {fmt!r} encoding (shardmerge reads e4m3 and e5m2)")
    scale_fmt = settings.get("scale_fmt")
    if scale_fmt not in SCALE_FORMATS:
        raise refusal(ckpt, f"FP8 with scale_fmt {scale_fmt!r} (shardmerge reads float and ue8m0)")
    block = settings.get("weight_block_size")
    if block is not None:
        if not (
            isinstance(block, list)
            and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise CorruptFileError(
                f"{where}: weight_block_size {block!r} is not two positive integers.",
                hint=FIX_CONFIG,
            )
        block = (block[0], block[1])
    if settings.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
        raise InputError(
            f"{where}: activation_scheme {settings.get('activation_scheme')!r} is not dynamic "
            "or static.",
            hint=FIX_CONFIG,
        )
    code = FORMATS[str(fmt).lower()] if fmt is not None else None
    return code, block, scale_fmt == "ue8m0"
