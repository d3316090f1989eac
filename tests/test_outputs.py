"""Output niceties: the model card, the JSON report, --json progress and inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import shardmerge
from shardmerge.cli import main

TARGETS = ["q_proj", "v_proj"]


def _base(folder: Path) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g)}
    for i in range(2):
        for name in ("q_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(16, 16, generator=g)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(16)
    tensors["lm_head.weight"] = torch.randn(32, 16, generator=g)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "float32", "tie_word_embeddings": False})
    )
    (folder / "README.md").write_text("# The base model\n\nThis card describes the base.\n")
    (folder / "tokenizer_config.json").write_text("{}\n")
    return folder


def _adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        for name in TARGETS:
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 16, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(16, 4, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    )
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return _base(root / "base"), _adapter(root / "ada", 1), _adapter(root / "bob", 2)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".shardmerge" not in p.relative_to(folder).parts
    }


def test_model_card_is_written_and_deterministic(inputs, tmp_path):
    base, a, b = inputs
    one = shardmerge.merge(base, [a, b], tmp_path / "one", weights=[0.7, 0.3], max_memory="1GiB")
    shardmerge.merge(
        base, [a, b], tmp_path / "two", weights=[0.7, 0.3], max_memory="600MiB", workers=1
    )
    card = (Path(one.out) / "README.md").read_text()
    assert card.startswith('---\nbase_model: "base"\n')
    front = card.split("---\n")[1]
    assert "- shardmerge" in front and "- merge" in front and "- lora" in front
    assert "library_name: transformers" in front
    assert "This card describes the base" not in card
    for name, w in (("ada", "0.7"), ("bob", "0.3")):
        assert f"| {name} | {w} |" in card
    sha = one.adapters[0]["sha256"]
    assert sha in card
    assert "shardmerge merge base ada bob --weights 0.7,0.3 --dtype auto -o OUT" in card
    assert shardmerge.__version__ in card
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert (tmp_path / "one" / "tokenizer_config.json").exists()


def test_report_and_max_delta(inputs, tmp_path):
    base, a, b = inputs
    out = tmp_path / "out"
    r = shardmerge.merge(base, [a, b], out, weights=[0.7, 0.3], report=tmp_path / "r.json")
    report = json.loads((out / ".shardmerge" / "report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == report
    for key in (
        "out", "base", "adapters", "seconds", "bytes_written", "tensors", "modules",
        "shards", "shards_resumed", "peak_memory_bytes", "max_delta",
    ):  # fmt: skip
        assert key in report, key
    assert report["tensors"] == {"merge": 4, "copy": 6}
    assert report["modules"] == {"linear": 8}
    assert [x["weight"] for x in report["adapters"]] == [0.7, 0.3]
    assert report["peak_memory_bytes"] > 10 << 20
    merged, orig = (
        load_file(str(out / "model.safetensors")),
        load_file(str(base / "model.safetensors")),
    )
    expected = max(float((merged[k] - orig[k]).abs().max()) for k in orig)
    assert report["max_delta"]["linear"] > 0
    assert report["max_delta"]["linear"] == pytest.approx(expected, rel=1e-6)
    assert r.max_delta == report["max_delta"]


def test_resumed_shards_keep_their_max_delta(inputs, tmp_path):
    base, a, _ = inputs
    out = tmp_path / "out"
    first = shardmerge.merge(base, [a], out)
    journal = out / ".shardmerge" / "journal.json"
    doc = json.loads(journal.read_text())
    doc["status"] = "running"
    journal.write_text(json.dumps(doc))
    again = shardmerge.merge(base, [a], out)
    assert again.shards_resumed == 1
    assert again.max_delta == first.max_delta


def test_cli_json_progress_and_report(inputs, tmp_path):
    base, a, _ = inputs
    out, rep = tmp_path / "out", tmp_path / "rep" / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shardmerge", "merge", str(base), str(a), "-o", str(out)]
        + ["--json", "--report", str(rep)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["bytes_total"] > 0
    assert events[0]["out"] == str(out)
    assert any(e["event"] == "shard" for e in events)
    assert events[-1]["event"] == "done" and events[-1]["max_delta"]["linear"] > 0
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["bytes_done"] == progress[-1]["bytes_total"]
    assert json.loads(rep.read_text())["out"] == str(out)


def test_cli_json_error_goes_to_stderr(inputs, tmp_path):
    base, _, _ = inputs
    result = CliRunner().invoke(
        main, ["merge", str(base), str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "error: " in result.stderr and "Traceback" not in result.output


def test_inspect_model(inputs):
    base, _, _ = inputs
    d = json.loads(CliRunner().invoke(main, ["inspect", str(base), "--json"]).stdout)
    assert d["kind"] == "model" and d["model_type"] == "llama" and d["dtype"] == "float32"
    assert d["shards"] == 1 and d["tensors"] == 10
    assert d["dtypes"]["F32"]["tensors"] == 10
    assert len(d["largest_tensors"]) == 5
    assert d["largest_tensors"][0]["name"] in ("lm_head.weight", "model.embed_tokens.weight")
    assert d["tie_word_embeddings"] is False
    text = CliRunner().invoke(main, ["inspect", str(base)])
    assert (
        text.exit_code == 0
        and "model_type llama" in text.stdout
        and "lm_head.weight" in text.stdout
    )


def test_inspect_adapter(inputs):
    _, a, _ = inputs
    d = json.loads(CliRunner().invoke(main, ["inspect", str(a), "--json"]).stdout)
    assert d["kind"] == "adapter" and d["peft_type"] == "LORA"
    assert d["r"] == 4 and d["lora_alpha"] == 8 and d["ranks"] == [4] and d["scaling"] == [2.0]
    assert d["modules"] == {"linear_or_conv1d": 4} and d["target_modules"] == TARGETS
    assert d["dtypes"] == {"F32": 8} and d["weights_bytes"] > 0
    text = CliRunner().invoke(main, ["inspect", str(a)])
    assert text.exit_code == 0 and "LORA" in text.stdout and "scaling: [2.0]" in text.stdout


def test_inspect_missing_path(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.output
