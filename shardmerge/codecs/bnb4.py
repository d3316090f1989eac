"""The codec of a bitsandbytes 4-bit tensor: packed NF4 codes and their block scales."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..io.safetensors import DTYPES
from ..terms import TensorRef
from .nf4 import BLOCKSIZE, block_row_align, nested_absmax, nf4_dequantize, unpack_4bit
from .protocol import Loader

# Decoding temporaries per element of a row block (codes, values); the planner's memory model.
BYTES_PER_ELEMENT = 16


@dataclass(frozen=True)
class Bnb4Codec:
    """Packed 4-bit data of a pre-quantized folder, dequantized.

    The job's byte range is the packed codes; ``absmax`` (and, with double
    quantization, the ``nested_*`` fields) name the scale tensors.
    """

    dtype: str  # safetensors dtype the codes dequantize to
    blocksize: int = BLOCKSIZE
    absmax: TensorRef | None = None
    nested_absmax: TensorRef | None = None
    nested_code: TensorRef | None = None
    nested_blocksize: int = 0
    nested_offset: float = 0.0
    method: ClassVar[str] = "bnb4"
    packed: ClassVar[bool] = True
    bytes_per_element: ClassVar[int] = BYTES_PER_ELEMENT

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Rows per block must be a multiple of this so blocks hold whole quantization blocks."""
        return block_row_align(shape, self.blocksize)

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Memory held per tensor: the float32 absmax of every block."""
        blocks = -(-math.prod(shape) // self.blocksize)
        return 8 * blocks  # the absmax, and its 8-bit source while decoding it

    def decoder(self, shape: tuple[int, ...], load: Loader) -> Bnb4Rows:
        """Rows of a tensor of ``shape`` from its packed bytes."""
        return Bnb4Rows(self, shape, load)


class Bnb4Rows:
    """Dequantized rows of one packed tensor (used by the worker and by verify)."""

    def __init__(self, codec: Bnb4Codec, shape: tuple[int, ...], load: Loader):
        self.codec = codec
        self.shape = shape
        self.cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        self.dtype = DTYPES[codec.dtype]
        self.absmax = _block_absmax(codec, load)

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) from ``raw``, their packed bytes."""
        bs = self.codec.blocksize
        e0, e1 = row0 * self.cols, row1 * self.cols
        assert e0 % bs == 0, "row blocks must start on a quantization block"
        shape = (row1 - row0, *self.shape[1:])
        codes = unpack_4bit(raw, e1 - e0)
        absmax = self.absmax[e0 // bs : -(-e1 // bs)]
        return nf4_dequantize(codes, absmax, self.dtype, bs).view(shape)


def _block_absmax(codec: Bnb4Codec, load: Loader) -> torch.Tensor:
    """The float32 absmax of every block, decoded first under double quantization."""
    absmax = load(codec.absmax).reshape(-1)
    if codec.nested_absmax is not None:
        absmax = nested_absmax(
            absmax,
            load(codec.nested_code),
            load(codec.nested_absmax).reshape(-1),
            codec.nested_offset,
            codec.nested_blocksize,
        )
    return absmax.to(torch.float32)
