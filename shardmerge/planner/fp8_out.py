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

from ..codecs import FP8_BLOCK, Fp8BlockOut, StoredBase, compressed_tensors_config, nf4_targets
from ..errors import InputError, ShardmergeError, UnsupportedAdapterError
from ..execute.policy import has_dora
from ..io.checkpoint import Checkpoint
from ..terms import TensorEdit

# MoE routers and gates (mlp.gate, shared_expert_gate, router) stay 16-bit, as
# llm-compressor's recipes ignore them: a handful of rows that decide routing.
_ROUTER = re.compile(r"(gate|router)$")


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
