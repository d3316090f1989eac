"""Process start-up settings: how OpenMP threads wait, how many threads torch runs, malloc.

These must be in place before torch starts its thread pool, so this module
imports nothing heavy: the CLI entry point and ``shardmerge/__init__`` call
``set_env_defaults`` before anything imports torch, and spawned workers
inherit the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

# torch's CPU build here uses GNU OpenMP (libgomp): with the default ACTIVE wait
# policy, idle pool threads spin for a while, which on shared cores (cloud VMs, CI
# runners) steals the time the working threads need; a 63 MB merge measured
# 34-40 s spinning against 5-6 s passive. KMP_BLOCKTIME is Intel OpenMP's knob and
# libgomp ignores it, so it is not set.
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

# glibc malloc serves blocks over its mmap threshold (128 KiB at first) with fresh
# mmaps and returns the heap's free top over its trim threshold to the kernel:
# a merge's per-block temporaries (a few MiB each) were then faulted in and
# zeroed anew for every row block, ~25% of a LoRA merge's CPU time (perf: page
# faults, clear_page). Serving them from the heap and keeping up to
# MALLOC_TRIM_BYTES of free heap makes them reusable; what stays mapped is at
# most the largest block's temporaries, which the planner's budget counts.
MALLOC_MMAP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit
MALLOC_TRIM_BYTES = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def set_env_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of ENV_DEFAULTS the user has not set; return those set here."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in ENV_DEFAULTS.items() if k not in env}
    env.update(added)
    return added


def quota_v2(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("150000 100000" -> 1.5; "max ..." -> None)."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return int(fields[0]) / period if period > 0 else None


def quota_v1(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no limit)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(path: str) -> list[str]:
    """A cgroup path and its parents, innermost first ("/a/b" -> "a/b", "a", "")."""
    parts = [p for p in path.strip().split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _read(file: Path) -> str | None:
    try:
        return file.read_text()
    except OSError:
        return None


def _quotas_v2(root: Path, path: str) -> list[float]:
    texts = [_read(root / p / "cpu.max") for p in _ancestors(path)]
    return [q for t in texts if t is not None and (q := quota_v2(t)) is not None]


def _quotas_v1(root: Path, path: str) -> list[float]:
    found = []
    for mount in ("cpu", "cpu,cpuacct"):
        for p in _ancestors(path):
            folder = root / mount / p
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is not None and period is not None:
                q = quota_v1(quota, period)
                found += [q] if q is not None else []
    return found


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """CPUs this process's cgroup (or any parent) allows, rounded up; None if unlimited."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    quotas: list[float] = []
    for line in text.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            quotas += _quotas_v2(root, path)
        elif "cpu" in controllers.split(","):
            quotas += _quotas_v1(root, path)
    return max(1, math.ceil(min(quotas))) if quotas else None


def affinity_cpus() -> int:
    """CPUs the scheduler lets this process run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def usable_cpus(affinity: int | None = None, limit: int | None = None) -> int:
    """CPUs this process may use: its affinity, capped by its cgroup quota."""
    affinity = affinity_cpus() if affinity is None else affinity
    limit = cgroup_cpu_limit() if limit is None else limit
    return max(1, min(affinity, limit) if limit else affinity)


def user_threads() -> bool:
    """Whether the user chose torch's thread count (OMP_NUM_THREADS): then it is left alone."""
    return bool(os.environ.get("OMP_NUM_THREADS"))


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """torch threads for each of ``workers`` processes sharing this process's CPUs."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus // max(1, workers))


def cap_torch_threads(limit: int | None = None) -> int:
    """Lower torch's intra-op threads to the usable CPUs, unless the user chose them.

    torch sizes its pool by the affinity mask but not by a cgroup CPU quota, so
    in a container it can start more threads than it may run. Imports torch:
    call it where torch is needed anyway. Returns the thread count.
    """
    import torch

    limit = usable_cpus() if limit is None else limit
    if not user_threads() and torch.get_num_threads() > limit:
        torch.set_num_threads(limit)
    return torch.get_num_threads()


def tune_malloc() -> bool:
    """Keep row blocks' temporaries in the heap between blocks (glibc only; True if set).

    Not through MALLOC_*_ environment variables: glibc reads those when the
    process starts, and they would reach every child process the user starts.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)
    )


EXIT_INTERRUPTED = 130


def _exit_interrupted(signum: int, frame: object) -> None:
    """Ctrl-C before any work that needs cleaning up: one line, exit 130, no traceback.

    ``os._exit``, not an exception: a KeyboardInterrupt raised in the middle of an
    import (torch's takes seconds) can surface as another error or a traceback.
    """
    os.write(2, b"\ninterrupted; nothing was written.\n")
    os._exit(EXIT_INTERRUPTED)


def exit_on_interrupt() -> None:
    """From now on Ctrl-C ends the process at once (start-up, reading, planning)."""
    import signal

    signal.signal(signal.SIGINT, _exit_interrupted)


def raise_on_interrupt() -> None:
    """Ctrl-C raises KeyboardInterrupt again, for work that cleans up after itself."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def ignore_interrupt() -> None:
    """Ctrl-C is ignored from now on (the process is only exiting)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
