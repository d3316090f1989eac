"""Tiny GPTQ and AWQ bases the tests quantize and pack themselves, with float64 references.

Independent of shardmerge: codes, zero points and scales are made here from
the float32 weights (min/max asymmetric quantization per output row and group
of input columns), packed bit by bit into int32 words with Python integers in
each format's documented order, and the exact dequantization
``(code - zero) * scale`` is computed in float64 from the integers kept
before packing. A folder comes with its dequantized twin (float64 values, no
quantization_config) for reference merges and PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fp8_builders import write_folder
from safetensors.torch import load_file

# AutoAWQ's GEMM order: field i of a word holds column AWQ_ORDER[i] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def llama_config():
    """A tiny Llama whose Linear dims pack into 32-bit words at 2, 4 and 8 bits."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip


def quantized(name: str, t: torch.Tensor) -> bool:
    """The weights GPTQ/AWQ checkpoints pack: decoder-layer Linear weights."""
    return ".layers." in name and t.dim() == 2 and name.endswith("_proj.weight")


def quantize(w: torch.Tensor, bits: int, g_idx: torch.Tensor, gen: torch.Generator, zmin: int):
    """(codes [out, in], zeros [out, groups], float16 scales [out, groups]) of ``w``."""
    out, cols = w.shape
    groups = int(g_idx.max()) + 1
    top = (1 << bits) - 1
    codes = torch.zeros(out, cols, dtype=torch.int64)
    zeros = torch.zeros(out, groups, dtype=torch.int64)
    scales = torch.zeros(out, groups, dtype=torch.float16)
    for g in range(groups):
        cols_g = (g_idx == g).nonzero().reshape(-1)
        part = w[:, cols_g].double()
        lo, hi = part.min(1).values.clamp(max=0), part.max(1).values.clamp(min=0)
        s = ((hi - lo) / top).clamp(min=1e-4).half()
        z = torch.round(-lo / s.double()).clamp(zmin, top).long()
        z = torch.where(torch.rand(out, generator=gen) < 0.1, torch.full_like(z, zmin), z)
        q = torch.round(part / s.double()[:, None]).long() + z[:, None]
        codes[:, cols_g] = q.clamp(0, top)
        zeros[:, g], scales[:, g] = z, s
    return codes, zeros, scales


def reference(codes, zeros, scales, g_idx) -> torch.Tensor:
    """The exact float64 values, element by element from the integers."""
    z = zeros[:, g_idx].double()
    s = scales[:, g_idx].double()
    return (codes.double() - z) * s


def pack(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 words of the rows of ``values`` [n, k*per] packed along the last dim, field i
    of each word holding position ``order[i]`` of its group (lowest bits first)."""
    per = 32 // bits
    order = order or tuple(range(per))
    rows = []
    for row in values.tolist():
        words = []
        for w0 in range(0, len(row), per):
            word = 0
            for i, pos in enumerate(order):
                word |= (row[w0 + pos] & ((1 << bits) - 1)) << (bits * i)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def gptq_tensors(
    module, w, bits, group, desc_act, gen, offset=1, wide=False
) -> tuple[dict, torch.Tensor]:
    """GPTQ's tensors of one Linear (v1 zero points stored minus ``offset``), and its values;
    ``wide``: float32 scales of 21 significant bits (products need float64)."""
    out, cols = w.shape
    g_idx = torch.arange(cols) // (group if group > 0 else cols)  # -1: one group per row
    if desc_act:  # columns taken in a random order: each group a scattered set of columns
        g_idx = g_idx[torch.argsort(torch.randperm(cols, generator=gen))]
    codes, zeros, scales = quantize(w, bits, g_idx, gen, zmin=offset)
    if wide:
        scales = scales.float() * (1 + 2.0**-20)
    stored = {
        f"{module}.qweight": pack(codes, bits).T.contiguous(),
        f"{module}.qzeros": pack((zeros - offset).T.contiguous(), bits),
        f"{module}.scales": scales.T.contiguous(),
        f"{module}.g_idx": g_idx.to(torch.int32),
    }
    return stored, reference(codes, zeros, scales, g_idx)


def awq_tensors(module, w, group, gen) -> tuple[dict, torch.Tensor]:
    """AWQ's GEMM tensors of one Linear (4 bits), and its values."""
    cols = w.shape[1]
    g_idx = torch.arange(cols) // group
    codes, zeros, scales = quantize(w, 4, g_idx, gen, zmin=0)
    stored = {
        f"{module}.qweight": pack(codes.T.contiguous(), 4, AWQ_ORDER),
        f"{module}.qzeros": pack(zeros.T.contiguous(), 4, AWQ_ORDER),
        f"{module}.scales": scales.T.contiguous(),
    }
    return stored, reference(codes, zeros, scales, g_idx)


def quantize_model(src: Path, dst: Path, deq: Path, method: str, **kw) -> dict:
    """Pack the float32 model in ``src`` into ``dst`` (GPTQ or AWQ; two shards) and write its
    exact dequantization to ``deq``. ``kw``: bits, group, desc_act, checkpoint_format."""
    gen = torch.Generator().manual_seed(kw.get("seed", 0))
    tensors = load_file(str(src / "model.safetensors"))
    bits, group = kw.get("bits", 4), kw.get("group", 16)
    offset = 0 if kw.get("checkpoint_format") == "gptq_v2" else 1
    stored, exact = {}, {}
    for name, w in sorted(tensors.items()):
        if not quantized(name, w):
            stored[name] = exact[name] = w
            continue
        module = name[: -len(".weight")]
        if method == "gptq":
            side, exact[name] = gptq_tensors(
                module, w, bits, group, kw.get("desc_act", False), gen, offset, kw.get("wide")
            )
        else:
            side, exact[name] = awq_tensors(module, w, group, gen)
        stored.update(side)
    qc = {"quant_method": method, "bits": bits, "group_size": group}
    if method == "gptq":
        qc.update(desc_act=kw.get("desc_act", False), sym=False)
        qc["checkpoint_format"] = kw.get("checkpoint_format", "gptq")
    else:
        qc.update(version="gemm", zero_point=True)
    config = json.loads((src / "config.json").read_text())
    names = sorted(stored, key=lambda n: (n.split(".layers.")[-1], n))
    half = len(names) // 2
    write_folder(dst, stored, dict(config, quantization_config=qc), [names[:half], names[half:]])
    write_folder(deq, {n: t.contiguous() for n, t in exact.items()}, config, [sorted(exact)])
    return stored


def ct_tensors(module, w, bits, group, symmetric, gen) -> tuple[dict, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one Linear (bfloat16 scales), and its
    values: signed codes q stored as q + 2^(bits-1), each row packed in turn (padded)."""
    out, cols = w.shape
    half = 1 << (bits - 1)
    g_idx = torch.arange(cols) // (group or cols)
    codes, zeros, scales = quantize(w, bits, g_idx, gen, zmin=0)
    if symmetric:  # zero point q = 0: unsigned codes centred on 2^(bits-1)
        codes = (codes - zeros[:, g_idx] + half).clamp(0, 2 * half - 1)
        zeros = torch.full_like(zeros, half)
    scales = scales.to(torch.bfloat16)
    per = 32 // bits
    padded = torch.nn.functional.pad(codes, (0, -cols % per))
    stored = {
        f"{module}.weight_packed": pack(padded, bits),
        f"{module}.weight_scale": scales,
        f"{module}.weight_shape": torch.tensor([out, cols]),
    }
    if not symmetric:  # packed down the rows: [ceil(out/per), groups]
        zp = torch.nn.functional.pad(zeros.T, (0, -out % per))
        stored[f"{module}.weight_zero_point"] = pack(zp, bits).T.contiguous()
    return stored, reference(codes, zeros, scales, g_idx)


def ct_config(bits: int, group: int, symmetric: bool, targets: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False}
    weights.update(strategy="group", group_size=group) if group else weights.update(
        strategy="channel"
    )
    group_0 = {"targets": targets, "weights": weights, "format": "pack-quantized"}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group_0},
        "ignore": ["lm_head"],
    }


def ct_quantize_model(src, dst, deq, *, bits=4, group=16, symmetric=True, select=None, seed=0):
    """Pack the float32 model in ``src`` as compressed-tensors (``select(name)``: which
    Linear weights; the rest stay as they are) into ``dst``, values into ``deq``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    select = select or (lambda n: True)
    stored, exact = {}, {}
    for name, w in sorted(tensors.items()):
        if not (quantized_linear_any(name, w) and select(name)):
            stored[name] = exact[name] = w
            continue
        side, exact[name] = ct_tensors(name[: -len(".weight")], w, bits, group, symmetric, gen)
        stored.update(side)
    config = json.loads((src / "config.json").read_text())
    qc = ct_config(bits, group, symmetric, ["Linear"])
    names = sorted(stored, key=lambda n: (n.split(".layers.")[-1], n))
    half = len(names) // 2
    write_folder(dst, stored, dict(config, quantization_config=qc), [names[:half], names[half:]])
    write_folder(deq, {n: t.contiguous() for n, t in exact.items()}, config, [sorted(exact)])
    return stored


def quantized_linear_any(name: str, t: torch.Tensor) -> bool:
    """Decoder-layer Linear weights of any projection name (not norms, not the router)."""
    return ".layers." in name and t.dim() == 2 and "norm" not in name and "mlp.gate." not in name


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def gpt_oss_config():
    """A tiny gpt-oss: experts' in-dims (hidden 64, intermediate 64) are whole MXFP4 blocks."""
    from transformers import GptOssConfig

    return GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip


def mxfp4_encode(w: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, R, G, 16], scales uint8 [E, R, G]) of a 16-bit expert tensor
    ``w`` [E, in, R]: per 32 inputs of one output row, a power of two and the nearest code."""
    rows = w.transpose(1, 2).double()  # [E, R, in]: the blocks run along the inputs
    e, r, cols = rows.shape
    grouped = rows.reshape(e, r, cols // 32, 32)
    top = grouped.abs().amax(-1).clamp(min=2.0**-100)
    exp = torch.ceil(torch.log2(top / 6.0)).long()
    exp += torch.randint(0, 2, exp.shape, generator=gen)  # some blocks with spare range
    scaled = grouped / torch.pow(2.0, exp.double())[..., None]
    table = torch.tensor(E2M1, dtype=torch.float64)
    mag = (scaled.abs()[..., None] - table).abs().argmin(-1)
    codes = mag + 8 * (scaled < 0).long()  # sign bit 3
    pairs = codes.reshape(e, r, cols // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # low nibble first
    return blocks, (exp + 127).to(torch.uint8)


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, in, R] float64 from the bit fields of each code, element by element in spirit."""
    lo, hi = blocks & 0x0F, blocks >> 4
    codes = torch.stack((lo, hi), -1).reshape(*blocks.shape[:-1], 32).long()
    sign = torch.where(codes >= 8, -1.0, 1.0).double()
    exp_bits, man = (codes >> 1) & 3, (codes & 1).double()
    magnitude = torch.where(
        exp_bits == 0, man * 0.5, (1.0 + man / 2) * torch.pow(2.0, (exp_bits - 1).double())
    )
    value = sign * magnitude * torch.pow(2.0, scales.double() - 127)[..., None]
    e, r, g, _ = value.shape
    return value.reshape(e, r, g * 32).transpose(1, 2).contiguous()


def mxfp4_quantize_model(src: Path, dst: Path, deq: Path, seed: int = 0) -> dict:
    """gpt-oss experts of ``src`` as MXFP4 (blocks in one shard, scales in the other) in
    ``dst``; the exact values in ``deq``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    stored, exact = {}, {}
    for name, w in sorted(tensors.items()):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name] = exact[name] = w
            continue
        blocks, scales = mxfp4_encode(w, gen)
        stored[f"{name}_blocks"], stored[f"{name}_scales"] = blocks, scales
        exact[name] = mxfp4_reference(blocks, scales)
    config = json.loads((src / "config.json").read_text())
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    names = sorted(stored)
    first = [n for n in names if not n.endswith("_scales")]
    write_folder(
        dst, stored, dict(config, quantization_config=qc), [first, sorted(set(names) - set(first))]
    )
    write_folder(deq, {n: t.contiguous() for n, t in exact.items()}, config, [sorted(exact)])
    return stored
