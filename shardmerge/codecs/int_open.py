"""Checking one integer-quantized weight (GPTQ, AWQ, compressed-tensors) before anything is written.

Every promise is checked from the headers and the side tensors' values: the
dtypes, the packed sizes against the bit width, the group count against the
group size, the scales' shape and values (finite), the zero points' range
and each ``g_idx`` entry naming a group that exists. The first problem is
raised, naming the file and tensor.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..errors import CorruptFileError, InputError
from ..io.safetensors import TensorInfo, read_tensor
from ..terms import TensorRef
from .detect import FIX_CONFIG
from .fp8_open import tensor_ref, where_of
from .intq import IntCodec, decoded_dtype, read_groups

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

SCALE_DTYPES = ("F16", "BF16", "F32")
INDEX_DTYPES = ("I32", "I64")
RESAVE = "Re-save or re-download the quantized model."


def corrupt(where: str, what: str, hint: str = RESAVE) -> CorruptFileError:
    """The error for one broken promise of a stored weight."""
    return CorruptFileError(f"{where}: {what}", hint=hint)


def load_ref(ref: TensorRef) -> torch.Tensor:
    """One whole side tensor from its shard."""
    return read_tensor(ref.path, TensorInfo(ref.key, ref.dtype, ref.shape, ref.start, ref.end))


def side_ref(ckpt: Checkpoint, weight: str, name: str, dtypes: tuple[str, ...]) -> TensorRef:
    """The side tensor ``name`` of ``weight``, which must exist in one of ``dtypes``."""
    if name not in ckpt.weight_map:
        raise corrupt(
            where_of(ckpt, weight),
            f"its {name.rsplit('.', 1)[-1]} tensor {name} is in no shard.",
            hint="Is a shard missing from model.safetensors.index.json? Re-download the model.",
        )
    ref = tensor_ref(ckpt, name)
    if ref.dtype not in dtypes:
        raise corrupt(
            where_of(ckpt, name), f"stored as {ref.dtype}; expected {' or '.join(dtypes)}."
        )
    return ref


def check_shape(ckpt: Checkpoint, ref: TensorRef, want: tuple[int, ...], why: str) -> None:
    """``ref`` must have shape ``want`` (``why``: what sets it, for the message)."""
    if tuple(ref.shape) != tuple(want):
        raise corrupt(
            where_of(ckpt, ref.key),
            f"has shape {list(ref.shape)}, but {why} needs {list(want)}.",
            hint="The bit width or group size in config.json does not match the tensors, or "
            "the file is damaged: fix config.json, or re-save the model.",
        )


def finish(ckpt: Checkpoint, weight: str, codec: IntCodec, shape: tuple[int, int]) -> IntCodec:
    """Check the codec's side-tensor values for a weight of ``shape``; the codec with its
    decoded dtype."""
    scales, zeros, g_idx = read_groups(codec, shape, load_ref)
    groups = scales.shape[1]
    where = where_of(ckpt, codec.scales.key)
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        raise corrupt(
            where,
            f"{int(bad.sum())} of its {scales.numel()} scales are NaN or infinite; its weight "
            "cannot be dequantized.",
            hint="Re-quantize or re-download the model.",
        )
    top = (1 << codec.bits) + (1 if codec.zero_offset else 0)  # GPTQ v1 may hold 2^bits
    if codec.zeros is not None and bool(((zeros < 0) | (zeros >= top)).any()):
        first = int(((zeros < 0) | (zeros >= top)).nonzero()[0][0])
        raise corrupt(
            where_of(ckpt, codec.zeros.key),
            f"zero points out of range for {codec.bits}-bit codes (row {first} holds "
            f"{int(zeros[first].min())}..{int(zeros[first].max())}; allowed 0..{top - 1}).",
        )
    if g_idx.numel() != shape[1]:
        raise corrupt(
            where_of(ckpt, codec.g_idx.key),
            f"has {g_idx.numel()} entries, but the weight has {shape[1]} input columns.",
        )
    out_of_range = (g_idx < 0) | (g_idx >= groups)
    if bool(out_of_range.any()):
        col = int(out_of_range.nonzero()[0])
        name = codec.g_idx.key if codec.g_idx is not None else weight
        raise corrupt(
            where_of(ckpt, name),
            f"g_idx names group {int(g_idx[col])} for input column {col}, but there are "
            f"{groups} groups (0..{groups - 1}).",
        )
    return replace(codec, dtype=decoded_dtype(codec.scales.dtype, scales))


def check_bits(ckpt: Checkpoint, bits: object, allowed: tuple[int, ...], what: str) -> int:
    """The configured bit width, which must be one shardmerge reads for ``what``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise InputError(
            f"{ckpt.path / 'config.json'}: {what} with bits {bits!r}; shardmerge reads "
            f"{what} in {' or '.join(map(str, allowed))} bits.",
            hint="Merge into the original 16-bit model instead.",
        )
    return bits


def check_group(ckpt: Checkpoint, group: object, what: str) -> int:
    """The configured group size (-1 or None: one group per row, returned as 0)."""
    if group is None or group == -1:
        return 0
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise InputError(
            f"{ckpt.path / 'config.json'}: {what} with group_size {group!r}; a group size is a "
            "positive number of input columns, or -1 for one group per row.",
            hint=FIX_CONFIG,
        )
    return group
