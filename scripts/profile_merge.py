"""Where the CPU goes in one merge: a mid-size case built locally, profiled in-process.

The case is one decoder layer of a Llama-3-8B-shaped model (hidden 4096,
intermediate 14336, 8 KV heads: ~0.44 GB of bf16 in the seven projections)
with a --kind adapter on every projection, written with scripts/bench.py's
generators. The merge runs in this process (``--workers 0``) under cProfile,
so every torch call of the merging thread shows as its own line; the reader
and writer threads are not in it (run the same command under
``perf record -g`` for them, or ``perf stat -e instructions`` for a
load-independent total).

    PYTHONPATH=$PWD .venv/bin/python scripts/profile_merge.py --kind lora --top 25
    perf stat -e instructions,task-clock -- env PYTHONPATH=$PWD \\
        .venv/bin/python scripts/profile_merge.py --kind lora --no-profile

``--dtype`` passes through to the merge (float32 outputs), ``--kind nf4`` is
the LoRA adapter with ``--qlora-base nf4``, ``--kind lorabf16`` the LoRA
adapter saved in bf16; ``--float32-base`` writes the base in float32.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the slice generators, reused)

LAYER_8B = bench.Shape(hidden=4096, intermediate=14336, vocab=256, heads=32, kv_heads=8)


def build(work: Path, kind: str, float32_base: bool) -> tuple[Path, Path]:
    """The base (one layer, one shard) and the adapter; reused when present."""
    base = work / ("base-f32" if float32_base else "base")
    adapter = work / f"adapter-{kind}"
    if not (base / "config.json").exists():
        write_base(base, float32_base)
    if not (adapter / "adapter_config.json").exists():
        if kind in ("lora", "nf4"):
            bench.write_adapter(adapter, LAYER_8B, 1, rank=16, alpha=32)
        elif kind == "lorabf16":  # the LoRA adapter saved in bf16: 16-bit-precision factors
            build(work, "lora", float32_base)
            bench.write_bf16_copy(work / "adapter-lora", adapter)
        else:
            bench.write_kind_adapter(adapter, kind, LAYER_8B, 1)
    return base, adapter


def write_base(base: Path, float32_base: bool) -> None:
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    dtype = torch.float32 if float32_base else torch.bfloat16
    tensors = {}
    for name, shp in bench.model_tensors(LAYER_8B, 1):
        t = torch.randn(*shp, generator=g) * (0.05 if len(shp) == 1 else 0.02)
        tensors[name] = (t + 1.0 if len(shp) == 1 else t).to(dtype)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = bench.llama_config(LAYER_8B, 1)
    config["torch_dtype"] = "float32" if float32_base else "bfloat16"
    (base / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/shardmerge-profile")
    ap.add_argument(
        "--kind", default="lora", choices=["lora", "lorabf16", "dora", "loha", "lokr", "ia3", "nf4"]
    )
    ap.add_argument("--dtype", default=None, help="--dtype for the merge (e.g. float32)")
    ap.add_argument("--float32-base", action="store_true", help="write the base in float32")
    ap.add_argument("--top", type=int, default=30, help="lines of the profile to print")
    ap.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    ap.add_argument("--no-profile", action="store_true", help="just merge (for perf stat)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    base, adapter = build(work, args.kind, args.float32_base)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)

    import importlib

    # shardmerge first: it sets torch's OpenMP wait policy before torch loads.
    shardmerge = importlib.import_module("shardmerge")
    torch = importlib.import_module("torch")

    if args.threads:
        torch.set_num_threads(args.threads)
    kw: dict = {"workers": 0}
    if args.dtype:
        kw["dtype"] = args.dtype
    if args.kind == "nf4":
        kw["qlora_base"] = "nf4"
    prof = None if args.no_profile else cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    shardmerge.merge(str(base), [str(adapter)], str(out), **kw)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"merge: {wall:.2f} s wall, {cpu:.2f} s CPU (process, all threads)", file=sys.stderr)
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
