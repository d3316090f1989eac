"""--executor ray on a real two-node Ray cluster on loopback (one machine, two raylets).

One cluster serves the module (a node costs seconds to start): a head and a
second node, both on 127.0.0.1, with their own temporary folder and ports,
stopped by the processes they started (never ``ray stop``). Merges run with
``ray.init`` in this process (through the API) or in a CLI subprocess. Every
output is compared byte for byte with a local merge of the same inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_resume import INDEX, WORK, build_model, cli, journal, snapshot

import shardmerge
from shardmerge.errors import ShardmergeError

if importlib.util.find_spec("ray") is None:  # CI installs it: skipped only where it cannot be
    pytest.skip("ray is not installed (pip install 'shardmerge[ray]')", allow_module_level=True)

# Ray keeps 127.0.0.1 (instead of the outward address) and asks for no token.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
NODE_MEMORY = 2 << 30
TASK_MEMORY = "1GiB"  # each task's --max-memory: two fit on a node


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's unix sockets live under it. RAY_TMPDIR keeps its address file here too.
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {**RAY_ENV, "RAY_TMPDIR": tmp}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported: only now.
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "memory": NODE_MEMORY}
    head = {**node, "temp_dir": f"{tmp}/ray", "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        c.add_node(**node)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Five shards; big enough that a tiny budget makes each shard take a while."""
    return build_model(tmp_path_factory.mktemp("ray"), layers=4, hidden=64, inter=512, seed=7)


@pytest.fixture(scope="module")
def slow(model, tmp_path_factory) -> int:
    """The smallest budget the model plans with in one process (a Ray task's sizing)."""
    from shardmerge.planner.memory import BASELINE_BYTES

    out = tmp_path_factory.mktemp("slow") / "out"
    for kib in range(4, 4096, 4):
        try:
            shardmerge.plan(
                model.base, [model.adapter], out, max_memory=BASELINE_BYTES + kib * 1024
            )
        except ShardmergeError:
            continue
        return BASELINE_BYTES + kib * 1024
    raise AssertionError("no small budget plans")


@pytest.fixture(scope="module")
def local(model, tmp_path_factory) -> dict[str, str]:
    """The bytes of a local merge (in this process)."""
    out = tmp_path_factory.mktemp("local") / "out"
    shardmerge.merge(model.base, [model.adapter], out, workers=0)
    return snapshot(out)


def ray_merge(model, out: Path, address: str, **kw):
    kw.setdefault("max_memory", TASK_MEMORY)
    return shardmerge.merge(
        model.base, [model.adapter], out, executor="ray", ray_address=address, **kw
    )


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in (out / WORK).glob("*.partial"))


def test_cluster_has_two_nodes_on_loopback(cluster):
    import ray

    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    assert len(nodes) == 2
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    assert cluster.address.startswith("127.0.0.1:")


def test_bytes_identical_to_local_with_progress_and_nodes(cluster, model, local, tmp_path):
    events = []
    result = ray_merge(model, tmp_path / "out", cluster.address, events=events.append)
    assert snapshot(tmp_path / "out") == local
    assert partials(tmp_path / "out") == []
    total = events[0]["bytes_total"]
    done = [e["bytes_done"] for e in events if e["event"] == "progress"]
    assert done == sorted(done) and done[-1] == total
    shards = {e["name"] for e in events if e["event"] == "shard"}
    assert shards == {name for name, _ in model.shard_tensors}
    report = json.loads((tmp_path / "out" / WORK / "report.json").read_text())
    nodes = report["cluster"]["nodes"]
    assert report["cluster"]["executor"] == "ray"
    assert {n["ip"] for n in nodes} == {"127.0.0.1"}
    assert sum(n["shards"] for n in nodes) == len(model.shard_tensors)
    assert sum(n["bytes"] for n in nodes) == total
    assert all(n["bytes_per_second"] > 0 for n in nodes)
    assert result.report()["cluster"] == report["cluster"]
    model.assert_inputs_unchanged()


def test_separate_three_adapters_on_ray_auto_address(cluster, model, tmp_path, monkeypatch):
    """--separate: the (adapter, shard) pairs are tasks; auto finds the cluster by RAY_ADDRESS."""
    adapters = [model.adapter, model.root / "lora_other", tmp_path / "third"]
    shutil.copytree(model.adapter, adapters[2])
    args = [str(model.base), *map(str, adapters), "--separate", "--weights", "1,0.5,-2"]
    assert cli("merge", *args, "-o", str(tmp_path / "local"), "-q").exit_code == 0
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    r = cli(
        "merge",
        *args,
        "-o",
        str(tmp_path / "ray"),
        "-q",
        "--executor",
        "ray",
        "--json",
        "--max-memory",
        TASK_MEMORY,
    )
    assert r.exit_code == 0, r.output
    done = [json.loads(line) for line in r.output.splitlines() if '"done"' in line]
    assert len(done) == 3 and all(d["cluster"]["executor"] == "ray" for d in done)
    for name in ("lora", "lora_other", "third"):
        got, want = snapshot(tmp_path / "ray" / name), snapshot(tmp_path / "local" / name)
        assert got == want, name
        assert (tmp_path / "ray" / name / INDEX).is_file()
    assert snapshot(tmp_path / "ray" / "lora") != snapshot(tmp_path / "ray" / "third")


def ray_workers() -> list[int]:
    """Pids of this test's Ray worker processes (descendants of this process)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def attempt_file(pid: int) -> str | None:
    """The attempt file process ``pid`` has open for writing, if any."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if path.endswith(".partial") and ".partial." in path:
            return path
    return None


class Killer(threading.Thread):
    """Kills, up to ``times`` times, a worker while it writes a shard (the first one seen)."""

    def __init__(self, times: int):
        super().__init__(daemon=True)
        self.times, self.killed, self.shard = times, [], None
        self.stop = threading.Event()

    def run(self) -> None:
        workers, listed = [], 0.0
        while not self.stop.is_set() and len(self.killed) < self.times:
            if time.monotonic() - listed > 0.2:  # new workers start after each kill
                workers, listed = ray_workers(), time.monotonic()
            for pid in workers:
                path = attempt_file(pid)
                shard = Path(path).name.split(".partial.")[0] if path else None
                if shard and self.shard in (None, shard) and pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.shard = shard
                    self.killed.append(pid)
            time.sleep(0.002)


def test_worker_killed_mid_shard_is_retried(cluster, model, slow, local, tmp_path, capfd):
    killer = Killer(times=1)
    killer.start()
    try:
        ray_merge(model, tmp_path / "out", cluster.address, max_memory=slow)
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == 1, "no worker was caught writing a shard"
    assert snapshot(tmp_path / "out") == local
    assert partials(tmp_path / "out") == []
    # Ray's notice of the dead worker goes to stderr: stdout is for --json's lines.
    assert "worker died" not in capfd.readouterr().out


def test_shard_failing_twice_stops_the_merge_naming_it(cluster, model, slow, local, tmp_path):
    out = tmp_path / "out"
    killer = Killer(times=2)
    killer.start()
    try:
        with pytest.raises(ShardmergeError) as err:
            ray_merge(model, out, cluster.address, max_memory=slow)
    finally:
        killer.stop.set()
        killer.join()
    shard = killer.shard.replace("__", "/")
    assert f"shard {shard} of {out} failed twice on the Ray cluster" in str(err.value)
    assert not (out / INDEX).exists()
    assert journal(out)["status"] == "running"
    assert partials(out) == []
    # Resumed locally: the shards the cluster finished are kept.
    kept = len(journal(out)["shards"])
    r = cli("merge", str(model.base), str(model.adapter), "-o", str(out), "-q")
    assert r.exit_code == 0, r.output
    assert (f"resumed: {kept} of" in r.output) == (kept > 0)
    assert snapshot(out) == local


def shardmerge_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardmerge", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_driver_killed_then_resumed_locally(cluster, model, local, tmp_path):
    out = tmp_path / "out"
    args = ["merge", str(model.base), str(model.adapter), "-o", str(out), "-q"]
    # Crash point 3 of the driver: right after the first shard is recorded in the journal.
    r = shardmerge_cli(
        *args, "--executor", "ray", "--ray-address", cluster.address, "--max-memory", TASK_MEMORY,
        env={"SHARDMERGE_CRASH_AT": "3"},
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(journal(out)["shards"]) == 1 and not (out / INDEX).exists()
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "resumed: 1 of 5 shards" in r.output
    assert snapshot(out) == local


def test_local_merge_killed_then_resumed_on_ray_and_no_resume(cluster, model, local, tmp_path):
    out = tmp_path / "out"
    args = ["merge", str(model.base), str(model.adapter), "-o", str(out), "-q"]
    # In one process the crash points count tensors too: stop after the first shard's record.
    crash = {"SHARDMERGE_CRASH_AT": str(model.record_point(0))}
    r = shardmerge_cli(*args, "--workers", "0", env=crash)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ray_args = [*args, "--executor", "ray", "--ray-address", cluster.address]
    ray_args += ["--max-memory", TASK_MEMORY]
    r = cli(*ray_args)
    assert r.exit_code == 0, r.output
    assert "resumed: 1 of 5 shards" in r.output
    assert snapshot(out) == local
    r = cli(*ray_args, "--no-resume")
    assert r.exit_code == 0 and "resumed" not in r.output, r.output
    assert snapshot(out) == local
    # Another job into the same OUT is refused, as locally.
    r = cli(*ray_args, "--weights", "0.5")
    assert r.exit_code == 5, r.output


def test_task_no_node_can_hold_is_refused_before_writing(cluster, model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ShardmergeError, match="no node of the Ray cluster can run a shard task"):
        ray_merge(model, out, cluster.address, max_memory="3GiB")  # nodes offer 2 GiB
    assert not out.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_refused_within_seconds(model, tmp_path, monkeypatch):
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    r = cli(
        "merge", str(model.base), str(model.adapter), "-o", str(out),
        "--executor", "ray", "--ray-address", address,
    )  # fmt: skip
    assert time.monotonic() - start < 10
    assert r.exit_code == 2, r.output
    assert f"cannot reach the Ray cluster at {address} (--ray-address)" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_job_file_fields():
    from shardmerge.errors import InputError
    from shardmerge.jobs import job_from_dict

    doc = {"base": "b", "adapters": ["a"], "output": "o", "executor": "ray"}
    job = job_from_dict({**doc, "ray_address": "127.0.0.1:6379"}, "job.yaml")
    assert (job.executor, job.ray_address) == ("ray", "127.0.0.1:6379")
    assert job_from_dict({**doc, "executor": "local"}, "job.yaml").ray_address == "auto"
    with pytest.raises(InputError, match="field 'executor' must be one of local, ray, not 'spark'"):
        job_from_dict({**doc, "executor": "spark"}, "job.yaml")
    with pytest.raises(InputError, match="field 'ray_address' must be auto"):
        job_from_dict({**doc, "ray_address": " "}, "job.yaml")


def test_a_local_merge_never_imports_ray(model, tmp_path):
    code = (
        "import sys, shardmerge\n"
        "shardmerge.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], workers=0)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    args = [str(model.base), str(model.adapter), str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / INDEX).is_file()
