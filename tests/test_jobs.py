"""Job files (shardmerge run) and merge --separate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import shardmerge
import shardmerge.io.safetensors as sio
from shardmerge.cli import main
from shardmerge.errors import InputError
from shardmerge.jobs import job_from_dict, load_job

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": MODULES[:2],
        "model-00002-of-00002.safetensors": MODULES[2:],
    }
    weight_map = {}
    for name, modules in shards.items():
        tensors = {
            f"{m}.weight": (torch.randn(64, 32, generator=g) * 0.02).to(torch.bfloat16)
            for m in modules
        }
        tensors[f"norm{name[10]}.weight"] = torch.ones(32, dtype=torch.bfloat16)
        save_file(tensors, base / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapters = {}
    for label in ("support", "tone", "legal"):
        folder = tmp_path / label
        folder.mkdir()
        lora = {}
        for m in MODULES:
            lora[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, 32, generator=g) * 0.1
            lora[f"base_model.model.{m}.lora_B.weight"] = torch.randn(64, 4, generator=g) * 0.1
        save_file(lora, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": 4,
                    "lora_alpha": 8,
                    "target_modules": ["q_proj", "v_proj"],
                }
            )
        )
        adapters[label] = folder
    return {"base": base, **adapters}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_job_file_gives_the_same_bytes_as_the_flags(models, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "base: base\nadapters:\n  - path: support\n    weight: 0.7\n  - tone\noutput: from-job\ndtype: float32\n"
    )
    runner = CliRunner()
    r1 = runner.invoke(main, ["run", str(job), "-q"])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(
        main,
        ["merge", str(models["base"]), str(models["support"]), str(models["tone"]),
         "--weights", "0.7,1", "--dtype", "float32", "-o", str(tmp_path / "from-flags"), "-q"],
    )  # fmt: skip
    assert r2.exit_code == 0, r2.output
    assert _files(tmp_path / "from-job") == _files(tmp_path / "from-flags")


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"adapters": ["a"], "output": "o"}, "base"),
        ({"base": "b", "output": "o"}, "adapters"),
        ({"base": "b", "adapters": ["a"]}, "output"),
        ({"base": "b", "adapters": ["a"], "output": "o", "dtyp": "auto"}, "dtyp"),
        ({"base": "b", "adapters": ["a"], "output": "o", "dtype": "int8"}, "dtype"),
        ({"base": "b", "adapters": ["a"], "output": "o", "workers": "two"}, "workers"),
        ({"base": "b", "adapters": ["a"], "output": "o", "workers": -1}, "workers"),
        ({"base": "b", "adapters": ["a"], "output": "o", "overwrite": "yes"}, "overwrite"),
        (
            {"base": "b", "adapters": [{"path": "a", "weight": "x"}], "output": "o"},
            "adapters[0].weight",
        ),
        (
            {"base": "b", "adapters": [{"path": "a", "wieght": 1}], "output": "o"},
            "adapters[0].wieght",
        ),
        ({"base": "b", "adapters": [{"weight": 1}], "output": "o"}, "adapters[0].path"),
        ({"base": 3, "adapters": ["a"], "output": "o"}, "base"),
    ],
)
def test_bad_job_field_is_named(doc, field):
    with pytest.raises(InputError) as err:
        job_from_dict(doc, "job.yaml")
    assert f"field '{field}'" in str(err.value) and "job.yaml" in str(err.value)


def test_job_file_that_is_not_yaml_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: b\nadapters: [a\noutput: o\n")
    result = CliRunner().invoke(main, ["run", str(bad)])
    assert result.exit_code == 2
    assert "not valid YAML at line" in result.output and "Traceback" not in result.output


def test_example_configs_are_valid_jobs():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        job = load_job(path)
        assert job.adapters and job.output


def test_separate_outputs_equal_separate_merges(models, tmp_path):
    out = tmp_path / "per-adapter"
    results = shardmerge.run_job(
        job_from_dict(
            {
                "base": str(models["base"]),
                "adapters": [str(models["support"]), {"path": str(models["tone"]), "weight": 0.5}],
                "output": str(out),
                "separate": True,
            },
            "test",
        )
    )
    assert [Path(r.out).name for r in results] == ["support", "tone"]
    shardmerge.merge(models["base"], [models["support"]], tmp_path / "one")
    shardmerge.merge(models["base"], [models["tone"]], tmp_path / "two", weights=[0.5])
    assert _files(out / "support") == _files(tmp_path / "one")
    assert _files(out / "tone") == _files(tmp_path / "two")


def test_separate_reads_each_base_byte_once(models, tmp_path, monkeypatch):
    read = {"bytes": 0}
    real = sio.pread_into
    base_files = {str(p) for p in models["base"].glob("*.safetensors")}

    def counting(f, offset, buf):
        if f.name in base_files:
            read["bytes"] += buf.numel()
        return real(f, offset, buf)

    monkeypatch.setattr("shardmerge.execute.pipeline.pread_into", counting)
    adapters = [models["support"], models["tone"], models["legal"]]
    job = job_from_dict(
        {"base": str(models["base"]), "adapters": [str(a) for a in adapters],
         "output": str(tmp_path / "sep"), "separate": True, "workers": 0},
        "test",
    )  # fmt: skip
    shardmerge.run_job(job)
    once = read["bytes"]
    read["bytes"] = 0
    for i, a in enumerate(adapters):
        shardmerge.merge(models["base"], [a], tmp_path / f"alone{i}", workers=0)
    assert once > 0 and read["bytes"] == 3 * once


def test_options_and_job_files_load_without_torch():
    """Reading a job file must not pay for (or need) torch."""
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    code = "import shardmerge.options, shardmerge.jobs, sys; assert 'torch' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_option_table_covers_every_merge_option():
    """Job-file fields, MergeOptions fields and the option table name the same options."""
    from dataclasses import fields

    from shardmerge.jobs import JOB_FIELDS
    from shardmerge.options import JOB_OPTIONS, MergeOptions

    assert {f.name for f in fields(MergeOptions)} - {"source"} == JOB_FIELDS
    for option in JOB_OPTIONS:
        assert getattr(MergeOptions("b", (), "o"), option.name) == option.default, option.name
