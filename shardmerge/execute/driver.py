"""Runs a MergePlan: holds OUT's lock, skips finished shards, runs shard jobs, commits each."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
import threading
from pathlib import Path

from ..arch.config import apply_config_update
from ..errors import Interrupted, PlanErrors, ResourceError, ShardmergeError, count
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME
from ..io.journal import Journal, OutputLock, check_resumable, crashpoint
from ..io.output import OutputDir, fmt_bytes
from ..report import CARD_NAME, model_card
from .executors import executor_for
from .jobs import MergePlan
from .pipeline import Progress, ShardResult
from .tasks import Executor, ShardTask


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
    return execute_many([plan], overwrite=overwrite, resume=resume, progress=progress)[0]


def execute_many(
    plans: list[MergePlan],
    *,
    overwrite: bool = False,
    resume: bool = True,
    progress: Progress | None = None,
    stats: list[dict] | None = None,
) -> list[int]:
    """Write several merges of the same base at once, reading each base shard once.

    Each plan has its own OUT, lock and journal; returns shards resumed per plan.
    A ``stats`` list is filled with one dict per plan: ``{"max_delta": {kind: float},
    "survival": {tensor: [kept, change, changed, numel]}, "bytes_written": int,
    "already_complete": bool}``, the largest |merged - base| per tensor kind and each
    touched tensor's survival figures (execute/survival.py) over all its shards, resumed
    ones included, the shard bytes this run wrote, and whether an earlier run had
    finished it all (then nothing is written).
    """
    outs = [OutputDir(Path(p.out)) for p in plans]
    locks: list[OutputLock] = []
    current: list[Path] = []
    # Before anything is written: a cluster that cannot be reached is refused here.
    executor = executor_for(plans[0])
    try:
        for out in outs:
            out.create()
            locks.append(OutputLock(out.work))
            locks[-1].acquire()
        with _sigterm_as_interrupt():
            return _execute_locked(
                plans, outs, (overwrite, resume), executor, progress, current, stats
            )
    except KeyboardInterrupt:
        _discard(current)
        raise Interrupted(
            f"interrupted; {_kept(plans, outs)}",
            hint="Rerun the same command to resume.",
        ) from None
    except OSError as e:
        _discard(current)
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(outs[0].path).free
        needed = sum(p.out_bytes for p in plans)
        raise ResourceError(
            f"the disk is full while writing to {', '.join(p.out for p in plans)}: the merged "
            f"model{'s need' if len(plans) > 1 else ' needs'} {fmt_bytes(needed)} in all and "
            f"{fmt_bytes(free)} is free now.",
            hint="Free some space and rerun the same command: finished shards are kept.",
        ) from None
    finally:
        executor.close()
        for lock in locks:
            lock.release()


def _kept(plans: list[MergePlan], outs: list[OutputDir]) -> str:
    """'N of M shards are finished and kept in OUT, ...': what an unfinished merge leaves."""
    done = [len((Journal.load(o.work) or Journal(o.work)).shards) for o in outs]
    where = ", ".join(
        f"{d} of {count(len(p.shards), 'shard')} {'is' if d == 1 else 'are'} finished "
        f"and kept in {p.out}"
        for d, p in zip(done, plans, strict=True)
    )
    return f"{where}, which does not look like a complete model."


def _prepare(
    plan: MergePlan, out: OutputDir, overwrite: bool, resume: bool
) -> tuple[Journal, set, bool]:
    """Journal checks, then the non-weight files; returns the journal, the shards done, and
    whether OUT was already finished (this job's, every file in place: then left untouched).
    """
    # Temporary files of a run that died (a killed driver's, or its cluster tasks'):
    # we hold the lock, so nothing else writes them now.
    for tmp in out.work.glob("*.partial"):
        tmp.unlink(missing_ok=True)
    journal = Journal.load(out.work)
    if journal is not None and journal.fingerprint != plan.fingerprint and not overwrite:
        # The plan checked this too; another job may have started since.
        check_resumable(out.path, plan.fingerprint, overwrite=False, resume=resume, job=plan.job)
    planned = [s.name for s in plan.shards] + list(plan.extra_files) + [CONFIG_NAME, CARD_NAME]
    if resume and not overwrite and _finished(plan, out, journal, planned):
        return journal, {s.name for s in plan.shards}, True
    if journal is None or journal.fingerprint != plan.fingerprint or not resume or overwrite:
        out.clear(planned)
        journal = Journal(out.work)
        journal.fingerprint, journal.job = plan.fingerprint, dict(plan.job)
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
    if plan.config_update or plan.config_drop:
        config = json.loads((base / CONFIG_NAME).read_text(encoding="utf-8"))
        apply_config_update(config, plan.config_update)
        for key in plan.config_drop:
            config.pop(key, None)
        out.write_bytes(CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    else:
        out.copy_file(base / CONFIG_NAME, CONFIG_NAME)
    out.write_bytes(CARD_NAME, model_card(plan).encode())
    crashpoint()
    return journal, done, False


def _finished(plan: MergePlan, out: OutputDir, journal: Journal | None, planned: list[str]) -> bool:
    """Whether OUT holds this job's finished output: complete journal, every file, shards checked."""
    if journal is None or journal.fingerprint != plan.fingerprint or journal.status != "complete":
        return False
    files = planned + ([INDEX_NAME] if plan.index is not None else [])
    if not all((out.path / name).is_file() for name in files):
        return False
    return all(journal.verified(out.path, s.name) for s in plan.shards)


def _execute_locked(
    plans: list[MergePlan],
    outs: list[OutputDir],
    start_over: tuple[bool, bool],
    executor: Executor,
    progress: Progress | None,
    current: list[Path],
    stats: list[dict] | None = None,
) -> list[int]:
    overwrite, resume = start_over
    prepared = [_prepare(p, o, overwrite, resume) for p, o in zip(plans, outs, strict=True)]
    journals = [j for j, _, _ in prepared]
    dones = [d for _, d, _ in prepared]
    finished = [f for _, _, f in prepared]
    written = [0] * len(plans)
    tasks: list[ShardTask] = []
    for si, shard in enumerate(plans[0].shards):
        needing = [k for k, done in enumerate(dones) if plans[k].shards[si].name not in done]
        if needing:
            tasks.append(_task(plans, outs, si, needing))
            current.extend(outs[k].temp_path(shard.name) for k in needing)
        elif progress:
            progress(sum(t.end - t.start for t in shard.tensors))

    def commit(k: int, result: ShardResult) -> None:
        tmp = outs[k].temp_path(result.name)
        outs[k].commit(tmp, result.name)
        current.remove(tmp)
        crashpoint()
        journals[k].record(
            result.name, result.size, result.crc32, result.max_delta, result.survival
        )
        written[k] += result.size
        crashpoint()

    try:
        executor.run(tasks, plans[0].device, progress, commit)
    except ShardmergeError as e:
        # A refusal met while merging (a non-finite output, a DoRA zero norm):
        # OUT keeps its finished shards and never looks complete.
        _discard(current)
        if isinstance(e, PlanErrors):
            raise
        raise type(e)(f"{e.message} {_kept(plans, outs)}", hint=e.hint) from None
    for plan, out, journal, skip in zip(plans, outs, journals, finished, strict=True):
        if skip:
            continue  # finished by an earlier run: nothing to write
        if plan.index is not None:
            out.write_bytes(
                INDEX_NAME, (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
            )
            crashpoint()
        journal.status = "complete"
        journal.save()
    if stats is not None:
        ran = executor.stats()
        stats[:] = [
            {
                "max_delta": _max_delta(j),
                "survival": _survival(j),
                "bytes_written": n,
                "already_complete": f,
                **ran,
            }
            for j, n, f in zip(journals, written, finished, strict=True)
        ]
    return [len(d) for d in dones]


def _max_delta(journal: Journal) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in journal.shards.values():
        for kind, d in (entry.get("max_delta") or {}).items():
            if kind not in out or d > out[kind] or d != d:
                out[kind] = d
    return dict(sorted(out.items()))


def _survival(journal: Journal) -> dict[str, list]:
    """Every touched tensor's [kept, change, changed, numel], from all shards' records."""
    out: dict[str, list] = {}
    for entry in journal.shards.values():
        out.update(entry.get("survival") or {})
    return dict(sorted(out.items()))


def _task(plans: list[MergePlan], outs: list[OutputDir], si: int, needing: list[int]) -> ShardTask:
    """Base shard ``si`` for the outputs that still need it."""
    jobs = tuple(plans[k].shards[si] for k in needing)
    dests = tuple(str(outs[k].temp_path(j.name)) for k, j in zip(needing, jobs, strict=True))
    return ShardTask(tuple(needing), jobs, dests)


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
