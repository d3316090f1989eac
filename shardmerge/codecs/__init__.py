"""Codecs: how a base tensor's values are made from what the base folder stores.

This package is the seam between storage formats and the rest of shardmerge:
the planner, the pipeline and the verifier import from here only, never from
the modules below. They see three things (protocol.py):

* ``TensorCodec``: a frozen, picklable spec carried by a tensor job: the
  decoded ``dtype``, whether the stored rows are ``packed`` bytes, the
  ``blocksize`` (for messages), ``row_align(shape)`` (row blocks hold whole
  quantization blocks), ``state_bytes(shape)`` and ``bytes_per_element`` (the
  memory model), and ``decoder(shape, load)``, which makes the ``RowDecoder``.
* ``RowDecoder``: ``decoder(raw, row0, row1)``, the stored rows [row0, row1)
  in, the exact base values out, each element rounded once to ``dtype``.
* ``BaseFormat``: a format of whole base folders, found by ``base_format``
  and opened by ``open_base_format`` into the folder as the merge sees it
  (each coded tensor of its decoded shape and dtype, side tensors gone) and a
  ``StoredBase`` (per-tensor codecs, stored dtypes, side tensors).

The members. ``Nf4Roundtrip`` (qlora.py, with ``nf4_targets``): a 16-bit
base tensor as a QLoRA run saw it, chosen by ``--qlora-base nf4``.
``Bnb4Codec`` (bnb4.py) with the ``BNB4_FOLDER`` format (bnb4_folder.py): a
bitsandbytes 4-bit folder, dequantized. nf4.py holds the NF4 arithmetic both
use, bit-exact with bitsandbytes' CUDA kernels. ``Fp8Codec`` (fp8.py: FP8
codes times block scales, decoded exactly to float64) with two formats:
``FP8_FOLDER`` (fp8_folder.py, ``quant_method: "fp8"``: DeepSeek-V3, Qwen3 and
GLM FP8, ``weight_scale_inv``) and ``CT_FP8_FOLDER`` (ct_fp8.py,
compressed-tensors ``float-quantized``, ``weight_scale``); fp8_open.py checks
one FP8 weight and its scale for both (``inspect_folder.py`` summarises a
folder's quantization without torch). ``IntCodec`` (intq.py: packed integer
codes, ``(code - zero) * scale`` per group, exact) with ``GPTQ_FOLDER``
(gptq.py), ``AWQ_FOLDER`` (awq.py, GEMM order) and ``CT_INT_FOLDER``
(ct_int.py, compressed-tensors ``pack-quantized``); int_open.py checks one
packed weight and its side tensors for all three. ``Mxfp4Codec`` (mxfp4.py,
one expert's blocks at a time) with ``MXFP4_FOLDER`` (mxfp4_folder.py, gpt-oss). A format may rename what it
decodes (``StoredBase.names``: GPTQ's ``m.qweight`` is ``m.weight``).

Adding a stored format (NVFP4, ...) is one new module here
plus its tests:

1. a frozen dataclass implementing ``TensorCodec`` whose ``decoder`` reads its
   side tensors through ``load`` (a ``TensorRef`` may point into any shard)
   and decodes row blocks exactly;
2. an object implementing ``BaseFormat``: ``marked`` (tensor names say so),
   ``check_unmarked`` (stray side tensors), ``accepts`` (config.json's
   ``quantization_config`` of its ``quant_method``; raise for unreadable
   variants), ``open`` (check every coded tensor, return a ``StoredBase``);
3. registered by adding it to ``BASE_FORMATS`` below; its quant_method then
   stops being refused (detect.py ``METHOD_NAMES``).

Nothing else changes: the planner sizes row blocks from the codec, the
pipeline and verify decode through it.

Outputs stored in a quantized format have the ``encode`` side
(``OutputCodec``, protocol.py): a spec a tensor job carries as ``encode``
(the stored dtype, row alignment, working bytes, the side tensors such as
scales written after it) whose ``encoder`` turns each row block's exact value
(base rows plus the kernel's block terms) into stored rows.
``Fp8BlockOut`` (fp8_encode.py) writes e4m3 codes with block scales.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .awq import AWQ_FOLDER
from .bnb4 import Bnb4Codec
from .bnb4_folder import BNB4_FOLDER
from .ct_fp8 import CT_FP8_FOLDER
from .ct_int import CT_INT_FOLDER
from .detect import find_format
from .fp8 import Fp8Codec
from .fp8_encode import FP8_BLOCK, Fp8BlockOut, compressed_tensors_config
from .fp8_folder import FP8_FOLDER
from .gptq import GPTQ_FOLDER
from .intq import IntCodec
from .keep import Kept, keep_untouched, keeps_untouched
from .mxfp4 import Mxfp4Codec, expert_part
from .mxfp4_folder import MXFP4_FOLDER
from .nf4 import nf4_roundtrip
from .protocol import BaseFormat, OutputCodec, RowDecoder, RowEncoder, StoredBase, TensorCodec
from .qlora import Nf4Roundtrip, nf4_targets
from .view import decoded_view

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# The stored base formats shardmerge reads, tried in this order.
BASE_FORMATS: tuple[BaseFormat, ...] = (
    BNB4_FOLDER,
    FP8_FOLDER,
    CT_INT_FOLDER,  # before CT_FP8_FOLDER, which refuses every other compressed-tensors format
    CT_FP8_FOLDER,
    GPTQ_FOLDER,
    AWQ_FOLDER,
    MXFP4_FOLDER,
)

__all__ = [
    "BASE_FORMATS",
    "BaseFormat",
    "Bnb4Codec",
    "Fp8Codec",
    "FP8_BLOCK",
    "Fp8BlockOut",
    "IntCodec",
    "Kept",
    "Mxfp4Codec",
    "Nf4Roundtrip",
    "OutputCodec",
    "RowDecoder",
    "RowEncoder",
    "StoredBase",
    "TensorCodec",
    "base_format",
    "compressed_tensors_config",
    "format_named",
    "expert_part",
    "keep_untouched",
    "keeps_untouched",
    "nf4_roundtrip",
    "nf4_targets",
    "open_base_format",
]


def base_format(ckpt: Checkpoint) -> BaseFormat | None:
    """The stored format of a base folder, None for an ordinary (16-bit) one; a quantized
    folder no registered format reads is refused."""
    return find_format(ckpt, BASE_FORMATS)


def format_named(name: str) -> BaseFormat:
    """The registered format of this ``BaseFormat.name``."""
    return next(f for f in BASE_FORMATS if f.name == name)


def open_base_format(
    ckpt: Checkpoint, stored_format: BaseFormat | None = None
) -> tuple[Checkpoint, StoredBase | None]:
    """The base as the merge sees it, and how its coded tensors decode (None: as stored).

    ``stored_format``: the folder's format when ``base_format`` already found it.
    """
    stored_format = stored_format or base_format(ckpt)
    if stored_format is None:
        return ckpt, None
    stored = stored_format.open(ckpt)
    return decoded_view(ckpt, stored), stored
