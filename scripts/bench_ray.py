"""Scaling of --executor ray on this machine: local workers vs a Ray cluster of 1 and 2 nodes.

Writes a sharded bf16 llama-shaped model with a LoRA adapter on every
projection, then times the same merge (wall clock, one run each, after a
warm-up that fills the page cache):

  local, --workers 1 and --workers 2 (spawned processes)
  ray, a cluster on loopback of one node, then of two nodes (each node 1 CPU,
  so a node is one task at a time, as a worker process is)

and checks that every output is byte-identical to the first. The cluster is
Ray's own test cluster (ray.cluster_utils): several raylets on one machine,
all on 127.0.0.1, stopped by the processes it started. Prints a table and
writes the figures as JSON.

    .venv/bin/python scripts/bench_ray.py --shards 8 --shard-mib 48
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 1024
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def write_model(root: Path, shards: int, shard_mib: int) -> int:
    """One decoder layer per shard, sized to about ``shard_mib``; returns the base's bytes."""
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    # bf16: q and o are HIDDEN^2 each, k and v a quarter of that; the MLP takes the rest.
    inter = max(HIDDEN, ((shard_mib << 20) // 2 - 5 * HIDDEN * HIDDEN // 2) // (2 * HIDDEN))
    dims = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (HIDDEN // 4, HIDDEN),
        "self_attn.v_proj": (HIDDEN // 4, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.up_proj": (inter, HIDDEN),
        "mlp.down_proj": (HIDDEN, inter),
    }
    g = torch.Generator().manual_seed(0)
    weight_map, total, lora = {}, 0, {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for module, (rows, cols) in dims.items():
            key = f"model.layers.{i}.{module}"
            tensors[f"{key}.weight"] = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
            lora[f"base_model.model.{key}.lora_A.weight"] = torch.randn(RANK, cols, generator=g)
            lora[f"base_model.model.{key}.lora_B.weight"] = torch.randn(rows, RANK, generator=g)
        save_file(tensors, base / name, metadata={"format": "pt"})
        for t, v in tensors.items():
            weight_map[t] = name
            total += v.numel() * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": inter,
        "num_hidden_layers": shards,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 256,
        "torch_dtype": "bfloat16",
    }
    (base / "config.json").write_text(json.dumps(config))
    peft = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(TARGETS)}
    (adapter / "adapter_config.json").write_text(json.dumps(peft))
    save_file({k: v * 0.01 for k, v in lora.items()}, adapter / "adapter_model.safetensors")
    return total


def digest(out: Path) -> str:
    """One hash over every output file (shardmerge's work folder aside)."""
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and ".shardmerge" not in p.parts:
            h.update(p.relative_to(out).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def merge(root: Path, label: str, flags: list[str], env: dict) -> dict:
    """One timed merge in a fresh CLI process; its report and the output's digest."""
    out = root / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "shardmerge", "merge", str(root / "base"), str(root / "adapter")]
    cmd += ["-o", str(out), "-q", "--max-memory", "1GiB", *flags]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    report = json.loads((out / ".shardmerge" / "report.json").read_text())
    row = {"run": label, "seconds": round(seconds, 2), "digest": digest(out)}
    row["merge_seconds"] = report["seconds"]
    if "cluster" in report:
        row["nodes"] = report["cluster"]["nodes"]
    shutil.rmtree(out)
    return row


def ray_runs(root: Path, env: dict, tmp: str) -> list[dict]:
    """The merge on a loopback cluster of one node, then of two."""
    os.environ.update(env)  # before ray is imported: it reads them then
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "memory": 2 << 30}
    head = {**node, "temp_dir": f"{tmp}/ray", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        flags = ["--executor", "ray", "--ray-address", cluster.address]
        rows = [merge(root, "ray-1-node", flags, env)]
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        rows.append(merge(root, "ray-2-nodes", flags, env))
        return rows
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mib", type=int, default=48)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's sockets live under it
    root = Path(tmp) / "m"
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": tmp,
    }
    try:
        size = write_model(root, args.shards, args.shard_mib)
        merge(root, "warm-up", ["--workers", "1"], env)
        rows = [merge(root, f"local-{w}-worker", ["--workers", str(w)], env) for w in (1, 2)]
        rows += ray_runs(root, env, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = len({r["digest"] for r in rows}) == 1
    print(f"base {size / 2**20:.0f} MiB in {args.shards} shards; outputs identical: {same}")
    print(f"{'run':<16}{'wall s':>8}{'merge s':>9}{'MiB/s':>8}")
    for r in rows:
        rate = size / 2**20 / r["merge_seconds"]
        print(f"{r['run']:<16}{r['seconds']:>8.1f}{r['merge_seconds']:>9.1f}{rate:>8.1f}")
        for n in r.get("nodes", []):
            mib = n["bytes"] / 2**20
            print(f"  node {n['node'][:8]}: {n['shards']} shards, {mib:.0f} MiB, "
                  f"{n['bytes_per_second'] / 2**20:.1f} MiB/s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"base_bytes": size, "runs": rows}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
