"""Peak memory of a merge does not grow with the model, and a hard memory limit holds.

Two llama-typed models of 3 and 12 layers (about 200 and 780 MiB, one shard
each; most bytes in 32 MiB MLP matrices, q/v projections merged with a rank-8
LoRA) are merged by ``python -m shardmerge merge`` in child processes. See
memtools.py for how the peak is measured. The second test runs the merge in a
memory cgroup limited to 512 MiB, less than the weights file alone, with the
model's pages dropped from the page cache first so that the merge's own reads
are charged to it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from memtools import Cgroup, drop_page_cache, make_model, measure, merge_command, mib
from safetensors import safe_open

SMALL_LAYERS, BIG_LAYERS = 3, 12
BUDGET = "1GiB"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    sizes = {n: make_model(root / f"l{n}", n) for n in (SMALL_LAYERS, BIG_LAYERS)}
    yield root, sizes
    shutil.rmtree(root, ignore_errors=True)


def check_output(model, out) -> None:
    """The merged file is complete, and one merged tensor matches a float64 reference."""
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        with safe_open(str(model / "base" / "model.safetensors"), "pt") as g:
            assert keys == set(g.keys())
            key = "model.layers.1.self_attn.q_proj.weight"
            base = g.get_tensor(key)
        merged = f.get_tensor(key)
    with safe_open(str(model / "adapter" / "adapter_model.safetensors"), "pt") as a:
        lora_a = a.get_tensor(f"base_model.model.{key[:-7]}.lora_A.weight").double()
        lora_b = a.get_tensor(f"base_model.model.{key[:-7]}.lora_B.weight").double()
    want = base.double() + (16 / 8) * (lora_b @ lora_a)
    got = merged.double()
    assert merged.dtype == torch.bfloat16
    # Within half a bfloat16 ulp of the exact value (at most 2^-8 relative).
    assert ((got - want).abs() <= want.abs() * 2.0**-8 * (1 + 1e-9)).all()
    assert (merged != base).float().mean() > 0.1  # the LoRA was applied


def test_peak_memory_does_not_grow_with_model_size(models, tmp_path):
    root, sizes = models
    runs = {}
    for n in (SMALL_LAYERS, BIG_LAYERS):
        drop_page_cache(root / f"l{n}")
        out = tmp_path / f"out{n}"
        run = measure(merge_command(root / f"l{n}", out, BUDGET))
        assert run.returncode == 0, run.stderr
        check_output(root / f"l{n}", out)
        shutil.rmtree(out)
        runs[n] = run
    small, big = runs[SMALL_LAYERS], runs[BIG_LAYERS]
    summary = (
        f"{SMALL_LAYERS} layers ({mib(sizes[SMALL_LAYERS])}): peak {mib(small.peak)} "
        f"(tree {mib(small.peak_tree_rss)}, largest process {mib(small.peak_process_rss)}, "
        f"{small.seconds:.1f} s); {BIG_LAYERS} layers ({mib(sizes[BIG_LAYERS])}): peak "
        f"{mib(big.peak)} (tree {mib(big.peak_tree_rss)}, largest process "
        f"{mib(big.peak_process_rss)}, {big.seconds:.1f} s)"
    )
    print(summary)
    assert sizes[BIG_LAYERS] > 3.5 * sizes[SMALL_LAYERS]
    assert big.peak <= small.peak * 1.10 + (30 << 20), summary
    assert big.peak < 1 << 30, summary  # within --max-memory
    assert big.peak < sizes[BIG_LAYERS], summary  # the model never sits in memory whole


def test_merge_under_a_hard_memory_limit(models, tmp_path):
    """A cgroup limit below the size of the weights file: the merge must finish, unkilled."""
    root, sizes = models
    limit = 512 << 20
    model = root / f"l{BIG_LAYERS}"
    assert sizes[BIG_LAYERS] > 1.4 * limit
    try:
        group = Cgroup.create(f"shardmerge-test-{tmp_path.name}", limit)
    except (OSError, RuntimeError) as e:
        pytest.skip(f"no writable memory cgroup to impose a hard limit in: {e}")
    try:
        drop_page_cache(model)
        out = tmp_path / "out"
        # One process (no worker) under the minimum budget: the tightest setting.
        run = measure(merge_command(model, out, "512MiB", workers=0), cgroup=group)
    finally:
        group.remove()
    summary = (
        f"limit {mib(limit)}, model {mib(sizes[BIG_LAYERS])}: rc {run.returncode}, "
        f"RSS peak {mib(run.peak)}, cgroup peak (page cache included) {mib(run.cgroup_peak)}, "
        f"OOM kills {run.oom_kills}, {run.seconds:.1f} s"
    )
    print(summary)
    assert run.returncode == 0, summary + "\n" + run.stderr
    assert run.oom_kills in (0, None), summary
    assert run.peak < limit, summary
    check_output(model, out)
    index = out / "model.safetensors.index.json"
    assert not index.exists()  # one-file model stays one file
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
