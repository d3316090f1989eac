"""Which storage format a base folder is in; quantized folders no codec reads are refused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InputError
from .protocol import BaseFormat

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

# config.json quant_method -> its name in messages.
METHOD_NAMES = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "hqq": "HQQ",
    "quanto": "Quanto",
    "fbgemm_fp8": "FBGEMM FP8",
    "fp8": "FP8",
    "compressed-tensors": "compressed-tensors",
    "torchao": "torchao",
    "bitnet": "BitNet",
    "gguf": "GGUF",
    "mxfp4": "MXFP4",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
}
# Tensor name endings of quantized folders without a quantization_config -> what they are.
FOREIGN_TENSORS = (
    ((".SCB", ".weight_format"), "bitsandbytes 8-bit (LLM.int8)"),
    ((".qweight", ".qzeros"), "GPTQ/AWQ-style packed weights (qweight, qzeros)"),
)


def find_format(ckpt: Checkpoint, formats: Sequence[BaseFormat]) -> BaseFormat | None:
    """The format of ``formats`` the folder is stored in, None for an ordinary (16-bit)
    base; refuses a quantized folder none of them reads."""
    config = ckpt.config.get("quantization_config")
    marked = [f for f in formats if f.marked(ckpt)]
    if not config and not marked:
        names = ckpt.weight_map
        for endings, what in FOREIGN_TENSORS:
            if any(n.endswith(endings) for n in names):
                raise refusal(ckpt, what)
        for f in formats:
            f.check_unmarked(ckpt)
        return None
    settings = config if isinstance(config, dict) else {}
    default = marked[0].quant_method if marked else ""
    method = str(settings.get("quant_method", default)).lower()
    for f in formats:
        if f.quant_method == method and f.accepts(ckpt, settings, f in marked):
            return f
    raise refusal(ckpt, METHOD_NAMES.get(method, method or "an unknown method"))


# The advice of every refusal of a quantization_config's contents.
FIX_CONFIG = "Fix quantization_config in config.json, or re-save the model."


def refusal(ckpt: Checkpoint, what: str) -> InputError:
    """The error for a base quantized with ``what``, which shardmerge does not read."""
    return InputError(
        f"{ckpt.path}: the base model is quantized with {what}; shardmerge merges into 16-bit "
        "bases, bitsandbytes 4-bit (NF4) folders, FP8 folders (quant_method fp8, or "
        "compressed-tensors float-quantized), GPTQ (2, 4, 8 bits), AWQ (GEMM) and "
        "compressed-tensors pack-quantized (INT4/INT8) folders only.",
        hint="Merge into the original 16-bit model (add --qlora-base nf4 if the adapter was "
        "trained with QLoRA on a 4-bit base).",
    )
