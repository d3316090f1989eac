"""Executors: where shard tasks run. The one place a new executor plugs in (``executor_for``).

Local ones are here (this process, or spawned worker processes); the Ray
executor is execute/ray_executor.py, imported only when a plan asks for it.
Every executor runs the tasks of execute/tasks.py and hands each result to
``commit`` in the driver's process, so the output bytes and the resume
story do not depend on the executor.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import signal
from pathlib import Path

import torch

from ..errors import InputError
from ..io.journal import set_crash_parent
from ..runtime import cap_torch_threads, threads_per_worker, user_threads
from .jobs import MergePlan
from .pipeline import Progress, ShardResult, run_shards
from .tasks import Commit, Executor, ShardTask


def run_task(task: ShardTask, device: str, progress: Progress | None) -> list[ShardResult]:
    """A task's shard jobs, run here (reading the base shard once for all outputs)."""
    dests = [Path(d) for d in task.dests]
    return run_shards(list(task.jobs), dests, torch.device(device), progress)


class Local:
    """What the local executors share: nothing to let go of, nothing to report."""

    def close(self) -> None:
        return None

    def stats(self) -> dict:
        return {}


class InProcess(Local):
    """Tasks one after another in this process (small models, the smallest budgets)."""

    def run(
        self, tasks: list[ShardTask], device: str, progress: Progress | None, commit: Commit
    ) -> None:
        cap_torch_threads()
        for task in tasks:
            if progress:
                progress(task.jobs[0].name)
            for k, result in zip(task.outputs, run_task(task, device, progress), strict=True):
                commit(k, result)


class ProcessPool(Local):
    """Tasks in spawned worker processes, ``workers`` at a time; commits in the parent."""

    def __init__(self, workers: int):
        self.workers = workers

    def run(
        self, tasks: list[ShardTask], device: str, progress: Progress | None, commit: Commit
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        updates = ctx.Queue()
        # The workers share this process's CPUs (affinity and cgroup quota).
        threads = None if user_threads() else threads_per_worker(self.workers)
        with ctx.Pool(self.workers, initializer=_worker_init, initargs=(updates, threads)) as pool:
            pending = [(t.outputs, pool.apply_async(_worker_run, (t, device))) for t in tasks]
            try:
                while pending:
                    _forward(updates, progress, timeout=0.2)
                    for entry in [e for e in pending if e[1].ready()]:
                        pending.remove(entry)
                        outputs, job = entry
                        # job.get() re-raises the worker's exception here
                        for k, result in zip(outputs, job.get(), strict=True):
                            commit(k, result)
                while progress and not updates.empty():
                    progress(updates.get_nowait())
            except BaseException:
                pool.terminate()
                raise


def executor_for(plan: MergePlan) -> Executor:
    """The executor a plan asks for: a Ray cluster, or its worker count (0: this process).

    Ray is imported only here, only when asked for; connecting refuses an
    unreachable cluster before anything is written.
    """
    if plan.executor == "ray":
        try:
            from .ray_executor import RayExecutor
        except ModuleNotFoundError as e:
            if e.name != "ray":
                raise
            raise InputError(
                "--executor ray needs Ray, which is not installed here.",
                hint="pip install 'shardmerge[ray]' (on the driver and every node of the cluster).",
            ) from None
        return RayExecutor(
            plan.ray_address,
            task_memory=plan.max_memory,
            in_flight=plan.workers,
            gpu=plan.device.startswith("cuda"),
        )
    return InProcess() if plan.workers == 0 else ProcessPool(plan.workers)


def _forward(updates, progress: Progress | None, timeout: float) -> None:
    """One progress update from the workers, if one comes within ``timeout``."""
    try:
        n = updates.get(timeout=timeout)
    except queue.Empty:
        return
    if progress:
        progress(n)


_updates = None


def _worker_init(updates, threads: int | None) -> None:
    """Runs in each worker: Ctrl-C is the parent's to handle; die with the parent; ``threads``
    torch threads (None: the user's OMP_NUM_THREADS, inherited)."""
    global _updates
    _updates = updates
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if threads is not None:
        torch.set_num_threads(threads)


def _worker_run(task: ShardTask, device: str) -> list[ShardResult]:
    _updates.put(task.jobs[0].name)  # the shard being worked on, for the progress bar
    return run_task(task, device, _updates.put)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no orphan writes on."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    set_crash_parent()
