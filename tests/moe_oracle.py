"""Tiny models of any transformers family, PEFT LoRA on them, and the float64 oracle of their merge.

For model families beyond builders.py's (MoE and vision-language models):
the base is built from a transformers config with random weights and saved
with ``save_pretrained`` (the layout transformers writes, or its loaded
layout with ``save_original_format=False``); the adapter is made by PEFT
(``init_lora_weights=False``) on the model as transformers loads it; the
reference is built from the live PEFT modules with PEFT's own formula in
float64 and rounded once, under the loaded model's parameter names, so every
disk layout compares against the same values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from builders import Reference, round_once


def auto_class(kind: str):
    """transformers' Auto class for a model kind: "causal" or "vlm"."""
    import transformers

    name = {"causal": "AutoModelForCausalLM", "vlm": "AutoModelForImageTextToText"}[kind]
    return getattr(transformers, name)


def build_base(
    folder: Path,
    config,
    kind: str = "causal",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    original_format: bool = True,
) -> Path:
    """A tiny random model of ``config`` saved to ``folder`` (every parameter random)."""
    torch.manual_seed(seed)
    model = auto_class(kind).from_config(config)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    model.to(dtype).save_pretrained(folder, save_original_format=original_format)
    return Path(folder)


def load(folder: Path, kind: str = "causal"):
    return auto_class(kind).from_pretrained(folder, dtype="auto")


def make_lora(base: Path, folder: Path, kind: str = "causal", *, seed: int = 1, **lora) -> Path:
    """A PEFT LoRA adapter (r=4, alpha=8 unless given; B non-zero) on the loaded model."""
    from peft import LoraConfig, get_peft_model

    model = load(base, kind)
    torch.manual_seed(seed)
    pm = get_peft_model(
        model, LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}, init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.mul_(0.05)
    pm.save_pretrained(folder)
    return Path(folder)


def peft_model(base: Path, adapter: Path, kind: str = "causal"):
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base, kind), str(adapter), adapter_name="a0").eval()


def peft_merged(base: Path, adapter: Path, kind: str = "causal") -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of the adapter, as a state dict of the loaded model."""
    merged = peft_model(base, adapter, kind).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def loaded_state(folder: Path, kind: str = "causal") -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in load(folder, kind).state_dict().items()}


def param_reference(
    base: Path, adapter: Path, dtype: torch.dtype, kind: str = "causal"
) -> Reference:
    """The merge in float64 from the live PEFT model's LoRA weights and PEFT's formulas.

    ParamWrapper (expert parameters): delta[e] = scale * B.reshape(out, r, E)[..., e]
    @ A.reshape(E, r, in)[e] (``einsum("o r e, e r i -> e o i")``, transposed where
    the model stores [E, in, out]); lora.Linear: scale * B @ A; lora.Embedding:
    scale * (B @ A).T.
    """
    from peft.tuners.lora.layer import Embedding, Linear, ParamWrapper

    pm = peft_model(base, adapter, kind)
    state = {k: v.detach().double() for k, v in load(base, kind).state_dict().items()}
    ref = Reference(base=state, max_rank=1)
    for name, mod in pm.named_modules():
        if not isinstance(mod, (ParamWrapper, Linear, Embedding)):
            continue
        scale = mod.scaling["a0"]
        owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(mod, Embedding):
            a = mod.lora_embedding_A["a0"].detach().double()  # [r, vocab]
            b = mod.lora_embedding_B["a0"].detach().double()  # [dim, r]
            key, delta, bound = f"{owner}.weight", (b @ a).T, (b.abs() @ a.abs()).T
            ref.max_rank = max(ref.max_rank, a.shape[0])
        elif isinstance(mod, ParamWrapper):
            a = mod.lora_A["a0"].weight.detach().double()
            b = mod.lora_B["a0"].weight.detach().double()
            key = f"{owner}.{mod.parameter_name}"
            e = mod.num_experts
            a3, b3 = a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e)
            # PEFT swaps in/out for [E, out, in] parameters (not is_transposed).
            swapped = mod._did_swap_in_out_features
            pattern = "o r e, e r i -> e o i" if swapped else "o r e, e r i -> e i o"
            delta = torch.einsum(pattern, b3, a3)
            bound = torch.einsum(pattern, b3.abs(), a3.abs())
            ref.max_rank = max(ref.max_rank, a3.shape[1])
        else:
            a = mod.lora_A["a0"].weight.detach().double()
            b = mod.lora_B["a0"].weight.detach().double()
            key = f"{owner}.weight"
            delta, bound = b @ a, b.abs() @ a.abs()
            ref.max_rank = max(ref.max_rank, a.shape[0])
        w = state[key]
        ref.exact[key] = w + scale * delta
        ref.magnitude[key] = w.abs() + abs(scale) * bound
        ref.tensors[key] = round_once(ref.exact[key], dtype)
        ref.touched.add(key)
    return ref
