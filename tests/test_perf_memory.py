"""Page cache under a memory budget: the writer syncs and drops written bytes at the planned interval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from builders import make_adapter

import shardmerge
from shardmerge.execute import pipeline
from shardmerge.planner import memory


def test_flush_interval_shrinks_with_the_budget_and_the_writers():
    mib = 1 << 20
    # A 512 MiB cgroup's default budget (0.85 of it), one worker: well under 256 MiB.
    small = memory.flush_bytes(int(512 * mib * memory.CGROUP_SHARE), 1, 1)
    assert memory.MIN_FLUSH_BYTES <= small <= 64 * mib
    assert memory.flush_bytes(8 << 30, 1, 1) == memory.MAX_FLUSH_BYTES
    assert memory.flush_bytes(8 << 30, 4, 4) < memory.MAX_FLUSH_BYTES
    assert memory.flush_bytes(0, 1, 1) == memory.MIN_FLUSH_BYTES


def test_plan_carries_the_interval(llama_bf16_sharded, tmp_path):
    adapter = make_adapter(llama_bf16_sharded, tmp_path / "ad")
    plan = shardmerge.plan(llama_bf16_sharded, [adapter], tmp_path / "x", max_memory="512MiB")
    want = memory.flush_bytes(plan.max_memory, plan.workers, 1)
    assert {s.flush_bytes for s in plan.shards} == {want}


@pytest.fixture(scope="module")
def planned(llama_bf16_sharded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flush")
    adapter = make_adapter(llama_bf16_sharded, tmp / "ad")
    return shardmerge.plan(llama_bf16_sharded, [adapter], tmp / "x", workers=0), tmp


def test_written_bytes_are_synced_in_pieces_and_unchanged(planned, monkeypatch):
    """A small interval syncs copies and merged blocks piece by piece; same bytes."""
    plan, tmp = planned
    job = max(plan.shards, key=lambda s: s.out_size)
    every = 4096
    calls: list[tuple[int, int]] = []
    real = pipeline._flush_and_drop

    def record(f, offset, length):
        calls.append((offset, length))
        real(f, offset, length)

    monkeypatch.setattr(pipeline, "_flush_and_drop", record)
    small = tmp / "small.safetensors"
    [result] = pipeline.run_shards([replace(job, flush_bytes=every)], [small], torch.device("cpu"))
    monkeypatch.undo()
    whole = tmp / "whole.safetensors"
    [again] = pipeline.run_shards([job], [whole], torch.device("cpu"))
    assert small.read_bytes() == whole.read_bytes() and result.crc32 == again.crc32
    # Contiguous ranges covering the file; none much longer than the interval
    # (a merged block is written whole, then synced).
    ends = [o + n for o, n in calls[:-1]]
    assert [o for o, _ in calls[1:-1]] == ends[:-1]
    block = max(t.block_rows * (t.end - t.start) // max(t.rows, 1) for t in job.tensors)
    assert len(calls) > job.out_size // (every + block)
    assert all(n < every + block + (1 << 16) for _, n in calls[:-1])
