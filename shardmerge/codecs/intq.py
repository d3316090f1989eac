"""The codec of integer-quantized weights: (code - zero) * scale per group, exactly.

GPTQ, AWQ and compressed-tensors ``pack-quantized`` all store a weight
``[out, in]`` as ``bits``-wide unsigned codes packed into int32 words (lowest
bits first), a scale and a zero point per (output row, group of input
columns); they differ only in which way the words run (``packing``):

* ``"gptq"``: ``qweight [in*bits/32, out]``, words packed down the input dim;
* ``"awq"``: ``qweight [in, out*bits/32]``, words packed along the output dim
  in AWQ's GEMM order (word field i holds column ``AWQ_ORDER[i]`` of its eight);
* ``"rows"``: ``[out, in*bits/32]``, each row's codes packed in turn
  (compressed-tensors).

The decoder holds scales and zero points normalised to ``[out, groups]``
(``read_groups``) and each input column's group (``g_idx``; GPTQ's
``desc_act`` scatters the groups over the columns). The two transposed layouts
keep their packed words in memory (a quarter of the 16-bit tensor, counted in
``state_bytes``) because an output row is a strided column of them.

Exactness: ``code - zero`` is an integer of at most ``bits + 1`` bits, so
with a float16 or bfloat16 scale (11 or 8 significant bits) every product is
an exact float32 (``dtype = "F32"``: the float32 merge path); float32 scales
decode to float64 (``"F64"``), exact there. Rows are returned contiguous (the
merge kernel's error bounds assume it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..terms import TensorRef
from .protocol import Loader

PACKINGS = ("gptq", "awq", "rows")
# AWQ's GEMM kernels pack eight output columns into a word in this order.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Decoding temporaries per element of a row block: codes, zero and scale gathers, values.
BYTES_PER_ELEMENT = 32
# Scales whose products with every ``code - zero`` are exact float32 numbers: at most
# this many significant bits (the difference has at most 9), and clear of overflow.
FLOAT32_SCALE_BITS = 15
FLOAT32_SCALE_MAX = 2.0**118


@dataclass(frozen=True)
class IntCodec:
    """Packed integer codes of one weight ``[out, in]`` and the side tensors that decode them.

    ``scales`` is ``[groups, out]`` (``scales_by_group``) or ``[out, groups]``; ``zeros``
    (None: symmetric, zero point ``2^(bits-1)``) is packed like ``zero_packing`` says:
    "gptq" (``[groups, out*bits/32]``), "awq" (the same in AWQ order), "rows"
    (``[ceil(out*bits/32), groups]``, packed down the rows) or "plain" (``[out, groups]``
    integers); ``zero_offset`` is added to stored zero points (GPTQ v1 stores z - 1).
    ``g_idx`` (None: column // group) gives each input column's group.
    """

    packing: str  # one of PACKINGS
    bits: int
    group: int  # input columns per group
    codes: TensorRef  # the packed int32 words
    scales: TensorRef
    scales_by_group: bool
    zeros: TensorRef | None = None
    zero_packing: str = "plain"
    zero_offset: int = 0
    g_idx: TensorRef | None = None
    dtype: str = "F32"  # "F64" where a product may not fit float32 (decoded_dtype)
    method: ClassVar[str] = "int"
    packed: ClassVar[bool] = True
    bytes_per_element: ClassVar[int] = BYTES_PER_ELEMENT

    @property
    def blocksize(self) -> int:
        """Input columns per group (named in messages)."""
        return self.group

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Any rows decode on their own."""
        return 1

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Scales (float64, and as stored) and zero points (int32, and unpacked) per group,
        g_idx, and for the transposed layouts the packed words themselves."""
        groups = self.scales.numel * (8 + 8 + 4 + 4)
        held = self.codes.end - self.codes.start if self.packing != "rows" else 0
        return groups + shape[-1] * 16 + held

    def decoder(self, shape: tuple[int, ...], load: Loader) -> IntRows:
        """Rows of a weight of ``shape`` ``[out, in]``."""
        return IntRows(self, shape, load)


def read_groups(
    codec: IntCodec, shape: tuple[int, ...], load: Loader
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales float64 ``[out, groups]``, zero points int32 ``[out, groups]`` with the offset
    applied, each input column's group int64 ``[in]``), as stored; checked by the caller."""
    out, cols = shape
    scales = load(codec.scales).to(torch.float64)
    scales = scales.T if codec.scales_by_group else scales
    if codec.zeros is None:
        zeros = torch.full(scales.shape, 1 << (codec.bits - 1), dtype=torch.int32)
    else:
        stored = load(codec.zeros)
        if codec.zero_packing == "plain":
            zeros = stored.to(torch.int32)
        elif codec.zero_packing == "rows":
            zeros = unpack(stored.view(torch.int32), codec.bits, dim=0)[:out]
        else:
            order = AWQ_ORDER if codec.zero_packing == "awq" else None
            zeros = unpack(stored.view(torch.int32), codec.bits, dim=1, order=order)[:, :out].T
        zeros = zeros + codec.zero_offset
    if codec.g_idx is None:
        g_idx = torch.arange(cols) // codec.group
    else:
        g_idx = load(codec.g_idx).to(torch.int64).reshape(-1)
    return scales.contiguous(), zeros.contiguous(), g_idx


class IntRows:
    """Decoded rows of one integer-quantized weight, for the merge (and verify)."""

    def __init__(self, codec: IntCodec, shape: tuple[int, ...], load: Loader):
        self.codec = codec
        self.out, self.cols = shape
        self.work = torch.float32 if codec.dtype == "F32" else torch.float64
        scales, self.zeros, self.g_idx = read_groups(codec, (self.out, self.cols), load)
        self.scales = scales.to(self.work)
        self.words = load(codec.codes).view(torch.int32) if codec.packing != "rows" else None

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1): ``raw`` is their stored bytes (used by the "rows" packing)."""
        codes = self.codes(raw, row0, row1)
        zeros = self.zeros[row0:row1][:, self.g_idx]
        scales = self.scales[row0:row1][:, self.g_idx]
        return (codes - zeros).to(self.work).mul_(scales)

    def codes(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """The unsigned codes of rows [row0, row1) as int32 ``[rows, in]``."""
        bits = self.codec.bits
        if self.codec.packing == "rows":
            words = raw.reshape(-1).view(torch.int32).view(row1 - row0, -1)
            return unpack(words, bits, dim=1)[:, : self.cols]
        if self.codec.packing == "gptq":
            return unpack(self.words[:, row0:row1], bits, dim=0)[: self.cols].T.contiguous()
        per = 32 // bits  # awq: output columns row0..row1 sit in words row0 // per ...
        w0, w1 = row0 // per, -(-row1 // per)
        cols = unpack(self.words[:, w0:w1], bits, dim=1, order=AWQ_ORDER)
        return cols[:, row0 - w0 * per : row1 - w0 * per].T.contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """The ``bits``-wide fields of int32 ``words`` laid out along ``dim`` (field 0 first), or
    in ``order`` (field i holds position order[i] of its word's group)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if order is not None:
        place = torch.tensor(order)
        shifts = shifts[torch.argsort(place)]  # position j comes from field argsort(order)[j]
    if dim == 0:
        fields = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return fields.reshape(words.shape[0] * per, words.shape[1])
    fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return fields.reshape(words.shape[0], words.shape[1] * per)


def decoded_dtype(stored: str, scales: torch.Tensor) -> str:
    """The decoded dtype: "F32" when every (code - zero) times every scale (float64 values of
    safetensors dtype ``stored``) is an exact float32, else "F64"."""
    if stored not in ("F16", "BF16"):
        return "F64"
    finite = scales[torch.isfinite(scales)]
    if finite.numel() and float(finite.abs().max()) >= FLOAT32_SCALE_MAX:
        return "F64"
    mantissa, _ = torch.frexp(finite)
    whole = torch.ldexp(mantissa, torch.tensor(FLOAT32_SCALE_BITS))
    return "F32" if bool((whole == whole.floor()).all()) else "F64"


def group_count(cols: int, group: int) -> int:
    """Groups of ``group`` input columns over ``cols`` (a partial last one counts)."""
    return math.ceil(cols / group)
