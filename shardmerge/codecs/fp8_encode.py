"""FP8 block outputs: a tensor written as float8_e4m3fn codes with one scale per block.

The ``encode`` side of a codec (protocol.OutputCodec). ``Fp8BlockOut`` is the
picklable spec a tensor job carries; its ``BlockEncoder`` turns each row block
(base rows plus the kernel's block terms, so the exact value is known) into
correctly rounded codes through kernel/fp8.py and collects the block scales,
written as their own tensor right after the codes.

``compressed_tensors_config`` is the ``quantization_config`` llm-compressor's
FP8_BLOCK scheme writes (compressed-tensors ``float-quantized`` format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..io.dtypes import DTYPES
from ..kernel.fp8 import ScaleRule, decode_e4m3, quantize_rows
from ..terms import TensorRef
from .protocol import Loader

# The block of compressed-tensors' FP8_BLOCK scheme (rows, columns of a Linear weight).
FP8_BLOCK = (128, 128)
# Working bytes per element of a row block written as FP8: the base rows read
# ahead (up to float32, three buffers), the codes and those waiting to be
# written, and the dequantized values and their difference from the base
# (max_delta) in float64.
FP8_BYTES_PER_ELEMENT = 36
# The kernel works on column slices of a row block of about this many elements,
# at most 160 bytes each (float64 value, bound, bounds, quotient, spread scale,
# the rounding's temporaries and masks).
SLICE_ELEMENTS = 1 << 18
SLICE_BYTES = 160 * SLICE_ELEMENTS


@dataclass(frozen=True)
class Fp8BlockOut:
    """An output tensor stored as e4m3 codes; its scale tensor follows it in the shard."""

    scale_name: str  # e.g. "model.layers.0.mlp.up_proj.weight_scale"
    scale_dtype: str  # safetensors dtype of the scales: "BF16", "F16" or "F32"
    block: tuple[int, int] = FP8_BLOCK
    pow2: bool = False  # ue8m0: scales are powers of two
    kept: TensorRef | None = None  # the base's scales, kept unless a block exceeds 448
    method: ClassVar[str] = "fp8-block"
    dtype: ClassVar[str] = "F8_E4M3"
    bytes_per_element: ClassVar[int] = FP8_BYTES_PER_ELEMENT

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (-(-shape[0] // self.block[0]), -(-math.prod(shape[1:]) // self.block[1]))

    def row_align(self, shape: tuple[int, ...]) -> int:
        return self.block[0]

    def side_entries(self, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(self.scale_name, self.scale_dtype, self.scale_shape(shape))]

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """The kernel's column slice, and the scales (written and kept) in float64."""
        return SLICE_BYTES + 16 * math.prod(self.scale_shape(shape))

    def encoder(self, shape: tuple[int, ...], load: Loader) -> BlockEncoder:
        return BlockEncoder(self, shape, load)


class BlockEncoder:
    """Codes of one tensor, row block by row block; its scales collected for the end."""

    def __init__(self, spec: Fp8BlockOut, shape: tuple[int, ...], load: Loader):
        self.spec = spec
        self.rule = ScaleRule(DTYPES[spec.scale_dtype], spec.pow2)
        self.kept = load(spec.kept).to(torch.float64) if spec.kept is not None else None
        self.scales = torch.zeros(spec.scale_shape(shape), dtype=torch.float64)
        self.fresh_blocks = 0  # kept scales replaced because a block would exceed 448

    def __call__(self, base: torch.Tensor, terms: list, row0: int, row1: int) -> torch.Tensor:
        bm = self.spec.block[0]
        assert row0 % bm == 0, "row blocks must start on a scale block"
        r0, r1 = row0 // bm, -(-row1 // bm)
        kept = self.kept[r0:r1] if self.kept is not None else None
        rows = base.reshape(row1 - row0, -1)
        q = quantize_rows(rows, terms, self.spec.block, self.rule, kept, SLICE_ELEMENTS)
        self.scales[r0:r1] = q.scales.cpu()
        if kept is not None:
            self.fresh_blocks += int(q.fresh.sum())
        return q.codes.cpu()

    def values(self, stored: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        bm, bn = self.spec.block
        s = self.scales[row0 // bm : -(-row1 // bm)]
        s = s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)
        codes = stored.reshape(row1 - row0, -1)
        return decode_e4m3(codes) * s[: codes.shape[0], : codes.shape[1]]

    def side_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(self.spec.scale_name, self.scales.to(self.rule.dtype))]


def compressed_tensors_config(ignore: list[str], block: tuple[int, int] = FP8_BLOCK) -> dict:
    """config.json's ``quantization_config`` of a compressed-tensors FP8 block model.

    The layout llm-compressor writes for its FP8_BLOCK preset: static FP8
    weights in ``block`` blocks, dynamic FP8 activations per group of 128,
    every Linear but those in ``ignore``.
    """
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "group_size": None,
                    "strategy": "block",
                    "block_structure": list(block),
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "group_size": 128,
                    "strategy": "group",
                    "dynamic": True,
                },
                "output_activations": None,
                "format": None,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
    }
