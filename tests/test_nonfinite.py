"""NaN and Inf: refused in adapter tensors before anything is written, and when the merge makes
them from finite inputs (an overflow of the output dtype), unless --allow-nonfinite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import load_model, make_adapter, make_base, read_tensors
from safetensors.torch import load_file, save_file

from shardmerge.jobs import job_from_dict
from shardmerge.planner.build import build_plan

REPO = Path(__file__).parents[1]
ADAPTER_FILE = "adapter_model.safetensors"
P = "base_model.model.model.layers.0."


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardmerge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _train(base: Path, folder: Path, config) -> Path:
    from peft import get_peft_model

    pm = get_peft_model(load_model(base), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    pm.save_pretrained(folder)
    return folder


def _poison(adapter: Path, dst: Path, key: str, value: float, index: tuple[int, ...]) -> Path:
    """A copy of ``adapter`` with one element of ``key`` set to ``value``."""
    shutil.copytree(adapter, dst)
    tensors = load_file(str(dst / ADAPTER_FILE))
    assert key in tensors, sorted(tensors)
    tensors[key][index] = value
    save_file(tensors, str(dst / ADAPTER_FILE))
    return dst


def _configs():
    from peft import IA3Config, LoraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
        "modules_to_save": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
        ),
        "tokens": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5]
        ),
    }


CASES = {  # kind, poisoned key, value, index
    "lora_A": ("lora", P + "self_attn.q_proj.lora_A.weight", float("nan"), (1, 2)),
    "lora_B": ("lora", P + "self_attn.q_proj.lora_B.weight", float("inf"), (3, 0)),
    "magnitude": ("dora", P + "self_attn.q_proj.lora_magnitude_vector", float("-inf"), (5,)),
    "ia3_vector": ("ia3", P + "self_attn.k_proj.ia3_l", float("nan"), (4, 0)),
    "replacement": ("modules_to_save", "base_model.model.lm_head.weight", float("inf"), (7, 1)),
    "token_rows": (
        "tokens",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        float("nan"),
        (1, 3),
    ),
}


@pytest.fixture(scope="module")
def trained(llama_bf16, tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    return {k: _train(llama_bf16, root / k, c) for k, c in _configs().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nonfinite_adapter_tensor_refused_before_anything_is_written(
    case, trained, llama_bf16, tmp_path
):
    kind, key, value, index = CASES[case]
    bad = _poison(trained[kind], tmp_path / "bad", key, value, index)
    out = tmp_path / "out"
    r = _cli("merge", llama_bf16, bad, "-o", out)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert key in r.stderr and str(bad) in r.stderr
    shown = "NaN" if value != value else ("Inf" if value > 0 else "-Inf")
    assert f"{shown} at index {list(index)}" in r.stderr
    assert "--allow-nonfinite" in r.stderr
    assert not out.exists()

    r = _cli("merge", llama_bf16, bad, "-o", out, "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    merged = read_tensors(out)
    assert any(not bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point())


def test_every_poisoned_tensor_of_an_adapter_in_one_short_refusal(trained, llama_bf16, tmp_path):
    tensors = load_file(str(trained["lora"] / ADAPTER_FILE))
    bad = tmp_path / "bad"
    shutil.copytree(trained["lora"], bad)
    for t in tensors.values():
        t[0, 0] = float("nan")
    save_file(tensors, str(bad / ADAPTER_FILE))
    r = _cli("merge", llama_bf16, bad, "-o", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert f"{len(tensors)} tensors in {bad / ADAPTER_FILE} hold NaN or Inf" in r.stderr
    assert len(r.stderr.splitlines()) <= 3


def test_nonfinite_in_the_base_is_copied_not_refused(tmp_path):
    base = make_base(tmp_path / "base", "llama", dtype=torch.float32)
    shard = base / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.0.self_attn.q_proj.weight"][2, 3] = float("nan")
    tensors["model.norm.weight"][1] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ada = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    r = _cli("merge", base, ada, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = read_tensors(tmp_path / "out")
    assert torch.isnan(out["model.layers.0.self_attn.q_proj.weight"][2, 3])
    assert torch.isinf(out["model.norm.weight"][1])


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A float32 base in shards whose last-layer down_proj LoRA overflows float16."""
    root = tmp_path_factory.mktemp("overflow")
    base = make_base(root / "base", "llama", dtype=torch.float32, max_shard_size="60KB")
    ada = make_adapter(base, root / "a", target_modules=["down_proj"])
    tensors = load_file(str(ada / ADAPTER_FILE))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key][5] = 1e6  # row 5 of the delta: far beyond float16's 65504
    save_file(tensors, str(ada / ADAPTER_FILE))
    return base, ada


def test_overflow_of_the_output_dtype_is_refused_and_out_never_looks_complete(
    overflowing, tmp_path
):
    base, ada = overflowing
    out = tmp_path / "out"
    r = _cli("merge", base, ada, "-o", out, "--dtype", "float16")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    name = "model.layers.1.mlp.down_proj.weight"
    assert f"{name}: the merge made" in r.stderr and "at index [5, " in r.stderr
    assert "from finite inputs" in r.stderr and "float16" in r.stderr
    assert "does not look like a complete model" in r.stderr
    assert not (out / "model.safetensors.index.json").exists()
    journal = json.loads((out / ".shardmerge" / "journal.json").read_text())
    assert journal["status"] == "running"
    assert not [p for p in (out / ".shardmerge").iterdir() if p.suffix not in (".json", "")]
    # The same command is refused the same way; another job needs --overwrite.
    again = _cli("merge", base, ada, "-o", out, "--dtype", "float16")
    assert again.returncode == 2 and f"{name}: the merge made" in again.stderr
    other = _cli("merge", base, ada, "-o", out, "--dtype", "float16", "--allow-nonfinite")
    assert other.returncode == 5 and "--overwrite" in other.stderr
    ok = _cli(
        "merge", base, ada, "-o", out, "--dtype", "float16", "--allow-nonfinite", "--overwrite"
    )
    assert ok.returncode == 0, ok.stderr
    row = read_tensors(out)[name][5]
    assert torch.isinf(row).any() and (out / "model.safetensors.index.json").exists()


def test_overflow_of_a_dtype_conversion_alone_is_refused(tmp_path):
    base = make_base(tmp_path / "base", "llama", dtype=torch.float32)
    shard = base / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.norm.weight"][9] = 1e6
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ada = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    r = _cli("merge", base, ada, "-o", tmp_path / "out", "--dtype", "float16")
    assert r.returncode == 2, r.stderr
    assert "model.norm.weight: the merge made Inf at index [9]" in r.stderr


def test_allow_nonfinite_is_a_job_field_and_part_of_the_fingerprint(overflowing, tmp_path):
    base, ada = overflowing
    doc = {"base": str(base), "adapters": [str(ada)], "output": str(tmp_path / "o")}
    plain = build_plan(job_from_dict(doc, "job.yaml"), check_out=False)
    allowed = build_plan(
        job_from_dict({**doc, "allow_nonfinite": True}, "job.yaml"), check_out=False
    )
    assert allowed.allow_nonfinite and all(s.allow_nonfinite for s in allowed.shards)
    assert not plain.allow_nonfinite and plain.fingerprint != allowed.fingerprint
    with pytest.raises(Exception, match="allow_nonfinite"):
        job_from_dict({**doc, "allow_nonfinite": "yes"}, "job.yaml")
