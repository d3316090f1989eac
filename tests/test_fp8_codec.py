"""The FP8 codec's decoding: exact, against a float64 loop, transformers and compressed-tensors.

Each stored tensor is decoded by ``Fp8Codec`` through its row decoder in
uneven row ranges (not aligned to the scale blocks, crossing experts), so
the result cannot depend on how rows are blocked.
"""

from __future__ import annotations

import pytest
import torch
from fp8_builders import block_scales, dequant_reference, encode, expand

from shardmerge.codecs import Fp8Codec
from shardmerge.codecs.fp8 import decoded_dtype, scale_values
from shardmerge.terms import TensorRef

SCALE_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e8m0fnu: "F8_E8M0"}
CODE_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def coded(
    shape, block, *, scale_dtype=torch.float32, ue8m0=False, code=torch.float8_e4m3fn, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05
    scale = block_scales(w, block, scale_dtype, ue8m0, gen)
    return encode(w, scale, block, code), scale


def decode(codes: torch.Tensor, scale: torch.Tensor, block, steps=(1, 3, 7)) -> torch.Tensor:
    """Decode through the codec's row decoder, in row ranges of varying sizes."""
    ref = TensorRef("mem", "scale", SCALE_DTYPE_NAMES[scale.dtype], tuple(scale.shape))
    shape = tuple(codes.shape)
    bm, bn = (block[0] or shape[-2], block[1] or shape[-1]) if block else shape[-2:]
    codec = Fp8Codec(ref, (bm, bn), CODE_NAMES[codes.dtype], decoded_dtype(scale_values(scale)))
    rows = codes.reshape(-1, shape[-1])
    decoder = codec.decoder(shape, lambda r: scale)
    parts, row0, k = [], 0, 0
    while row0 < rows.shape[0]:
        row1 = min(rows.shape[0], row0 + steps[k % len(steps)])
        raw = rows[row0:row1].contiguous().view(torch.uint8).reshape(-1)
        parts.append(decoder(raw, row0, row1).double())  # float32 where exact (decoded_dtype)
        row0, k = row1, k + 1
    return torch.cat(parts).reshape(shape)


@pytest.mark.parametrize(
    "shape, block",
    [
        ((40, 72), (16, 16)),  # partial edge blocks both ways
        ((64, 48), (16, 16)),  # whole blocks
        ((7, 5), (16, 16)),  # smaller than one block
        ((3, 24, 40), (16, 16)),  # fused experts, 3-D scales, blocks straddle experts
        ((40, 72), None),  # one scale per tensor
        ((40, 72), (1, 0)),  # one scale per row
        ((40, 72), (1, 16)),  # groups along the row
    ],
)
def test_decode_equals_float64_loop(shape, block):
    codes, scale = coded(shape, block)
    assert torch.equal(decode(codes, scale, block), dequant_reference(codes, scale, block))


def test_decoded_values_need_more_than_float32():
    """The exact products keep up to 28 bits: float32 decoding would round many of them."""
    codes, scale = coded((40, 72), (16, 16))
    assert decoded_dtype(scale_values(scale)) == "F64"
    exact = decode(codes, scale, (16, 16))
    assert not torch.equal(exact.to(torch.float32).double(), exact)


@pytest.mark.parametrize(
    "scales, dtype",
    [
        ([0.5, 2.0**-100, 2.0**90], "F32"),  # powers of two (ue8m0)
        ([1 + 2.0**-7, 3.0], "F32"),  # bf16 scales: 8 bits
        ([1 + 2.0**-19], "F32"),  # 20 bits: 4-bit codes still fit 24
        ([1 + 2.0**-20], "F64"),  # 21 bits
        ([2.0**-111], "F64"),  # a product could be a float32 subnormal
        ([2.0**101], "F64"),  # a product could overflow float32
    ],
)
def test_decoded_dtype_is_float32_only_where_every_product_is_exact(scales, dtype):
    assert decoded_dtype(torch.tensor(scales, dtype=torch.float64)) == dtype


@pytest.mark.parametrize(
    "scale_dtype, ue8m0, code",
    [
        (torch.bfloat16, False, torch.float8_e4m3fn),
        (torch.float8_e8m0fnu, True, torch.float8_e4m3fn),
        (torch.float32, True, torch.float8_e4m3fn),
        (torch.float32, False, torch.float8_e5m2),
    ],
)
def test_decode_other_scale_and_code_dtypes(scale_dtype, ue8m0, code):
    codes, scale = coded((40, 72), (16, 16), scale_dtype=scale_dtype, ue8m0=ue8m0, code=code)
    want = codes.to(torch.float64) * expand(scale.float(), codes.shape, (16, 16))
    assert torch.equal(decode(codes, scale, (16, 16)), want)


@pytest.mark.parametrize("shape", [(40, 72), (2, 24, 40), (64, 32)])
def test_matches_transformers_fp8_dequantization(shape):
    """transformers' fine-grained FP8 dequantization (its backward pass), run in float64."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    codes, scale = coded(shape, (16, 16))
    theirs = _dequantize_fp8_weight(codes, scale, [16, 16], torch.float64)
    assert torch.equal(decode(codes, scale, (16, 16)), theirs)


def test_matches_transformers_loader_dequantization():
    """transformers' load-time Fp8Dequantize (whole blocks; float32 out: one rounding of ours)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    codes, scale = coded((64, 32), (16, 16))
    theirs = Fp8Dequantize(None)._dequantize_one(codes, scale, torch.float32)
    assert torch.equal(decode(codes, scale, (16, 16)).to(torch.float32), theirs)


@pytest.mark.parametrize(
    "strategy, block, shape",
    [
        ("tensor", None, (40, 72)),
        ("channel", (1, 0), (40, 72)),
        ("block", (16, 16), (40, 72)),
        ("group", (1, 16), (40, 64)),
    ],
)
def test_matches_compressed_tensors_dequantization(strategy, block, shape):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    codes, scale = coded(shape, block)
    kw = {"block_structure": list(block)} if strategy == "block" else {}
    if strategy == "group":
        kw["group_size"] = block[1]
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, **kw)
    stored = scale.reshape(1) if strategy == "tensor" else scale
    theirs = dequantize(codes, stored.double(), args=args, dtype=torch.float64)
    assert torch.equal(decode(codes, scale, block), theirs)


def test_row_alignment_follows_the_scale_blocks():
    ref = TensorRef("mem", "s", "F32", (3, 3))
    codec = Fp8Codec(ref, (16, 16))
    assert codec.row_align((40, 72)) == 16
    assert codec.row_align((4, 32, 40)) == 16  # experts of whole blocks
    assert codec.row_align((4, 24, 40)) == 1  # blocks straddle experts: rows decode anywhere
    assert Fp8Codec(ref, (40, 72)).row_align((40, 72)) == 1  # one scale: no alignment needed
    assert codec.state_bytes((40, 72)) == 9 * 16


@pytest.mark.parametrize("code", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_verify_code_table_agrees_with_torch_on_every_code(code):
    """verify decodes codes from their bit fields; torch's cast must give the same 256 values."""
    from shardmerge.verifier.dequant import code_table

    table = code_table(CODE_NAMES[code])
    torch_values = torch.arange(256, dtype=torch.uint8).view(code).to(torch.float64)
    assert torch.equal(table.isnan(), torch_values.isnan())
    finite = ~table.isnan()
    assert torch.equal(table[finite], torch_values[finite])
    assert float(table[table.isfinite()].abs().max()) == torch.finfo(code).max


@pytest.mark.parametrize("shape, block", [((40, 72), (16, 16)), ((3, 24, 40), (16, 16))])
def test_verify_reference_decoder_equals_codec(shape, block):
    from shardmerge.verifier.dequant import reference_decoder

    codes, scale = coded(shape, block, scale_dtype=torch.float8_e8m0fnu, ue8m0=True)
    ref = TensorRef("mem", "scale", "F8_E8M0", tuple(scale.shape))
    codec = Fp8Codec(ref, block)
    raw = codes.reshape(-1, shape[-1]).view(torch.uint8)
    rows = raw.shape[0]
    want = dequant_reference(codes, scale, block).reshape(rows, shape[-1])
    decoder = reference_decoder(codec, shape, lambda r: scale)
    assert torch.equal(decoder(raw[5:rows], 5, rows), want[5:])


@pytest.mark.parametrize(
    "shape, align",
    [((7000, 512), 128), ((8, 1000, 512), 1), ((8, 1024, 512), 128)],
)
def test_planned_row_blocks_hold_whole_scale_blocks_within_the_budget(shape, align):
    """A 7000x512 FP8 tensor in a 16 MiB working budget: blocks of whole 128-row scale blocks
    (a partial last one), each within the budget; experts with partial blocks are not aligned."""
    from shardmerge.planner.memory import (
        MERGE_BYTES_PER_ELEMENT,
        QUANT_BYTES_PER_ELEMENT,
        tensor_block_rows,
    )

    ref = TensorRef("mem", "s", "F32", (*shape[:-2], -(-shape[-2] // 128), 4))
    codec = Fp8Codec(ref, (128, 128))
    assert codec.row_align(shape) == align
    errors: list = []
    working = 16 << 20
    rows = tensor_block_rows("w", shape, shape, None, codec, working, errors)
    assert not errors
    assert rows % align == 0 and rows < shape[-2]
    per_element = MERGE_BYTES_PER_ELEMENT + QUANT_BYTES_PER_ELEMENT
    assert rows * shape[-1] * per_element + codec.state_bytes(shape) <= working


@pytest.mark.parametrize("code", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float32_products_are_exact_at_the_edges_of_the_float32_range(code):
    """Every code times the extreme scales decoded_dtype lets through: float32 == float64."""
    scales = torch.tensor([2.0**-110, 2.0**-110 * (2 - 2.0**-19), 2.0**100 * (1 - 2.0**-20)])
    scales = scales.to(torch.float64)
    assert decoded_dtype(scales) == "F32"
    values = torch.arange(256, dtype=torch.uint8).view(code).to(torch.float64)
    values = values[values.isfinite()]
    exact = values[:, None] * scales[None, :]
    in32 = values.to(torch.float32)[:, None] * scales.to(torch.float32)[None, :]
    assert torch.equal(in32.double(), exact)
