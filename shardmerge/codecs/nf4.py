"""NF4, the 4-bit code of bitsandbytes and QLoRA: quantize, dequantize, round trip, unpack.

A QLoRA run sees each quantized weight as its NF4 round trip: the flattened
tensor cut into blocks of ``blocksize`` values, each block scaled by its
absolute maximum, every value replaced by the nearest of 16 NF4 code values
and multiplied back.

Semantics follow bitsandbytes 0.48 (``csrc/kernels.cu``, the CUDA kernels a
QLoRA run uses; ``backends/default/ops.py``, its CPU reference):

* absmax: max |x| of each block of ``blocksize`` consecutive values of the
  flattened tensor, in float32 (exact); the last block may be partial.
* scaled value: ``x * (1 / absmax)`` in float32 (a reciprocal, then a product,
  each rounded once; as both kernels do).
* code: the CUDA decision tree ``dQuantizeNF4``: the number of its 15 float32
  thresholds that the scaled value is strictly greater than (a value exactly
  on a threshold takes the lower code). An all-zero block scales to NaN and
  gets code 0 (-1.0), dequantizing to -0.0, as the kernel does.
* dequantized value: ``code_value * absmax`` in float32, rounded once to the
  tensor's dtype (bfloat16/float16/float32), as ``kDequantizeBlockwise``.
* double quantization (a pre-quantized folder only): the block absmax is
  ``nested_code[q] * nested_absmax + offset``, each step in float32.

Where bitsandbytes' CPU backend differs from its CUDA kernels we follow CUDA,
which is what trained the adapter: its CPU ``dequantize_4bit`` to a 16-bit
dtype rounds the code value to that dtype before scaling, and its CPU
quantizer picks the nearest code by float32 distances, which disagrees with
the CUDA tree on six single float32 values (one on each of six thresholds).
Not reproduced: the CUDA build's fast-math reciprocal (``rcp.approx``, within
1 ulp of the exact one used here) and flushing of subnormals.
"""

from __future__ import annotations

import math

import torch

# transformers' BitsAndBytesConfig has no block size: Linear4bit's default (64 on CUDA).
BLOCKSIZE = 64
# bitsandbytes' largest block size (quantize_blockwise / quantize_4bit): a stored one above it is
# damage, and would make each block that many float32 values wide.
MAX_BLOCKSIZE = 4096

# NF4 code values (bitsandbytes' nf4_dequantization_lut / CODE["nf4"]), float32.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# The decision thresholds of bitsandbytes' CUDA dQuantizeNF4, as float32, ascending:
# code k is taken when the scaled value is > exactly k of them.
NF4_THRESHOLDS = torch.tensor(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    dtype=torch.float32,
)


def nf4_codes(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """NF4 code index (int32) of every value of ``blocks`` (float32, one block per row)."""
    scaled = blocks * torch.reciprocal(absmax).unsqueeze(1)
    codes = torch.searchsorted(
        NF4_THRESHOLDS.to(scaled.device), scaled, right=False, out_int32=True
    )
    # NaN (an all-zero block: 0 * inf) fails every comparison of the CUDA tree: code 0.
    return codes.masked_fill_(scaled.isnan(), 0)


def nf4_quantize(x: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per value) and float32 block absmax of ``x`` flattened."""
    blocks = _blocks(x.reshape(-1).to(torch.float32), blocksize)
    absmax = blocks.abs().amax(dim=1)
    codes = nf4_codes(blocks, absmax).reshape(-1)[: x.numel()]
    return codes.to(torch.uint8), absmax


def nf4_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, blocksize: int = BLOCKSIZE
) -> torch.Tensor:
    """Values ``NF4_CODE[codes] * absmax`` in float32, rounded once to ``dtype`` (flat)."""
    n = codes.numel()
    values = NF4_CODE.to(absmax.device)[codes.reshape(-1).to(torch.int32)]
    values = _blocks(values, blocksize).mul_(absmax.unsqueeze(1))
    return values.reshape(-1)[:n].to(dtype)


def nf4_roundtrip(x: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """``x`` as a QLoRA run sees it: NF4-quantized and dequantized, same dtype and shape.

    ``x`` must start on a quantization block boundary of its tensor (and end
    on one, or at the tensor's end).
    """
    codes, absmax = nf4_quantize(x, blocksize)
    return nf4_dequantize(codes, absmax, x.dtype, blocksize).view(x.shape)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes of packed bytes, high nibble first (bitsandbytes' order)."""
    packed = packed.reshape(-1).view(torch.uint8)
    return torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)[:n]


def nested_absmax(
    q: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: float, blocksize2: int
) -> torch.Tensor:
    """Double quantization's block absmax: ``code[q] * absmax2 + offset``, each in float32."""
    values = code.to(torch.float32)[q.reshape(-1).long()]
    n = values.numel()
    values = _blocks(values, blocksize2).mul_(absmax2.to(torch.float32).unsqueeze(1))
    return values.reshape(-1)[:n].add_(torch.tensor(offset, dtype=torch.float32))


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return flat.view(-1, blocksize)


def block_row_align(shape: tuple[int, ...], blocksize: int) -> int:
    """Rows per block must be a multiple of this so blocks hold whole quantization blocks
    (blocks of ``blocksize`` consecutive values of the flattened tensor)."""
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return blocksize // math.gcd(cols, blocksize)
