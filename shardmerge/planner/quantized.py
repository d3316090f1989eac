"""Which base tensors a merge sees through a 4-bit codec, and the QLoRA checks on them."""

from __future__ import annotations

from ..arch.layers import CONV1D_MODULES
from ..codecs import Nf4Roundtrip, StoredBase, TensorCodec, nf4_targets
from ..errors import InputError, ShardmergeError, UnsupportedAdapterError
from ..io.checkpoint import Checkpoint
from ..terms import TensorEdit


def nf4_tensors(
    ckpt: Checkpoint, edits: dict[str, TensorEdit], qlora_base: str, errors: list[ShardmergeError]
) -> set[str]:
    """The tensors --qlora-base nf4 round-trips (none without it); problems go to ``errors``."""
    nf4 = set(nf4_targets(ckpt, edits)) if qlora_base == "nf4" else set()
    if qlora_base == "nf4" and not nf4:
        errors.append(
            InputError(
                f"--qlora-base nf4: {ckpt.path} has none of the weights a QLoRA setup quantizes "
                "(2-D Linear weights inside a numbered layer stack such as model.layers.N), so "
                "shardmerge cannot tell which weights the adapter saw quantized.",
                hint="Merge without --qlora-base (into the 16-bit weights).",
            )
        )
    if nf4 and str(ckpt.config.get("model_type", "")) in CONV1D_MODULES:
        errors.append(
            InputError(
                f"--qlora-base nf4: {ckpt.config['model_type']} models use Conv1D layers, which "
                "bitsandbytes quantizes transposed; that layout is not supported.",
                hint="Merge without --qlora-base (into the 16-bit weights).",
            )
        )
    return nf4


def quant_spec(
    name: str,
    dtype: str,
    edit: TensorEdit | None,
    nf4: set[str],
    bnb4: StoredBase | None,
    errors: list[ShardmergeError],
) -> TensorCodec | None:
    """How tensor ``name``'s base values are made (quant.py), or None: as stored."""
    if bnb4 is not None and name in bnb4.specs:
        if edit is not None and edit.replacement is not None:
            errors.append(
                UnsupportedAdapterError(
                    f"an adapter replaces {name} whole, but it is a quantized ({bnb4.format}) "
                    "tensor of the base; replacing a quantized tensor is not supported.",
                    hint="Merge into the original 16-bit base instead.",
                )
            )
        return bnb4.specs[name]
    if name in nf4 and not (edit is not None and edit.replacement is not None):
        # A replaced tensor is the adapter's own full-precision copy: no round trip.
        return Nf4Roundtrip(dtype)
    return None
