"""Start-up: what the light commands import, the OpenMP and thread settings, a quiet Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import make_adapter

from shardmerge.runtime import (
    cgroup_cpu_limit,
    quota_v1,
    quota_v2,
    set_env_defaults,
    threads_per_worker,
    usable_cpus,
)

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI as `python -m shardmerge` does, then reports what got imported.
PROBE = """
import json, runpy, sys
code = 0
try:
    sys.argv = ["shardmerge", *sys.argv[1:]]
    runpy.run_module("shardmerge", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "numpy", "psutil", "tqdm") if m in sys.modules]
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _probe(*args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=_env()
    )
    line = [x for x in run.stdout.splitlines() if x.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE ") :]) | {"stderr": run.stderr, "stdout": run.stdout}


@pytest.fixture(scope="module")
def adapter(llama_bf16_sharded, tmp_path_factory):
    return make_adapter(llama_bf16_sharded, tmp_path_factory.mktemp("startup") / "ad")


def test_help_imports_nothing_heavy():
    r = _probe("--help")
    assert r["code"] == 0 and "inspect" in r["stdout"]
    assert r["heavy"] == []


def test_inspect_model_and_adapter_leave_torch_out(llama_bf16_sharded, adapter):
    model = _probe("inspect", str(llama_bf16_sharded))
    assert model["code"] == 0 and " shards, " in model["stdout"]
    assert "torch" not in model["heavy"]
    lora = _probe("inspect", "--json", str(adapter))
    assert lora["code"] == 0 and '"peft_type": "LORA"' in lora["stdout"]
    assert "torch" not in lora["heavy"]


def test_inspect_refusal_leaves_torch_out(tmp_path):
    r = _probe("inspect", str(tmp_path / "missing"))
    assert r["code"] not in (0, None) and "error:" in r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert "torch" not in r["heavy"]


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_omp_wait_policy_default_respects_the_user(user_value):
    extra = {"OMP_WAIT_POLICY": user_value} if user_value else {}
    code = "import os, shardmerge; print(os.environ['OMP_WAIT_POLICY'])"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(**extra)
    )
    assert run.stdout.strip() == (user_value or "PASSIVE")


def test_set_env_defaults_only_adds_missing():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_env_defaults(env) == {}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    empty: dict[str, str] = {}
    assert set_env_defaults(empty) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert empty == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_quota_parsing():
    assert quota_v2("max 100000\n") is None
    assert quota_v2("150000 100000\n") == 1.5
    assert quota_v2("200000 100000") == 2.0
    assert quota_v1("-1\n", "100000\n") is None
    assert quota_v1("50000\n", "100000\n") == 0.5


def _fake_cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc_file = tmp_path / "proc_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_limit_rounds_up_and_takes_the_tightest_ancestor(tmp_path):
    root, proc = _fake_cgroup(
        tmp_path,
        "0::/outer/inner\n",
        {"outer/cpu.max": "350000 100000\n", "outer/inner/cpu.max": "150000 100000\n"},
    )
    assert cgroup_cpu_limit(root, proc) == 2
    (root / "outer/inner/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, proc) == 4


def test_cgroup_v2_unlimited_and_missing(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(root, tmp_path / "no_such_file") is None


def test_cgroup_v1_quota(tmp_path):
    files = {
        "cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
    }
    root, proc = _fake_cgroup(tmp_path, "4:cpu,cpuacct:/job\n3:memory:/job\n", files)
    assert cgroup_cpu_limit(root, proc) == 3
    (root / "cpu,cpuacct/job/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_usable_cpus_and_worker_threads():
    assert usable_cpus(affinity=8, limit=2) == 2
    assert usable_cpus(affinity=2, limit=16) == 2
    assert usable_cpus(affinity=6, limit=None) >= 1
    assert threads_per_worker(4, cpus=2) == 1
    assert threads_per_worker(2, cpus=8) == 4
    assert threads_per_worker(0, cpus=3) == 3


def test_ctrl_c_at_start_up_and_planning_exits_130_quietly(llama_bf16_sharded, adapter, tmp_path):
    """Ctrl-C after 0.1, 0.5 and 1.5 s: during imports, planning or merging, or while the
    process exits. Each run the signal reaches is 130 with one line (never killed by the
    signal, never a traceback); a run that finished first is 0, and at least one is cut."""
    interrupted = 0
    for delay in (0.1, 0.5, 1.5):
        cmd = [sys.executable, "-m", "shardmerge", "merge", str(llama_bf16_sharded), str(adapter)]
        proc = subprocess.Popen(
            [*cmd, "-o", str(tmp_path / f"out{delay}"), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # the merge (or its exit) was done before Ctrl-C could matter
        interrupted += 1
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert "Traceback" not in err
        # One line; cut while merging, the line and its hint (what is kept, how to resume).
        lines = err.strip().splitlines()
        assert len(lines) == 1 or lines[1:] == ["Rerun the same command to resume."], err
        assert "interrupted" in lines[0], err
    assert interrupted >= 1
