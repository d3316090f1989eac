"""Base values of a quantized tensor for verify, decoded by verify's own arithmetic where it has one.

FP8: each code's value comes from its bit fields (sign, exponent, mantissa),
not from torch's float8 conversion, and each element's scale is gathered by
its own (row, column) block index, not broadcast over blocks as the codec
does; the product is exact in float64 either way. Packed integers (GPTQ, AWQ):
each field is cut from its word by integer division and remainder (not
shifts and masks), the words laid out per format here, and each element's
scale and zero point gathered by its own group; exact in float64. MXFP4:
each E2M1 code's value from its sign, exponent and mantissa bits, times
2^(byte - 127) of its block, gathered per element. Other codecs decode
through their own row decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..codecs import Fp8Codec, IntCodec, Mxfp4Codec, RowDecoder, TensorCodec, expert_part
from ..terms import TensorRef

Loader = Callable[[TensorRef], torch.Tensor]


def reference_decoder(codec: TensorCodec, shape: tuple[int, ...], load: Loader) -> RowDecoder:
    """Rows [row0, row1) of the base as exact values, for the reference merge."""
    if isinstance(codec, Fp8Codec):
        return _Fp8Reference(codec, shape, load)
    if isinstance(codec, IntCodec):
        return _IntReference(codec, shape, load)
    if isinstance(codec, Mxfp4Codec):
        return _Mxfp4Reference(codec, shape, load)
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


# AWQ's GEMM kernels: field i of a word holds column AWQ_GEMM[i] of its eight.
AWQ_GEMM = (0, 2, 4, 6, 1, 3, 5, 7)


def int_fields(words: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """``[..., per]``: the unsigned ``bits``-wide fields of int32 ``words`` by position in the
    word's group (field i at position ``order[i]``, lowest bits first)."""
    per = 32 // bits
    unsigned = words.to(torch.int64) % (1 << 32)
    powers = torch.tensor([1 << (bits * i) for i in range(per)], dtype=torch.int64)
    fields = (unsigned[..., None] // powers) % (1 << bits)
    if order is None:
        return fields
    placed = torch.empty_like(fields)
    placed[..., list(order)] = fields
    return placed


class _IntReference:
    def __init__(self, codec: IntCodec, shape: tuple[int, ...], load: Loader):
        self.codec = codec
        self.out, self.cols = shape
        scales = load(codec.scales).to(torch.float64)
        self.scales = scales.T if codec.scales_by_group else scales
        self.zeros = self._zeros(load)
        if codec.g_idx is not None:
            self.g_idx = load(codec.g_idx).to(torch.int64).reshape(-1)
        else:
            self.g_idx = torch.arange(self.cols) // codec.group
        self.words = load(codec.codes) if codec.packing != "rows" else None

    def _zeros(self, load: Loader) -> torch.Tensor:
        codec = self.codec
        if codec.zeros is None:
            return torch.full(self.scales.shape, float(1 << (codec.bits - 1)), dtype=torch.float64)
        stored = load(codec.zeros)
        if codec.zero_packing == "plain":
            zeros = stored.to(torch.int64)
        elif codec.zero_packing == "rows":  # [words, groups]: down the rows
            f = int_fields(stored, codec.bits)  # [words, groups, per]
            zeros = f.permute(0, 2, 1).reshape(-1, f.shape[1])[: self.out]
        else:
            order = AWQ_GEMM if codec.zero_packing == "awq" else None
            zeros = int_fields(stored, codec.bits, order).reshape(stored.shape[0], -1)
            zeros = zeros[:, : self.out].T
        return (zeros + codec.zero_offset).to(torch.float64)

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        codec, n = self.codec, row1 - row0
        if codec.packing == "rows":
            words = raw.reshape(-1).view(torch.int32).view(n, -1)
            codes = int_fields(words, codec.bits).reshape(n, -1)[:, : self.cols]
        elif codec.packing == "gptq":  # [in/per, out]: down the input columns
            f = int_fields(self.words[:, row0:row1], codec.bits)  # [in/per, n, per]
            codes = f.permute(1, 0, 2).reshape(n, -1)[:, : self.cols]
        else:  # awq: [in, out/per] along the outputs; rows row0.. sit in words row0 // per..
            per = 32 // codec.bits
            w0, w1 = row0 // per, -(-row1 // per)
            f = int_fields(self.words[:, w0:w1], codec.bits, AWQ_GEMM).reshape(self.cols, -1)
            codes = f[:, row0 - w0 * per : row1 - w0 * per].T
        groups = self.g_idx[None, :]
        rows = torch.arange(row0, row1)[:, None]
        values = (codes.to(torch.float64) - self.zeros[rows, groups]) * self.scales[rows, groups]
        return values.contiguous()


def e2m1_table() -> torch.Tensor:
    """The float64 value of each of the 16 E2M1 codes, from its bit fields (bias 1)."""
    values = []
    for code in range(16):
        sign = -1.0 if code >> 3 else 1.0
        exp, man = (code >> 1) & 3, code & 1
        values.append(sign * (math.ldexp(man, -1) if exp == 0 else math.ldexp(2 + man, exp - 2)))
    return torch.tensor(values, dtype=torch.float64)


class _Mxfp4Reference:
    def __init__(self, codec: Mxfp4Codec, shape: tuple[int, ...], load: Loader):
        self.codec, self.load = codec, load
        self.experts, self.cols, self.rows = shape
        self.table = e2m1_table()
        self.powers = torch.tensor([math.ldexp(1.0, e - 127) for e in range(256)])

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        out = torch.empty(row1 - row0, self.rows, dtype=torch.float64)
        for row in range(row0, row1):  # row = expert * in + input column
            expert, col = divmod(row, self.cols)
            if row == row0 or col == 0:
                blocks = self.load(expert_part(self.codec.blocks, expert)).to(torch.int64)
                scales = self.load(expert_part(self.codec.scales, expert)).to(torch.int64)
            byte = blocks[:, col // 32, (col % 32) // 2]
            code = (byte // 16) if col % 2 else (byte % 16)
            out[row - row0] = self.table[code] * self.powers[scales[:, col // 32]]
        return out
