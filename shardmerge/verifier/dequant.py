"""Base values of a quantized tensor for verify, decoded by verify's own arithmetic where it has one.

FP8: each code's value comes from its bit fields (sign, exponent, mantissa),
not from torch's float8 conversion, and each element's scale is gathered by
its own (row, column) block index, not broadcast over blocks as the codec
does; the product is exact in float64 either way. Other codecs decode
through their own row decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..codecs import Fp8Codec, RowDecoder, TensorCodec
from ..terms import TensorRef

Loader = Callable[[TensorRef], torch.Tensor]


def reference_decoder(codec: TensorCodec, shape: tuple[int, ...], load: Loader) -> RowDecoder:
    """Rows [row0, row1) of the base as exact values, for the reference merge."""
    if isinstance(codec, Fp8Codec):
        return _Fp8Reference(codec, shape, load)
    return codec.decoder(shape, load)


def code_table(stored: str) -> torch.Tensor:
    """The float64 value of each of the 256 codes of an FP8 encoding, from its bit fields."""
    exp_bits, man_bits, bias = {"F8_E4M3": (4, 3, 7), "F8_E5M2": (5, 2, 15)}[stored]
    values = []
    for byte in range(256):
        sign = -1.0 if byte >> 7 else 1.0
        exp = (byte >> man_bits) & ((1 << exp_bits) - 1)
        man = byte & ((1 << man_bits) - 1)
        top = exp == (1 << exp_bits) - 1
        if stored == "F8_E4M3" and top and man == (1 << man_bits) - 1:
            values.append(math.nan)  # e4m3fn: no infinities, one NaN pattern per sign
        elif stored == "F8_E5M2" and top:
            values.append(sign * math.inf if man == 0 else math.nan)
        elif exp == 0:
            values.append(sign * math.ldexp(man, 1 - bias - man_bits))
        else:
            values.append(sign * math.ldexp((1 << man_bits) + man, exp - bias - man_bits))
    return torch.tensor(values, dtype=torch.float64)


def _scale_grid(stored: torch.Tensor) -> torch.Tensor:
    """Stored scales as float64: E8M0 bytes are 2^(byte - 127), 0xFF NaN."""
    if stored.element_size() == 1:
        exponent = stored.view(torch.uint8).to(torch.int64)
        grid = torch.tensor([math.ldexp(1.0, e - 127) for e in range(255)] + [math.nan])
        return grid.to(torch.float64)[exponent]
    return stored.to(torch.float64)


class _Fp8Reference:
    def __init__(self, codec: Fp8Codec, shape: tuple[int, ...], load: Loader):
        self.table = code_table(codec.stored)
        self.shape = shape
        self.block = codec.block
        grid = _scale_grid(load(codec.scale))
        self.grid = grid.reshape(-1, -(-shape[-1] // codec.block[1]))

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        out, cols = self.shape[-2], self.shape[-1]
        bm, bn = self.block
        codes = raw.reshape(-1).view(torch.uint8).to(torch.int64).view(row1 - row0, cols)
        rows = torch.arange(row0, row1)
        grid_row = (rows // out) * -(-out // bm) + (rows % out) // bm
        grid_col = torch.arange(cols) // bn
        return self.table[codes] * self.grid[grid_row[:, None], grid_col[None, :]]
