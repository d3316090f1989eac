"""Crash safety and resume: kill -9 at every crash point, real-time kills, signals, locks, disk full.

Every merge here runs on a tiny hand-written bf16 llama checkpoint (several
shards, an index, config.json and a tokenizer-like extra file) and a
hand-written PEFT LoRA adapter. Merges that must die run in real processes:
either the real CLI started with ``subprocess.Popen`` or a child forked from a
"fork server", a single Python process that imported shardmerge (and torch)
once and forks one child per merge, so that dozens of crash/resume runs cost
milliseconds each instead of a torch import each. A child runs exactly what
``shardmerge merge ...`` runs (``shardmerge.cli.main`` with the arguments)
and can be stopped (SIGSTOP) at its N-th crash point so that the test can
deliver a real signal, or fill the disk, at a known place.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import shardmerge
import shardmerge.errors
import shardmerge.planner.memory
from shardmerge.cli import main as cli_main
from shardmerge.errors import ResourceError

PY = sys.executable
INDEX = "model.safetensors.index.json"
WORK = ".shardmerge"


# --------------------------------------------------------------------------- fixtures: models


@dataclass
class Model:
    """A base folder and its adapter(s), with the tensor count of each shard in order."""

    root: Path
    base: Path
    adapter: Path
    shard_tensors: list[tuple[str, int]]
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def crashpoints(self) -> int:
        """Crash points in a full run: extras, each tensor, commit+record per shard, index."""
        return 1 + sum(n + 2 for _, n in self.shard_tensors) + 1

    def record_point(self, i: int) -> int:
        """The crash point right after shard ``i`` (0-based) was recorded in the journal."""
        return 1 + sum(n + 2 for _, n in self.shard_tensors[: i + 1])

    def assert_inputs_unchanged(self) -> None:
        assert hash_tree(self.root) == self.hashes, "an input file changed"


def hash_tree(root: Path, skip: str | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (skipping a top-level folder named ``skip``)."""
    result = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and (skip is None or rel.parts[0] != skip):
            result[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return result


def snapshot(out: Path) -> dict[str, str]:
    """Every output file's hash, except shardmerge's own work folder."""
    return hash_tree(out, skip=WORK)


def write_adapter(folder: Path, layers: int, dims: dict[str, tuple[int, int]], seed: int) -> None:
    """A PEFT LoRA adapter written by hand: r=4, alpha=8, non-zero A and B (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted({name.split(".")[-1] for name in dims}),
        "base_model_name_or_path": "tiny-llama",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for i in range(layers):
        for module, (out_f, in_f) in dims.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
    save_file(tensors, folder / "adapter_model.safetensors")


def build_model(
    root: Path,
    *,
    layers: int = 3,
    hidden: int = 32,
    inter: int = 48,
    vocab: int = 64,
    seed: int = 0,
) -> Model:
    """A bf16 llama split one shard per layer (plus embeddings and head), and its adapter."""
    base = root / "base"
    base.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.1).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rnd(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": rnd(hidden, hidden),
                p + "self_attn.v_proj.weight": rnd(hidden, hidden),
                p + "mlp.up_proj.weight": rnd(inter, hidden),
                p + "input_layernorm.weight": rnd(hidden),
            }
        )
    shards[-1]["model.norm.weight"] = rnd(hidden)
    shards[-1]["lm_head.weight"] = rnd(vocab, hidden)
    weight_map, total, names = {}, 0, []
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, base / name, metadata={"format": "pt"})
        names.append((name, len(tensors)))
        for t, v in tensors.items():
            weight_map[t] = name
            total += v.numel() * v.element_size()
    (base / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    dims = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "mlp.up_proj": (inter, hidden),
    }
    write_adapter(root / "lora", layers, dims, seed + 100)
    write_adapter(root / "lora_other", layers, dims, seed + 200)
    model = Model(root, base, root / "lora", names)
    model.hashes = hash_tree(root)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Model:
    return build_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Model:
    """Big enough that a merge with a small --max-memory takes a few seconds."""
    return build_model(tmp_path_factory.mktemp("big"), layers=4, hidden=64, inter=512, seed=7)


@pytest.fixture(scope="module")
def slow(big, tmp_path_factory) -> str:
    """The smallest --max-memory that ``big`` plans with: tiny row blocks, a merge of seconds."""
    planner = sys.modules["shardmerge.planner.memory"]
    out = tmp_path_factory.mktemp("slow") / "out"
    for kib in range(4, 4096, 4):
        budget = planner.BASELINE_BYTES + (kib << 10)
        try:
            shardmerge.plan(big.base, [big.adapter], out, max_memory=budget)
        except shardmerge.errors.ShardmergeError:
            continue
        return str(budget)
    raise AssertionError("no small budget plans")


def merge_args(model: Model, out: Path, *extra: str) -> list[str]:
    return ["merge", str(model.base), str(model.adapter), "-o", str(out), "-q", *extra]


def cli(*args: str):
    """Run the CLI in this process."""
    return CliRunner().invoke(cli_main, list(args))


# --------------------------------------------------------------------------- the fork server

SERVER = r"""
import json, os, signal, sys, traceback
import shardmerge.api
import shardmerge.cli
import shardmerge.execute.driver
import shardmerge.io.journal

proto = os.fdopen(os.dup(1), "w")
# Ctrl-C as from a terminal, even when the tests run where SIGINT is ignored
# (a background job of a non-interactive shell inherits SIG_IGN).
signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_at(n):
    # The n-th crash point SIGSTOPs this process (in every module that calls one).
    orig = shardmerge.io.journal.crashpoint
    count = [0]

    def hooked():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGSTOP)
        orig()

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("shardmerge."):
            if getattr(mod, "crashpoint", None) is orig:
                mod.crashpoint = hooked


for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.chdir(req["cwd"])
            for k, v in req["env"].items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if req.get("stop_at"):
                stop_at(req["stop_at"])
            for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            try:
                shardmerge.cli.main(req["args"], prog_name="shardmerge")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    proto.write(json.dumps({"pid": pid}) + "\n")
    proto.flush()
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    proto.write(json.dumps({"rc": rc}) + "\n")
    proto.flush()
"""


@dataclass
class Result:
    rc: int
    out: str
    err: str


class ForkServer:
    """Runs ``shardmerge`` CLI commands in children forked from one warm Python process."""

    def __init__(self, logs: Path):
        self.logs = logs
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMERGE_")}
        self.proc = subprocess.Popen(
            [PY, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._buf = b""
        self._n = 0

    def _readline(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("the fork server did not answer")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, args: list[str], env: dict | None = None, stop_at: int = 0) -> int:
        """Fork a child running ``shardmerge *args``; returns its pid."""
        self._n += 1
        self._files = (self.logs / f"{self._n}.out", self.logs / f"{self._n}.err")
        req = {
            "args": args,
            "cwd": str(self.logs),
            "env": {"SHARDMERGE_CRASH_AT": None, **(env or {})},
            "stop_at": stop_at,
            "stdout": str(self._files[0]),
            "stderr": str(self._files[1]),
        }
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._readline()["pid"]

    def wait(self, timeout: float = 60.0) -> Result:
        rc = self._readline(timeout)["rc"]
        return Result(rc, self._files[0].read_text(), self._files[1].read_text())

    def run(self, args: list[str], env: dict | None = None) -> Result:
        self.start(args, env)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fs = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield fs
    fs.close()


def wait_stopped(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` is stopped (SIGSTOP'd itself at its crash point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            raise AssertionError(f"process {pid} ended before it stopped") from None
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.005)
    raise TimeoutError(f"process {pid} did not stop")


@pytest.fixture(scope="module")
def reference(tiny, server, tmp_path_factory) -> dict[str, str]:
    """The bytes of an uninterrupted merge of ``tiny``."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    assert (out / INDEX).is_file()
    return snapshot(out)


def journal(out: Path) -> dict:
    return json.loads((out / WORK / "journal.json").read_text())


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in (out / WORK).glob("*.partial"))


def stat_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# --------------------------------------------------------------------------- 1. kill -9 everywhere


def test_kill9_at_every_crash_point_then_resume(tiny, server, reference, tmp_path):
    """SIGKILL at crash point k = 1, 2, ... until a run gets through; each rerun is exact."""
    expected = tiny.crashpoints
    assert expected >= 20
    n_shards = len(tiny.shard_tensors)
    k = 0
    while True:
        k += 1
        assert k <= expected + 1, "more crash points than the plan has"
        out = tmp_path / f"k{k}"
        crashed = server.run(merge_args(tiny, out), {"SHARDMERGE_CRASH_AT": str(k)})
        if crashed.rc == 0:
            break
        assert crashed.rc == -signal.SIGKILL, (k, crashed.err)
        # OUT never looks complete unless the kill came after the index was written.
        assert (out / INDEX).exists() == (k == expected), k
        recorded = set(journal(out)["shards"])
        want = [name for i, (name, _) in enumerate(tiny.shard_tensors) if tiny.record_point(i) <= k]
        assert recorded == set(want), k
        rerun = server.run(merge_args(tiny, out))
        assert rerun.rc == 0, (k, rerun.err)
        if want:
            assert f"resumed: {len(want)} of {n_shards} shards" in rerun.out, (k, rerun.out)
        else:
            assert "resumed" not in rerun.out
        assert snapshot(out) == reference, k
        assert journal(out)["status"] == "complete"
        assert partials(out) == []
        shutil.rmtree(out)
    assert k - 1 == expected, f"a full run has {k - 1} crash points, expected {expected}"
    tiny.assert_inputs_unchanged()


def test_repeated_crashes_then_resume(tiny, server, reference, tmp_path):
    """Several kills in a row, each resuming the last, still end in the exact output."""
    out = tmp_path / "out"
    for k in (4, 3, 9, 2, 7):
        r = server.run(merge_args(tiny, out), {"SHARDMERGE_CRASH_AT": str(k)})
        assert r.rc == -signal.SIGKILL
        assert not (out / INDEX).exists()
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


def test_real_time_sigkill_then_resume(big, slow, server, tmp_path):
    """The real CLI, killed -9 at a random moment of its merge; the rerun is exact.

    The killed runs use a tiny memory budget (many small row blocks, so the
    merge takes seconds); the reruns use the default budget: the budget does
    not change the output bytes, so a resume may change it.
    """
    ref = tmp_path / "ref"
    r = server.run(merge_args(big, ref))
    assert r.rc == 0, r.err
    expected = snapshot(ref)
    rng = random.Random(1234)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMERGE_")}
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [PY, "-m", "shardmerge", *merge_args(big, out, "--max-memory", slow)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for out in outs
    ]
    # The slow merge runs about 1 s after its journal appears: kill well inside that.
    delays = [rng.uniform(0.02, 0.35) for _ in outs]
    kill_at: list[float | None] = [None, None]
    deadline = time.monotonic() + 60
    try:
        while any(p.returncode is None for p in procs) and time.monotonic() < deadline:
            now = time.monotonic()
            for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
                if p.poll() is not None:
                    continue
                if kill_at[i] is None and (out / WORK / "journal.json").exists():
                    kill_at[i] = now + delays[i]  # the merge proper has started
                if kill_at[i] is not None and now >= kill_at[i]:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
            time.sleep(0.002)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()
        p.stderr.close()
        assert not (out / INDEX).exists()
        r = server.run(merge_args(big, out))
        assert r.rc == 0, r.err
        assert snapshot(out) == expected
    big.assert_inputs_unchanged()


# --------------------------------------------------------------------------- 2. resume skips


def test_resume_skips_finished_shards(tiny, server, reference, tmp_path):
    out = tmp_path / "out"
    k = tiny.record_point(1)  # killed right after the second shard was recorded
    r = server.run(merge_args(tiny, out), {"SHARDMERGE_CRASH_AT": str(k)})
    assert r.rc == -signal.SIGKILL
    names = [n for n, _ in tiny.shard_tensors]
    before = {n: stat_id(out / n) for n in names[:2]}
    time.sleep(0.01)  # so that a rewrite would show in mtime too
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    assert f"resumed: 2 of {len(names)} shards were already done." in r.out
    assert {n: stat_id(out / n) for n in names[:2]} == before
    assert snapshot(out) == reference
    # A rerun of a finished job says so and rewrites no shard.
    before = {n: stat_id(out / n) for n in names}
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    assert f"already complete: an earlier run of this job merged all {len(names)} shards" in r.out
    assert "nothing was written" in r.out
    assert {n: stat_id(out / n) for n in names} == before
    assert snapshot(out) == reference


# --------------------------------------------------------------------------- 3. corrupt shards


@pytest.mark.parametrize("finished", [False, True], ids=["after-crash", "after-finish"])
def test_corrupted_finished_shards_are_redone(tiny, server, reference, tmp_path, finished):
    out = tmp_path / "out"
    names = [n for n, _ in tiny.shard_tensors]
    env = {} if finished else {"SHARDMERGE_CRASH_AT": str(tiny.record_point(3))}
    r = server.run(merge_args(tiny, out), env)
    assert r.rc == (0 if finished else -signal.SIGKILL)
    flipped, truncated = out / names[1], out / names[2]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 7)
    kept = {n: stat_id(out / n) for n in (names[0], names[3])}
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    done = len(names) - 2 if finished else 2
    assert f"resumed: {done} of {len(names)}" in r.out
    assert {n: stat_id(out / n) for n in kept} == kept
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


# --------------------------------------------------------------------------- 4. other jobs


def test_different_job_is_refused_then_overwrite_and_no_resume(tiny, tmp_path):
    out = tmp_path / "out"
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 0, r.output
    first = snapshot(out)
    other_adapter = merge_args(tiny, out)
    other_adapter[2] = str(tiny.root / "lora_other")
    for args in (
        merge_args(tiny, out, "--weights", "0.5"),
        merge_args(tiny, out, "--dtype", "float32"),
        other_adapter,
    ):
        r = cli(*args)
        assert r.exit_code == 5, r.output
        assert "different job" in r.stderr and "--overwrite" in r.stderr
        assert "Traceback" not in r.output
        assert snapshot(out) == first  # nothing touched
    # --overwrite replaces it with exactly what a fresh merge of that job writes.
    fresh = tmp_path / "fresh"
    assert cli(*merge_args(tiny, fresh, "--weights", "0.5")).exit_code == 0
    r = cli(*merge_args(tiny, out, "--weights", "0.5", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert snapshot(out) == snapshot(fresh) != first
    # Now the first job is the different one; an unfinished different job is refused too.
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 5 and "a finished merge of a different job" in r.stderr
    # --no-resume writes every shard again (same bytes, new files).
    names = [n for n, _ in tiny.shard_tensors]
    before = {n: stat_id(out / n) for n in names}
    time.sleep(0.01)
    r = cli(*merge_args(tiny, out, "--weights", "0.5", "--no-resume"))
    assert r.exit_code == 0, r.output
    assert "resumed" not in r.output
    after = {n: stat_id(out / n) for n in names}
    assert all(after[n] != before[n] for n in names)
    assert snapshot(out) == snapshot(fresh)
    tiny.assert_inputs_unchanged()


def test_unfinished_different_job_is_refused(tiny, server, tmp_path):
    out = tmp_path / "out"
    r = server.run(merge_args(tiny, out, "--weights", "0.5"), {"SHARDMERGE_CRASH_AT": "8"})
    assert r.rc == -signal.SIGKILL
    state = hash_tree(out)
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 5
    assert "an unfinished merge of a different job" in r.stderr
    assert hash_tree(out) == state
    # --no-resume of the same job starts over: no shard is resumed.
    r = cli(*merge_args(tiny, out, "--weights", "0.5", "--no-resume"))
    assert r.exit_code == 0, r.output
    assert "resumed" not in r.output
    tiny.assert_inputs_unchanged()


# --------------------------------------------------------------------------- 5. the lock


def test_lock_held_by_another_process_refuses_at_once(tiny, reference, tmp_path):
    out = tmp_path / "out"
    (out / WORK).mkdir(parents=True)
    fd = os.open(out / WORK / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"424242")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t0 = time.monotonic()
        r = cli(*merge_args(tiny, out))
        assert time.monotonic() - t0 < 10
        assert r.exit_code == 5, r.output
        assert "pid 424242" in r.stderr and "Traceback" not in r.output
        assert snapshot(out) == {}
    finally:
        os.close(fd)
    # The holder is gone (its lock with it): the pid left in the file does not matter.
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 0, r.output
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


def test_lock_of_a_stopped_merge_then_of_a_dead_one(tiny, server, reference, tmp_path):
    """A real merge paused mid-way holds OUT; once it is killed, its lock is taken over."""
    out = tmp_path / "out"
    pid = server.start(merge_args(tiny, out), stop_at=tiny.record_point(1) + 2)
    try:
        try:
            wait_stopped(pid)
        except AssertionError:
            raise AssertionError(server.wait()) from None
        assert (out / WORK / "lock").read_text() == str(pid)
        state = hash_tree(out)
        r = cli(*merge_args(tiny, out))
        assert r.exit_code == 5, r.output
        assert f"pid {pid}" in r.stderr
        assert hash_tree(out) == state
    finally:
        os.kill(pid, signal.SIGKILL)
    assert server.wait().rc == -signal.SIGKILL
    assert (out / WORK / "lock").read_text() == str(pid)  # left behind, not held
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 0, r.output
    assert "resumed: 2 of" in r.output
    assert snapshot(out) == reference
    assert (out / WORK / "lock").read_text() == str(os.getpid())
    tiny.assert_inputs_unchanged()


# --------------------------------------------------------------------------- 6. SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_known_point_stops_cleanly(tiny, server, reference, tmp_path, sig):
    """Stopped in the middle of the third shard, then signalled: exit 130, shards kept."""
    out = tmp_path / "out"
    pid = server.start(merge_args(tiny, out), stop_at=tiny.record_point(1) + 2)
    try:
        wait_stopped(pid)
        os.kill(pid, sig)
    finally:
        os.kill(pid, signal.SIGCONT)
    r = server.wait()
    assert r.rc == 130, r.err
    assert "Traceback" not in r.err
    names = [n for n, _ in tiny.shard_tensors]
    assert f"interrupted; 2 of {len(names)} shards are finished and kept" in r.err
    assert "Rerun the same command to resume." in r.err
    assert set(journal(out)["shards"]) == set(names[:2])
    assert all((out / n).is_file() for n in names[:2])
    assert not (out / names[2]).exists() and not (out / INDEX).exists()
    assert partials(out) == []
    before = {n: stat_id(out / n) for n in names[:2]}
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    assert f"resumed: 2 of {len(names)}" in r.out
    assert {n: stat_id(out / n) for n in names[:2]} == before
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_a_random_moment(big, slow, server, tmp_path, sig):
    """A signal sent while a slow merge runs (once a shard is recorded): exit 130, exact resume."""
    ref = tmp_path / "ref"
    assert server.run(merge_args(big, ref)).rc == 0
    out = tmp_path / "out"
    pid = server.start(merge_args(big, out, "--max-memory", slow))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if journal(out)["shards"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    time.sleep(random.Random(int(sig)).uniform(0.0, 0.2))
    os.kill(pid, sig)
    r = server.wait()
    assert r.rc == 130, (r.out, r.err)
    assert "Rerun the same command to resume." in r.err and "Traceback" not in r.err
    kept = set(journal(out)["shards"])
    assert kept and partials(out) == [] and not (out / INDEX).exists()
    r = server.run(merge_args(big, out))
    assert r.rc == 0, r.err
    assert f"resumed: {len(kept)} of" in r.out
    assert snapshot(out) == snapshot(ref)
    big.assert_inputs_unchanged()


# --------------------------------------------------------------------------- 7. disk full


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of our own, or a skip where this platform does not let us mount one."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Write a filler file so that only about ``leave`` bytes stay free."""
    free = shutil.disk_usage(folder).free
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_output_that_cannot_fit_is_refused_up_front(tiny, tmpfs):
    disk = tmpfs("16k")
    out = disk / "out"
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 6, r.output
    assert "needs" in r.stderr and "free" in r.stderr
    assert str(disk) in r.stderr
    # The numbers are readable for a small model too (not "0.00 GiB").
    assert "KiB" in r.stderr, r.stderr
    assert not out.exists()
    tiny.assert_inputs_unchanged()


@pytest.mark.parametrize("leave", [2048, 20 << 10], ids=["almost-nothing", "two-shards"])
def test_disk_fills_up_while_merging(tiny, server, reference, tmpfs, leave):
    """The real CLI: the disk fills after planning (at the first crash point); exit 6, clean."""
    disk = tmpfs("256k")
    out = disk / "out"
    pid = server.start(merge_args(tiny, out), stop_at=1)
    try:
        wait_stopped(pid)
        filler = fill(disk, leave)
    finally:
        os.kill(pid, signal.SIGCONT)
    r = server.wait()
    assert r.rc == 6, (r.out, r.err)
    assert "disk is full" in r.err and "Traceback" not in r.err
    assert "needs" in r.err and "KiB" in r.err
    assert partials(out) == []
    assert not (out / INDEX).exists()
    kept = journal(out)["shards"]
    for name, entry in kept.items():  # whatever the journal trusts is really in place
        assert (out / name).stat().st_size == entry["size"]
    filler.unlink()
    r = server.run(merge_args(tiny, out))
    assert r.rc == 0, r.err
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


@pytest.mark.parametrize("pages", [0, 1, 2, 3])
def test_disk_full_before_the_first_shard(tiny, reference, tmpfs, pages):
    """In-process: plan, then the disk fills, leaving room for a few small files at most."""
    disk = tmpfs("256k")
    out = disk / "out"
    plan = shardmerge.plan(tiny.base, [tiny.adapter], out)
    filler = fill(disk, pages * 4096)
    from shardmerge.execute.driver import execute

    with pytest.raises(ResourceError) as e:
        execute(plan)
    assert "disk is full" in str(e.value)
    leftovers = sorted(p.name for p in (out / WORK).iterdir())
    assert set(leftovers) <= {"lock", "journal.json"}, leftovers
    if "journal.json" in leftovers:
        assert journal(out)["shards"] == {}
    assert snapshot(out).keys() <= {"tokenizer.json", "config.json"}
    filler.unlink()
    shardmerge.merge(tiny.base, [tiny.adapter], out)
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


def test_disk_full_injected_mid_shard(tiny, reference, tmp_path, monkeypatch):
    """ENOSPC raised by the writer in the middle of the third shard (in-process)."""
    from shardmerge.io import safetensors as safetensors_io

    out = tmp_path / "out"
    names = [n for n, _ in tiny.shard_tensors]
    real_write = safetensors_io.StreamWriter.write
    written = {"n": 0}

    def write(self, data):
        if str(self.f.name).endswith(names[2] + ".partial"):
            written["n"] += 1
            if written["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        return real_write(self, data)

    monkeypatch.setattr(safetensors_io.StreamWriter, "write", write)
    with pytest.raises(ResourceError) as e:
        shardmerge.merge(tiny.base, [tiny.adapter], out)
    assert e.value.exit_code == 6
    msg = str(e.value)
    assert "disk is full" in msg and "needs" in msg and "rerun" in msg.lower()
    assert partials(out) == []
    assert set(journal(out)["shards"]) == set(names[:2])
    assert not (out / names[2]).exists() and not (out / INDEX).exists()
    monkeypatch.setattr(safetensors_io.StreamWriter, "write", real_write)
    # The same through the CLI: exit code 6 and the message, no traceback.
    written["n"] = 0
    shutil.rmtree(out)
    monkeypatch.setattr(safetensors_io.StreamWriter, "write", write)
    r = cli(*merge_args(tiny, out))
    assert r.exit_code == 6, r.output
    assert "disk is full" in r.stderr and "Traceback" not in r.output
    monkeypatch.setattr(safetensors_io.StreamWriter, "write", real_write)
    result = shardmerge.merge(tiny.base, [tiny.adapter], out)
    assert result.shards_resumed == 2
    assert snapshot(out) == reference
    tiny.assert_inputs_unchanged()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_sigterm_with_a_worker_process(big, slow, server, tmp_path):
    """--workers 1: SIGTERM stops the merge and its worker; exit 130; the resume is exact."""
    ref = tmp_path / "ref"
    assert server.run(merge_args(big, ref)).rc == 0
    out = tmp_path / "out"
    budget = str(int(slow) + sys.modules["shardmerge.planner.memory"].PROCESS_BYTES)
    pid = server.start(merge_args(big, out, "--max-memory", budget, "--workers", "1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if journal(out)["shards"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    workers = _children(pid)
    assert workers, "no worker process"
    os.kill(pid, signal.SIGTERM)
    r = server.wait()
    assert r.rc == 130, (r.out, r.err)
    assert "Rerun the same command to resume." in r.err and "Traceback" not in r.err
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(_alive(w) for w in workers), "a worker outlived the merge"
    assert partials(out) == [] and not (out / INDEX).exists()
    kept = set(journal(out)["shards"])
    r = server.run(merge_args(big, out))  # resumed in-process: workers do not change bytes
    assert r.rc == 0, r.err
    assert f"resumed: {len(kept)} of" in r.out
    assert snapshot(out) == snapshot(ref)
    big.assert_inputs_unchanged()
