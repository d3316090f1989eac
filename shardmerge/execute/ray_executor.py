"""Shard tasks as Ray tasks, on a cluster whose nodes all see the inputs and OUT.

Imported only for ``--executor ray``: the rest of shardmerge never imports
ray. Each task runs the pipeline for one output and one base shard on some
node and writes the shard to a file of its own attempt
(``<temporary name>.<attempt>.partial`` in OUT's work folder), so a retried
task never shares a file with the attempt it replaces, however long that one lingers. Back in the driver's process the
finished attempt's file is renamed to the shard's temporary name and handed
to ``commit``: renames, the journal and the index stay with the driver, and
the bytes are those of a local run. A task that fails is retried once by
Ray; a second failure stops the merge naming the shard.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.exceptions
import torch

from ..errors import InputError, ResourceError, ShardmergeError
from ..io.output import fmt_bytes
from .pipeline import Progress, ShardResult, run_shards
from .tasks import Commit, ShardTask

# How long a cluster address may take to accept a TCP connection.
PROBE_SECONDS = 3.0
# How often the driver collects progress; how often a task reports it.
POLL_SECONDS = 0.2
REPORT_SECONDS = 0.5
# Ray runs a failed task once more; a second failure stops the merge.
RETRIES = 1


@dataclass(frozen=True)
class Attempt:
    """What one successful run of a task sends back to the driver."""

    results: tuple[ShardResult, ...]
    files: tuple[str, ...]  # the attempt's file for each of the task's outputs
    node: str  # the Ray node id
    ip: str
    started: float  # wall clock (time.time) on the node
    seconds: float
    bytes_read: int  # base bytes processed


class RayExecutor:
    """Runs shard tasks on a Ray cluster; the driver commits each result."""

    def __init__(self, address: str, *, task_memory: int, in_flight: int = 0, gpu: bool = False):
        self.task_memory, self.in_flight, self.gpu = task_memory, in_flight, gpu
        self.owned = connect(address)
        self.attempts: list[Attempt] = []
        try:
            check_fits(task_memory, gpu)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Disconnect from a cluster this executor connected to (and stop one it started)."""
        if self.owned and ray.is_initialized():
            ray.shutdown()

    def stats(self) -> dict:
        """Per node: shards, base bytes, busy seconds and throughput over its busy span."""
        return {"cluster": cluster_stats(self.attempts)} if self.attempts else {}

    def run(
        self, tasks: list[ShardTask], device: str, progress: Progress | None, commit: Commit
    ) -> None:
        # One task per (output, base shard): on a cluster parallel reads beat one shared read.
        pairs = [
            ShardTask((k,), (job,), (dest,))
            for t in tasks
            for k, job, dest in zip(t.outputs, t.jobs, t.dests, strict=True)
        ]
        for pair in pairs:
            _remove_attempts(pair.dests[0])
        gpu = self.gpu
        sink = Sink.options(num_cpus=0).remote()
        remote = run_attempt.options(
            memory=self.task_memory,
            num_cpus=1,
            num_gpus=1 if gpu else 0,
            max_retries=RETRIES,
            retry_exceptions=True,
        )
        tracker = _Progress(progress, pairs)
        pending: dict[ray.ObjectRef, ShardTask] = {}
        todo = list(enumerate(pairs))
        try:
            while todo or pending:
                while todo and (not self.in_flight or len(pending) < self.in_flight):
                    i, pair = todo.pop(0)
                    pending[remote.remote(pair, "cuda" if gpu else "cpu", sink, i)] = pair
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                tracker.poll(sink)
                for ref in ready:
                    self._finish(pending.pop(ref), ref, commit)
            tracker.poll(sink)
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            for pair in pairs:
                _remove_attempts(pair.dests[0])
            with contextlib.suppress(Exception):
                ray.kill(sink)

    def _finish(self, pair: ShardTask, ref: ray.ObjectRef, commit: Commit) -> None:
        """Take a finished task's result (or its second failure), rename its file, commit."""
        out = Path(pair.dests[0]).parent.parent  # the temporary name is in OUT/.shardmerge
        attempt = fetch(ref, f"{pair.jobs[0].name} of {out}")
        self.attempts.append(attempt)
        os.replace(attempt.files[0], pair.dests[0])
        _remove_attempts(pair.dests[0])  # a lingering earlier attempt's file
        commit(pair.outputs[0], attempt.results[0])


def fetch(ref: ray.ObjectRef, shard: str) -> Attempt:
    """A task's result; its failure (after the retry) as the error a user can act on."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, ShardmergeError) or getattr(cause, "errno", None) == errno.ENOSPC:
            raise cause from None  # a bad input or a full disk: the driver's message
        hint = "Fix the cause and rerun the same command: finished shards are kept."
        if isinstance(cause, OSError):
            hint = (
                "Every node must see the base, the adapters and OUT at the same paths (a "
                f"shared filesystem). {hint}"
            )
        raise ShardmergeError(
            f"shard {shard} failed twice on the Ray cluster: {type(cause).__name__}: {cause}",
            hint=hint,
        ) from None
    except ray.exceptions.RayError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardmergeError(
            f"shard {shard} failed twice on the Ray cluster (a worker or node was lost: {reason}).",
            hint="Rerun the same command to resume: finished shards are kept.",
        ) from None


@ray.remote
def run_attempt(task: ShardTask, device: str, sink, key: int) -> Attempt:
    """One attempt at a task, on whichever node Ray chose; writes the attempt's own files."""
    tag = uuid.uuid4().hex[:12]
    files = tuple(f"{d}.{tag}.partial" for d in task.dests)
    ctx = ray.get_runtime_context()
    started, clock = time.time(), time.monotonic()
    sink.start.remote(task.jobs[0].name)
    report = _Reporter(sink, key)
    try:
        results = run_shards(
            list(task.jobs), [Path(f) for f in files], torch.device(device), report
        )
    except BaseException:
        for f in files:
            Path(f).unlink(missing_ok=True)
        raise
    report.flush()
    return Attempt(
        tuple(results),
        files,
        ctx.get_node_id(),
        ray.util.get_node_ip_address(),
        started,
        time.monotonic() - clock,
        report.done,
    )


@ray.remote
class Sink:
    """Progress from the tasks: shards started, and base bytes done per task (its best attempt)."""

    def __init__(self):
        self.started: list[str] = []
        self.done: dict[int, int] = {}

    def start(self, name: str) -> None:
        self.started.append(name)

    def update(self, key: int, done: int) -> None:
        self.done[key] = max(done, self.done.get(key, 0))

    def poll(self) -> tuple[list[str], dict[int, int]]:
        started, self.started = self.started, []
        return started, dict(self.done)


class _Reporter:
    """A task's progress callback: base bytes done, sent to the sink at most twice a second."""

    def __init__(self, sink, key: int):
        self.sink, self.key = sink, key
        self.done, self.sent_at = 0, 0.0

    def __call__(self, item: int | str) -> None:
        if isinstance(item, int):
            self.done += item
            if time.monotonic() - self.sent_at >= REPORT_SECONDS:
                self.flush()

    def flush(self) -> None:
        self.sent_at = time.monotonic()
        self.sink.update.remote(self.key, self.done)


class _Progress:
    """Turns the sink's per-task totals into the driver's progress calls.

    A retried task's bytes count only once (the sink keeps each task's best
    attempt), and the (adapter, shard) pairs of one base shard count as one
    read of it, so the bar ends at the base's size, as locally.
    """

    def __init__(self, progress: Progress | None, pairs: list[ShardTask]):
        self.progress = progress
        self.shard = [p.jobs[0].name for p in pairs]
        self.share = {name: self.shard.count(name) for name in self.shard}
        self.forwarded = 0

    def poll(self, sink) -> None:
        if self.progress is None:
            return
        try:
            started, done = ray.get(sink.poll.remote(), timeout=10)
        except ray.exceptions.RayError:
            return  # progress is lost with its actor's node; the merge goes on
        for name in started:
            self.progress(name)
        per_shard: dict[str, int] = {}
        for key, n in done.items():
            per_shard[self.shard[key]] = per_shard.get(self.shard[key], 0) + n
        total = sum(n // self.share[name] for name, n in per_shard.items())
        if total > self.forwarded:
            self.progress(total - self.forwarded)
            self.forwarded = total


def connect(address: str) -> bool:
    """Attach this process to the Ray cluster at ``address``; True if it was not attached.

    ``auto``: the cluster this process is already attached to, else RAY_ADDRESS,
    else the cluster started on this machine (Ray's address file), else a new
    local one. An address that does not accept a TCP connection within
    seconds is refused (Ray itself would retry for minutes).
    """
    if ray.is_initialized():
        return False
    target = address.strip()
    if target == "auto":
        target = os.environ.get("RAY_ADDRESS", "").strip() or _machine_cluster() or "local"
    if target != "local":
        probe(target)
    # A new local instance needs no dashboard; a cluster's own settings are its own.
    local = {"include_dashboard": False} if target == "local" else {}
    ray.init(address=target, log_to_driver=False, logging_level="WARNING", **local)
    notices_to_stderr()
    return True


def notices_to_stderr() -> None:
    """Send the cluster notices Ray's driver prints (a worker died, a task is retried) to
    stderr: it prints them to stdout, which ``--json`` keeps for JSON lines.

    Ray has no setting for this; its module function is wrapped where it exists.
    """
    module = getattr(getattr(ray, "_private", None), "worker", None)
    original = getattr(module, "print_to_stdstream", None)
    if original is None or getattr(original, "to_stderr", False):
        return

    def to_stderr(data: dict, *args, **kwargs):
        return original({**data, "is_err": True}, *args, **kwargs)

    to_stderr.to_stderr = True
    module.print_to_stdstream = to_stderr


def probe(address: str) -> None:
    """Refuse an address whose host does not accept a TCP connection within PROBE_SECONDS."""
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(
            f"--ray-address {address!r} is not an address of a Ray cluster.",
            hint="Give the head node's host:port (e.g. 10.0.0.5:6379), ray://host:10001, or auto.",
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise InputError(
            f"cannot reach the Ray cluster at {address} (--ray-address): {why}; nothing was "
            "written.",
            hint="Start the cluster (ray start --head on the head node) or give its address "
            "host:port; check that this machine can reach it.",
        ) from None


def _machine_cluster() -> str | None:
    """The address of the Ray cluster last started on this machine, if it still answers."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        address = (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip()
        probe(address)
    except (OSError, InputError):
        return None  # none, or a stale file: start a local one
    return address


def check_fits(memory: int, gpu: bool) -> None:
    """Refuse a task no live node can hold (Ray would wait for such a node for ever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [
        r
        for r in nodes
        if r.get("memory", 0) >= memory and r.get("CPU", 0) >= 1 and (not gpu or r.get("GPU", 0))
    ]
    if fits:
        return
    largest = max((r.get("memory", 0) for r in nodes), default=0)
    raise ResourceError(
        f"no node of the Ray cluster can run a shard task: each asks for {fmt_bytes(memory)} "
        f"of memory (--max-memory), 1 CPU{' and 1 GPU' if gpu else ''}; the largest node "
        f"offers {fmt_bytes(int(largest))} of memory.",
        hint="Lower --max-memory, or add larger nodes to the cluster.",
    )


def cluster_stats(attempts: list[Attempt]) -> dict:
    """The report's ``cluster`` entry: per node, the shards run and their throughput."""
    nodes: dict[str, dict] = {}
    for a in attempts:
        n = nodes.setdefault(a.node, {"node": a.node, "ip": a.ip, "shards": 0, "bytes": 0})
        n["shards"] += 1
        n["bytes"] += a.bytes_read
        n["busy_seconds"] = n.get("busy_seconds", 0.0) + a.seconds
        n["first"] = min(n.get("first", a.started), a.started)
        n["last"] = max(n.get("last", 0.0), a.started + a.seconds)
    rows = []
    for n in sorted(nodes.values(), key=lambda n: (n["ip"], n["node"])):
        span = max(n.pop("last") - n.pop("first"), 1e-9)
        n["busy_seconds"] = round(n["busy_seconds"], 3)
        n["bytes_per_second"] = round(n["bytes"] / span)
        rows.append(n)
    return {"executor": "ray", "nodes": rows}


def _remove_attempts(dest: str) -> None:
    """Every attempt file of the task writing ``dest`` (failed, cancelled or lingering)."""
    for f in glob.glob(glob.escape(dest) + ".*.partial"):
        Path(f).unlink(missing_ok=True)
