"""Resume state for one output folder: a lock, the job's fingerprint, the shards finished.

Lives in ``OUT/.shardmerge/``. A shard is recorded only after its file was
fsynced and renamed into place, with its size and CRC-32; on resume each
recorded shard is checked against both before it is trusted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import signal
import zlib
from pathlib import Path

from ..errors import OutputError, shown
from .jsonfile import parse_json, read_regular_file

WORK_DIR = ".shardmerge"
JOURNAL_NAME = "journal.json"
LOCK_NAME = "lock"
FORMAT = 1


def crc32_file(path: Path, chunk: int = 16 << 20) -> int:
    """CRC-32 of a whole file (zlib releases the GIL, so this overlaps other work)."""
    crc = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


class OutputLock:
    """An exclusive lock on OUT; the kernel drops it when the holder dies, so a stale one is taken over."""

    def __init__(self, work: Path):
        self.path = work / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise self._held() from None
        self._fd = fd
        # The pid is only for the message above; on a full disk the first real
        # write reports ENOSPC properly.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)

    def check(self) -> None:
        """Refuse if another process holds the lock; takes nothing and writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
        except OSError:
            return  # no lock (or OUT is no folder): the output checks say what is wrong
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # dropped when fd closes
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise self._held() from None
        finally:
            os.close(fd)

    def _held(self) -> OutputError:
        try:
            holder = self.path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        return OutputError(
            f"another shardmerge (pid {holder}) is writing to {self.path.parent.parent}.",
            hint="Wait for it to finish, or stop it; a second merge into the same folder is refused.",
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def refuse_if_locked(out: Path) -> None:
    """Refuse at once when another shardmerge holds OUT's lock: checked before any slow work.

    Only a check, which writes nothing: the driver takes the lock for the merge itself.
    """
    OutputLock(out / WORK_DIR).check()


class Journal:
    """The fingerprint of the job writing OUT and the shards it has finished."""

    def __init__(self, work: Path):
        self.path = work / JOURNAL_NAME
        self.fingerprint: str = ""
        self.status: str = "running"
        self.shards: dict[str, dict] = {}
        # What the job is, readable; only for messages (never trusted for a decision).
        self.job: dict = {}

    @classmethod
    def load(cls, work: Path) -> Journal | None:
        """The journal in ``work``; None when there is none, or when it is damaged.

        A damaged journal is set aside here, never trusted: every shard is
        written again. ``check_resumable`` refuses one unless --overwrite.
        """
        try:
            return cls.read(work)
        except OutputError:
            return None

    @classmethod
    def read(cls, work: Path) -> Journal | None:
        """The journal in ``work``, None when there is none; OutputError when it is damaged."""
        j = cls(work)

        def damaged(problem: str) -> OutputError:
            return OutputError(
                f"{j.path}: the resume journal is damaged ({problem}); it cannot be trusted.",
                hint="Pass --overwrite to start this output folder over (every shard is "
                "written again), or choose another folder.",
            )

        try:
            raw = read_regular_file(j.path, damaged)
        except FileNotFoundError:
            return None
        doc = parse_json(raw, damaged)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise damaged(f"not a format-{FORMAT} journal object")
        fingerprint, status, shards = doc.get("fingerprint"), doc.get("status"), doc.get("shards")
        if not isinstance(fingerprint, str) or status not in ("running", "complete"):
            raise damaged("its fingerprint or status has the wrong type")
        if not isinstance(shards, dict):
            raise damaged("'shards' is not an object")
        for name, entry in shards.items():
            problem = _shard_entry_problem(entry)
            if problem:
                raise damaged(f"shards[{shown(name)}] {problem}")
        j.fingerprint, j.status, j.shards = fingerprint, status, shards
        job = doc.get("job")
        j.job = job if isinstance(job, dict) else {}
        return j

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        doc = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "shards": self.shards,
        }
        if self.job:
            doc["job"] = self.job
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: the old journal stands
            raise

    def record(
        self,
        name: str,
        size: int,
        crc: int,
        max_delta: dict | None = None,
        survival: dict | None = None,
    ) -> None:
        """A finished shard, with what its merge measured (kept for the report of a resume).

        ``survival``: per touched tensor [kept, change, changed, numel] (execute/survival.py).
        """
        self.shards[name] = {"size": size, "crc32": crc}
        if max_delta:
            self.shards[name]["max_delta"] = max_delta
        if survival:
            self.shards[name]["survival"] = {
                k: [v if math.isfinite(v) else None for v in r[:2]] + list(r[2:])
                for k, r in survival.items()
            }
        self.save()

    def verified(self, out: Path, name: str) -> bool:
        """True when the recorded shard is on disk with its recorded size and CRC-32."""
        entry = self.shards.get(name)
        file = out / name
        if not entry or not file.is_file():
            return False
        try:
            return file.stat().st_size == entry.get("size") and crc32_file(file) == entry.get(
                "crc32"
            )
        except OSError:
            return False


def _shard_entry_problem(entry: object) -> str | None:
    """Why a journal's shard entry is not ``{"size": int, "crc32": int[, "max_delta": {},
    "survival": {}]}``."""
    if not isinstance(entry, dict):
        return "is not an object"
    for key in ("size", "crc32"):
        value = entry.get(key)
        if type(value) is not int or value < 0:
            return f"has no whole-number {key}"
    deltas = entry.get("max_delta", {})
    if not isinstance(deltas, dict) or not all(
        isinstance(d, (int, float)) and not isinstance(d, bool) for d in deltas.values()
    ):
        return "has a max_delta that is not an object of numbers"
    survival = entry.get("survival", {})
    if not isinstance(survival, dict) or not all(_survival_record_ok(r) for r in survival.values()):
        return "has a survival entry that is not an object of [kept, change, changed, elements]"
    return None


def _survival_record_ok(record: object) -> bool:
    """[kept, change, changed, numel(, new FP8 scales)]: two norms (null if not finite), counts."""
    if not isinstance(record, list) or len(record) not in (4, 5):  # 5th: new FP8 scales
        return False
    norms_ok = all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
        for v in record[:2]
    )
    return norms_ok and all(type(v) is int and v >= 0 for v in record[2:])


def check_resumable(
    out: Path, fingerprint: str, *, overwrite: bool, resume: bool, job: dict | None = None
) -> Journal | None:
    """The journal to resume from, None for a fresh start; refuses a different job's output.

    ``job``: this job's description (planner/provenance.JobParts.description); the
    refusal lists where it differs from the one the journal recorded.
    """
    if overwrite:
        return None  # the journal, damaged or not, is set aside and rewritten
    journal = Journal.read(out / WORK_DIR)
    if journal is None:
        return None
    if journal.fingerprint != fingerprint:
        state = "a finished" if journal.status == "complete" else "an unfinished"
        differs = job_differences(journal.job, job or {})
        what = (
            f": {'; '.join(differs)}"
            if differs
            else " (other base, adapters, weights, dtype or --qlora-base)"
        )
        raise OutputError(
            f"the output folder {out} holds {state} merge of a different job{what}.",
            hint="Rerun that job's own command to resume it, choose another folder, "
            "or pass --overwrite to start over.",
        )
    return journal if resume else None


def job_differences(old: dict, new: dict) -> list[str]:
    """Where two job descriptions differ, as "key old -> new" (keys both have only)."""

    def text(value: object) -> str:
        joined = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        return joined if len(joined) <= 200 else joined[:197] + "..."  # a journal is a file

    return [
        f"{key} {text(old[key])} -> {text(new[key])}"
        for key in new
        if key in old and old[key] != new[key]
    ]


_crash_count = 0
_crash_parent = False


def set_crash_parent() -> None:
    """In a worker process: a crashpoint kills the parent too (the whole merge dies)."""
    global _crash_parent
    _crash_parent = True


def crashpoint() -> None:
    """Fault injection for the crash tests: SIGKILL ourselves at the Nth call.

    Inert unless SHARDMERGE_CRASH_AT is set in the environment.
    """
    global _crash_count
    target = os.environ.get("SHARDMERGE_CRASH_AT")
    if not target:
        return
    _crash_count += 1
    if _crash_count == int(target):
        if _crash_parent:
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
