"""An AWQ base folder (``quant_method: "awq"``, GEMM packing): found, checked, opened.

AutoAWQ's GEMM layout stores each quantized Linear ``m`` as ``m.qweight``
(int32 ``[in, out/8]``: eight 4-bit codes of neighbouring output columns per
word, field i holding column ``AWQ_ORDER[i]``), ``m.qzeros`` (int32
``[groups, out/8]``, the same order) and ``m.scales`` (``[groups, out]``,
float16). The value is ``(code - zero) * scale``; zero points are stored as
they are. Other kernels' layouts (GEMV, Marlin, ...) and AWQ without zero
points are refused. The decoded view names the weight ``m.weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .detect import refusal
from .fp8_open import tensor_ref, where_of
from .gptq import check_has_packed, check_qweight, module_of, stored_base
from .int_open import SCALE_DTYPES, check_bits, check_group, check_shape, corrupt, finish, side_ref
from .intq import IntCodec, group_count
from .keep import listed
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

BITS = (4,)
PER_WORD = 8  # 4-bit codes in an int32
VERSIONS = ("gemm",)
SIDE_SUFFIXES = (".qzeros", ".scales")


class AwqFolder:
    """The BaseFormat of ``quant_method: "awq"`` folders in the GEMM layout."""

    name = "awq"
    title = "AWQ"
    quant_method = "awq"

    def marked(self, ckpt: Checkpoint) -> bool:
        """Never by names alone (detect.py refuses qweight without a config)."""
        return False

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Refused in detect.py (FOREIGN_TENSORS)."""
        return None

    def module_of(self, name: str) -> str:
        """The module of a decoded tensor (``m.weight`` -> ``m``)."""
        return module_of(name)

    def keep_setting(self, settings: dict, modules: list[str]) -> tuple[str, list[str]]:
        """Touched modules join ``modules_to_not_convert`` (transformers' and vLLM's AWQ)."""
        return listed(settings, "modules_to_not_convert", modules)

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Every ``awq`` config is this format; unreadable settings are refused here."""
        read_settings(ckpt, settings)
        check_has_packed(ckpt, self.title)
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every packed module; raise on the first problem."""
        bits, group = read_settings(ckpt, ckpt.config["quantization_config"])
        specs, shapes = {}, {}
        for module in check_has_packed(ckpt, self.title):
            codec, shape = open_module(ckpt, module, bits, group)
            specs[f"{module}.weight"], shapes[f"{module}.weight"] = codec, shape
        return stored_base(ckpt, self.name, specs, shapes, SIDE_SUFFIXES)


AWQ_FOLDER = AwqFolder()


def read_settings(ckpt: Checkpoint, settings: dict) -> tuple[int, int]:
    """(bits, group size or 0 for one group per row) from the config."""
    version = str(settings.get("version") or "gemm").lower()
    if version not in VERSIONS:
        raise refusal(ckpt, f"AWQ in the {version!r} layout (shardmerge reads GEMM)")
    if settings.get("zero_point") is False:
        raise refusal(ckpt, "AWQ without zero points (zero_point false)")
    bits = check_bits(ckpt, settings.get("bits", settings.get("w_bit")), BITS, "AWQ")
    group = settings.get("group_size", settings.get("q_group_size", -1))
    return bits, check_group(ckpt, group, "AWQ")


def open_module(
    ckpt: Checkpoint, module: str, bits: int, group: int
) -> tuple[IntCodec, tuple[int, int]]:
    """The codec and ``[out, in]`` shape of packed module ``module``."""
    cols, words = check_qweight(ckpt, module)
    out = words * PER_WORD
    group = group or cols
    groups = group_count(cols, group)
    why = f"{module}.qweight ({cols} inputs x {out} outputs in {bits} bits, group_size {group})"
    qweight = f"{module}.qweight"
    scales = side_ref(ckpt, qweight, f"{module}.scales", SCALE_DTYPES)
    check_shape(ckpt, scales, (groups, out), why)
    zeros = side_ref(ckpt, qweight, f"{module}.qzeros", ("I32",))
    check_shape(ckpt, zeros, (groups, words), why)
    if f"{module}.g_idx" in ckpt.weight_map:
        raise corrupt(where_of(ckpt, f"{module}.g_idx"), "AWQ weights have no g_idx.")
    ref = tensor_ref(ckpt, qweight)
    codec = IntCodec("awq", bits, group, ref, scales, True, zeros, "awq")
    return finish(ckpt, qweight, codec, (out, cols)), (out, cols)
