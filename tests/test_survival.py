"""Adapter survival: the share of each adapter's change a merged tensor kept after rounding.

``kept`` = ||stored(out) - stored(base)||, ``change`` = ||exact merge - base||,
checked against PEFT's own merge in float64 (the change) and the files
(what was kept), for every adapter kind.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import load_model, make_adapter, make_base, peft_merged_state, read_tensors

import shardmerge

REPO = Path(__file__).parents[1]
SHARD = "model.safetensors"


def _train(base: Path, folder: Path, config, *, seed: int = 1, amount: float = 0.05) -> Path:
    """A PEFT adapter of any kind whose every trainable tensor moved away from its init."""
    from peft import get_peft_model

    pm = get_peft_model(load_model(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.add_((amount * torch.randn(p.shape, generator=g)).to(p.dtype))
    pm.save_pretrained(folder)
    return folder


def _kind(name: str):
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    return {
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]),
        "modules_to_save": LoraConfig(
            r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]
        ),
        "trainable_tokens": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 17, 200]
        ),
    }[name]


def _expected(base: Path, adapters: list[Path], out: Path, weights=None) -> dict[str, dict]:
    """Per tensor the adapters change: PEFT's float64 change and the stored change, from files."""
    b, o = read_tensors(base), read_tensors(out)
    peft = peft_merged_state(base, adapters, torch.float64)
    if weights:  # PEFT merges with weight 1: scale each adapter's change by hand
        assert len(adapters) == 1
        peft = {k: b[k].double() + weights[0] * (v - b[k].double()) for k, v in peft.items()}
    want = {}
    for name, w in b.items():
        change = peft[name] - w.double()
        if not bool(change.any()):
            continue
        stored = o[name].double() - w.double()
        want[name] = {
            "change": float(change.norm()),
            "kept": float(stored.norm()),
            "changed": int((o[name].double() != w.double()).sum()),
            "elements": w.numel(),
        }
    return want


def _assert_survival(survival: dict[str, dict], want: dict[str, dict], rel: float = 1e-9) -> None:
    assert want and set(survival) == set(want)
    for name, w in want.items():
        got = survival[name]
        assert got["change_norm"] == pytest.approx(w["change"], rel=rel), name
        assert got["kept_norm"] == pytest.approx(w["kept"], rel=1e-6), name
        assert got["elements_changed"] == w["changed"], name
        assert got["elements"] == w["elements"], name
        assert got["survived"] == pytest.approx(w["kept"] / w["change"], rel=1e-6), name
        assert got["changed_share"] == w["changed"] / w["elements"], name


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardmerge", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_tiny_lora_delta_mostly_lost_in_bf16_is_warned(llama_bf16, tmp_path):
    ada = make_adapter(llama_bf16, tmp_path / "a", b_scale=1e-5, target_modules=["q_proj"])
    out = tmp_path / "out"
    r = _cli("merge", str(llama_bf16), str(ada), "-o", str(out), "--report", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / ".shardmerge" / "report.json").read_text())
    assert json.loads((tmp_path / "r").read_text()) == report
    want = _expected(llama_bf16, [ada], out)
    assert set(want) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    _assert_survival(report["survival"], want)
    for name in want:
        assert report["survival"][name]["survived"] < 0.5
        assert name in r.stderr.split("warning:")[1]  # every weak tensor is named
    assert sorted(report["survival_below_half"]) == sorted(want)
    assert "adapter change kept after rounding (worst first):" in r.stdout
    assert "Traceback" not in r.stderr


def test_large_lora_delta_survives_whole_without_warning(llama_bf16, tmp_path):
    ada = make_adapter(llama_bf16, tmp_path / "a", b_scale=0.5, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    r = _cli("merge", str(llama_bf16), str(ada), "-o", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / ".shardmerge" / "report.json").read_text())
    _assert_survival(report["survival"], _expected(llama_bf16, [ada], out))
    for entry in report["survival"].values():
        assert entry["survived"] == pytest.approx(1.0, abs=1e-3)
        assert entry["changed_share"] > 0.99
    assert report["survival_below_half"] == []
    assert "warning" not in r.stderr


def test_weighted_lora_change_includes_the_weight(llama_fp32, tmp_path):
    ada = make_adapter(llama_fp32, tmp_path / "a", target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    r = shardmerge.merge(llama_fp32, [ada], out, weights=[-0.3], dtype="float16")
    _assert_survival(r.survival, _expected(llama_fp32, [ada], out, weights=[-0.3]))


@pytest.mark.parametrize(
    "kind", ["dora", "ia3", "loha", "lokr", "modules_to_save", "trainable_tokens"]
)
def test_every_kind_measures_its_change_against_peft(kind, llama_bf16, tmp_path):
    ada = _train(llama_bf16, tmp_path / "a", _kind(kind))
    out = tmp_path / "out"
    r = shardmerge.merge(llama_bf16, [ada], out)
    # DoRA: PEFT's float64 merge itself is within a few float64 ulps of the exact value.
    _assert_survival(r.survival, _expected(llama_bf16, [ada], out), rel=1e-9)


def test_resumed_merge_still_reports_every_tensor(llama_bf16_sharded, tmp_path):
    ada = make_adapter(llama_bf16_sharded, tmp_path / "a", target_modules=["q_proj", "o_proj"])
    out = tmp_path / "out"
    first = shardmerge.merge(llama_bf16_sharded, [ada], out)
    journal = out / ".shardmerge" / "journal.json"
    doc = json.loads(journal.read_text())
    assert all("survival" in e for e in doc["shards"].values() if e.get("max_delta"))
    doc["status"] = "running"
    journal.write_text(json.dumps(doc))
    again = shardmerge.merge(llama_bf16_sharded, [ada], out)
    assert again.shards_resumed == again.shards > 1
    assert again.survival == first.survival and len(again.survival) == 4


def test_damaged_survival_record_in_journal_is_refused(llama_bf16, tmp_path):
    ada = make_adapter(llama_bf16, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    shardmerge.merge(llama_bf16, [ada], out)
    journal = out / ".shardmerge" / "journal.json"
    doc = json.loads(journal.read_text())
    doc["status"] = "running"
    doc["shards"][SHARD]["survival"] = {"x": [1.0, "two", 3, 4]}
    journal.write_text(json.dumps(doc))
    r = _cli("merge", str(llama_bf16), str(ada), "-o", str(out))
    assert r.returncode == 5, r.stderr
    assert "journal" in r.stderr and "survival" in r.stderr and "Traceback" not in r.stderr


def test_fused_expert_terms_in_blocks_that_cut_through_experts(tmp_path, monkeypatch):
    memory = importlib.import_module("shardmerge.planner.memory")
    per_expert = make_base(tmp_path / "pe", "qwen2_moe", dtype=torch.bfloat16, seed=11)
    fused = tmp_path / "fused"
    load_model(per_expert).save_pretrained(fused, save_original_format=False)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    ada = make_adapter(per_expert, tmp_path / "a", target_parameters=targets, target_modules=[])
    # 37 rows of gate_up_proj's [E*2I, H] view per block: blocks straddle expert boundaries.
    monkeypatch.setattr(memory, "MAX_BLOCK_BYTES", 37 * 64 * memory.MERGE_BYTES_PER_ELEMENT)
    out = tmp_path / "out"
    r = shardmerge.merge(fused, [ada], out, workers=0)
    assert any(n.endswith("experts.gate_up_proj") for n in r.survival)
    _assert_survival(r.survival, _expected(fused, [ada], out))


def test_adapter_asking_no_change_has_no_share_and_no_warning(llama_bf16, tmp_path):
    ada = make_adapter(
        llama_bf16, tmp_path / "a", target_modules=["q_proj"], init_lora_weights=True
    )
    out = tmp_path / "out"
    r = _cli("merge", str(llama_bf16), str(ada), "-o", str(out))
    assert r.returncode == 0, r.stderr
    survival = json.loads((out / ".shardmerge" / "report.json").read_text())["survival"]
    assert len(survival) == 2
    for entry in survival.values():  # B is zero: nothing to keep, nothing kept
        assert entry["survived"] is None and entry["change_norm"] == 0.0
        assert entry["elements_changed"] == 0 and entry["kept_norm"] == 0.0
    assert "warning" not in r.stderr and "adapter change kept" not in r.stdout


def test_separate_outputs_each_measure_their_own_adapter(llama_bf16, tmp_path):
    tiny = make_adapter(llama_bf16, tmp_path / "tiny", b_scale=1e-5, target_modules=["q_proj"])
    big = make_adapter(llama_bf16, tmp_path / "big", b_scale=0.5, target_modules=["q_proj"])
    out = tmp_path / "out"
    r = _cli("merge", str(llama_bf16), str(tiny), str(big), "-o", str(out), "--separate")
    assert r.returncode == 0, r.stderr
    for name in ("tiny", "big"):
        report = json.loads((out / name / ".shardmerge" / "report.json").read_text())
        want = _expected(llama_bf16, [tmp_path / name], out / name)
        _assert_survival(report["survival"], want)
        assert bool(report["survival_below_half"]) == (name == "tiny")
