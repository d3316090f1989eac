"""A bitsandbytes 4-bit base folder (``save_pretrained`` of a 4-bit model): found, checked, opened.

transformers saves ``W.weight`` (packed codes, two per byte), ``W.weight.absmax``,
``W.weight.quant_map`` and, with double quantization, ``W.weight.nested_absmax``
and ``W.weight.nested_quant_map``, plus ``W.weight.quant_state.bitsandbytes__nf4``:
a JSON blob (uint8) with quant_type, blocksize, dtype, shape and the nested
fields (bitsandbytes QuantState.as_dict(packed=True)). Every packed weight is
checked before anything is written; the first problem is raised.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

from ..errors import CorruptFileError, InputError
from ..io.jsonfile import parse_json
from ..io.safetensors import TensorInfo, read_tensor
from ..options import REFUSED_CHOICES
from ..terms import TensorRef
from .bnb4 import Bnb4Codec
from .detect import refusal
from .nf4 import MAX_BLOCKSIZE, NF4_CODE
from .protocol import StoredBase

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# A quant_state blob is a few hundred bytes of JSON; far larger is not one.
MAX_STATE_BYTES = 1 << 16
_QUANT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_AUX_NAMES = tuple(f".weight.{s}" for s in _AUX_SUFFIXES)
_STATE_KEY = re.compile(r"^(.+)\.quant_state\.bitsandbytes__(\w+)$")
_RESAVE = "Re-save the 4-bit model with save_pretrained()."
_EIGHT_BIT = "bitsandbytes 8-bit (LLM.int8)"


class Bnb4Folder:
    """The BaseFormat of bitsandbytes 4-bit (NF4) folders."""

    name = "bnb4"
    title = "bitsandbytes 4-bit"
    quant_method = "bitsandbytes"

    def marked(self, ckpt: Checkpoint) -> bool:
        """A ``*.quant_state.bitsandbytes__*`` tensor says so."""
        return any(_STATE_KEY.match(n) for n in ckpt.weight_map)

    def check_unmarked(self, ckpt: Checkpoint) -> None:
        """Quantization tensors without any quant_state: a shard missing from the index?"""
        orphans = sorted(n for n in ckpt.weight_map if n.endswith(_AUX_NAMES))
        if orphans:
            raise CorruptFileError(
                f"{ckpt.path}: holds bitsandbytes 4-bit quantization tensors ({', '.join(orphans[:3])}) "
                "but no *.quant_state.bitsandbytes__nf4 saying how to read them.",
                hint="Is a shard missing from the index? Re-save the 4-bit model with save_pretrained().",
            )

    def accepts(self, ckpt: Checkpoint, settings: dict, marked: bool) -> bool:
        """4-bit bitsandbytes settings or packed tensors; 8-bit is refused."""
        if settings.get("load_in_8bit") or settings.get("_load_in_8bit"):
            raise refusal(ckpt, _EIGHT_BIT)
        if not (marked or settings.get("load_in_4bit") or settings.get("_load_in_4bit")):
            return False
        if not marked:
            raise CorruptFileError(
                f"{ckpt.path}: config.json says bitsandbytes 4-bit but the weights hold no "
                "packed 4-bit tensors (no *.quant_state.bitsandbytes__nf4).",
                hint="Re-save the model, or remove quantization_config from config.json.",
            )
        return True

    def open(self, ckpt: Checkpoint) -> StoredBase:
        """Check every packed weight; raise on the first problem."""
        specs: dict[str, Bnb4Codec] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        storage: dict[str, str] = {}
        aux: set[str] = set()
        for key in sorted(ckpt.weight_map):
            m = _STATE_KEY.match(key)
            if not m:
                continue
            weight = m.group(1)
            codec, shape, side = _open_weight(ckpt, key, weight, m.group(2))
            specs[weight] = codec
            shapes[weight] = shape
            storage[weight] = ckpt.tensor(weight).dtype
            aux |= {key} | side
        _check_strays(ckpt, specs, aux)
        return StoredBase(self.name, specs, shapes, storage, frozenset(aux))


BNB4_FOLDER = Bnb4Folder()


def _corrupt(where: str, what: str) -> CorruptFileError:
    return CorruptFileError(f"{where}: {what}", hint=_RESAVE)


def _open_weight(
    ckpt: Checkpoint, key: str, weight: str, qtype: str
) -> tuple[Bnb4Codec, tuple[int, ...], set[str]]:
    """The codec, real shape and side tensors of packed ``weight`` (quant_state ``key``)."""
    where = f"{ckpt.path / ckpt.weight_map[key]}: {weight}"
    state = _read_state(ckpt, key, where)
    _check_quant_type(where, qtype, state)
    present = _side_tensors(ckpt, key, weight, where)
    shape, blocksize, dtype = _check_state(state, where)
    _check_packed_bytes(ckpt.tensor(weight), shape, where)
    _check_quant_map(ckpt, weight, where)
    blocks = -(-math.prod(shape) // blocksize)
    if "nested_absmax" in present:
        scales = _nested_scales(ckpt, weight, state, blocks, where)
    else:
        scales = {"absmax": _plain_absmax(ckpt, weight, blocks, where)}
    codec = Bnb4Codec(dtype, blocksize, **scales)
    return codec, shape, {f"{weight}.{s}" for s in present}


def _read_state(ckpt: Checkpoint, key: str, where: str) -> dict:
    """The quant_state JSON object stored as the uint8 tensor ``key``."""
    blob = ckpt.tensor(key)
    if blob.dtype not in ("U8", "I8") or blob.nbytes > MAX_STATE_BYTES:
        raise _corrupt(
            where,
            f"its quant_state is {blob.dtype} {list(blob.shape)}, not a short uint8 JSON blob.",
        )
    raw = _load(ckpt, key).numpy().tobytes()
    state = parse_json(raw, lambda _: _corrupt(where, "its quant_state is not a JSON object."))
    if not isinstance(state, dict):
        raise _corrupt(where, "its quant_state is not a JSON object.")
    return state


def _check_quant_type(where: str, qtype: str, state: dict) -> None:
    """The key's suffix and the blob's quant_type must both say nf4."""
    qtype = next((q for q in (qtype, str(state.get("quant_type", qtype))) if q != "nf4"), "nf4")
    if qtype != "nf4":
        raise InputError(
            f"{where} is quantized as bitsandbytes {qtype}; only NF4 is supported "
            f"({REFUSED_CHOICES['fp4'] if qtype == 'fp4' else 'unknown quant type'}).",
            hint="Merge into the original 16-bit model instead.",
        )


def _side_tensors(ckpt: Checkpoint, key: str, weight: str, where: str) -> set[str]:
    """The suffixes of ``weight``'s quantization tensors: all needed, none unknown."""
    names = ckpt.weight_map
    if weight not in names:
        raise _corrupt(where, "the packed weight itself is missing.")
    present = {s for s in _AUX_SUFFIXES if f"{weight}.{s}" in names}
    unknown = [n for n in names if n.startswith(weight + ".") and n != key]
    unknown = [n for n in unknown if n[len(weight) + 1 :] not in _AUX_SUFFIXES]
    if unknown:
        raise _corrupt(where, f"unexpected quantization tensors {unknown[:3]}.")
    has_nested = "nested_absmax" in present
    if "nested_quant_map" in present and not has_nested:
        raise _corrupt(where, f"has {weight}.nested_quant_map but no {weight}.nested_absmax.")
    need = {"absmax", "quant_map"} | ({"nested_quant_map"} if has_nested else set())
    if need - present:
        missing = ", ".join(sorted(f"{weight}.{s}" for s in need - present))
        raise _corrupt(where, f"missing {missing}.")
    return present


def _check_state(state: dict, where: str) -> tuple[tuple[int, ...], int, str]:
    """The real shape, block size and dequantized dtype the quant_state gives."""
    shape = state.get("shape")
    blocksize = state.get("blocksize")
    dtype = _QUANT_DTYPES.get(str(state.get("dtype")))
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise _corrupt(where, f"quant_state shape {shape!r} is not a list of positive sizes.")
    if not _valid_blocksize(blocksize):
        raise _corrupt(
            where,
            f"quant_state blocksize {blocksize!r} is not a power of two from 2 to {MAX_BLOCKSIZE}.",
        )
    if dtype is None:
        raise _corrupt(
            where, f"quant_state dtype {state.get('dtype')!r} is not bfloat16, float16 or float32."
        )
    return tuple(shape), blocksize, dtype


def _check_packed_bytes(info: TensorInfo, shape: tuple[int, ...], where: str) -> None:
    """Two codes a byte, for a 2-D weight of an even number of columns."""
    n = math.prod(shape)
    if info.nbytes != -(-n // 2):
        raise _corrupt(
            where,
            f"holds {info.nbytes} bytes of packed codes but its shape {list(shape)} needs {-(-n // 2)}.",
        )
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if len(shape) != 2 or cols % 2:
        raise _corrupt(
            where,
            f"shape {list(shape)}: only 2-D weights with an even number of columns are supported.",
        )


def _check_quant_map(ckpt: Checkpoint, weight: str, where: str) -> None:
    """The stored code table must be NF4's: the decoder uses its own copy."""
    quant_map = _load(ckpt, f"{weight}.quant_map")
    if quant_map.dtype != torch.float32 or not torch.equal(quant_map.reshape(-1), NF4_CODE):
        raise _corrupt(
            where, "its quant_map is not bitsandbytes' NF4 code (a custom code is not supported)."
        )


def _plain_absmax(ckpt: Checkpoint, weight: str, blocks: int, where: str) -> TensorRef:
    """The float32 absmax of every block."""
    absmax = _ref(ckpt, f"{weight}.absmax")
    if absmax.dtype != "F32" or absmax.numel != blocks:
        raise _corrupt(
            where,
            f"absmax must be {blocks} float32 values, not {absmax.dtype} {list(absmax.shape)}.",
        )
    return absmax


def _nested_scales(ckpt: Checkpoint, weight: str, state: dict, blocks: int, where: str) -> dict:
    """Double quantization: 8-bit absmax codes, their float32 scales and code table."""
    absmax = _ref(ckpt, f"{weight}.absmax")
    nbs = state.get("nested_blocksize")
    offset = state.get("nested_offset")
    if not _valid_blocksize(nbs) or not _is_number(offset):
        raise _corrupt(
            where,
            f"quant_state nested_blocksize {nbs!r} or nested_offset {offset!r} is missing "
            f"or invalid (a power of two up to {MAX_BLOCKSIZE}; a finite number).",
        )
    if absmax.dtype != "U8" or absmax.numel != blocks:
        raise _corrupt(
            where,
            f"nested absmax must be {blocks} uint8 values, not {absmax.dtype} {list(absmax.shape)}.",
        )
    n_abs = _ref(ckpt, f"{weight}.nested_absmax")
    code = _ref(ckpt, f"{weight}.nested_quant_map")
    if n_abs.dtype != "F32" or n_abs.numel != -(-blocks // nbs):
        raise _corrupt(where, f"nested_absmax must be {-(-blocks // nbs)} float32 values.")
    if code.dtype != "F32" or code.numel != 256:
        raise _corrupt(where, "nested_quant_map must be 256 float32 values.")
    return dict(
        absmax=absmax,
        nested_absmax=n_abs,
        nested_code=code,
        nested_blocksize=nbs,
        nested_offset=float(offset),
    )


def _check_strays(ckpt: Checkpoint, specs: dict, aux: set[str]) -> None:
    """Quantization tensors without a quant_state, or a packed-looking weight without any,
    would be copied into the 16-bit output as they are."""
    names = ckpt.weight_map
    strays = [n for n in names if n.endswith(_AUX_NAMES) and n not in aux]
    strays += [
        n
        for n in names
        if n.endswith(".weight") and n not in specs and ckpt.tensor(n).dtype == "U8"
    ]
    if strays:
        more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
        raise CorruptFileError(
            f"{ckpt.path}: bitsandbytes 4-bit data without a *.quant_state.bitsandbytes__nf4 "
            f"to read it by: {', '.join(sorted(strays)[:3])}{more}.",
            hint="Is a shard missing from the index? Re-save the 4-bit model with save_pretrained().",
        )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_blocksize(v: object) -> bool:
    return _is_int(v) and 2 <= v <= MAX_BLOCKSIZE and not v & (v - 1)


def _ref(ckpt: Checkpoint, name: str) -> TensorRef:
    info = ckpt.tensor(name)
    path = str(ckpt.path / ckpt.weight_map[name])
    return TensorRef(path, name, info.dtype, info.shape, "safetensors", info.start, info.end)


def _load(ckpt: Checkpoint, name: str) -> torch.Tensor:
    return read_tensor(str(ckpt.path / ckpt.weight_map[name]), ckpt.tensor(name))
