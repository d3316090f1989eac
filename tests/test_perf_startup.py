"""Refusals of bad input answer without torch (planner/precheck.py), and say what the planner says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import make_adapter

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI as `python -m shardmerge` does; with BLOCK set, importing torch fails.
PROBE = """
import json, os, runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

if os.environ.get("BLOCK_TORCH"):
    sys.meta_path.insert(0, NoTorch())
code = 0
try:
    sys.argv = ["shardmerge", *sys.argv[1:]]
    runpy.run_module("shardmerge", run_name="__main__")
except SystemExit as e:
    code = e.code
print("PROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _run(*args: str, block: bool) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("BLOCK_TORCH", None)
    if block:
        env["BLOCK_TORCH"] = "1"
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env
    )
    line = [x for x in run.stdout.splitlines() if x.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE ") :]) | {"stderr": run.stderr}


def _refused_without_torch(*args: str) -> dict:
    r = _run(*args, block=True)
    assert r["code"] not in (0, None), r["stderr"]
    assert "error:" in r["stderr"].lower() and "Traceback" not in r["stderr"], r["stderr"]
    assert "torch is blocked" not in r["stderr"] and not r["torch"]
    return r


@pytest.fixture(scope="module")
def folders(llama_bf16_sharded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precheck")
    adapter = make_adapter(llama_bf16_sharded, tmp / "ad")
    bad_adapter = tmp / "bad-ad"
    shutil.copytree(adapter, bad_adapter)
    (bad_adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    bad_base = tmp / "bad-base"
    bad_base.mkdir()
    (bad_base / "config.json").write_text("{not json")
    return {"base": llama_bf16_sharded, "adapter": adapter, "tmp": tmp}, bad_adapter, bad_base


def test_missing_folders_refused_as_the_planner_does(folders):
    f, _, _ = folders
    args = ("plan", str(f["tmp"] / "no-base"), str(f["tmp"] / "no-adapter"))
    r = _refused_without_torch(*args)
    assert "base model folder" in r["stderr"] and "adapter folder" in r["stderr"]
    full = _run(*args, block=False)
    assert (full["code"], full["stderr"]) == (r["code"], r["stderr"])


def test_bad_json_refused_without_torch(folders):
    f, bad_adapter, bad_base = folders
    out = str(f["tmp"] / "out")
    r = _refused_without_torch("merge", str(f["base"]), str(bad_adapter), "-o", out, "-q")
    assert "adapter_config.json" in r["stderr"]
    full = _run("merge", str(f["base"]), str(bad_adapter), "-o", out, "-q", block=False)
    assert (full["code"], full["stderr"]) == (r["code"], r["stderr"])
    r = _refused_without_torch("merge", str(bad_base), str(f["adapter"]), "-o", out, "-q")
    assert "config.json" in r["stderr"]
    assert not Path(out).exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--max-memory", "12abc"], "cannot read memory size"),
        (["--max-memory", "100MiB"], "is below the"),
        (["--device", "tpu"], "unknown device"),
        (["--weights", "nan"], "comma-separated numbers"),
    ],
)
def test_bad_options_refused_without_torch(folders, flags, says):
    f, _, _ = folders
    out = f["tmp"] / "out-options"
    r = _refused_without_torch("merge", str(f["base"]), str(f["adapter"]), "-o", str(out), *flags)
    assert says in r["stderr"]
    assert not out.exists()


def test_good_input_still_plans(folders):
    """The early checks let good input through to the planner (which imports torch)."""
    f, _, _ = folders
    r = _run("plan", str(f["base"]), str(f["adapter"]), block=False)
    assert r["code"] == 0, r["stderr"]
    assert r["torch"]
