"""The codec of MXFP4 expert tensors (gpt-oss): E2M1 codes times a power of two per 32 values.

gpt-oss stores a fused expert parameter ``P`` as ``P_blocks`` (uint8
``[E, R, G, 16]``: two 4-bit E2M1 codes per byte, the low nibble first, 32
values per block) and ``P_scales`` (uint8 ``[E, R, G]``, the block's scale
``2^(s - 127)``), R output rows of ``G * 32`` inputs each. transformers
dequantizes it to ``[E, G*32, R]`` (``convert_moe_packed_tensors``: the
blocks transposed), the layout of the 16-bit gpt-oss checkpoints, whose
``gate_up_proj`` interleaves gate and up columns (gate at even, up at odd
output columns); the decoded view is that tensor, so LoRA on the experts
(``target_parameters``) meets the layout it was trained on.

Exactness: an E2M1 value has at most 2 significant bits, so every value
times a power of two down to 2^-127 is an exact float32 (subnormal at the
bottom) unless it overflows: scales up to 2^125 decode to float32
(``dtype = "F32"``), larger ones to float64. An output row of the view is a
column of the blocks, so the decoder reads one expert's blocks at a time
(``state_bytes``): memory does not grow with the number of experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..terms import TensorRef
from .protocol import Loader

# The 16 E2M1 codes: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
BIAS = 127
# Largest scale byte whose products with every code are float32 numbers (6 * 2^125 < 2^128).
FLOAT32_MAX_SCALE = BIAS + 125
BYTES_PER_ELEMENT = 24  # codes, values and the scale rows of a row block


@dataclass(frozen=True)
class Mxfp4Codec:
    """One MXFP4 expert tensor: its blocks (the job's bytes) and scales, both whole."""

    blocks: TensorRef  # uint8 [E, R, G, 16]
    scales: TensorRef  # uint8 [E, R, G]
    dtype: str = "F32"
    method: ClassVar[str] = "mxfp4"
    packed: ClassVar[bool] = True
    bytes_per_element: ClassVar[int] = BYTES_PER_ELEMENT
    blocksize: ClassVar[int] = BLOCK

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Any rows decode on their own."""
        return 1

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """One expert's blocks and scales, as read and as unpacked codes."""
        experts, cols, rows = shape
        return rows * cols // 2 + rows * (cols // BLOCK) * 8 + rows * cols

    def decoder(self, shape: tuple[int, ...], load: Loader) -> Mxfp4Rows:
        """Rows of the ``[E, in, out]`` view."""
        return Mxfp4Rows(self, shape, load)


def expert_part(ref: TensorRef, expert: int) -> TensorRef:
    """The bytes of one expert (the leading index) of a stored tensor, as its own ref."""
    size = (ref.end - ref.start) // ref.shape[0]
    start = ref.start + expert * size
    return replace(ref, shape=ref.shape[1:], start=start, end=start + size)


class Mxfp4Rows:
    """Decoded rows of one MXFP4 expert tensor, one expert's bytes in memory at a time."""

    def __init__(self, codec: Mxfp4Codec, shape: tuple[int, ...], load: Loader):
        self.codec, self.load = codec, load
        self.experts, self.cols, self.rows = shape
        self.work = torch.float32 if codec.dtype == "F32" else torch.float64
        self.table = torch.tensor(E2M1, dtype=self.work)
        self.expert = -1
        self.blocks = self.scales = None

    def _select(self, expert: int) -> None:
        if expert != self.expert:
            self.blocks = self.load(expert_part(self.codec.blocks, expert))
            scales = self.load(expert_part(self.codec.scales, expert)).to(torch.int32) - BIAS
            self.scales = torch.ldexp(torch.ones((), dtype=self.work), scales.to(self.work))
            self.expert = expert

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) of the matrix view (experts' ``in`` rows one after another)."""
        parts = []
        for expert in range(row0 // self.cols, (row1 - 1) // self.cols + 1):
            lo = max(row0, expert * self.cols) - expert * self.cols
            hi = min(row1, (expert + 1) * self.cols) - expert * self.cols
            self._select(expert)
            parts.append(self._columns(lo, hi))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _columns(self, lo: int, hi: int) -> torch.Tensor:
        """Inputs [lo, hi) of the current expert as rows ``[hi - lo, R]``."""
        g0, g1 = lo // BLOCK, -(-hi // BLOCK)
        packed = self.blocks[:, g0:g1]  # [R, g, 16]
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(self.rows, -1)
        values = self.table[codes.to(torch.int64)]  # [R, g*32]
        values = values.view(self.rows, g1 - g0, BLOCK).mul_(self.scales[:, g0:g1, None])
        values = values.view(self.rows, -1)[:, lo - g0 * BLOCK : hi - g0 * BLOCK]
        return values.T.contiguous()
