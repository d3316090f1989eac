"""Shared, cheap, session-scoped tiny base models (each takes well under a second to build)."""

from __future__ import annotations

import pytest
import torch
from builders import make_base


@pytest.fixture(scope="session")
def llama_bf16_sharded(tmp_path_factory):
    """Untied llama in bfloat16, several shards, with a tokenizer-like extra file."""
    folder = tmp_path_factory.mktemp("llama_bf16_sharded") / "base"
    return make_base(
        folder,
        "llama",
        dtype=torch.bfloat16,
        max_shard_size="50KB",
        extra_files={"tokenizer_config.json": '{"model_max_length": 64}\n'},
    )


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory):
    """Untied llama in float32, one file."""
    return make_base(tmp_path_factory.mktemp("llama_fp32") / "base", "llama", dtype=torch.float32)


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory):
    """Untied llama in bfloat16, one file."""
    return make_base(
        tmp_path_factory.mktemp("llama_bf16") / "base", "llama", dtype=torch.bfloat16, seed=3
    )


@pytest.fixture(scope="session")
def qwen2_fp32(tmp_path_factory):
    """qwen2 (q/k/v biases) in float32."""
    return make_base(tmp_path_factory.mktemp("qwen2_fp32") / "base", "qwen2", seed=4)


@pytest.fixture(scope="session")
def qwen2_moe_fp32(tmp_path_factory):
    """qwen2_moe in float32 (experts stored per expert on disk)."""
    return make_base(tmp_path_factory.mktemp("qwen2_moe") / "base", "qwen2_moe", seed=5)
