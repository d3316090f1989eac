"""The CUDA path gives the same bytes as the CPU path. Skips cleanly without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shardmerge

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _model(tmp: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base, adapter = tmp / "base", tmp / "adapter"
    base.mkdir()
    adapter.mkdir()
    tensors = {
        f"model.layers.{i}.self_attn.{p}.weight": (torch.randn(256, 128, generator=g) * 0.02).to(
            torch.bfloat16
        )
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    tensors["model.embed_tokens.weight"] = torch.randn(512, 128, generator=g).to(torch.bfloat16)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    lora = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{p}"
            lora[f"{key}.lora_A.weight"] = torch.randn(8, 128, generator=g) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(256, 8, generator=g) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        )
    )
    return base, adapter


@needs_cuda
@pytest.mark.parametrize("dtype", ["auto", "float32", "float16"])
def test_cuda_output_is_byte_identical_to_cpu(tmp_path, dtype):
    base, adapter = _model(tmp_path)
    shardmerge.merge(base, [adapter], tmp_path / "cpu", device="cpu", dtype=dtype)
    shardmerge.merge(base, [adapter], tmp_path / "gpu", device="cuda", dtype=dtype)
    cpu = (tmp_path / "cpu" / "model.safetensors").read_bytes()
    gpu = (tmp_path / "gpu" / "model.safetensors").read_bytes()
    assert cpu == gpu


@needs_cuda
def test_cuda_merge_in_worker_process_verifies(tmp_path):
    base, adapter = _model(tmp_path)
    shardmerge.merge(base, [adapter], tmp_path / "gpu", device="cuda", workers=1)
    assert shardmerge.verify(tmp_path / "gpu", base, [adapter]).ok


def test_cuda_device_refused_clearly_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot happen here")
    base, adapter = _model(tmp_path)
    with pytest.raises(shardmerge.errors.InputError, match="no CUDA GPU"):
        shardmerge.merge(base, [adapter], tmp_path / "out", device="cuda")
