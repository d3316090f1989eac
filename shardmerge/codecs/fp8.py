"""The codec of an FP8 tensor: 8-bit float codes times the scale of their block, exactly.

A coded tensor ``[..., out, in]`` (2-D, or 3-D fused experts) stores one
code per element (``float8_e4m3fn``, or ``float8_e5m2``) and a scale tensor
``[..., ceil(out/bm), ceil(in/bn)]``: the value of element (i, j) is
``code[i, j] * scale[i // bm, j // bn]``; edge blocks are partial. A scale
per tensor (bm, bn = out, in) or per output channel (bm = 1, bn = in) is
the same grid with one block.

Exactness: an e4m3 code has 4 significant bits and a float32 scale 24, so
their product needs up to 28 bits and does not fit float32. Both convert to
float64 exactly and their product is exact there (no overflow or underflow
is possible between 2^-158 and 2^137), so the decoder returns float64 rows
(``dtype = "F64"``): the merge kernel then accumulates in float64 and rounds
once to the output dtype. Where every scale of a tensor has at most 20
significant bits (bf16/f16 scales, ue8m0 powers of two) in a range where no
product is subnormal or overflows, the products are exact in float32 and the
codec decodes to float32 (``dtype = "F32"``): the faster float32 merge path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..io.safetensors import DTYPES
from ..terms import TensorRef
from .protocol import Loader

# Stored dtypes of FP8 codes this codec decodes -> their name in messages.
CODE_DTYPES = {"F8_E4M3": "float8_e4m3fn (e4m3)", "F8_E5M2": "float8_e5m2 (e5m2)"}
# FP8 encodings that are refused, by name.
REFUSED_CODE_DTYPES = {
    "F8_E4M3FNUZ": "float8_e4m3fnuz (the AMD 'fnuz' e4m3 encoding)",
    "F8_E5M2FNUZ": "float8_e5m2fnuz (the AMD 'fnuz' e5m2 encoding)",
}
# Stored dtypes of scales: float ones, and E8M0 (a power of two 2^(byte - 127)).
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
# Decoding temporaries per element of a row block: the values and the scale rows.
BYTES_PER_ELEMENT = 16
# Scales whose products with every code are exact float32 numbers: at most this many
# significant bits (a code has at most 4), and products clear of float32's subnormals
# (the smallest nonzero code is 2^-16, e5m2) and of its overflow (the largest is 57344).
FLOAT32_SCALE_BITS = 20
FLOAT32_SCALE_RANGE = (2.0**-110, 2.0**100)


@dataclass(frozen=True)
class Fp8Codec:
    """FP8 codes with a grid of block scales in another tensor (any shard), decoded exactly.

    ``block`` is (rows, cols) per scale block within one ``[out, in]`` matrix;
    leading dimensions (fused experts) each have their own grid.
    """

    scale: TensorRef
    block: tuple[int, int]
    stored: str = "F8_E4M3"  # the codes' safetensors dtype
    dtype: str = "F64"  # the decoded values: "F32" where every product fits (decoded_dtype)
    method: ClassVar[str] = "fp8"
    packed: ClassVar[bool] = True  # rows arrive as raw bytes, one code per byte
    bytes_per_element: ClassVar[int] = BYTES_PER_ELEMENT

    @property
    def blocksize(self) -> int:
        """Values per scale block (named in messages)."""
        return self.block[0] * self.block[1]

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Rows per block a multiple of the scale block's rows where blocks tile the rows evenly.

        Decoding itself works on any rows; a per-tensor scale (one block of all
        rows) or blocks straddling two experts need no alignment, and get none,
        so that row blocks stay small.
        """
        bm, out = self.block[0], shape[-2]
        if bm >= out or (len(shape) > 2 and out % bm):
            return 1
        return bm

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """The scale grid held in float64 (and as stored while it is decoded)."""
        return self.scale.numel * (8 + 8)

    def decoder(self, shape: tuple[int, ...], load: Loader) -> Fp8Rows:
        """Rows of a tensor of ``shape`` from its stored codes."""
        return Fp8Rows(self, shape, load)


class Fp8Rows:
    """Decoded rows of one FP8 tensor (float64, or float32 where exact), for the merge.

    verify decodes by its own arithmetic (verifier/dequant.py).
    """

    def __init__(self, codec: Fp8Codec, shape: tuple[int, ...], load: Loader):
        self.block = codec.block
        self.out, self.cols = shape[-2], shape[-1]
        self.grid_rows = -(-self.out // codec.block[0])  # scale rows per [out, in] matrix
        self.code = DTYPES[codec.stored]
        self.work = DTYPES[codec.dtype]  # exact either way (decoded_dtype)
        grid = scale_values(load(codec.scale)).to(self.work)
        self.scale = grid.reshape(-1, -(-self.cols // codec.block[1]))

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) of the matrix view (experts' rows one after another)."""
        n, bm, bn = row1 - row0, *self.block
        values = raw.view(self.code).view(n, self.cols).to(self.work)
        rows = torch.arange(row0, row1)
        scale = self.scale[(rows // self.out) * self.grid_rows + (rows % self.out) // bm]
        full, rest = divmod(self.cols, bn)
        if full:  # whole column blocks: one scale broadcast over each, no expanded copy
            values[:, : full * bn].view(n, full, bn).mul_(scale[:, :full, None])
        if rest:
            values[:, full * bn :].mul_(scale[:, full : full + 1])
        return values


def scale_values(stored: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor as exact float64 values (E8M0 bytes as powers of two, 0xFF NaN)."""
    if stored.dtype == DTYPES.get("F8_E8M0"):
        exponent = stored.view(torch.uint8).to(torch.float64)
        values = torch.ldexp(torch.ones_like(exponent), exponent - 127)
        return values.masked_fill_(exponent == 255, math.nan)
    return stored.to(torch.float64)


def decoded_dtype(values: torch.Tensor) -> str:
    """The dtype a tensor with these scales (float64) decodes to: "F32" when every code
    times every scale is a float32 number exactly, else "F64"."""
    lo, hi = FLOAT32_SCALE_RANGE
    if not bool(((values >= lo) & (values <= hi)).all()):
        return "F64"
    mantissa, _ = torch.frexp(values)
    whole = torch.ldexp(mantissa, torch.tensor(FLOAT32_SCALE_BITS))
    return "F32" if bool((whole == whole.floor()).all()) else "F64"


def scale_problem(values: torch.Tensor, power_of_two: bool) -> str | None:
    """What is wrong with a decoded scale grid (NaN, infinite, zero, negative), or None."""
    flat = values.reshape(-1)
    for bad, what in (
        (torch.isnan(flat), "NaN"),
        (torch.isinf(flat), "infinite"),
        (flat == 0, "zero"),
        (flat < 0, "negative"),
    ):
        count = int(bad.sum())
        if count:
            first = int(bad.nonzero()[0])
            return (
                f"{count} of its {flat.numel()} scales are {what} (the first at flat index {first})"
            )
    if power_of_two:
        mantissa, _ = torch.frexp(flat)
        odd = mantissa != 0.5
        if bool(odd.any()):
            first = int(odd.nonzero()[0])
            return (
                f"scale_fmt is ue8m0 but {int(odd.sum())} of its scales are not powers of two "
                f"(the first, {float(flat[first])!r}, at flat index {first})"
            )
    return None


def grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a coded tensor of ``shape`` in blocks of ``block``."""
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def grid_fits(scale_shape: tuple[int, ...], shape: tuple[int, ...], block: tuple[int, int]) -> bool:
    """Does a stored scale of ``scale_shape`` hold the grid of ``block`` over ``shape``?

    Besides the grid's own shape: a single scale stored as a scalar or ``[1]``,
    and a grid of one column stored without it (``[out]`` for ``[out, 1]``).
    """
    want = grid_shape(shape, block)
    if tuple(scale_shape) == want:
        return True
    if math.prod(want) == 1 and math.prod(scale_shape) == 1:
        return True
    return want[-1] == 1 and tuple(scale_shape) == want[:-1]
