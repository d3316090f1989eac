"""A compressed-tensors INT4/INT8 base folder (``format: "pack-quantized"``): found, checked, opened.

llm-compressor (Kimi-K2's experts, many W4A16 models) stores each quantized
Linear ``m`` as ``m.weight_packed`` (int32 ``[out, ceil(in*bits/32)]``, each
row's codes packed in turn, lowest bits first, as unsigned ``q + 2^(bits-1)``),
``m.weight_scale`` (``[out, groups]``: ``group`` strategy with ``group_size``,
or ``[out, 1]`` for ``channel``), ``m.weight_shape`` (``[out, in]``), with
asymmetric weights ``m.weight_zero_point`` (int32 ``[ceil(out*bits/32),
groups]``, packed down the rows the same way) and with activation ordering
``m.weight_g_idx``. The value is ``(q - zero) * scale``. Modules in
``ignore`` stay 16-bit. Other compressed-tensors formats are refused by the
FP8 module (ct_fp8.py), which reads ``float-quantized``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InputError
from .detect import FIX_CONFIG, refusal
from .fp8_open import tensor_ref, where_of
from .int_open import (
    INDEX_DTYPES,
    SCALE_DTYPES,
    check_shape,
    corrupt,
    finish,
    load_ref,
    side_ref,
)
from .intq import IntCodec, group_count
from .keep import listed
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

FORMAT = "pack-quantized"
BITS = (4, 8)
SUFFIXES = (".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")
# (bits, group size or 0 for one group per row, symmetric) of one config group.
Scheme = tuple[int, int, bool]


class CtIntFolder:
    """The BaseFormat of compressed-tensors ``pack-quantized`` (INT4/INT8) folders."""

    name = "ct-int"
    title = "compressed-tensors INT (pack-quantized)"
    quant_method = "compressed-tensors"

    def marked(self, ckpt: Checkpoint) -> bool:
        """Never by names alone: the config says how the codes are packed."""
        return False

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Packed weights without a quantization_config."""
        packed = sorted(n for n in ckpt.weight_map if n.endswith(".weight_packed"))
        if packed:
            raise CorruptFileError(
                f"{ckpt.path}: holds packed weights ({', '.join(packed[:3])}) but config.json "
                "has no quantization_config saying how they are packed.",
                hint="Restore the model's original config.json (with its quantization_config).",
            )

    def module_of(self, name: str) -> str:
        """The module of a decoded tensor (``m.weight`` -> ``m``)."""
        return name[: -len(".weight")]

    def keep_setting(self, settings: dict, modules: list[str]) -> tuple[str, list[str]]:
        """Touched modules join ``ignore`` (left unquantized by compressed-tensors and vLLM)."""
        return listed(settings, "ignore", modules)

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Configs whose every format is pack-quantized; others go on to ct_fp8.py."""
        groups = settings.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            return False
        formats = {settings.get("format")} | {
            g.get("format") for g in groups.values() if isinstance(g, dict)
        }
        if formats - {None} != {FORMAT}:
            return False
        schemes(ckpt, settings)
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every packed weight; raise on the first problem."""
        allowed = schemes(ckpt, ckpt.config["quantization_config"])
        specs, shapes, names = {}, {}, {}
        for packed in sorted(n for n in ckpt.weight_map if n.endswith(".weight_packed")):
            module = packed[: -len(".weight_packed")]
            codec, shape = open_module(ckpt, module, allowed)
            specs[f"{module}.weight"], shapes[f"{module}.weight"] = codec, shape
            names[packed] = f"{module}.weight"
        if not specs:
            raise InputError(
                f"{ckpt.path}: config.json says compressed-tensors {FORMAT}, but no tensor is "
                "stored packed (*.weight_packed).",
                hint="Remove quantization_config from config.json, or re-download the model.",
            )
        modules = [w[: -len(".weight")] for w in specs]
        aux = {f"{m}{s}" for m in modules for s in SUFFIXES} & set(ckpt.weight_map)
        strays = sorted(n for n in ckpt.weight_map if n.endswith(SUFFIXES[1:]) and n not in aux)
        if strays:
            raise CorruptFileError(
                f"{ckpt.path}: quantization tensors without a weight_packed of their module: "
                f"{', '.join(strays[:3])}.",
                hint="Is a shard missing from the index? Re-download the model.",
            )
        storage = dict.fromkeys(specs, "I32")
        parts = {
            w: tuple(sorted({f"{w}_packed"} | {f"{w[:-7]}{s}" for s in SUFFIXES} & aux))
            for w in specs
        }
        return StoredBase(self.name, specs, shapes, storage, frozenset(aux), names, parts)


CT_INT_FOLDER = CtIntFolder()


def schemes(ckpt: Checkpoint, settings: dict) -> list[Scheme]:
    """The (bits, group, symmetric) each config group allows; unreadable ones refused."""
    where = f"{ckpt.path / 'config.json'}: quantization_config.config_groups"
    found: list[Scheme] = []
    for name, group in settings["config_groups"].items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise CorruptFileError(f"{where}.{name}.weights is not an object.", hint=FIX_CONFIG)
        kind, bits = weights.get("type"), weights.get("num_bits")
        if kind != "int" or bits not in BITS:
            raise refusal(ckpt, f"compressed-tensors {FORMAT} {bits}-bit {kind} weights")
        if weights.get("dynamic"):
            raise refusal(ckpt, "compressed-tensors dynamic weight quantization")
        strategy = weights.get("strategy")
        if strategy == "channel":
            size = 0
        elif strategy == "group":
            size = weights.get("group_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise InputError(
                    f"{where}.{name}.weights: group_size {size!r} is not a positive integer.",
                    hint=FIX_CONFIG,
                )
        else:
            raise refusal(ckpt, f"compressed-tensors {FORMAT} with the {strategy!r} strategy")
        found.append((bits, size, weights.get("symmetric", True) is not False))
    if settings.get("transform_config"):
        raise refusal(ckpt, "compressed-tensors transforms (rotated weights)")
    return found


def open_module(
    ckpt: Checkpoint, module: str, allowed: list[Scheme]
) -> tuple[IntCodec, tuple[int, int]]:
    """The codec and ``[out, in]`` shape of packed module ``module``."""
    packed = f"{module}.weight_packed"
    info = ckpt.tensor(packed)
    if info.dtype != "I32" or len(info.shape) != 2 or 0 in info.shape:
        raise corrupt(
            where_of(ckpt, packed),
            f"packed codes stored as {info.dtype} {list(info.shape)}; expected a 2-D int32 "
            "tensor (3-D fused experts are not read).",
        )
    if f"{module}.weight" in ckpt.weight_map:
        raise corrupt(where_of(ckpt, packed), f"{module} holds both weight_packed and weight.")
    shape_ref = side_ref(ckpt, packed, f"{module}.weight_shape", INDEX_DTYPES)
    out, cols = stored_shape(ckpt, shape_ref, info.shape[0])
    scales = side_ref(ckpt, packed, f"{module}.weight_scale", SCALE_DTYPES)
    fits = [s for s in allowed if -(-cols * s[0] // 32) == info.shape[1]]
    fits = [s for s in fits if tuple(scales.shape) == (out, group_count(cols, s[1] or cols))]
    if not fits:
        want = " or ".join(
            f"{list((out, group_count(cols, g or cols)))} ({b} bits, group {g or cols})"
            for b, g, _ in allowed
        )
        raise corrupt(
            where_of(ckpt, scales.key),
            f"has shape {list(scales.shape)} with {packed} {list(info.shape)} of a "
            f"{[out, cols]} weight; config_groups allow {want}.",
            hint="The bit width or group size in config.json does not match the tensors: fix "
            "it, or re-save the model.",
        )
    bits, group, symmetric = fits[0]
    group = group or cols
    codec = IntCodec("rows", bits, group, tensor_ref(ckpt, packed), scales, False)
    per = 32 // bits
    if not symmetric:
        zeros = side_ref(ckpt, packed, f"{module}.weight_zero_point", ("I32",))
        why = f"{packed} ({out} outputs in {bits} bits, {scales.shape[1]} groups)"
        check_shape(ckpt, zeros, (-(-out // per), scales.shape[1]), why)
        codec = IntCodec("rows", bits, group, codec.codes, scales, False, zeros, "rows")
    if f"{module}.weight_g_idx" in ckpt.weight_map:
        g_idx = side_ref(ckpt, packed, f"{module}.weight_g_idx", INDEX_DTYPES)
        codec = IntCodec(
            "rows", bits, group, codec.codes, scales, False, codec.zeros, codec.zero_packing,
            0, g_idx,
        )  # fmt: skip
    return finish(ckpt, packed, codec, (out, cols)), (out, cols)


def stored_shape(ckpt: Checkpoint, ref, rows: int) -> tuple[int, int]:
    """``[out, in]`` from ``m.weight_shape``, which must agree with the packed rows."""
    values = load_ref(ref).reshape(-1).tolist()
    if len(values) != 2 or values[0] != rows or values[1] <= 0:
        raise corrupt(
            where_of(ckpt, ref.key),
            f"says the weight is {values}, but its packed codes have {rows} rows.",
        )
    return int(values[0]), int(values[1])
