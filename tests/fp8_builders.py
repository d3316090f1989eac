"""Tiny FP8 bases the tests build and quantize themselves, and their float64 references.

Independent of shardmerge: block scales and codes are made here with torch,
the reference dequantization is a plain loop over blocks in float64, and
folders are written with the ``safetensors`` library. A folder comes with
its dequantized twin (the exact float64 values, no quantization_config) for
reference merges and PEFT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
# Block sizes the tiny models are quantized in: their dims (40, 72, 24, 64, 16) are mostly
# not multiples of 16, so edge blocks are partial.
BLOCK = (16, 16)


def deepseek_config():
    """DeepSeek-V3 in miniature: MLA attention, one dense layer, then routed + shared experts."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=256, hidden_size=40, intermediate_size=72, moe_intermediate_size=24,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=24, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


def qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=256, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip


def save_tiny(folder: Path, config, seed: int = 0) -> Path:
    """A random float32 model of ``config`` (norms randomised too), saved to ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    return Path(folder)


def quantized_linear(name: str, t: torch.Tensor) -> bool:
    """The weights FP8 checkpoints quantize: decoder-layer Linear weights, not the router."""
    return (
        ".layers." in name
        and t.dim() >= 2
        and "norm" not in name
        and not name.endswith("mlp.gate.weight")
    )


def _grid(shape, block) -> tuple[int, int, int, int]:
    out, cols = shape[-2], shape[-1]
    bm, bn = (block[0] or out, block[1] or cols) if block else (out, cols)
    return bm, bn, -(-out // bm), -(-cols // bn)


def block_scales(
    w: torch.Tensor, block, scale_dtype: torch.dtype, ue8m0: bool, gen: torch.Generator
) -> torch.Tensor:
    """One scale per block (leading dims kept): amax/448 times a random factor in [1, 1.3),
    so that scales have many significant bits; powers of two (rounded up) for ue8m0."""
    bm, bn, rows, cols = _grid(w.shape, block)
    lead = w.shape[:-2]
    flat = w.reshape(-1, *w.shape[-2:]).double()
    scale = torch.empty(flat.shape[0], rows, cols, dtype=torch.float64)
    for e in range(flat.shape[0]):
        for i in range(rows):
            for j in range(cols):
                amax = float(flat[e, i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].abs().max())
                s = amax / FP8_MAX if amax > 0 else 1.0
                if ue8m0:
                    s = 2.0 ** math.ceil(math.log2(s))
                else:
                    s *= 1.0 + 0.3 * float(torch.rand((), generator=gen, dtype=torch.float64))
                scale[e, i, j] = s
    if ue8m0 and scale_dtype == torch.float8_e8m0fnu:
        return scale.to(torch.float32).to(scale_dtype).reshape(*lead, rows, cols)
    return scale.to(scale_dtype).reshape(*lead, rows, cols)


def expand(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """The scale of every element, float64 (``scale`` is [..., rows, cols] of blocks)."""
    bm, bn, rows, cols = _grid(shape, block)
    s = scale.to(torch.float64).reshape(*shape[:-2], rows, cols)
    s = s.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def encode(w: torch.Tensor, scale: torch.Tensor, block, code=torch.float8_e4m3fn) -> torch.Tensor:
    """FP8 codes of ``w`` over its block scales (any rounding will do for test data)."""
    top = torch.finfo(code).max
    return (w.double() / expand(scale, w.shape, block)).clamp(-top, top).to(code)


def dequant_reference(codes: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """code * scale of its block, in float64, by a plain loop over the blocks."""
    bm, bn, rows, cols = _grid(codes.shape, block)
    flat = codes.reshape(-1, *codes.shape[-2:]).to(torch.float64)
    s = scale.to(torch.float64).reshape(flat.shape[0], rows, cols)
    out = torch.empty_like(flat)
    for e in range(flat.shape[0]):
        for i in range(rows):
            for j in range(cols):
                part = (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
                out[e][part] = flat[e][part] * float(s[e, i, j])
    return out.reshape(codes.shape)


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down weights -> transformers v5's fused 3-D expert tensors."""
    out = dict(tensors)
    layers = sorted({n.split(".experts.")[0] for n in tensors if ".experts." in n})
    for layer in layers:
        e = 0
        gate_up, down = [], []
        while f"{layer}.experts.{e}.gate_proj.weight" in tensors:
            p = f"{layer}.experts.{e}."
            gate_up.append(
                torch.cat([out.pop(p + "gate_proj.weight"), out.pop(p + "up_proj.weight")])
            )
            down.append(out.pop(p + "down_proj.weight"))
            e += 1
        out[f"{layer}.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{layer}.experts.down_proj"] = torch.stack(down)
    return out


def write_folder(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: list[list[str]]
) -> Path:
    """Safetensors shards with the given names each, an index, and config.json."""
    folder.mkdir(parents=True)
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, names in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            part = {n: tensors[n].contiguous() for n in names}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def quantize_model(
    src: Path,
    fp8: Path,
    deq: Path,
    *,
    convention: str = "fp8",
    block=BLOCK,
    scale_dtype: torch.dtype = torch.float32,
    ue8m0: bool = False,
    fused: bool = False,
    extra: Callable[[dict, dict], None] | None = None,
    seed: int = 0,
    code: torch.dtype = torch.float8_e4m3fn,
) -> dict:
    """Quantize the float32 model in ``src`` into ``fp8`` (two shards; the first weight's
    scale in the other shard) and write its exact dequantization to ``deq``.

    ``convention``: "fp8" (``weight_scale_inv``, quant_method fp8) or "ct"
    (compressed-tensors ``weight_scale``, with static ``input_scale``s and lm_head
    in ``ignore``). ``block`` None: a scale per tensor; (1, 0): per channel.
    Returns {weight name: (codes, scale)}.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    if fused:
        tensors = fuse_experts(tensors)
    config = json.loads((src / "config.json").read_text())
    stored, exact, coded = {}, {}, {}
    for name in sorted(tensors):
        w = tensors[name]
        if not quantized_linear(name, w):
            stored[name] = exact[name] = w
            continue
        scale = block_scales(w, block, scale_dtype, ue8m0, gen)
        codes = encode(w, scale, block, code)
        coded[name] = (codes, scale)
        stored[name] = codes
        if block is None:  # one scale: a scalar (FP8Linear's) or [1] (compressed-tensors')
            scale = scale.reshape(()) if convention == "fp8" else scale.reshape(1)
        stored[scale_key(name, convention)] = scale
        exact[name] = dequant_reference(codes, scale, block)
    if convention == "ct":  # static activation scales, as llm-compressor's FP8 scheme writes
        for name in coded:
            stored[name.replace(".weight", ".input_scale")] = torch.tensor([0.02])
    qc = quantization_config(convention, block, ue8m0)
    if code == torch.float8_e5m2:
        qc["fmt"] = "e5m2"
    if extra:
        extra(stored, qc)
    names = sorted(stored, key=lambda n: (n.split(".layers.")[-1], n))
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    first = next(n for n in shards[0] if n in coded)
    moved = scale_key(first, convention)
    for s in shards:
        if moved in s:
            s.remove(moved)
    shards[1].append(moved)  # a scale in another shard than its weight
    write_folder(fp8, stored, dict(config, quantization_config=qc), shards)
    write_folder(deq, {n: t.contiguous() for n, t in exact.items()}, config, [sorted(exact)])
    return coded


def scale_key(name: str, convention: str) -> str:
    return name + ("_scale_inv" if convention == "fp8" else "_scale")


def quantization_config(convention: str, block, ue8m0: bool) -> dict:
    if convention == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
        qc["weight_block_size"] = list(block) if block else None
        if ue8m0:
            qc["scale_fmt"] = "ue8m0"
        return qc
    if block is None:
        weights = {"strategy": "tensor"}
    elif block == (1, 0):
        weights = {"strategy": "channel"}
    else:
        weights = {"strategy": "block", "block_structure": list(block)}
    weights.update(num_bits=8, type="float", symmetric=True, dynamic=False)
    inputs = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    inputs["strategy"] = "tensor"
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head", "re:.*mlp\\.gate$"],
    }
