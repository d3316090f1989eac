"""A compressed-tensors FP8 base folder (``format: "float-quantized"``): found, checked, opened.

llm-compressor writes ``W.weight`` in float8_e4m3fn and ``W.weight_scale``
(in the model's dtype or float32), whose grid the weights' ``strategy`` in
``config_groups`` sets: ``tensor`` (one scale), ``channel`` (``[out, 1]``),
``block`` (``block_structure`` [bm, bn]: ``[ceil(out/bm), ceil(in/bn)]``) or
``group`` (``group_size`` g: ``[out, ceil(in/g)]``). The value is code times
scale. A static ``W.input_scale`` and the KV-cache scales are dropped with the
weight scales: the output is a dequantized model. Modules in ``ignore`` stay
16-bit and must not hold FP8 codes. Packed INT4/INT8 is ct_int.py's (tried
first); other compressed-tensors formats (NVFP4, MXFP4, sparse, transforms,
asymmetric) are refused by name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import CorruptFileError
from .detect import FIX_CONFIG, refusal
from .fp8 import Fp8Codec
from .fp8_open import Block, check_codes, check_strays, is_fp8, open_scaled, where_of
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

FORMAT = "float-quantized"
SCALE_SUFFIX = "_scale"
# Scales of activations and of the KV cache: meaningless once the weights are dequantized.
ACTIVATION_SUFFIXES = (".input_scale", ".output_scale", ".k_scale", ".v_scale")


def scale_name(weight: str) -> str:
    """``x.weight`` -> ``x.weight_scale``."""
    return weight + SCALE_SUFFIX


class CtFp8Folder:
    """The BaseFormat of compressed-tensors ``float-quantized`` (FP8) folders."""

    name = "ct-fp8"
    title = "compressed-tensors FP8"
    quant_method = "compressed-tensors"

    def marked(self, ckpt: Checkpoint) -> bool:
        """Never by names alone: the config says how the scales are laid out."""
        return False

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Unconfigured FP8 tensors are refused by the fp8 format (fp8_folder.py)."""
        return None

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """Every compressed-tensors config is this format or refused here, by name."""
        weight_blocks(ckpt, settings)
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every FP8 weight and its scale; raise on the first problem."""
        settings = ckpt.config["quantization_config"]
        blocks = weight_blocks(ckpt, settings)
        ignore = [str(i) for i in settings.get("ignore") or []]
        setting = "the strategies of quantization_config.config_groups"
        specs: dict[str, Fp8Codec] = {}
        for name in sorted(ckpt.weight_map):
            if not is_fp8(ckpt.tensor(name).dtype) or name.endswith(SCALE_SUFFIX):
                continue
            check_codes(ckpt, name, None)
            _check_not_ignored(ckpt, name, ignore)
            specs[name] = open_scaled(ckpt, name, scale_name(name), blocks, setting)
        if not specs:
            raise CorruptFileError(
                f"{ckpt.path}: config.json says compressed-tensors {FORMAT} but no tensor is "
                "stored as FP8.",
                hint="Remove quantization_config from config.json, or re-save the model.",
            )
        aux = {scale_name(n) for n in specs}
        aux |= {n for n in ckpt.weight_map if n.endswith(ACTIVATION_SUFFIXES)}
        # Only ``*.weight_scale``: other names may end in "_scale" (a model's own layer_scale).
        check_strays(ckpt, ".weight" + SCALE_SUFFIX, aux, SCALE_SUFFIX)
        shapes = {n: ckpt.tensor(n).shape for n in specs}
        storage = {n: ckpt.tensor(n).dtype for n in specs}
        return StoredBase(self.name, specs, shapes, storage, frozenset(aux))


CT_FP8_FOLDER = CtFp8Folder()


def weight_blocks(ckpt: Checkpoint, settings: dict) -> list[Block]:
    """The scale grids the config's groups allow; refuses what is not FP8 float-quantized."""
    formats = {settings.get("format")} | {
        g.get("format") for g in _groups(ckpt, settings) if isinstance(g, dict)
    }
    for fmt in sorted(f for f in formats if f is not None and f != FORMAT):
        raise refusal(ckpt, f"compressed-tensors in the {fmt!r} format")
    sparsity = settings.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
        raise refusal(ckpt, f"compressed-tensors sparsity ({sparsity.get('format')})")
    if settings.get("transform_config"):
        raise refusal(ckpt, "compressed-tensors transforms (rotated weights)")
    blocks: list[Block] = []
    for name, group in _groups(ckpt, settings).items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if weights:
            blocks.append(_group_block(ckpt, name, weights))
    if not blocks:
        raise CorruptFileError(
            f"{ckpt.path / 'config.json'}: quantization_config has no config_groups with "
            "quantized weights.",
            hint=FIX_CONFIG,
        )
    return blocks


def _groups(ckpt: Checkpoint, settings: dict) -> dict:
    groups = settings.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CorruptFileError(
            f"{ckpt.path / 'config.json'}: quantization_config.config_groups is not an object.",
            hint=FIX_CONFIG,
        )
    return groups


def _group_block(ckpt: Checkpoint, name: str, weights: object) -> Block:
    """The scale block of one config group's weights (0: the whole dimension)."""
    where = f"{ckpt.path / 'config.json'}: quantization_config.config_groups.{name}.weights"
    if not isinstance(weights, dict):
        raise CorruptFileError(f"{where} is not an object.", hint=FIX_CONFIG)
    kind, bits = weights.get("type"), weights.get("num_bits")
    if kind != "float" or bits != 8:
        raise refusal(ckpt, f"compressed-tensors {bits}-bit {kind} weights")
    if weights.get("symmetric") is False:
        raise refusal(ckpt, "compressed-tensors asymmetric FP8 (zero points)")
    if weights.get("dynamic"):
        raise refusal(ckpt, "compressed-tensors dynamic weight quantization")
    strategy = weights.get("strategy")
    if strategy == "tensor":
        return None
    if strategy == "channel":
        return (1, 0)
    if strategy == "block":
        return _positive_pair(weights.get("block_structure"), where, "block_structure")
    if strategy == "group":
        size = weights.get("group_size")
        return (1, _positive_pair([1, size], where, "group_size")[1])
    raise refusal(ckpt, f"compressed-tensors FP8 with the {strategy!r} weight strategy")


def _positive_pair(value: object, where: str, key: str) -> tuple[int, int]:
    if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value):
        value = [int(v) for v in value.split("x")]
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise CorruptFileError(f"{where}: {key} {value!r} is not valid.", hint=FIX_CONFIG)
    return (value[0], value[1])


def _check_not_ignored(ckpt: Checkpoint, weight: str, ignore: list[str]) -> None:
    """A module the ``ignore`` list keeps 16-bit must not hold FP8 codes."""
    module = weight.rsplit(".", 1)[0]
    for entry in ignore:
        try:
            hit = re.match(entry[3:], module) if entry.startswith("re:") else entry == module
        except re.error as e:
            raise CorruptFileError(
                f"{ckpt.path / 'config.json'}: quantization_config.ignore entry {entry!r} is "
                f"not a valid regular expression ({e}).",
                hint=FIX_CONFIG,
            ) from None
        if hit:
            raise CorruptFileError(
                f"{where_of(ckpt, weight)} holds FP8 codes, but quantization_config.ignore "
                f"lists it ({entry!r}) as not quantized.",
                hint=FIX_CONFIG,
            )
