"""Runs a MergePlan: holds OUT's lock, skips finished shards, runs shard jobs, commits each."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import queue
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import CONFIG_NAME, INDEX_NAME
from .errors import Interrupted, ResourceError
from .journal import Journal, OutputLock, check_resumable, crashpoint, set_crash_parent
from .output import OutputDir, fmt_bytes
from .plan import MergePlan, ShardJob
from .worker import Progress, ShardResult, run_shard


def execute(
    plan: MergePlan,
    *,
    overwrite: bool = False,
    resume: bool = True,
    progress: Progress | None = None,
) -> int:
    """Write the merged model described by ``plan`` into ``plan.out``; returns shards resumed.

    Holds OUT's lock throughout. Shards a previous run of the same job
    finished (and that still check out) are kept; the rest are written, each
    recorded in the journal once it is safely in place. Ctrl-C, SIGTERM and a
    full disk stop the merge with a message; a rerun of the same command
    resumes.
    """
    out = OutputDir(Path(plan.out))
    out.create()
    lock = OutputLock(out.work)
    lock.acquire()
    current: list[Path] = []
    try:
        with _sigterm_as_interrupt():
            return _execute_locked(plan, out, overwrite, resume, progress, current)
    except KeyboardInterrupt:
        _discard(current)
        done = len((Journal.load(out.work) or Journal(out.work)).shards)
        raise Interrupted(
            f"interrupted; {done} of {len(plan.shards)} shards are finished and kept in {plan.out}, "
            "which does not look like a complete model.",
            hint="Rerun the same command to resume.",
        ) from None
    except OSError as e:
        _discard(current)
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(out.path).free
        raise ResourceError(
            f"the disk is full while writing to {plan.out}: the merged model needs "
            f"{fmt_bytes(plan.out_bytes)} in all and {fmt_bytes(free)} is free now.",
            hint="Free some space and rerun the same command: finished shards are kept.",
        ) from None
    finally:
        lock.release()


def _execute_locked(
    plan: MergePlan,
    out: OutputDir,
    overwrite: bool,
    resume: bool,
    progress: Progress | None,
    current: list[Path],
) -> int:
    journal = Journal.load(out.work)
    if journal is not None and journal.fingerprint != plan.fingerprint and not overwrite:
        # The plan checked this too; another job may have started since.
        check_resumable(out.path, plan.fingerprint, overwrite=False, resume=resume)
    planned = [s.name for s in plan.shards] + list(plan.extra_files) + [CONFIG_NAME]
    if journal is None or journal.fingerprint != plan.fingerprint or not resume or overwrite:
        out.clear(planned)
        journal = Journal(out.work)
        journal.fingerprint = plan.fingerprint
    done = {s.name for s in plan.shards if journal.verified(out.path, s.name)}
    journal.shards = {n: e for n, e in journal.shards.items() if n in done}
    if len(done) < len(plan.shards):
        # Until every shard is back in place OUT must not look complete.
        (out.path / INDEX_NAME).unlink(missing_ok=True)
        journal.status = "running"
    journal.save()

    base = Path(plan.base)
    for name in plan.extra_files:
        out.copy_file(base / name, name)
    if plan.config_update:
        config = json.loads((base / CONFIG_NAME).read_text(encoding="utf-8"))
        config.update(dict(plan.config_update))
        out.write_bytes(CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    else:
        out.copy_file(base / CONFIG_NAME, CONFIG_NAME)
    crashpoint()
    todo = []
    for shard in plan.shards:
        if shard.name in done:
            if progress:
                progress(sum(t.end - t.start for t in shard.tensors))
        else:
            todo.append(shard)

    def commit(result: ShardResult) -> None:
        tmp = out.temp_path(result.name)
        out.commit(tmp, result.name)
        current.remove(tmp)
        crashpoint()
        journal.record(result.name, result.size, result.crc32)
        crashpoint()

    current.extend(out.temp_path(s.name) for s in todo)
    if plan.workers == 0:
        device = torch.device(plan.device)
        for shard in todo:
            if progress:
                progress(shard.name)
            commit(run_shard(shard, out.temp_path(shard.name), device, progress))
    else:
        _run_in_workers(plan, todo, out, progress, commit)
    if plan.index is not None:
        out.write_bytes(
            INDEX_NAME, (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
        )
        crashpoint()
    journal.status = "complete"
    journal.save()
    return len(done)


def _run_in_workers(
    plan: MergePlan,
    todo: list[ShardJob],
    out: OutputDir,
    progress: Progress | None,
    commit: Callable[[ShardResult], None],
) -> None:
    """Shard jobs in spawned worker processes, ``plan.workers`` at a time; commits in the parent."""
    ctx = multiprocessing.get_context("spawn")
    updates = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // plan.workers)
    with ctx.Pool(plan.workers, initializer=_worker_init, initargs=(updates, threads)) as pool:
        pending = [
            pool.apply_async(_worker_run, (shard, str(out.temp_path(shard.name)), plan.device))
            for shard in todo
        ]
        try:
            while pending:
                try:
                    n = updates.get(timeout=0.2)
                    if progress:
                        progress(n)
                except queue.Empty:
                    pass
                for job in [j for j in pending if j.ready()]:
                    pending.remove(job)
                    commit(job.get())  # re-raises the worker's exception here
            while progress and not updates.empty():
                progress(updates.get_nowait())
        except BaseException:
            pool.terminate()
            raise


_updates = None


def _worker_init(updates, threads: int) -> None:
    """Runs in each worker: Ctrl-C is the parent's to handle; die with the parent."""
    global _updates
    _updates = updates
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    torch.set_num_threads(threads)


def _worker_run(shard: ShardJob, tmp: str, device: str) -> ShardResult:
    _updates.put(shard.name)  # the shard being worked on, for the progress bar
    return run_shard(shard, Path(tmp), torch.device(device), _updates.put)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no orphan writes on."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    set_crash_parent()


def _discard(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C while merging (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
