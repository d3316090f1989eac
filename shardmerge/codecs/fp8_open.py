"""Checking one FP8 weight and its scale before anything is written (both FP8 conventions).

Every promise is checked from the headers and the scale values: the codes'
encoding, the weight's rank, the scale's dtype and grid shape against the
configured block size, and the scales themselves (finite, positive, powers
of two for ue8m0). The first problem is raised, naming the file and tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InputError
from ..io.safetensors import read_tensor
from ..terms import TensorRef
from .fp8 import (
    CODE_DTYPES,
    REFUSED_CODE_DTYPES,
    SCALE_DTYPES,
    Fp8Codec,
    decoded_dtype,
    grid_fits,
    grid_shape,
    scale_problem,
    scale_values,
)

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# A block of None: one scale for each [out, in] matrix; a 0 in a block: the whole dimension.
Block = tuple[int, int] | None
_MERGE_16 = "Merge into the original 16-bit model instead."


def where_of(ckpt: Checkpoint, name: str) -> str:
    """``file: tensor`` for messages."""
    return f"{ckpt.path / ckpt.weight_map[name]}: {name}"


def tensor_ref(ckpt: Checkpoint, name: str) -> TensorRef:
    """Where tensor ``name`` of the base lives (any shard)."""
    info = ckpt.tensor(name)
    path = str(ckpt.path / ckpt.weight_map[name])
    return TensorRef(path, name, info.dtype, info.shape, "safetensors", info.start, info.end)


def is_fp8(dtype: str) -> bool:
    """Any 8-bit float encoding, read or refused."""
    return dtype in CODE_DTYPES or dtype in REFUSED_CODE_DTYPES


def check_codes(ckpt: Checkpoint, weight: str, expect: str | None) -> None:
    """The weight holds FP8 codes this codec reads (of ``expect``, when config.json names one)."""
    info = ckpt.tensor(weight)
    where = where_of(ckpt, weight)
    if info.dtype in REFUSED_CODE_DTYPES:
        raise InputError(
            f"{where} is stored as {REFUSED_CODE_DTYPES[info.dtype]}, which shardmerge does not "
            "read; it reads float8_e4m3fn and float8_e5m2.",
            hint=_MERGE_16,
        )
    if info.dtype not in CODE_DTYPES:
        raise CorruptFileError(
            f"{where} has a scale but is stored as {info.dtype}, not as FP8 codes.",
            hint="Is the checkpoint half converted? Re-save the quantized model.",
        )
    if expect is not None and info.dtype != expect:
        raise CorruptFileError(
            f"{where} is stored as {CODE_DTYPES[info.dtype]} but config.json's "
            f"quantization_config says {CODE_DTYPES[expect]}.",
            hint="Fix quantization_config (fmt) in config.json, or re-save the model.",
        )
    if len(info.shape) not in (2, 3) or 0 in info.shape:
        raise InputError(
            f"{where}: an FP8 tensor of shape {list(info.shape)}; only 2-D weights and 3-D fused "
            "expert tensors, none of them empty, are supported.",
            hint=_MERGE_16,
        )


def open_scaled(
    ckpt: Checkpoint,
    weight: str,
    scale: str,
    blocks: Sequence[Block],
    setting: str,
    power_of_two: bool = False,
) -> Fp8Codec:
    """The codec of FP8 ``weight`` whose scale is tensor ``scale``; ``blocks`` are the grids
    config.json allows (``setting`` names where, for messages). Raises on the first problem."""
    where = where_of(ckpt, weight)
    if scale not in ckpt.weight_map:
        raise CorruptFileError(
            f"{where} holds FP8 codes but its scale {scale} is in no shard.",
            hint="Is a shard missing from model.safetensors.index.json? Re-download the model.",
        )
    shape = ckpt.tensor(weight).shape
    ref = tensor_ref(ckpt, scale)
    if ref.dtype not in SCALE_DTYPES:
        raise CorruptFileError(
            f"{where_of(ckpt, scale)}: a scale stored as {ref.dtype}; FP8 scales are "
            f"{', '.join(SCALE_DTYPES)}.",
            hint="Re-save the quantized model.",
        )
    block = next((b for b in _grids(shape, blocks) if grid_fits(ref.shape, shape, b)), None)
    if block is None:
        wants = " or ".join(str(list(grid_shape(shape, b))) for b in _grids(shape, blocks))
        raise CorruptFileError(
            f"{where_of(ckpt, scale)} has shape {list(ref.shape)}, but weight {weight} "
            f"{list(shape)} with {setting} needs a scale of shape {wants}.",
            hint="The block size in config.json's quantization_config does not match the "
            "tensors: fix it, or re-save the model.",
        )
    values = scale_values(read_tensor(ref.path, ckpt.tensor(scale)))
    problem = scale_problem(values, power_of_two)
    if problem:
        raise CorruptFileError(
            f"{where_of(ckpt, scale)}: {problem}; its weight cannot be dequantized.",
            hint="Re-quantize or re-download the model.",
        )
    return Fp8Codec(ref, block, ckpt.tensor(weight).dtype, decoded_dtype(values))


def _grids(shape: tuple[int, ...], blocks: Sequence[Block]) -> list[tuple[int, int]]:
    """The allowed blocks over ``shape``, a per-matrix scale as one block of it all."""
    out, cols = shape[-2], shape[-1]
    return [(b[0] or out, b[1] or cols) if b is not None else (out, cols) for b in blocks]


def check_strays(ckpt: Checkpoint, suffix: str, used: set[str], added: str) -> None:
    """Refuse tensors named like scales (ending in ``suffix``; the weight's name plus
    ``added``) that no FP8 weight uses: a 16-bit weight with a scale is a half-converted
    checkpoint, a scale without a weight a missing shard."""
    names = sorted(n for n in ckpt.weight_map if n.endswith(suffix) and n not in used)
    for name in names:
        weight = name[: -len(added)]
        if weight in ckpt.weight_map:
            check_codes(ckpt, weight, None)
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise CorruptFileError(
            f"{ckpt.path}: scale tensors without an FP8 weight of their name: "
            f"{', '.join(names[:3])}{more}.",
            hint="Is a shard missing from the index? Re-save the quantized model.",
        )
