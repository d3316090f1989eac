"""Synthetic models and peak-memory measurement, shared by test_memory.py and scripts/bench_memory.py.

A model here is a llama-typed folder (config.json + one model.safetensors)
whose bulk is large projection matrices, with a hand-written PEFT LoRA
adapter targeting some of them. The merge runs as ``python -m shardmerge
merge`` in a child process; its peak memory is the largest summed RSS of its
process tree (sampled every few milliseconds) and the largest single-process
ru_maxrss reported by the kernel, whichever is higher. Optionally the child
runs in a fresh memory cgroup with a hard limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

HIDDEN = 2048
INTER = 8192
RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "v_proj")


def layer_shapes(hidden: int = HIDDEN, inter: int = INTER) -> dict[str, tuple[int, int]]:
    """Per-layer tensors: the two MLP matrices (4 * hidden * inter bytes in bf16) and q/v."""
    return {
        "self_attn.q_proj": (hidden // 8, hidden),
        "self_attn.v_proj": (hidden // 32, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def make_model(root: Path, layers: int, *, hidden: int = HIDDEN, inter: int = INTER) -> int:
    """Write base model and adapter under ``root``; returns the weights file's size in bytes.

    Targeted weights and the LoRA factors are random; the other weights,
    which are copied unchanged, are constant (cheap to make).
    """
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    gen = torch.Generator().manual_seed(layers)
    tensors: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, (rows, cols) in layer_shapes(hidden, inter).items():
            key = f"model.layers.{i}.{name}"
            if name.rsplit(".", 1)[-1] in TARGETS:
                w = torch.randn(rows, cols, generator=gen) * 0.02
                tensors[f"{key}.weight"] = w.to(torch.bfloat16)
                a = torch.randn(RANK, cols, generator=gen) * 0.02
                b = torch.randn(rows, RANK, generator=gen) * 0.02
                lora[f"base_model.model.{key}.lora_A.weight"] = a
                lora[f"base_model.model.{key}.lora_B.weight"] = b
            else:  # copied as they are: their values do not matter
                tensors[f"{key}.weight"] = torch.full((rows, cols), 0.01 * i, dtype=torch.bfloat16)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    path = base / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    del tensors
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    drop_page_cache(root)
    return path.stat().st_size


def drop_page_cache(root: Path) -> None:
    """Flush and evict the files under ``root`` from the page cache.

    Then a merge reading them pays for its own page cache, as it would with
    a model fresh from disk (and, in a cgroup, is charged for it).
    """
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def merge_command(root: Path, out: Path, max_memory: str, workers: int = 1) -> list[str]:
    """The merge, with one worker process (the default for all but tiny models) unless told."""
    return [
        sys.executable,
        "-m",
        "shardmerge",
        "merge",
        str(root / "base"),
        str(root / "adapter"),
        "-o",
        str(out),
        "--max-memory",
        max_memory,
        "--workers",
        str(workers),
        "-q",
    ]


@dataclass
class Run:
    returncode: int
    peak_tree_rss: int  # largest sampled sum of RSS over the process tree, bytes
    peak_process_rss: int  # largest ru_maxrss of any process in the tree, bytes
    seconds: float
    stderr: str
    cgroup_peak: int | None = None  # memory.max_usage_in_bytes / memory.peak, bytes
    oom_kills: int | None = None

    @property
    def peak(self) -> int:
        return max(self.peak_tree_rss, self.peak_process_rss)


def measure(cmd: list[str], *, cgroup: Cgroup | None = None, timeout: float = 300) -> Run:
    """Run ``cmd`` in a child and return its peak memory.

    The child is a small Python launcher that (optionally) moves itself into
    ``cgroup``, runs ``cmd`` and reports RUSAGE_CHILDREN.ru_maxrss: the largest
    RSS any process of the tree reached, which polling could miss.
    """
    launcher = (
        "import json, os, resource, subprocess, sys\n"
        "procs = sys.argv[1]\n"
        "if procs:\n"
        "    open(procs, 'w').write(str(os.getpid()))\n"
        "rc = subprocess.call(sys.argv[2:], stdout=sys.stderr)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "sys.stdout.write(json.dumps({'rc': rc, 'maxrss': peak}))\n"
    )
    procs = str(cgroup.procs_file) if cgroup else ""
    start = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", launcher, procs, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_tree = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak_tree
        try:
            root = psutil.Process(child.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            total = 0
            try:
                for p in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                break
            peak_tree = max(peak_tree, total)
            stop.wait(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        stop.set()
        poller.join()
        if child.poll() is None:
            child.kill()
    seconds = time.monotonic() - start
    try:
        report = json.loads(out)
    except ValueError:
        report = {"rc": child.returncode or -1, "maxrss": 0}
    run = Run(report["rc"], peak_tree, report["maxrss"], seconds, err)
    if cgroup is not None:
        run.cgroup_peak = cgroup.peak()
        run.oom_kills = cgroup.oom_kills()
    return run


class Cgroup:
    """A child memory cgroup of our own, with a hard limit; v1 or v2."""

    def __init__(self, path: Path, version: int):
        self.path = path
        self.version = version

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    @classmethod
    def create(cls, name: str, limit: int) -> Cgroup:
        """Make the cgroup or raise OSError/RuntimeError saying why not."""
        own_v1 = own_v2 = None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                own_v1 = path
            elif controllers == "":
                own_v2 = path
        v1_root = Path("/sys/fs/cgroup/memory")
        if own_v1 is not None and (v1_root / "memory.limit_in_bytes").exists():
            parent = v1_root / own_v1.lstrip("/")
            group = cls(parent / name, 1)
            group.path.mkdir()
            try:
                (group.path / "memory.limit_in_bytes").write_text(str(limit))
                swap = group.path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(limit))  # no escape into swap
            except OSError:
                group.remove()
                raise
            return group
        for v2_root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
            if own_v2 is not None and (v2_root / "cgroup.controllers").exists():
                parent = v2_root / own_v2.lstrip("/")
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    raise RuntimeError(
                        f"cgroup v2 at {parent} does not delegate the memory controller"
                    )
                group = cls(parent / name, 2)
                group.path.mkdir()
                try:
                    (group.path / "memory.max").write_text(str(limit))
                    if (group.path / "memory.swap.max").exists():
                        (group.path / "memory.swap.max").write_text("0")
                except OSError:
                    group.remove()
                    raise
                return group
        raise RuntimeError("no memory cgroup (v1 or v2) found for this process")

    def peak(self) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            f = self.path / name
            if f.exists():
                return int(f.read_text())
        return None

    def oom_kills(self) -> int | None:
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        if not f.exists():
            return None
        for line in f.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"
