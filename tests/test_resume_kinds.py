"""Crash-safe resume for the adapter kinds whose merge has more moving parts.

DoRA down columns reads a tensor twice (a pre-pass summing column squares);
untying embeddings adds a tensor to a shard and changes config.json; fused
MoE experts cut row blocks through experts. A SIGKILL at any crash point,
then the same command again, must give the bytes of an uninterrupted merge.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from builders import load_model, make_adapter, make_base
from test_resume import INDEX, ForkServer, journal, merge_args, snapshot


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fs = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield fs
    fs.close()


def _dora_tied(root: Path):
    base = make_base(
        root / "base", "llama", dtype=torch.bfloat16, tie=True, max_shard_size="60KB", seed=21
    )
    adapter = make_adapter(
        base,
        root / "adapter",
        target_modules=["embed_tokens", "q_proj", "down_proj"],
        use_dora=True,
        seed=22,
    )
    return base, adapter


def _moe_fused(root: Path):
    per_expert = make_base(root / "per_expert", "mixtral", dtype=torch.bfloat16, seed=23)
    base = root / "base"
    load_model(per_expert).save_pretrained(base, save_original_format=False, max_shard_size="100KB")
    adapter = make_adapter(
        per_expert,
        root / "adapter",
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        seed=24,
    )
    return base, adapter


class _Model:
    def __init__(self, base: Path, adapter: Path):
        self.base, self.adapter = base, adapter


@pytest.mark.parametrize("build", [_dora_tied, _moe_fused], ids=["dora_tied", "moe_fused"])
def test_kill_at_every_crash_point_then_resume(build, server, tmp_path):
    model = _Model(*build(tmp_path / "in"))
    ref = tmp_path / "ref"
    r = server.run(merge_args(model, ref))
    assert r.rc == 0, r.err
    expected = snapshot(ref)
    if build is _dora_tied:
        # The merge this test is about: DoRA on the embedding unties lm_head.
        assert '"tie_word_embeddings": false' in (ref / "config.json").read_text()
        assert len([n for n in expected if n.endswith(".safetensors")]) >= 3
    k = 0
    while True:
        k += 1
        assert k <= 200, "no run got through"
        out = tmp_path / f"k{k}"
        crashed = server.run(merge_args(model, out), {"SHARDMERGE_CRASH_AT": str(k)})
        if crashed.rc == 0:
            break
        assert crashed.rc == -signal.SIGKILL, (k, crashed.err)
        if (out / INDEX).exists():
            assert journal(out)["status"] != "complete" or snapshot(out) == expected
        rerun = server.run(merge_args(model, out))
        assert rerun.rc == 0, (k, rerun.err)
        assert snapshot(out) == expected, k
        assert journal(out)["status"] == "complete"
    assert k > 5, "too few crash points: the fault injection did not run"
    assert snapshot(out) == expected
    print(f"{build.__name__}: {k - 1} crash points", file=sys.stderr)
