#!/usr/bin/env python
"""Benchmark: LoRA into an FP8 base (DeepSeek-V3 style block scales), kept FP8 and to bf16.

Builds the Llama-3-70B-shaped slice of scripts/bench.py (bf16, its rank-16 LoRA on
all seven projections), stores it as `quant_method: "fp8"` with 128x128
`weight_scale_inv` blocks (the decoder layers' Linear weights; embeddings, norms and
lm_head stay bf16), then times, alternating, with the page cache dropped before
each: `cp -r` of the FP8 folder, the merge that keeps the FP8 format (touched
tensors requantized with the base's scales), and the merge to `--dtype bfloat16`.

    python scripts/bench_fp8.py --layers 1 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)

BLOCK = 128
E4M3_MAX = 448.0


def quantized(name: str, shape: list[int]) -> bool:
    """The decoder layers' Linear weights (what FP8 checkpoints store as codes)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and len(shape) == 2


def fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scale_inv per 128x128 block): amax / 448, as DeepSeek-V3 stores them."""
    rows, cols = w.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    pad = torch.zeros(br * BLOCK, bc * BLOCK, dtype=torch.float32)
    pad[:rows, :cols] = w.float().abs()
    amax = pad.reshape(br, BLOCK, bc, BLOCK).amax(dim=(1, 3))
    scale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def to_fp8(src: Path, dst: Path) -> None:
    """The bf16 slice ``src`` stored as block FP8 in ``dst`` (shard by shard)."""
    if (dst / "config.json").exists():
        return
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted({v for v in index["weight_map"].values()}):
        out = {}
        with safe_open(str(src / shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                if quantized(name, list(t.shape)):
                    out[name], out[name + "_scale_inv"] = fp8_block(t)
                else:
                    out[name] = t
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in out})
        bench.log(f"  {shard} stored as FP8")
    index["weight_map"] = dict(sorted(weight_map.items()))
    index["metadata"] = {
        "total_size": sum((dst / s).stat().st_size for s in set(weight_map.values()))
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")


def run_once(label: str, cmd: list[str]) -> dict:
    bench.drop_caches()
    child = bench.timed(cmd)
    if child.rc != 0:
        sys.exit(f"{label} failed ({child.rc}):\n{child.stderr[-2000:]}")
    # Sampled: ru_maxrss of a child forked from this (large) process starts at its size.
    return {"seconds": child.seconds_sync, "peak_rss": child.tree_rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/shardmerge-bench-fp8"))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    spec = {
        "version": bench.SPEC_VERSION,
        "shape": asdict(bench.LLAMA3_70B),
        "layers": args.layers,
        "max_shard_bytes": 5_000_000_000,
        "rank": 16,
        "lora_alpha": 32,
        "seed": 0,
    }
    work = args.workdir
    if not bench.slice_intact(work, spec):
        bench.log("generating the bf16 slice")
        bench.generate(work, spec)
    base, adapter, out = work / "base-fp8", work / "adapter", work / "out"
    to_fp8(work / "base", base)
    py = [sys.executable, "-m", "shardmerge", "merge", str(base), str(adapter), "-o", str(out)]
    runs = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "merge, FP8 kept": [*py, "-q"],
        "merge --dtype bfloat16": [*py, "-q", "--dtype", "bfloat16"],
    }
    results: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for label, cmd in runs.items():
            bench.rm(out)
            results[label].append(run_once(label, cmd))
    bench.rm(out)
    size = sum(p.stat().st_size for p in base.iterdir())
    cp = min(r["seconds"] for r in results["cp -r"])
    print(f"FP8 slice: {args.layers} layer(s), {size / 2**30:.2f} GiB; best of {args.repeats}")
    for label, rs in results.items():
        best = min(r["seconds"] for r in rs)
        peak = max(r["peak_rss"] for r in rs)
        print(f"  {label:<24} {best:7.1f} s  {best / cp:5.2f}x cp  peak RSS {peak / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
