"""Benchmark: merging attention LoRA into 4-bit bases that keep their experts packed.

Two slices with real tensor names, shapes and storage, random contents:

* ``gpt-oss``: gpt-oss-120b layers (hidden 2880, 64 query heads of 64, 8 KV
  heads, experts 2880 wide in MXFP4 blocks; ``--experts``, 128 in the real model);
* ``kimi``: Kimi-K2 layers (hidden 7168, MLA attention in bf16, routed experts
  2048 wide in compressed-tensors INT4 groups of 32; ``--experts``, 384 in the
  real model).

The vocabulary is cut to 1024 rows. A LoRA (r 16) on the attention projections
is written by hand. Each slice is timed three ways: ``cp -r``, the default merge
(untouched experts copied packed) and ``--dtype bfloat16`` (everything
dequantized, with ``--full``). Peak RSS: ru_maxrss of each command.

    python scripts/bench_q4.py --slice gpt-oss --layers 1 --experts 32 --workdir /tmp/q4bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 1024


def gpt_oss(layers: int, experts: int) -> tuple[dict, dict, list[str]]:
    """(tensors, config, attention module suffixes) of a gpt-oss-120b slice."""
    h, heads, kv, d, inter = 2880, 64, 8, 64, 2880
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, h).bfloat16()}
    t["lm_head.weight"] = torch.randn(VOCAB, h).bfloat16()
    t["model.norm.weight"] = torch.ones(h).bfloat16()
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in {
            "q_proj": (heads * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h),
            "o_proj": (h, heads * d),
        }.items():  # fmt: skip
            t[f"{p}.self_attn.{name}.weight"] = (torch.randn(shape) * 0.02).bfloat16()
            t[f"{p}.self_attn.{name}.bias"] = torch.zeros(shape[0]).bfloat16()
        t[f"{p}.self_attn.sinks"] = torch.zeros(heads).bfloat16()
        t[f"{p}.mlp.router.weight"] = (torch.randn(experts, h) * 0.02).bfloat16()
        t[f"{p}.mlp.router.bias"] = torch.zeros(experts).bfloat16()
        for name, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            e = f"{p}.mlp.experts.{name}"
            t[f"{e}_blocks"] = torch.randint(
                0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8
            )
            t[f"{e}_scales"] = torch.randint(
                118, 126, (experts, rows, cols // 32), dtype=torch.uint8
            )
            t[f"{e}_bias"] = torch.zeros(experts, rows).bfloat16()
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{n}.weight"] = torch.ones(h).bfloat16()
    config = {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": d, "vocab_size": VOCAB,
        "num_local_experts": experts, "num_experts_per_tok": 4, "dtype": "bfloat16",
        "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]},
    }  # fmt: skip
    return t, config, ["q_proj", "k_proj", "v_proj", "o_proj"]


def kimi(layers: int, experts: int) -> tuple[dict, dict, list[str]]:
    """(tensors, config, attention module suffixes) of a Kimi-K2 slice (routed experts only)."""
    h, inter, heads = 7168, 2048, 64
    q_rank, kv_rank, nope, rope, v = 1536, 512, 128, 64, 128
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, h).bfloat16()}
    t["lm_head.weight"] = torch.randn(VOCAB, h).bfloat16()
    t["model.norm.weight"] = torch.ones(h).bfloat16()
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in {
            "q_a_proj": (q_rank, h), "q_b_proj": (heads * (nope + rope), q_rank),
            "kv_a_proj_with_mqa": (kv_rank + rope, h), "kv_b_proj": (heads * (nope + v), kv_rank),
            "o_proj": (h, heads * v),
        }.items():  # fmt: skip
            t[f"{p}.self_attn.{name}.weight"] = (torch.randn(shape) * 0.02).bfloat16()
        t[f"{p}.self_attn.q_a_layernorm.weight"] = torch.ones(q_rank).bfloat16()
        t[f"{p}.self_attn.kv_a_layernorm.weight"] = torch.ones(kv_rank).bfloat16()
        t[f"{p}.mlp.gate.weight"] = (torch.randn(experts, h) * 0.02).bfloat16()
        for e in range(experts):
            for name, rows, cols in (
                ("gate_proj", inter, h),
                ("up_proj", inter, h),
                ("down_proj", h, inter),
            ):
                m = f"{p}.mlp.experts.{e}.{name}"
                t[f"{m}.weight_packed"] = torch.randint(
                    -(2**31), 2**31 - 1, (rows, cols // 8), dtype=torch.int32
                )
                t[f"{m}.weight_scale"] = (torch.rand(rows, cols // 32) * 0.01 + 0.001).bfloat16()
                t[f"{m}.weight_shape"] = torch.tensor([rows, cols])
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{n}.weight"] = torch.ones(h).bfloat16()
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 32, "dynamic": False}  # fmt: skip
    config = {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": h,
        "num_hidden_layers": layers, "vocab_size": VOCAB, "n_routed_experts": experts,
        "dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "format": "pack-quantized"}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"],
        },
    }  # fmt: skip
    return t, config, ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def write_slice(folder: Path, tensors: dict, config: dict, shard_bytes: int = 2 << 30) -> None:
    """Shards of about ``shard_bytes`` in name order, an index and config.json."""
    folder.mkdir(parents=True)
    shards, cur, size = [], [], 0
    for name in sorted(tensors):
        cur.append(name)
        size += tensors[name].numel() * tensors[name].element_size()
        if size >= shard_bytes:
            shards, cur, size = shards + [cur], [], 0
    shards += [cur] if cur else []
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def write_lora(folder: Path, tensors: dict, targets: list[str], r: int = 16) -> None:
    """A PEFT LoRA on every ``targets`` projection of the slice."""
    folder.mkdir(parents=True)
    lora = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and any(f".{s}." in name for s in targets):
            key = "base_model.model." + name[: -len(".weight")]
            lora[f"{key}.lora_A.weight"] = (torch.randn(r, t.shape[1]) * 0.01).bfloat16()
            lora[f"{key}.lora_B.weight"] = (torch.randn(t.shape[0], r) * 0.01).bfloat16()
    save_file(lora, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
              "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))


PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def timed(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes of the command and its children) of one command."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *argv], check=True, capture_output=True)
    return time.perf_counter() - start, int(done.stdout.split()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slice", choices=["gpt-oss", "kimi"], default="gpt-oss")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/q4bench"))
    ap.add_argument("--full", action="store_true", help="also time --dtype bfloat16")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    build = gpt_oss if args.slice == "gpt-oss" else kimi
    torch.manual_seed(0)
    tensors, config, targets = build(args.layers, args.experts)
    base, adapter = args.workdir / "base", args.workdir / "lora"
    write_slice(base, tensors, config)
    write_lora(adapter, tensors, targets)
    del tensors
    size = sum(f.stat().st_size for f in base.iterdir())
    print(f"{args.slice}: {args.layers} layer(s), {args.experts} experts, {size / 2**30:.2f} GiB")
    merge = [sys.executable, "-m", "shardmerge", "merge", str(base), str(adapter), "-q"]
    runs = {"cp -r": ["cp", "-r", str(base), str(args.workdir / "copy")]}
    runs["merge (experts kept packed)"] = merge + ["-o", str(args.workdir / "kept")]
    if args.full:
        runs["merge --dtype bfloat16"] = merge + [
            "-o",
            str(args.workdir / "full"),
            "--dtype",
            "bfloat16",
        ]
    for what, argv in runs.items():
        seconds, peak = timed(argv)
        print(f"  {what:<28} {seconds:7.2f} s   peak RSS {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
