"""``--quantize fp8-block``: which tensors are written as FP8, and the config that says so.

llm-compressor's FP8_BLOCK scheme quantizes every nn.Linear but lm_head (and
what its recipe ignores): the Linear weights of the decoder layers, in
128 x 128 blocks, each block's scale stored as ``<module>.weight_scale`` in the
weight's own dtype. Embeddings, lm_head, norms and MoE routers stay 16-bit;
``ignore`` names every module whose weight is not quantized, so a loader never
looks for a scale it does not have.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..codecs import FP8_BLOCK, Fp8BlockOut, StoredBase, compressed_tensors_config, nf4_targets
from ..errors import InputError, ShardmergeError, UnsupportedAdapterError
from ..execute.policy import has_dora
from ..io.checkpoint import Checkpoint
from ..terms import TensorEdit

# MoE routers and gates (mlp.gate, shared_expert_gate, router) stay 16-bit, as
# llm-compressor's recipes ignore them: a handful of rows that decide routing.
_ROUTER = re.compile(r"(gate|router)$")
# FP8 base formats whose format a merge keeps (without --dtype).
FP8_FORMATS = ("fp8", "ct-fp8")
# Scale dtypes the encoder writes (E8M0 bytes are read, not written).
_WRITTEN_SCALES = ("F32", "BF16", "F16")


def fp8_outputs(
    ckpt: Checkpoint,
    quantize: str,
    out_dtype: str | None,
    edits: dict[str, TensorEdit],
    stored: StoredBase | None,
    errors: list[ShardmergeError],
) -> dict[str, Fp8BlockOut]:
    """Base tensor name -> its FP8 output spec (empty without --quantize); problems to ``errors``."""
    if quantize == "none":
        return {}
    if stored is not None:
        errors.append(
            InputError(
                f"--quantize {quantize}: the base {ckpt.path} is stored quantized "
                f"({stored.format}); requantizing a quantized base into another format is not "
                "supported.",
                hint="Merge into the 16-bit base, or leave out --quantize.",
            )
        )
        return {}
    # The Linear weights of the layer stack, as transformers builds them, less routers.
    names = [n for n in nf4_targets(ckpt) if not _ROUTER.search(n.removesuffix(".weight"))]
    if not names:
        errors.append(
            InputError(
                f"--quantize {quantize}: {ckpt.path} has no Linear weights inside a numbered layer "
                "stack (model.layers.N...), so there is nothing the FP8_BLOCK scheme quantizes.",
                hint="Leave out --quantize.",
            )
        )
        return {}
    specs = {}
    for name in names:
        if has_dora(edits.get(name)):
            errors.append(
                UnsupportedAdapterError(
                    f"{name}: a DoRA adapter changes it, and DoRA merges are not written as FP8 "
                    f"(--quantize {quantize}).",
                    hint="Merge without --quantize, then quantize the merged model.",
                )
            )
            continue
        dtype = out_dtype or ckpt.headers[ckpt.weight_map[name]].tensors[name].dtype
        scale_name = name.removesuffix(".weight") + ".weight_scale"
        specs[name] = Fp8BlockOut(scale_name, dtype, FP8_BLOCK)
    return specs


def fp8_config(ckpt: Checkpoint, specs: dict[str, Fp8BlockOut]) -> tuple[tuple[str, object], ...]:
    """config.json's quantization_config for the FP8 output (nothing without one)."""
    if not specs:
        return ()
    kept = {n.removesuffix(".weight") for n in ckpt.weight_map if n.endswith(".weight")}
    kept -= {n.removesuffix(".weight") for n in specs}
    kept.add("lm_head")  # a tied lm_head is not stored, but is a Linear all the same
    return (("quantization_config", compressed_tensors_config(sorted(kept), FP8_BLOCK)),)


def keeps_format(stored: StoredBase | None, out_dtype: str | None, quantize: str) -> bool:
    """Is this a merge into an FP8 base that keeps its format (no --dtype, no --quantize)?"""
    return (
        stored is not None and stored.format in FP8_FORMATS and not out_dtype and quantize == "none"
    )


def kept_format_outputs(
    ckpt: Checkpoint,
    stored: StoredBase,
    edits: dict[str, TensorEdit],
    requant_scales: str,
    errors: list[ShardmergeError],
) -> dict[str, Fp8BlockOut]:
    """Each FP8 tensor an adapter touches -> its requantized output (``ckpt`` as stored)."""
    quant = ckpt.config.get("quantization_config") or {}
    pow2 = quant.get("scale_fmt") == "ue8m0"
    specs = {}
    for name in sorted(n for n in edits if n in stored.specs):
        codec = stored.specs[name]
        problem = _keep_problem(name, codec, stored.shapes[name], edits[name])
        if problem:
            errors.append(
                UnsupportedAdapterError(
                    f"{name}: {problem}, so the merge cannot keep the base's FP8 format.",
                    hint="Pass --dtype bfloat16 (or float16, float32) for a dequantized output.",
                )
            )
            continue
        kept = codec.scale if requant_scales == "kept" else None
        specs[name] = Fp8BlockOut(codec.scale.key, codec.scale.dtype, codec.block, pow2, kept)
    return specs


def _keep_problem(name: str, codec, shape: tuple[int, ...], edit: TensorEdit) -> str | None:
    """Why tensor ``name`` cannot be requantized in its own format, or None."""
    if len(shape) != 2:
        return "it is a fused 3-D expert tensor, which is not requantized"
    if codec.stored != "F8_E4M3":
        return f"it is stored as {codec.stored}; only float8_e4m3fn codes are written"
    if codec.scale.dtype not in _WRITTEN_SCALES:
        return f"its scale is stored as {codec.scale.dtype}; written scales are F32, BF16 or F16"
    if tuple(codec.scale.shape) != tuple(Fp8BlockOut("", "F32", codec.block).scale_shape(shape)):
        return f"its scale has shape {list(codec.scale.shape)}, not the 2-D grid of its blocks"
    if has_dora(edit):
        return "a DoRA adapter changes it, and DoRA merges are not written as FP8"
    return None


def touched_only(stored: StoredBase, specs: dict[str, Fp8BlockOut]) -> StoredBase:
    """``stored`` with the codecs of the requantized tensors only: the rest are copied as stored."""
    keep = {n: c for n, c in stored.specs.items() if n in specs}
    return replace(stored, specs=keep)
