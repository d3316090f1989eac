"""A GPTQ base folder (``quant_method: "gptq"``): found, checked, opened.

AutoGPTQ / GPTQModel / optimum save each quantized Linear ``m`` as
``m.qweight`` (int32 ``[in*bits/32, out]``, codes packed down the input dim,
lowest bits first), ``m.qzeros`` (int32 ``[groups, out*bits/32]``),
``m.scales`` (``[groups, out]``, float16) and ``m.g_idx`` (int32 ``[in]``,
each input column's group; with ``desc_act`` a permutation of groups, else
column // group_size). The value is ``(code - zero) * scale``. In the
``checkpoint_format: "gptq"`` (v1) convention the stored zero point is one
less than the real one (``sym`` stores 2^(bits-1) - 1); ``"gptq_v2"`` stores it
as is. Bit widths 2, 4 and 8 are read (3-bit words straddle and are refused).
The decoded view names the weight ``m.weight``; the side tensors are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InputError
from .detect import refusal
from .fp8_open import tensor_ref, where_of
from .int_open import (
    INDEX_DTYPES,
    SCALE_DTYPES,
    check_bits,
    check_group,
    check_shape,
    corrupt,
    finish,
    side_ref,
)
from .intq import IntCodec, group_count
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

BITS = (2, 4, 8)
# checkpoint_format -> what is added to a stored zero point.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
SIDE_SUFFIXES = (".qzeros", ".scales", ".g_idx")


def packed_modules(ckpt: Checkpoint) -> list[str]:
    """The modules stored as ``m.qweight``, sorted."""
    return sorted(n[: -len(".qweight")] for n in ckpt.weight_map if n.endswith(".qweight"))


def check_has_packed(ckpt: Checkpoint, title: str) -> list[str]:
    """The packed modules; refuses a folder whose config names ``title`` but holds none."""
    modules = packed_modules(ckpt)
    if not modules:
        raise InputError(
            f"{ckpt.path}: config.json says the model is quantized with {title}, but no "
            "tensor is stored packed (*.qweight).",
            hint="Remove quantization_config from config.json, or re-download the model.",
        )
    return modules


def check_qweight(ckpt: Checkpoint, module: str) -> tuple[int, int]:
    """``m.qweight`` is a 2-D int32 tensor with no ``m.weight`` beside it; its shape."""
    name = f"{module}.qweight"
    info = ckpt.tensor(name)
    if info.dtype != "I32" or len(info.shape) != 2 or 0 in info.shape:
        raise corrupt(
            where_of(ckpt, name),
            f"packed codes stored as {info.dtype} {list(info.shape)}; expected a 2-D int32 tensor.",
        )
    if f"{module}.weight" in ckpt.weight_map:
        raise corrupt(where_of(ckpt, name), f"{module} holds both a packed qweight and a weight.")
    return info.shape[0], info.shape[1]


def view_names(modules: list[str]) -> dict[str, str]:
    """Stored name -> the name the merge sees: ``m.qweight`` -> ``m.weight``."""
    return {f"{m}.qweight": f"{m}.weight" for m in modules}


def stored_base(
    ckpt: Checkpoint, fmt: str, specs: dict[str, IntCodec], shapes: dict, side: tuple[str, ...]
) -> StoredBase:
    """The StoredBase of packed modules (specs keyed by the view's ``m.weight``)."""
    modules = [w[: -len(".weight")] for w in specs]
    aux = {f"{m}{s}" for m in modules for s in side} & set(ckpt.weight_map)
    strays = sorted(
        n for n in ckpt.weight_map if n.endswith((".qzeros", ".g_idx")) and n not in aux
    )
    if strays:
        raise CorruptFileError(
            f"{ckpt.path}: quantization tensors without a qweight of their module: "
            f"{', '.join(strays[:3])}.",
            hint="Is a shard missing from the index? Re-download the model.",
        )
    storage = {f"{m}.weight": "I32" for m in modules}  # the packed words
    parts = {
        f"{m}.weight": tuple(sorted({f"{m}.qweight"} | ({f"{m}{s}" for s in side} & aux)))
        for m in modules
    }
    return StoredBase(fmt, specs, shapes, storage, frozenset(aux), view_names(modules), parts)


def module_of(name: str) -> str:
    """The module of a decoded ``m.weight``."""
    return name[: -len(".weight")]


class GptqFolder:
    """The BaseFormat of ``quant_method: "gptq"`` folders."""

    name = "gptq"
    title = "GPTQ"
    quant_method = "gptq"

    def marked(self, ckpt: Checkpoint) -> bool:
        """Never by names alone (detect.py refuses qweight without a config)."""
        return False

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Refused in detect.py (FOREIGN_TENSORS)."""
        return None

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Every ``gptq`` config is this format; unreadable settings are refused here."""
        read_settings(ckpt, settings)
        check_has_packed(ckpt, self.title)
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every packed module; raise on the first problem."""
        bits, group, offset = read_settings(ckpt, ckpt.config["quantization_config"])
        specs, shapes = {}, {}
        for module in check_has_packed(ckpt, self.title):
            codec, shape = open_module(ckpt, module, bits, group, offset)
            specs[f"{module}.weight"], shapes[f"{module}.weight"] = codec, shape
        return stored_base(ckpt, self.name, specs, shapes, SIDE_SUFFIXES)


GPTQ_FOLDER = GptqFolder()


def read_settings(ckpt: Checkpoint, settings: dict) -> tuple[int, int, int]:
    """(bits, group size or 0 for one group per row, zero-point offset) from the config."""
    bits = check_bits(ckpt, settings.get("bits"), BITS, "GPTQ")
    group = check_group(ckpt, settings.get("group_size", -1), "GPTQ")
    fmt = str(settings.get("checkpoint_format") or "gptq").lower()
    if fmt not in ZERO_OFFSETS or settings.get("is_marlin_format"):
        raise refusal(
            ckpt, f"GPTQ in the {fmt!r} checkpoint format (shardmerge reads gptq, gptq_v2)"
        )
    return bits, group, ZERO_OFFSETS[fmt]


def open_module(
    ckpt: Checkpoint, module: str, bits: int, group: int, offset: int
) -> tuple[IntCodec, tuple[int, int]]:
    """The codec and ``[out, in]`` shape of packed module ``module``."""
    words, out = check_qweight(ckpt, module)
    per = 32 // bits
    cols = words * per
    group = group or cols
    groups = group_count(cols, group)
    why = f"{module}.qweight ({cols} inputs x {out} outputs in {bits} bits, group_size {group})"
    scales = side_ref(ckpt, f"{module}.qweight", f"{module}.scales", SCALE_DTYPES)
    check_shape(ckpt, scales, (groups, out), why)
    zeros = side_ref(ckpt, f"{module}.qweight", f"{module}.qzeros", ("I32",))
    if out % per:
        raise corrupt(
            where_of(ckpt, zeros.key), f"{out} outputs do not pack into {bits}-bit words."
        )
    check_shape(ckpt, zeros, (groups, out // per), why)
    g_idx = None
    if f"{module}.g_idx" in ckpt.weight_map:
        g_idx = side_ref(ckpt, f"{module}.qweight", f"{module}.g_idx", INDEX_DTYPES)
    qweight = tensor_ref(ckpt, f"{module}.qweight")
    codec = IntCodec("gptq", bits, group, qweight, scales, True, zeros, "gptq", offset, g_idx)
    return finish(ckpt, f"{module}.qweight", codec, (out, cols)), (out, cols)
