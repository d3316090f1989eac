"""Benchmark shardmerge on a "70B-shaped slice" against `cp -r` and against PEFT.

The slice has Llama-3-70B's exact tensor names, shapes and dtype (hidden 8192,
intermediate 28672, vocab 128256, 64 heads / 8 KV heads, bf16, untied
lm_head) but only N decoder layers; the adapter is a PEFT LoRA (r=16,
lora_alpha=32) on all seven projections of every layer. Weights are random
and generated locally (no downloads); a slice whose spec matches the one in
--workdir is reused.

--kind picks another adapter kind for the same slice: dora, loha, lokr, ia3
(written by hand in PEFT's key format and config, with the key names, shapes
and dtypes PEFT's own save_pretrained gives), nf4 (the LoRA adapter merged
with --qlora-base nf4), or moe: a Mixtral-8x7B-shaped slice instead (hidden
4096, 8 experts of intermediate 14336, vocab 32000; N layers, ~3.4 GB per
layer with the embeddings), experts stored per expert as the Hub's Mixtral
checkpoints or fused (--moe-layout), with a LoRA on the attention
projections and, through target_parameters, on every expert.

What is measured (see docs/benchmarks.md for the method):

1. `cp -r BASE DEST` vs `python -m shardmerge merge BASE ADAPTER -o OUT -q`,
   alternated --repeats times; each timed run includes a trailing `sync`, the
   destination is deleted before each run and the page cache is dropped
   before each run where permitted. Medians and the median ratio merge/cp.
2. Peak RSS of each merge process (os.wait4 rusage of the child).
3. One merge inside a child memory cgroup limited to --limit (cgroup v1
   memory.limit_in_bytes or v2 memory.max): pass/fail, max usage, failcnt.
4. `python -m shardmerge verify` of one merged output.
5. With --peft: transformers + PEFT (from_pretrained, PeftModel.from_pretrained,
   merge_and_unload, save_pretrained) in a child process: wall time and peak
   RSS; with --peft-cgroup also under the same memory limit.

Reproduce (from the repository root, as root so the cgroup and drop_caches
steps work):

    # quick end-to-end check of the whole flow (1-2 minutes, ~0.3 GB of disk)
    .venv/bin/python scripts/bench.py --small --repeats 1 --peft --peft-cgroup \\
        --workdir /tmp/shardmerge-bench-small --limit 256MiB

    # the reported benchmark: 2 layers of Llama-3-70B (~7.6 GB slice plus one
    # ~7.6 GB output at a time: ~16 GB of disk; ~8 GB of RAM for the PEFT step)
    .venv/bin/python scripts/bench.py --layers 2 --repeats 3 --peft \\
        --json /tmp/shardmerge-bench/results.json

    # the same without the PEFT comparison, 1 layer (~5.9 GB)
    .venv/bin/python scripts/bench.py --layers 1 --repeats 3

    # other adapter kinds on the same slice (the base is shared), and MoE
    .venv/bin/python scripts/bench.py --layers 2 --repeats 2 --no-verify --kind dora
    .venv/bin/python scripts/bench.py --layers 1 --repeats 2 --kind moe --moe-layout fused
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC_VERSION = 1
SPEC_NAME = "spec.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_70B = Shape(hidden=8192, intermediate=28672, vocab=128256, heads=64, kv_heads=8)
SMALL = Shape(hidden=1024, intermediate=3584, vocab=16032, heads=8, kv_heads=1)


@dataclass(frozen=True)
class MoeShape(Shape):
    experts: int = 8


MIXTRAL_8X7B = MoeShape(hidden=4096, intermediate=14336, vocab=32000, heads=32, kv_heads=8)
SMALL_MOE = MoeShape(hidden=512, intermediate=1792, vocab=16032, heads=4, kv_heads=1, experts=4)
MOE_LAYOUTS = ("per-expert", "fused")


def layer_tensors(shape: Shape, i: int) -> list[tuple[str, list[int]]]:
    """One decoder layer's tensors in state-dict (module) order, as HF saves them."""
    h, m, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    p = f"model.layers.{i}."
    return [
        (p + "self_attn.q_proj.weight", [h, h]),
        (p + "self_attn.k_proj.weight", [kv, h]),
        (p + "self_attn.v_proj.weight", [kv, h]),
        (p + "self_attn.o_proj.weight", [h, h]),
        (p + "mlp.gate_proj.weight", [m, h]),
        (p + "mlp.up_proj.weight", [m, h]),
        (p + "mlp.down_proj.weight", [h, m]),
        (p + "input_layernorm.weight", [h]),
        (p + "post_attention_layernorm.weight", [h]),
    ]


def moe_layer_tensors(shape: MoeShape, i: int, layout: str) -> list[tuple[str, list[int]]]:
    """One Mixtral decoder layer: per expert as the Hub's Mixtral checkpoints store it
    (``block_sparse_moe.experts.N.w1/w2/w3``), or fused as transformers v5 holds it in
    memory and saves it with ``save_original_format=False`` (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I])."""
    h, m, kv, e = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim, shape.experts
    p = f"model.layers.{i}."
    out = [
        (p + "self_attn.q_proj.weight", [h, h]),
        (p + "self_attn.k_proj.weight", [kv, h]),
        (p + "self_attn.v_proj.weight", [kv, h]),
        (p + "self_attn.o_proj.weight", [h, h]),
    ]
    if layout == "fused":
        out += [
            (p + "mlp.gate.weight", [e, h]),
            (p + "mlp.experts.gate_up_proj", [e, 2 * m, h]),
            (p + "mlp.experts.down_proj", [e, h, m]),
        ]
    else:
        out.append((p + "block_sparse_moe.gate.weight", [e, h]))
        for j in range(e):
            q = f"{p}block_sparse_moe.experts.{j}."
            out += [(q + "w1.weight", [m, h]), (q + "w2.weight", [h, m]), (q + "w3.weight", [m, h])]
    return out + [
        (p + "input_layernorm.weight", [h]),
        (p + "post_attention_layernorm.weight", [h]),
    ]


def model_tensors(
    shape: Shape, layers: int, layout: str | None = None
) -> list[tuple[str, list[int]]]:
    out = [("model.embed_tokens.weight", [shape.vocab, shape.hidden])]
    for i in range(layers):
        if isinstance(shape, MoeShape):
            out += moe_layer_tensors(shape, i, layout or "per-expert")
        else:
            out += layer_tensors(shape, i)
    out += [("model.norm.weight", [shape.hidden]), ("lm_head.weight", [shape.vocab, shape.hidden])]
    return out


def numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(
    tensors: list[tuple[str, list[int]]], max_shard: int
) -> list[list[tuple[str, list[int]]]]:
    """Split like transformers' save_pretrained: greedy, in state-dict order, whole tensors."""
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shp in tensors:
        nbytes = numel(shp) * 2
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    return shards


def llama_config(shape: Shape, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def mixtral_config(shape: MoeShape, layers: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 32768,
        "num_attention_heads": shape.heads,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "num_key_value_heads": shape.kv_heads,
        "num_local_experts": shape.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


# --------------------------------------------------------------------------- generation


class RandomBF16:
    """A block of random bf16 bytes (N(0, 0.02)) written out repeatedly at varying offsets."""

    def __init__(self, nbytes: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        values = (torch.randn(nbytes // 2, generator=g) * 0.02).to(torch.bfloat16)
        self.block = memoryview(values.view(torch.uint8).numpy().tobytes())
        self.size = len(self.block)
        self.pos = 0

    def write(self, f, nbytes: int, chunk: int = 16 << 20) -> None:
        while nbytes:
            n = min(nbytes, chunk, self.size - self.pos)
            f.write(self.block[self.pos : self.pos + n])
            nbytes -= n
            # Jump to a new even offset so tensors and chunks do not repeat in lockstep.
            self.pos = (self.pos + n + 2 * 1_000_003) % (self.size - 2)
            self.pos -= self.pos % 2


def norm_weight_bytes(n: int, seed: int) -> bytes:
    import torch

    g = torch.Generator().manual_seed(seed)
    w = (1.0 + 0.05 * torch.randn(n, generator=g)).to(torch.bfloat16)
    return w.view(torch.uint8).numpy().tobytes()


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], rand: RandomBF16) -> int:
    """Write a safetensors file by hand, streaming the data; returns its data size."""
    order = sorted(tensors)  # safetensors' save_file orders same-dtype tensors by name
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shp in order:
        nbytes = numel(shp) * 2
        header[name] = {"dtype": "BF16", "shape": shp, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, shp) in enumerate(order):
            if len(shp) == 1:
                f.write(norm_weight_bytes(shp[0], seed=hash_name(name) + i))
            else:
                rand.write(f, numel(shp) * 2)
    tmp.rename(path)
    return offset


def hash_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def write_adapter(folder: Path, shape: Shape, layers: int, rank: int, alpha: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for i in range(layers):
        for name, shp in layer_tensors(shape, i):
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[1] not in TARGETS:
                continue
            out_f, in_f = shp
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.001
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- other adapter kinds

KINDS = ("lora", "dora", "loha", "lokr", "ia3", "nf4", "moe")
KIND_HELP = (
    "adapter kind: lora (default), dora (LoRA r=16 + lora_magnitude_vector), loha (r=8, "
    "alpha=8), lokr (r=8, alpha=8, PEFT's default factorization), ia3 (feedforward_modules: "
    "down_proj), all on the seven projections; nf4 (the LoRA adapter merged with --qlora-base "
    "nf4); moe (a Mixtral-8x7B-shaped slice, LoRA r=16 on the attention projections and, "
    "through target_parameters, on every expert's gate_up_proj/down_proj)"
)
LOKR_RANK = LOHA_RANK = 8
MOE_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lokr_factors(n: int) -> tuple[int, int]:
    """(m, n // m), m <= n // m: the split PEFT's LoKr ``factorization(n, -1)`` picks, i.e.
    the largest divisor m of n with m * m <= n."""
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def targeted(shape: Shape, layers: int) -> list[tuple[str, list[int]]]:
    """(module, [out, in]) of the seven projections of every layer of a dense slice."""
    return [
        (name.removesuffix(".weight"), shp)
        for i in range(layers)
        for name, shp in layer_tensors(shape, i)
        if name.removesuffix(".weight").rsplit(".", 1)[1] in TARGETS
    ]


def kind_adapter(kind: str, shape: Shape, layers: int) -> tuple[dict, dict, int]:
    """The tensors (float32, PEFT's key format), adapter_config.json and merged element count
    of a --kind adapter. Values are random but sized like trained adapters: deltas of order
    1e-4..1e-3 on weights of order 0.02, so merged values differ from the base in the low
    bits and every element's rounding matters."""
    import torch

    g = torch.Generator().manual_seed(4321)

    def randn(*size: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std + mean

    t: dict = {}
    pre = "base_model.model."
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True}
    if kind == "moe":
        assert isinstance(shape, MoeShape)
        r, e, h, m = 16, shape.experts, shape.hidden, shape.intermediate
        kv = shape.kv_heads * shape.head_dim
        attn = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
        for i in range(layers):
            for mod, (out_f, in_f) in attn.items():
                k = f"{pre}model.layers.{i}.self_attn.{mod}"
                t[f"{k}.lora_A.weight"] = randn(r, in_f, std=0.01)
                t[f"{k}.lora_B.weight"] = randn(out_f, r, std=0.001)
            # gate_up_proj registers first, so it is the innermost ParamWrapper (base_layer).
            k = f"{pre}model.layers.{i}.mlp.experts"
            t[f"{k}.base_layer.lora_A.weight"] = randn(r * e, h, std=0.01)
            t[f"{k}.base_layer.lora_B.weight"] = randn(2 * m, r * e, std=0.001)
            t[f"{k}.lora_A.weight"] = randn(r * e, m, std=0.01)
            t[f"{k}.lora_B.weight"] = randn(h, r * e, std=0.001)
        config = {
            **common,
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "target_modules": ATTENTION,
            "target_parameters": MOE_TARGET_PARAMETERS,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        }
        merged = layers * (sum(a * b for a, b in attn.values()) + 3 * e * h * m)
        return t, config, merged

    modules = targeted(shape, layers)
    merged = sum(o * i for _, (o, i) in modules)
    for module, (out_f, in_f) in modules:
        k = pre + module
        if kind == "dora":
            t[f"{k}.lora_A.weight"] = randn(16, in_f, std=0.01)
            t[f"{k}.lora_B.weight"] = randn(out_f, 16, std=0.001)
            # ||W + delta|| per output row, as DoRA initialises it (W ~ N(0, 0.02)), perturbed.
            t[f"{k}.lora_magnitude_vector"] = randn(out_f, std=0.002, mean=0.02 * in_f**0.5)
        elif kind == "loha":
            for w in ("w1", "w2"):
                t[f"{k}.hada_{w}_a"] = randn(out_f, LOHA_RANK, std=0.1)
                t[f"{k}.hada_{w}_b"] = randn(LOHA_RANK, in_f, std=0.1)
        elif kind == "lokr":
            (out_l, out_k), (in_m, in_n) = lokr_factors(out_f), lokr_factors(in_f)
            t[f"{k}.lokr_w1"] = randn(out_l, in_m, std=0.03)
            if max(out_k, in_n) <= 2 * LOKR_RANK:  # PEFT stores w2 whole then
                t[f"{k}.lokr_w2"] = randn(out_k, in_n, std=0.03)
            else:
                t[f"{k}.lokr_w2_a"] = randn(out_k, LOKR_RANK, std=0.1)
                t[f"{k}.lokr_w2_b"] = randn(LOKR_RANK, in_n, std=0.1)
        elif kind == "ia3":
            ff = module.endswith("down_proj")
            t[f"{k}.ia3_l"] = randn(*((1, in_f) if ff else (out_f, 1)), std=0.05, mean=1.0)
        else:
            raise ValueError(kind)
    if kind == "dora":
        config = {
            **common,
            "peft_type": "LORA",
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "target_modules": TARGETS,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": True,
        }
    elif kind in ("loha", "lokr"):
        config = {
            **common,
            "peft_type": kind.upper(),
            "r": LOHA_RANK if kind == "loha" else LOKR_RANK,
            "alpha": 8,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "target_modules": TARGETS,
            "init_weights": True,
        }
        if kind == "lokr":
            config |= {"decompose_both": False, "decompose_factor": -1}
    else:
        config = {
            **common,
            "peft_type": "IA3",
            "target_modules": TARGETS,
            "feedforward_modules": ["down_proj"],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
    return t, config, merged


def write_kind_adapter(folder: Path, kind: str, shape: Shape, layers: int) -> int:
    """Write the --kind adapter to folder (replacing it); returns the merged element count."""
    from safetensors.torch import save_file

    tensors, config, merged = kind_adapter(kind, shape, layers)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return merged


def slice_spec(args) -> dict:
    if args.kind == "moe":
        # The adapter is written per run (write_kind_adapter), so the spec is the base's.
        return {
            "version": SPEC_VERSION,
            "shape": asdict(SMALL_MOE if args.small else MIXTRAL_8X7B),
            "layout": args.moe_layout,
            "layers": args.layers,
            "max_shard_bytes": args.shard_size,
            "seed": args.seed,
        }
    shape = SMALL if args.small else LLAMA3_70B
    return {
        "version": SPEC_VERSION,
        "shape": asdict(shape),
        "layers": args.layers,
        "max_shard_bytes": args.shard_size,
        "rank": 16,
        "lora_alpha": 32,
        "seed": args.seed,
    }


def slice_names(spec: dict) -> tuple[str, str]:
    """(base folder, spec file) in the work dir: the MoE slices live beside the dense one."""
    if "layout" in spec:
        return f"base-moe-{spec['layout']}", f"spec-moe-{spec['layout']}.json"
    return "base", SPEC_NAME


def spec_shape(spec: dict) -> Shape:
    return MoeShape(**spec["shape"]) if "experts" in spec["shape"] else Shape(**spec["shape"])


def slice_intact(workdir: Path, spec: dict) -> bool:
    """True when workdir holds a complete slice generated from exactly this spec."""
    try:
        old = json.loads((workdir / slice_names(spec)[1]).read_text())
    except (OSError, ValueError):
        return False
    if old.get("spec") != spec:
        return False
    for rel, size in old.get("files", {}).items():
        p = workdir / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def generate(workdir: Path, spec: dict) -> None:
    shape = spec_shape(spec)
    moe = isinstance(shape, MoeShape)
    layers = spec["layers"]
    base_name, spec_name = slice_names(spec)
    base, adapter = workdir / base_name, workdir / "adapter"
    folders = (base,) if moe else (base, adapter)
    (workdir / spec_name).unlink(missing_ok=True)
    for p in folders:
        shutil.rmtree(p, ignore_errors=True)
    base.mkdir(parents=True)
    t0 = time.perf_counter()
    rand = RandomBF16(64 << 20, seed=spec["seed"])
    tensors = model_tensors(shape, layers, spec.get("layout"))
    shards = shard_plan(tensors, spec["max_shard_bytes"])
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        log(f"  writing {name} ({sum(numel(s) * 2 for _, s in shard) / 1e9:.2f} GB)")
        total += write_shard(base / name, shard, rand)
        weight_map.update({t: name for t, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if moe:
        config = mixtral_config(shape, layers)
        gen = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        config = llama_config(shape, layers)
        gen = {"do_sample": True, "bos_token_id": 128000, "eos_token_id": 128001}
    (base / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (base / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if not moe:
        write_adapter(adapter, shape, layers, spec["rank"], spec["lora_alpha"])
    run(["sync"])
    files = {
        str(p.relative_to(workdir)): p.stat().st_size for d in folders for p in sorted(d.iterdir())
    }
    (workdir / spec_name).write_text(json.dumps({"spec": spec, "files": files}, indent=2) + "\n")
    log(f"  generated {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------- running things


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


@dataclass
class Child:
    rc: int
    seconds: float  # the command itself
    seconds_sync: float  # the command plus a trailing sync
    maxrss: int  # bytes: kernel peak RSS of the process or of any one child it reaped
    stdout: str
    stderr: str
    tree_rss: int = 0  # bytes: peak of the summed RSS of the process tree (sampled)
    tree_anon: int = 0  # bytes: peak of the summed anonymous RSS of the process tree (sampled)
    procs: int = 1  # most processes seen at once in the tree


class TreeSampler:
    """Samples the summed RSS / anonymous RSS of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.1):
        import threading

        self.pid, self.interval = pid, interval
        self.rss = self.anon = 0
        self.procs = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = anon = 0
            pids = _tree(self.pid)
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                rss += _kb(fields.get("VmRSS"))
                anon += _kb(fields.get("RssAnon"))
            self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
            self.procs = max(self.procs, len(pids))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/PID/task/TID/children (cheap), else psutil."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except FileNotFoundError:
                return _tree_psutil(pid)
            except OSError:
                continue
            todo += [int(k) for k in kids]
    return out


def _tree_psutil(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return [pid]


def _kb(field: str | None) -> int:
    try:
        return int(field.split()[0]) * 1024 if field else 0
    except (ValueError, IndexError):
        return 0


def timed(cmd: list[str], *, cwd: Path | None = None, sync: bool = True) -> Child:
    """Run cmd, then sync; wall times and the child's peak RSS from wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    # Drain pipes in threads, then reap with wait4 to get this child's own rusage.
    import threading

    out: dict[str, str] = {}

    def drain(name, stream):
        out[name] = stream.read()

    threads = [
        threading.Thread(target=drain, args=("out", p.stdout)),
        threading.Thread(target=drain, args=("err", p.stderr)),
    ]
    for t in threads:
        t.start()
    sampler = TreeSampler(p.pid)
    # Reap with waitid(WNOWAIT) first so the sampler can still see the process tree.
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    t1 = time.perf_counter()
    sampler.stop()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    if sync:
        os.sync()
    t2 = time.perf_counter()
    return Child(
        p.returncode,
        t1 - t0,
        t2 - t0,
        usage.ru_maxrss * 1024,
        out["out"],
        out.get("err", ""),
        sampler.rss,
        sampler.anon,
        sampler.procs,
    )


class Busy:
    """``n`` processes spinning on the CPU for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Busy:
        spin = [sys.executable, "-c", "while True: pass"]
        self.procs = [subprocess.Popen(spin) for _ in range(self.n)]
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def write_bf16_copy(src: Path, dst: Path) -> None:
    """The LoRA adapter in ``src`` saved again with bf16 tensors (16-bit-precision factors)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "adapter_config.json").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()},
        str(dst / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rm(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.sync()


def merge_supports(flag: str, python: str) -> bool:
    r = subprocess.run(
        [python, "-m", "shardmerge", "merge", "--help"], capture_output=True, text=True, cwd=REPO
    )
    return flag in r.stdout


def subcommand_exists(name: str, python: str) -> bool:
    r = subprocess.run(
        [python, "-m", "shardmerge", "--help"], capture_output=True, text=True, cwd=REPO
    )
    return any(line.split()[:1] == [name] for line in r.stdout.splitlines())


# --------------------------------------------------------------------------- cgroups


def parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (e.g. 1GiB, 512MiB)")
    number, unit, binary = m.groups()
    base = 1024 if binary or not text.lower().endswith("b") else 1000
    return int(float(number) * base ** "_kmgt".index(unit or "_"))


class MemoryCgroup:
    """A child memory cgroup of our own, with a hard limit (v1 or v2)."""

    def __init__(self, path: Path, version: int):
        self.path = path
        self.version = version

    @classmethod
    def create(cls, limit: int, name: str) -> tuple[MemoryCgroup | None, str]:
        parent, version, why = cls._own_dir()
        if parent is None:
            return None, why
        path = parent / name
        try:
            if path.exists():
                path.rmdir()
            path.mkdir()
        except OSError as e:
            return None, f"cannot create a child cgroup under {parent}: {e}"
        cg = cls(path, version)
        try:
            if version == 1:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                memsw = path / "memory.memsw.limit_in_bytes"
                if memsw.exists():  # no swapping around the limit either
                    with contextlib.suppress(OSError):
                        memsw.write_text(str(limit))
            else:
                (path / "memory.max").write_text(str(limit))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
        except OSError as e:
            cg.remove()
            return None, f"cannot set a memory limit in {path}: {e}"
        return cg, ""

    @staticmethod
    def _own_dir() -> tuple[Path | None, int, str]:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError as e:
            return None, 0, f"cannot read /proc/self/cgroup: {e}"
        v1 = v2 = None
        for line in lines:
            hid, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                v1 = rel
            elif hid == "0" and controllers == "":
                v2 = rel
        candidates: list[tuple[Path, int]] = []
        if v1 is not None:
            root = Path("/sys/fs/cgroup/memory")
            candidates += [(root / v1.lstrip("/"), 1), (root, 1)]
        if v2 is not None:
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                candidates.append((root / v2.lstrip("/"), 2))
        for d, version in candidates:
            probe = "memory.limit_in_bytes" if version == 1 else "cgroup.controllers"
            if not (d / probe).exists():
                continue
            if version == 2 and "memory" not in (d / "cgroup.controllers").read_text().split():
                continue
            if os.access(d, os.W_OK):
                return d, version, ""
        return None, 0, "no writable memory cgroup found (need root and a memory controller)"

    def wrap(self, cmd: list[str]) -> list[str]:
        """cmd, started inside this cgroup (the shell moves itself in, then execs)."""
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", procs, *cmd]

    def stats(self) -> dict:
        def read(name: str) -> str | None:
            try:
                return (self.path / name).read_text().strip()
            except OSError:
                return None

        if self.version == 1:
            out = {
                "max_usage_bytes": _int(read("memory.max_usage_in_bytes")),
                "failcnt": _int(read("memory.failcnt")),
                "memsw_failcnt": _int(read("memory.memsw.failcnt")),
            }
            oom = read("memory.oom_control") or ""
        else:
            out = {"max_usage_bytes": _int(read("memory.peak")), "failcnt": None}
            oom = read("memory.events") or ""
        for line in oom.splitlines():
            k, _, v = line.partition(" ")
            if k in ("oom_kill", "oom"):
                out[k] = _int(v)
        return out

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log(f"warning: could not remove cgroup {self.path}")


def _int(s: str | None) -> int | None:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None


def limited(cmd: list[str], limit: int, label: str) -> dict:
    cg, why = MemoryCgroup.create(limit, f"shardmerge-bench-{os.getpid()}-{label}")
    if cg is None:
        log(f"  skipped: {why}")
        return {"ran": False, "why": why}
    try:
        c = timed(cg.wrap(cmd), cwd=REPO)
        res = {
            "ran": True,
            "cgroup": str(cg.path),
            "version": cg.version,
            "limit_bytes": limit,
            "rc": c.rc,
            "passed": c.rc == 0,
            "seconds": c.seconds_sync,
            "maxrss_bytes": c.maxrss,
            "tree_rss_bytes": c.tree_rss,
            "tree_anon_bytes": c.tree_anon,
            "procs": c.procs,
            "stderr_tail": c.stderr.strip()[-600:],
            **cg.stats(),
        }
    finally:
        cg.remove()
    return res


# --------------------------------------------------------------------------- PEFT

PEFT_CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
base, adapter, out = sys.argv[1:4]
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
t2 = time.perf_counter()
model = PeftModel.from_pretrained(model, adapter)
t3 = time.perf_counter()
model = model.merge_and_unload()
t4 = time.perf_counter()
model.save_pretrained(out)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "peft_load": t3 - t2,
                  "merge": t4 - t3, "save": t5 - t4}))
"""


def peft_cmd(python: str, base: Path, adapter: Path, out: Path) -> list[str]:
    return [python, "-c", PEFT_CHILD, str(base), str(adapter), str(out)]


# --------------------------------------------------------------------------- report


def gb(n: float | None, unit: float = 1e9) -> str:
    return "n/a" if n is None else f"{n / unit:.2f}"


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def machine_info() -> dict:
    import psutil
    import torch

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "ram_bytes": psutil.virtual_memory().total,
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
    }
    try:
        import peft
        import transformers

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        import shardmerge

        info["shardmerge"] = shardmerge.__version__
    except (ImportError, AttributeError):
        pass
    return info


def table(r: dict) -> str:
    m = r["machine"]
    rows = [
        ("date", m["date"]),
        (
            "machine",
            f"{m['nproc']} CPUs, {m['ram_bytes'] / 2**30:.1f} GiB RAM, torch {m['torch']}, "
            f"load avg at start {m['loadavg_start'][0]:.2f}",
        ),
        (
            "slice",
            f"{r['slice']['name']}: {r['slice']['layers']} layers, {r['slice']['shards']} shards, "
            f"{gb(r['slice']['bytes'])} GB",
        ),
        (
            "adapter kind",
            f"{r.get('kind', 'lora')} ({gb(r.get('adapter_bytes'), 1e6)} MB); "
            f"{r.get('merged_elements', 0) / 1e9:.2f} G elements merged",
        ),
        ("page cache dropped before each run", "yes" if r["drop_caches"] else "no (not permitted)"),
        ("repeats", str(r["repeats"])),
        ("busy processes spinning during timed runs", str(r.get("busy", 0))),
        ("cp -r + sync, median", f"{r['cp']['median_s']:.1f} s ({_list(r['cp']['runs_s'])})"),
        (
            "shardmerge merge + sync, median",
            f"{r['merge']['median_s']:.1f} s ({_list(r['merge']['runs_s'])})",
        ),
        ("ratio merge / cp (median of per-pair ratios)", f"{r['ratio_merge_cp']:.2f}"),
        (
            "merge throughput",
            f"{r['slice']['bytes'] / r['merge']['median_s'] / 1e6:.0f} MB/s "
            f"(cp: {r['slice']['bytes'] / r['cp']['median_s'] / 1e6:.0f} MB/s); "
            f"{r.get('merged_elements', 0) / r['merge']['median_s'] / 1e6:.0f} M merged "
            "elements/s over the whole run",
        ),
        ("merge peak RSS (max over runs)", mem(r["merge"])),
        ("merge flags", " ".join(r["merge"]["flags"]) or "(defaults)"),
    ]
    cg = r.get("cgroup")
    if cg is not None:
        if cg["ran"]:
            rows.append(
                (
                    f"merge under a {gib(cg['limit_bytes'])} memory cgroup (v{cg['version']})",
                    f"{'PASS' if cg['passed'] else 'FAIL (rc ' + str(cg['rc']) + ')'}, "
                    f"{cg['seconds']:.1f} s; cgroup max usage {gib(cg.get('max_usage_bytes'))} "
                    f"(incl. page cache), failcnt {cg.get('failcnt')}"
                    f"/{cg.get('memsw_failcnt', 'n/a')} (mem/mem+swap), "
                    f"oom_kill {cg.get('oom_kill', 'n/a')}; {mem(cg)}",
                )
            )
        else:
            rows.append(("merge under a memory cgroup", f"skipped: {cg['why']}"))
    v = r.get("verify")
    if v is not None:
        rows.append(
            ("shardmerge verify", f"{'OK' if v['ok'] else 'FAILED'} ({v['seconds']:.1f} s)")
        )
    p = r.get("peft")
    if p is not None:
        if p["rc"] == 0:
            ph = p.get("phases", {})
            phases = ", ".join(f"{k} {s:.1f}" for k, s in ph.items())
            rows += [
                ("PEFT merge_and_unload + save + sync", f"{p['seconds']:.1f} s ({phases})"),
                ("PEFT peak RSS", mem(p)),
                ("time ratio shardmerge / PEFT", f"{r['merge']['median_s'] / p['seconds']:.2f}"),
                (
                    "peak-memory ratio shardmerge / PEFT (RSS; anon RSS)",
                    f"{r['merge']['tree_rss_bytes'] / max(p['tree_rss_bytes'], 1):.3f}; "
                    f"{r['merge']['tree_anon_bytes'] / max(p['tree_anon_bytes'], 1):.3f}",
                ),
            ]
        else:
            rows.append(("PEFT", f"FAILED rc {p['rc']}: {p['stderr_tail'][-300:]}"))
        pc = r.get("peft_cgroup")
        if pc is not None:
            if pc["ran"]:
                rows.append(
                    (
                        f"PEFT under the {gib(pc['limit_bytes'])} cgroup",
                        f"{'PASS' if pc['passed'] else 'FAIL (rc ' + str(pc['rc']) + ')'}, "
                        f"{pc['seconds']:.1f} s, failcnt {pc.get('failcnt')}"
                        f"/{pc.get('memsw_failcnt', 'n/a')}, oom_kill {pc.get('oom_kill', 'n/a')}",
                    )
                )
            else:
                rows.append(("PEFT under a memory cgroup", f"skipped: {pc['why']}"))
    out = ["| metric | value |", "|---|---|"]
    out += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    out += separate_rows(r)
    return "\n".join(out)


def separate_rows(r: dict) -> list[str]:
    s = r.get("separate")
    if not s:
        return []
    return [
        f"| merge --separate, {s['adapters']} adapters | {s['together_s']:.1f} s "
        f"({gib(s['tree_anon_bytes'])} anonymous) |",
        f"| {s['adapters']} separate merges | {sum(s['separate_runs_s']):.1f} s |",
        f"| ratio --separate / separate merges | {s['ratio']:.2f} |",
    ]


def mem(d: dict) -> str:
    procs = f", {d['procs']} processes" if d.get("procs", 1) > 1 else ""
    return (
        f"{gib(d.get('tree_rss_bytes'))} RSS, {gib(d.get('tree_anon_bytes'))} anonymous "
        f"(sampled, process tree{procs}); kernel VmHWM {gib(d.get('maxrss_bytes'))}"
    )


def _list(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


# --------------------------------------------------------------------------- main


def time_separate(args, base: Path, adapter: Path, work: Path, flags: list[str]) -> dict:
    """One `merge --separate` with K adapters vs K merges one after the other."""
    k = args.separate
    names = []
    for i in range(k):
        link = work / f"adapter-{i + 1}"
        if not link.exists():
            link.symlink_to(adapter.resolve(), target_is_directory=True)
        names.append(link)
    out = work / "out-separate"
    rm(out)
    if not args.no_drop_caches:
        drop_caches()
    cmd = [args.python, "-m", "shardmerge", "merge", str(base), *map(str, names)]
    together = timed([*cmd, "--separate", "-o", str(out), *flags], cwd=REPO)
    if together.rc:
        raise SystemExit(f"merge --separate failed:\n{together.stderr}")
    rm(out)
    alone = []
    for i, name in enumerate(names):
        if not args.no_drop_caches:
            drop_caches()
        one = work / f"out-alone-{i}"
        c = timed(
            [
                args.python,
                "-m",
                "shardmerge",
                "merge",
                str(base),
                str(name),
                "-o",
                str(one),
                *flags,
            ],
            cwd=REPO,
        )
        if c.rc:
            raise SystemExit(f"merge failed:\n{c.stderr}")
        alone.append(c.seconds_sync)
        rm(one)
    log(
        f"--separate with {k} adapters: {together.seconds_sync:.1f} s; {k} separate merges: "
        f"{sum(alone):.1f} s ({' + '.join(f'{a:.1f}' for a in alone)})"
    )
    return {
        "adapters": k,
        "together_s": together.seconds_sync,
        "separate_runs_s": alone,
        "ratio": together.seconds_sync / sum(alone),
        "tree_anon_bytes": together.tree_anon,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/shardmerge-bench"))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2, ~7.6 GB)")
    ap.add_argument(
        "--small",
        action="store_true",
        help="shrink widths (hidden 1024, intermediate 3584, vocab 16032) for a quick check",
    )
    ap.add_argument(
        "--shard-size",
        type=parse_size,
        default=None,
        help="max bytes per shard (default 5GB, or 50MB with --small)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=KINDS, default="lora", help=KIND_HELP)
    ap.add_argument(
        "--moe-layout",
        choices=MOE_LAYOUTS,
        default="per-expert",
        help="with --kind moe: the experts as separate tensors (as Mixtral ships) or fused",
    )
    ap.add_argument("--repeats", type=int, default=3, help="cp/merge pairs (default 3)")
    ap.add_argument(
        "--limit", type=parse_size, default=parse_size("1GiB"), help="cgroup limit (1GiB)"
    )
    ap.add_argument("--no-cgroup", action="store_true", help="skip the memory-cgroup run")
    ap.add_argument(
        "--cgroup-max-memory",
        default=None,
        help="--max-memory for the merge in the cgroup (default: same flags as the timed runs)",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip shardmerge verify")
    ap.add_argument(
        "--separate",
        type=int,
        default=0,
        metavar="K",
        help="also time merge --separate with K adapters against K separate merges",
    )
    ap.add_argument("--peft", action="store_true", help="also time transformers + PEFT")
    ap.add_argument("--peft-cgroup", action="store_true", help="also run PEFT under --limit")
    ap.add_argument("--max-memory", default=None, help="--max-memory for the timed merges")
    ap.add_argument("--quantize", default=None, help="--quantize for the timed merges (fp8-block)")
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="N processes spinning on the CPU during every timed cp and merge (shared cores: "
        "--busy 1 keeps the other core of a 2-core machine busy)",
    )
    ap.add_argument("--dtype", default=None, help="--dtype for the merges (e.g. float32)")
    ap.add_argument(
        "--bf16-factors",
        action="store_true",
        help="with --kind lora/nf4: the adapter saved in bf16 (16-bit-precision factors)",
    )
    ap.add_argument("--workers", type=int, default=None, help="--workers, if shardmerge has it")
    ap.add_argument(
        "--no-drop-caches", action="store_true", help="do not drop the page cache between runs"
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter that has shardmerge")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged/copied folders")
    args = ap.parse_args(argv)
    if args.shard_size is None:
        args.shard_size = 50_000_000 if args.small else 5_000_000_000
    if args.layers < 1 or args.repeats < 1:
        ap.error("--layers and --repeats must be at least 1")

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    spec = slice_spec(args)
    shape = spec_shape(spec)
    base, adapter = work / slice_names(spec)[0], work / "adapter"
    cp_out, merge_out, peft_out = work / "out-cp", work / "out-merge", work / "out-peft"
    for p in (cp_out, merge_out, peft_out):
        rm(p)

    if slice_intact(work, spec):
        log(f"reusing the slice in {work}")
    else:
        need = sum(numel(s) * 2 for _, s in model_tensors(shape, args.layers, spec.get("layout")))
        free = shutil.disk_usage(work).free
        if free < 2 * need + (1 << 30):  # the slice plus one output at a time
            log(f"warning: {free / 1e9:.1f} GB free; the run needs about {2 * need / 1e9:.1f} GB")
        log(f"generating a {args.layers}-layer slice in {work}")
        generate(work, spec)

    if args.kind in ("lora", "nf4"):
        merged_elements = sum(o * i for _, (o, i) in targeted(shape, args.layers))
        if args.bf16_factors:
            adapter = work / "adapter-bf16"
            write_bf16_copy(work / "adapter", adapter)
    else:
        adapter = work / f"adapter-{args.kind}"
        merged_elements = write_kind_adapter(adapter, args.kind, shape, args.layers)
        log(f"wrote the {args.kind} adapter to {adapter}")

    shards = sorted(base.glob("model-*.safetensors"))
    slice_bytes = sum(p.stat().st_size for p in base.iterdir())
    if args.kind == "moe":
        name = f"Mixtral-8x7B-shaped, {args.moe_layout} experts"
        if args.small:
            name = f"small MoE (hidden 512, 4 experts), {args.moe_layout} experts"
    else:
        name = "small (hidden 1024)" if args.small else "Llama-3-70B-shaped"
    results: dict = {
        "machine": machine_info(),
        "kind": args.kind,
        "merged_elements": merged_elements,
        "adapter_bytes": sum(p.stat().st_size for p in adapter.iterdir()),
        "slice": {
            "name": name,
            "layers": args.layers,
            "shards": len(shards),
            "bytes": slice_bytes,
            "spec": spec,
        },
        "repeats": args.repeats,
        "busy": args.busy,
        "bf16_factors": args.bf16_factors,
    }

    flags = ["-q"]
    if args.kind == "nf4":
        flags += ["--qlora-base", "nf4"]
    if args.max_memory:
        flags += ["--max-memory", args.max_memory]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.workers is not None:
        if merge_supports("--workers", args.python):
            flags += ["--workers", str(args.workers)]
        else:
            log("note: this shardmerge has no --workers; ignoring --workers")
    merge_cmd = [args.python, "-m", "shardmerge", "merge", str(base), str(adapter), "-o"]

    dropped = []
    cp_runs, merge_runs = [], []
    for k in range(args.repeats):
        rm(cp_out)
        rm(merge_out)
        dropped.append(False if args.no_drop_caches else drop_caches())
        with Busy(args.busy):
            c = timed(["cp", "-r", str(base), str(cp_out)])
        if c.rc:
            raise SystemExit(f"cp failed: {c.stderr}")
        cp_runs.append(c)
        rm(cp_out)
        dropped.append(False if args.no_drop_caches else drop_caches())
        with Busy(args.busy):
            m = timed([*merge_cmd, str(merge_out), *flags], cwd=REPO)
        if m.rc:
            raise SystemExit(f"merge failed (rc {m.rc}):\n{m.stdout}\n{m.stderr}")
        merge_runs.append(m)
        log(
            f"run {k + 1}/{args.repeats}: cp {c.seconds_sync:.1f} s, merge {m.seconds_sync:.1f} s "
            f"(peak RSS {gib(m.tree_rss)}, anon {gib(m.tree_anon)}, {m.procs} procs); "
            f"{m.stdout.strip()}"
        )
    results["drop_caches"] = all(dropped)
    results["cp"] = {
        "runs_s": [c.seconds_sync for c in cp_runs],
        "runs_nosync_s": [c.seconds for c in cp_runs],
        "median_s": statistics.median(c.seconds_sync for c in cp_runs),
    }
    results["merge"] = {
        "flags": flags,
        "runs_s": [m.seconds_sync for m in merge_runs],
        "runs_nosync_s": [m.seconds for m in merge_runs],
        "median_s": statistics.median(m.seconds_sync for m in merge_runs),
        "maxrss_bytes": max(m.maxrss for m in merge_runs),
        "maxrss_runs_bytes": [m.maxrss for m in merge_runs],
        "tree_rss_bytes": max(m.tree_rss for m in merge_runs),
        "tree_anon_bytes": max(m.tree_anon for m in merge_runs),
        "procs": max(m.procs for m in merge_runs),
        "stdout": merge_runs[-1].stdout.strip(),
    }
    results["ratio_merge_cp"] = statistics.median(
        m.seconds_sync / c.seconds_sync for c, m in zip(cp_runs, merge_runs, strict=True)
    )

    if args.separate > 1:
        results["separate"] = time_separate(args, base, adapter, work, flags)

    if not args.no_verify:
        if subcommand_exists("verify", args.python):
            log("verifying the merged output")
            v = timed(
                [
                    args.python,
                    "-m",
                    "shardmerge",
                    "verify",
                    str(merge_out),
                    "--base",
                    str(base),
                    "--adapter",
                    str(adapter),
                ],
                cwd=REPO,
                sync=False,
            )
            results["verify"] = {
                "ok": v.rc == 0,
                "rc": v.rc,
                "seconds": v.seconds,
                "maxrss_bytes": v.maxrss,
                "output": (v.stdout + v.stderr).strip()[-2000:],
            }
            log(f"  verify: {'OK' if v.rc == 0 else 'FAILED'}: {results['verify']['output']}")
        else:
            log("note: this shardmerge has no verify subcommand")
    if not args.keep_outputs:
        rm(merge_out)

    if not args.no_cgroup:
        log(f"merging under a {args.limit / 2**30:.2f} GiB memory cgroup")
        cg_flags = flags
        if args.cgroup_max_memory:
            cg_flags = [f for f in flags if f != "--max-memory" and f != args.max_memory]
            cg_flags += ["--max-memory", args.cgroup_max_memory]
        if not args.no_drop_caches:
            drop_caches()
        res = limited([*merge_cmd, str(merge_out), *cg_flags], args.limit, "merge")
        res["flags"] = cg_flags
        results["cgroup"] = res
        if res["ran"]:
            log(
                f"  {'PASS' if res['passed'] else 'FAIL'} rc {res['rc']}, max usage "
                f"{gib(res.get('max_usage_bytes'))}, failcnt {res.get('failcnt')}, "
                f"oom_kill {res.get('oom_kill')}; {mem(res)}"
            )
            if not res["passed"]:
                log(f"  stderr: {res['stderr_tail']}")
        rm(merge_out)

    if args.peft and args.kind == "nf4":
        log("note: no PEFT comparison for nf4 (PEFT merges into a bitsandbytes model on a GPU)")
    elif args.peft:
        log("running transformers + PEFT merge_and_unload")
        if not args.no_drop_caches:
            drop_caches()
        p = timed(peft_cmd(args.python, base, adapter, peft_out), cwd=REPO)
        pres = {
            "rc": p.rc,
            "seconds": p.seconds_sync,
            "seconds_nosync": p.seconds,
            "maxrss_bytes": p.maxrss,
            "tree_rss_bytes": p.tree_rss,
            "tree_anon_bytes": p.tree_anon,
            "stderr_tail": p.stderr.strip()[-1500:],
        }
        if p.rc == 0:
            with contextlib.suppress(ValueError, IndexError):
                pres["phases"] = json.loads(p.stdout.strip().splitlines()[-1])
        results["peft"] = pres
        log(f"  rc {p.rc}, {p.seconds_sync:.1f} s; {mem(pres)}")
        if p.rc:
            log(f"  stderr: {pres['stderr_tail']}")
        rm(peft_out)
        if args.peft_cgroup and not args.no_cgroup:
            log(f"running PEFT under the {args.limit / 2**30:.2f} GiB memory cgroup")
            if not args.no_drop_caches:
                drop_caches()
            pc = limited(peft_cmd(args.python, base, adapter, peft_out), args.limit, "peft")
            results["peft_cgroup"] = pc
            if pc["ran"]:
                log(
                    f"  {'PASS' if pc['passed'] else 'FAIL'} rc {pc['rc']}, "
                    f"failcnt {pc.get('failcnt')}, oom_kill {pc.get('oom_kill')}"
                )
            rm(peft_out)

    results["machine"]["loadavg_end"] = os.getloadavg()
    md = table(results)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json}")
    if results.get("verify") and not results["verify"]["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
