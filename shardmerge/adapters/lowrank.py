"""One LoRA module's A/B pair -> a low-rank term on its base tensor (DoRA and lora_bias included).

``delta = scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA), transposed for Conv1D layers and embeddings; ``lora_B.bias * scale``
is added to the layer bias.
"""

from __future__ import annotations

import math

from ..arch.embeddings import is_vocab_tensor
from ..arch.experts import EXPERT_MODULE
from ..arch.layers import is_conv1d
from ..errors import (
    CorruptFileError,
    IncompatibleAdapterError,
    ShardmergeError,
    UnsupportedAdapterError,
)
from ..io.checkpoint import Checkpoint
from ..io.safetensors import FLOAT_DTYPES, TensorInfo
from ..terms import TensorRef, Term
from .collect import CollectedEdits
from .config import USE_PEFT
from .naming import (
    base_tensor,
    conversion_refusal,
    pattern_value,
    resolve_base_name,
    resolve_lora_target,
)

LOW_RANK_ROLES = ("lora_A", "lora_B", "emb_A", "emb_B")


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lowrank_edits(
    c: CollectedEdits, module: str, roles: dict[str, TensorRef], weight: float, ckpt: Checkpoint
) -> bool:
    """Add the term (and lora_bias term) of one module's A/B pair.

    False when the module is given up (its problem recorded): its tensors
    saved whole are then not looked at either.
    """
    cfg, wfile = c.adapter.config, str(c.adapter.weights_file)
    pair = _factor_pair(c, module, roles)
    if pair is None:
        return False
    a, b, embedding = pair
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    scaling = lora_scaling(alpha, a.shape[0], bool(cfg.get("use_rslora", False)))
    base_name = resolve_lora_target(module, "weight", ckpt)
    if base_name is None:
        refusal = conversion_refusal(module, "weight", ckpt)
        if refusal:
            c.errors.append(
                UnsupportedAdapterError(
                    f"{wfile}: LoRA on {module}: {refusal}.",
                    hint="Merge this adapter with PEFT (merge_and_unload).",
                )
            )
        else:
            c.unmatched.append(f"{module}.weight")
        return False
    w = base_tensor(ckpt, base_name)
    if w.dtype not in FLOAT_DTYPES:
        c.incompatible(
            f"base tensor {base_name} is {w.dtype}, not floating point; cannot add LoRA to it."
        )
        return False
    saved_base = roles.get("base_layer.weight")
    if saved_base is not None and is_vocab_tensor(base_name):
        w = TensorInfo(w.name, w.dtype, saved_base.shape, w.start, w.end)  # resized
    kind, transposed, expect = _layout(cfg, ckpt, module, embedding, w, a, b)
    if w.shape != expect:
        c.shape_differs(module, base_name, tuple(expect), tuple(w.shape))
        return False
    magnitude = None
    if cfg.get("use_dora"):
        magnitude = dora_magnitude(roles, module, kind, w.shape, wfile, c.errors)
        if magnitude is None:
            return False
    left, right = (a, b) if transposed else (b, a)
    c.add(
        base_name,
        term=Term(
            kind, c.adapter.label, module, left, right, weight * scaling, transposed, transposed,
            magnitude=magnitude, norm_dim=1 if kind == "linear" else 0,
        ),
    )  # fmt: skip
    # One expert's Linear of an MoE whose experts are separate modules counts as an expert.
    c.counts["expert" if kind == "linear" and EXPERT_MODULE.search(module) else kind] += 1
    if "lora_B_bias" in roles:
        _lora_bias(c, module, roles["lora_B_bias"], weight * scaling, ckpt)
    return True


def _factor_pair(
    c: CollectedEdits, module: str, roles: dict[str, TensorRef]
) -> tuple[TensorRef, TensorRef, bool] | None:
    """(A, B, whether an embedding's) of a module, checked; None when unusable (problem recorded)."""
    cfg, wfile = c.adapter.config, c.adapter.weights_file
    low_rank = [r for r in LOW_RANK_ROLES if r in roles]
    embedding = "emb_A" in roles or "emb_B" in roles
    pair = ("emb_A", "emb_B") if embedding else ("lora_A", "lora_B")
    if not all(p in roles for p in pair) or set(low_rank) != set(pair):
        c.incompatible(
            f"module {module} has {', '.join(low_rank)} but not a complete A/B pair.", ask=False
        )
        return None
    a, b = roles[pair[0]], roles[pair[1]]
    if len(a.shape) < 2 or len(b.shape) < 2:
        # Not a convolution's factors either: a malformed file.
        c.errors.append(
            CorruptFileError(
                f"{wfile}: LoRA factors of {module} have shapes {list(a.shape)} and "
                f"{list(b.shape)}; a LoRA factor is a 2-D matrix.",
                hint="Re-save the adapter with PeftModel.save_pretrained().",
            )
        )
        return None
    if len(a.shape) != 2 or len(b.shape) != 2:
        c.errors.append(
            UnsupportedAdapterError(
                f"{wfile}: module {module} has {len(a.shape)}-D LoRA factors; "
                "LoRA on convolution layers is not supported yet.",
                hint=USE_PEFT,
            )
        )
        return None
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        c.errors.append(
            CorruptFileError(f"{wfile}: LoRA factors of {module} are not floating point.")
        )
        return None
    rank = a.shape[0]
    if b.shape[1] != rank:
        c.incompatible(
            f"module {module}: lora_A has rank {rank} but lora_B has {b.shape[1]}.", ask=False
        )
        return None
    r_cfg = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    if rank != r_cfg:
        c.errors.append(
            CorruptFileError(
                f"{wfile}: module {module} has rank {rank} but adapter_config.json gives r={r_cfg}.",
                hint="The config and the weights disagree; re-save the adapter.",
            )
        )
        return None
    return a, b, embedding


def _layout(
    cfg: dict,
    ckpt: Checkpoint,
    module: str,
    embedding: bool,
    w: TensorInfo,
    a: TensorRef,
    b: TensorRef,
) -> tuple[str, bool, tuple[int, int]]:
    """(term kind, whether the delta is stored transposed, the base shape it needs)."""
    out_f, in_f = b.shape[0], a.shape[1]
    if embedding:
        return "embedding", True, (in_f, out_f)
    if is_conv1d(str(ckpt.config.get("model_type", "")), module) or (
        cfg.get("fan_in_fan_out") and w.shape == (in_f, out_f) and w.shape != (out_f, in_f)
    ):
        return "conv1d", True, (in_f, out_f)
    return "linear", False, (out_f, in_f)


def _lora_bias(
    c: CollectedEdits, module: str, bias_ref: TensorRef, scale: float, ckpt: Checkpoint
) -> None:
    """lora_B.bias (lora_bias: true), added times the module's scale to the layer bias."""
    bias_name = resolve_base_name(module, "bias", ckpt)
    if bias_name is None:
        c.incompatible(
            f"module {module} has a LoRA bias (lora_bias) but the base has no {module}.bias."
        )
    elif ckpt.tensor(bias_name).shape != bias_ref.shape:
        c.incompatible(
            f"lora_B.bias of {module} has shape {list(bias_ref.shape)} but base "
            f"{bias_name} has {list(ckpt.tensor(bias_name).shape)}."
        )
    else:
        c.add(bias_name, term=Term("lora_bias", c.adapter.label, module, bias_ref, None, scale))
        c.counts["lora_bias"] += 1


def dora_magnitude(
    roles: dict[str, TensorRef],
    module: str,
    kind: str,
    base_shape: tuple[int, ...],
    wfile: str,
    errors: list[ShardmergeError],
) -> TensorRef | None:
    """The DoRA magnitude vector of a PEFT module, checked; None (and an error) if unusable.

    One value per output channel: per row of a Linear weight [out, in], per
    stored column of a Conv1D weight [in, out] or an embedding [vocab, dim].
    """
    ref = roles.get("dora")
    if ref is None:
        errors.append(
            CorruptFileError(
                f"{wfile}: module {module} has no lora_magnitude_vector although "
                "adapter_config.json sets use_dora.",
                hint="Re-save the adapter with PeftModel.save_pretrained().",
            )
        )
        return None
    channels = base_shape[0] if kind == "linear" else base_shape[-1]
    if ref.dtype not in FLOAT_DTYPES:
        errors.append(
            CorruptFileError(
                f"{wfile}: the DoRA magnitude of {module} is {ref.dtype}, not floating point."
            )
        )
        return None
    if ref.numel != channels or sum(d != 1 for d in ref.shape) > 1:
        errors.append(
            IncompatibleAdapterError(
                f"{wfile}: the DoRA magnitude of {module} has shape {list(ref.shape)}, but its base "
                f"tensor {list(base_shape)} has {channels} output channels.",
                hint="Is this adapter made for this base model?",
            )
        )
        return None
    return ref
