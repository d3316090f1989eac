"""plan's time estimate: each worked tensor at the rate of the work it needs (planner/describe.py)."""

from __future__ import annotations

from builders import make_adapter

import shardmerge
from shardmerge.planner import describe


def test_estimate_rates_follow_the_work(llama_bf16_sharded, tmp_path):
    adapter = make_adapter(llama_bf16_sharded, tmp_path / "ad")
    plain = shardmerge.plan(llama_bf16_sharded, [adapter], tmp_path / "x", device="cpu")
    wide = shardmerge.plan(
        llama_bf16_sharded, [adapter], tmp_path / "x", device="cpu", dtype="float32"
    )
    merged = [t for s in plain.shards for t in s.tensors if t.action == "merge"]
    assert merged and {describe.work_kind(t) for t in merged} == {"lowrank"}
    kinds = {describe.work_kind(t) for s in wide.shards for t in s.tensors if t.action != "copy"}
    assert kinds == {"wide", "convert"}
    assert 0 < describe.merge_seconds(plain) < describe.merge_seconds(wide)
    assert describe.describe(plain)["estimated_seconds"] >= describe.STARTUP_S
