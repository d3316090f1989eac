"""An MXFP4 base folder (``quant_method: "mxfp4"``, gpt-oss): found, checked, opened.

Every ``P_blocks`` (uint8 ``[E, R, G, 16]``) needs its ``P_scales`` (uint8
``[E, R, G]``, no byte 255: E8M0's NaN); the merge sees ``P`` ``[E, G*32, R]``
(mxfp4.py), and the rest of the folder (attention, router, biases) as
stored. Only gpt_oss's fused expert layout is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InputError
from .fp8_open import tensor_ref, where_of
from .int_open import check_shape, corrupt, load_ref, side_ref
from .keep import listed
from .mxfp4 import BLOCK, FLOAT32_MAX_SCALE, Mxfp4Codec
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

MODEL_TYPES = ("gpt_oss",)


class Mxfp4Folder:
    """The BaseFormat of ``quant_method: "mxfp4"`` folders (gpt-oss experts)."""

    name = "mxfp4"
    title = "MXFP4"
    quant_method = "mxfp4"

    def marked(self, ckpt: Checkpoint) -> bool:
        """Never by names alone: the config says the blocks are MXFP4."""
        return False

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Blocks and scales without a quantization_config."""
        names = sorted(n for n in ckpt.weight_map if n.endswith(("_blocks", "_scales")))
        if any(n.endswith("_blocks") and n[:-7] + "_scales" in ckpt.weight_map for n in names):
            raise CorruptFileError(
                f"{ckpt.path}: holds MXFP4-style tensors ({', '.join(names[:2])}) but "
                "config.json has no quantization_config saying how they are stored.",
                hint="Restore the model's original config.json (with its quantization_config).",
            )

    def module_of(self, name: str) -> str:
        """The module of a decoded parameter (``...mlp.experts.gate_up_proj`` -> its experts)."""
        return name.rsplit(".", 1)[0]

    def keep_setting(self, settings: dict, modules: list[str]) -> tuple[str, list[str]]:
        """Touched expert modules join ``modules_to_not_convert``."""
        return listed(settings, "modules_to_not_convert", modules)

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Every ``mxfp4`` config is this format; other model types are refused here."""
        model_type = str(ckpt.config.get("model_type", ""))
        if model_type not in MODEL_TYPES:
            raise InputError(
                f"{ckpt.path}: an MXFP4 {model_type or 'model'}; shardmerge reads MXFP4 only in "
                "gpt_oss's fused expert layout.",
                hint="Merge into the model's 16-bit checkpoint instead.",
            )
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every MXFP4 tensor; raise on the first problem."""
        specs, shapes, names = {}, {}, {}
        for blocks in sorted(n for n in ckpt.weight_map if n.endswith("_blocks")):
            param = blocks[: -len("_blocks")]
            specs[param], shapes[param] = open_param(ckpt, param)
            names[blocks] = param
        if not specs:
            raise InputError(
                f"{ckpt.path}: config.json says MXFP4, but no tensor is stored as MXFP4 blocks "
                "(*_blocks).",
                hint="Remove quantization_config from config.json, or re-download the model.",
            )
        aux = {f"{p}_scales" for p in specs}
        strays = sorted(n for n in ckpt.weight_map if n.endswith("_scales") and n not in aux)
        if strays:
            raise CorruptFileError(
                f"{ckpt.path}: MXFP4 scales without their blocks: {', '.join(strays[:3])}.",
                hint="Is a shard missing from the index? Re-download the model.",
            )
        storage = dict.fromkeys(specs, "U8")
        parts = {p: (f"{p}_blocks", f"{p}_scales") for p in specs}
        return StoredBase(self.name, specs, shapes, storage, frozenset(aux), names, parts)


MXFP4_FOLDER = Mxfp4Folder()


def open_param(ckpt: Checkpoint, param: str) -> tuple[Mxfp4Codec, tuple[int, int, int]]:
    """The codec and decoded ``[E, in, out]`` shape of the MXFP4 parameter ``param``."""
    name = f"{param}_blocks"
    info = ckpt.tensor(name)
    if info.dtype != "U8" or len(info.shape) != 4 or info.shape[-1] != BLOCK // 2:
        raise corrupt(
            where_of(ckpt, name),
            f"MXFP4 blocks stored as {info.dtype} {list(info.shape)}; expected uint8 "
            f"[experts, rows, blocks, {BLOCK // 2}].",
        )
    if 0 in info.shape:
        raise corrupt(where_of(ckpt, name), f"an empty MXFP4 tensor {list(info.shape)}.")
    if param in ckpt.weight_map:
        raise corrupt(where_of(ckpt, name), f"both {param} and its MXFP4 blocks are stored.")
    experts, rows, groups, _ = info.shape
    scales = side_ref(ckpt, name, f"{param}_scales", ("U8",))
    check_shape(ckpt, scales, (experts, rows, groups), f"{name} {list(info.shape)}")
    values = load_ref(scales)
    if bool((values == 255).any()):
        raise corrupt(
            where_of(ckpt, scales.key),
            f"{int((values == 255).sum())} of its scales are 255 (NaN in E8M0); its experts "
            "cannot be dequantized.",
            hint="Re-quantize or re-download the model.",
        )
    top = int(values.max()) if values.numel() else 0
    dtype = "F32" if top <= FLOAT32_MAX_SCALE else "F64"
    codec = Mxfp4Codec(tensor_ref(ckpt, name), scales, dtype)
    return codec, (experts, groups * BLOCK, rows)
