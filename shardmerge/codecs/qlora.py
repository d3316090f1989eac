"""``--qlora-base nf4``: a 16-bit base as the QLoRA run saw it, NF4 round-tripped.

An adapter trained with QLoRA saw each quantized Linear weight not as the
16-bit checkpoint value but as bitsandbytes' NF4 round trip of it (nf4.py).
``nf4_targets`` names the weights a transformers QLoRA setup quantizes;
``Nf4Roundtrip`` is their codec: the stored 16-bit rows in, the round trip out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .nf4 import BLOCKSIZE, block_row_align, nf4_roundtrip
from .protocol import Loader

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# Decoding temporaries per element of a row block (codes, values); the planner's memory model.
BYTES_PER_ELEMENT = 16
_NUMBERED_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")
# Weights inside a layer stack that are not nn.Linear in transformers 5: norms,
# embeddings, and MoE routers (``gate``: a plain Parameter in transformers 5).
_NOT_LINEAR = re.compile(r"(norm|^ln_|^ln\d|embed|^wte$|^wpe$|relative_attention_bias|^gate$)")


@dataclass(frozen=True)
class Nf4Roundtrip:
    """A 16-bit base tensor, round-tripped through NF4 as a QLoRA run saw it."""

    dtype: str  # safetensors dtype of the stored values, kept by the round trip
    blocksize: int = BLOCKSIZE
    method: ClassVar[str] = "nf4"
    packed: ClassVar[bool] = False
    bytes_per_element: ClassVar[int] = BYTES_PER_ELEMENT

    def row_align(self, shape: tuple[int, ...]) -> int:
        """Rows per block must be a multiple of this so blocks hold whole quantization blocks."""
        return block_row_align(shape, self.blocksize)

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Nothing is held per tensor: each block's absmax comes from its own rows."""
        return 0

    def decoder(self, shape: tuple[int, ...], load: Loader) -> RoundtripRows:
        """Rows of a tensor of ``shape`` from its stored 16-bit rows."""
        return RoundtripRows(self, shape)


class RoundtripRows:
    """Round-tripped rows of one tensor (used by the worker and by verify)."""

    def __init__(self, codec: Nf4Roundtrip, shape: tuple[int, ...]):
        self.codec = codec
        self.cols = math.prod(shape[1:]) if len(shape) > 1 else 1

    def __call__(self, raw: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) from ``raw``, their stored 16-bit values."""
        bs = self.codec.blocksize
        assert row0 * self.cols % bs == 0, "row blocks must start on a quantization block"
        return nf4_roundtrip(raw, bs)


def nf4_targets(ckpt: Checkpoint, edits: dict | None = None) -> list[str]:
    """The base tensors a transformers QLoRA setup quantizes (by name, without transformers).

    transformers replaces every nn.Linear but the output embedding (and
    ``llm_int8_skip_modules``) with a bitsandbytes Linear4bit. From a
    checkpoint we take: 2-D floating-point ``*.weight`` tensors inside a
    numbered layer stack (``layers.N``, ``h.N``, ``blocks.N``...), minus norms,
    embeddings and MoE routers (``gate``), which are not nn.Linear there.
    Embeddings, lm_head, biases and norms are never quantized. Nor are the
    per-expert tensors of models whose experts transformers 5 fuses into 3-D
    parameters at load (``experts.N.w1`` of Mixtral, ``experts.N.gate_proj`` of
    Qwen2-MoE...: arch/experts.fused_expert_tensors): no nn.Linear holds them. Unless
    ``edits`` (base tensor -> TensorEdit) has LoRA on one of them as a Linear
    module rather than a parameter: such an adapter was trained with
    transformers 4, whose experts were nn.Linear modules, quantized like the rest.
    """
    from ..arch.experts import fused_expert_tensors

    fused = fused_expert_tensors(ckpt)
    if fused and edits:
        expert_modules = [
            n for n, e in edits.items() if n in fused for t in e.terms if t.kind != "expert"
        ]
        if expert_modules:
            fused = set()
    out = []
    for name, shard in ckpt.weight_map.items():
        info = ckpt.headers[shard].tensors[name]
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = name[: -len(".weight")]
        if info.dtype not in ("BF16", "F16", "F32") or not _NUMBERED_BLOCK.search(module + "."):
            continue
        if _NOT_LINEAR.search(module.rsplit(".", 1)[-1]):
            continue
        if name in fused:
            continue
        out.append(name)
    return sorted(out)
