"""Hub ids (org/name[@revision]) as BASE and ADAPTER, from a hand-built local Hub cache; no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import shardmerge
from shardmerge.cli import main
from shardmerge.errors import InputError
from shardmerge.io import hub

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
BASE_HASH = "a" * 40
ADAPTER_HASH = "b" * 40


def _write_base(folder: Path) -> None:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    tensors = {
        f"{m}.weight": (torch.randn(64, 32, generator=g) * 0.02).to(torch.bfloat16) for m in MODULES
    }
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _write_adapter(folder: Path, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    lora = {}
    for m in MODULES:
        lora[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, 32, generator=g) * 0.1
        lora[f"base_model.model.{m}.lora_B.weight"] = torch.randn(64, 4, generator=g) * 0.1
    save_file(lora, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        )
    )


def _cache_repo(cache: Path, repo_id: str, commit: str, write) -> Path:
    """The Hub cache layout: models--org--name/refs/main and snapshots/<commit>/ (plain files)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    write(snapshot)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> dict[str, Path]:
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return {
        "base": _cache_repo(root, "org/tiny-llama", BASE_HASH, _write_base),
        "adapter": _cache_repo(root, "org/tiny-lora", ADAPTER_HASH, _write_adapter),
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resolve_local_paths_and_ids(cache, tmp_path, monkeypatch):
    assert Path(hub.resolve("org/tiny-llama")) == cache["base"]
    assert Path(hub.resolve(f"org/tiny-llama@{BASE_HASH}")) == cache["base"]
    assert Path(hub.resolve("org/tiny-lora@main", offline=True)) == cache["adapter"]
    assert hub.resolve("./not/there") == "./not/there"  # not an id: later code reports it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny-llama").mkdir(parents=True)
    assert hub.resolve("org/tiny-llama") == "org/tiny-llama"  # a local folder wins


def test_merge_hub_ids_same_bytes_as_local_folders(cache, tmp_path):
    runner = CliRunner()
    r1 = runner.invoke(
        main, ["merge", "org/tiny-llama", "org/tiny-lora", "-o", str(tmp_path / "hub-out"), "-q"]
    )
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(
        main,
        ["merge", str(cache["base"]), str(cache["adapter"]), "-o", str(tmp_path / "local-out"), "-q"],
    )  # fmt: skip
    assert r2.exit_code == 0, r2.output
    expected = _files(tmp_path / "local-out")
    assert _files(tmp_path / "hub-out") == expected

    shardmerge.merge(
        f"org/tiny-llama@{BASE_HASH}", "org/tiny-lora@main", tmp_path / "api-out", offline=True
    )
    assert _files(tmp_path / "api-out") == expected

    r3 = runner.invoke(
        main,
        ["verify", str(tmp_path / "hub-out"), "--base", "org/tiny-llama",
         "--adapter", "org/tiny-lora@main", "--offline"],
    )  # fmt: skip
    assert r3.exit_code == 0, r3.output
    r4 = runner.invoke(main, ["plan", "org/tiny-llama", "org/tiny-lora", "--offline"])
    assert r4.exit_code == 0, r4.output
    assert shardmerge.verify(tmp_path / "api-out", "org/tiny-llama", ["org/tiny-lora"]).ok


@pytest.mark.parametrize("command", ["merge", "plan", "verify"])
def test_missing_id_offline_is_a_clear_error(cache, tmp_path, command):
    if command == "verify":
        args = ["verify", str(tmp_path), "--base", "org/not-cached", "--adapter", "org/tiny-lora"]
    else:
        args = [command, "org/not-cached", "org/tiny-lora", "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(main, [*args, "--offline"])
    assert r.exit_code == 2, r.output
    assert "org/not-cached" in r.output
    assert "`hf download org/not-cached`" in r.output  # huggingface_hub's current CLI
    assert "huggingface-cli" not in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_missing_revision_offline(cache):
    with pytest.raises(InputError, match=r"org/tiny-llama@v9.*local cache"):
        hub.resolve("org/tiny-llama@v9")


def test_job_file_with_hub_ids_and_separate(cache, tmp_path):
    _cache_repo(tmp_path / "hub", "org/tone-lora", "c" * 40, lambda p: _write_adapter(p, 2))
    job = tmp_path / "job.yaml"
    job.write_text(
        "base: org/tiny-llama\n"
        "adapters:\n  - org/tiny-lora@main\n  - path: org/tone-lora\n    weight: 0.5\n"
        "output: out\nseparate: true\noffline: true\n"
    )
    r = CliRunner().invoke(main, ["run", str(job), "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-lora", "tone-lora"]
    single = shardmerge.merge(cache["base"], [cache["adapter"]], tmp_path / "single")
    assert _files(tmp_path / "out" / "tiny-lora") == _files(Path(single.out))
