"""The output folder: checks before the first byte, atomic file commits, the index last.

Every file is written under a temporary name inside ``OUT/.shardmerge/``,
fsynced and renamed into place. The index (or, for a one-file model, the
weights file) is committed last, so OUT looks complete only when it is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import OutputError, ResourceError, count
from .checkpoint import CONFIG_NAME, INDEX_NAME
from .journal import WORK_DIR, Journal, check_resumable

_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_dir(
    out: Path,
    base: Path,
    adapters: list[Path],
    *,
    fingerprint: str,
    overwrite: bool,
    resume: bool = True,
    job: dict | None = None,
) -> Journal | None:
    """Refuse an OUT that overlaps an input or holds something we must not clobber.

    Returns the journal of an earlier run of the same job to resume from, or
    None for a fresh start.
    """
    out_r = out.resolve()
    for label, path in [("the base model", base)] + [("an adapter", a) for a in adapters]:
        p = path.resolve()
        if _inside(out_r, p):
            raise OutputError(
                f"the output folder {out} is {'the same as' if out_r == p else 'inside'} "
                f"{label} folder {path}; shardmerge never writes into its inputs.",
                hint="Choose an output folder outside the inputs.",
            )
        if _inside(p, out_r):
            raise OutputError(
                f"{label} folder {path} is inside the output folder {out}; writing there could "
                "destroy the input.",
                hint="Choose an output folder that does not contain the inputs.",
            )
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"the output path {out} exists and is not a folder.",
            hint="Choose a folder path for -o.",
        )
    if out.is_symlink() and not out.exists():
        raise OutputError(
            f"the output path {out} is a symbolic link to {os.readlink(out)}, which does not exist.",
            hint="Create the folder it points to, or choose another path for -o.",
        )
    blocker = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(
            f"the output folder {out} cannot be created: {blocker} is a file, not a folder.",
            hint="Choose another path for -o.",
        )
    if not out.exists():
        return None
    if (out / WORK_DIR).is_dir():
        return check_resumable(out, fingerprint, overwrite=overwrite, resume=resume, job=job)
    entries = [e.name for e in out.iterdir()]
    if not entries or overwrite:
        return None
    holds_model = (out / CONFIG_NAME).exists() or any(
        name.endswith(_MODEL_SUFFIXES) or name == INDEX_NAME for name in entries
    )
    what = "holds a model" if holds_model else f"is not empty ({count(len(entries), 'entry')})"
    raise OutputError(
        f"the output folder {out} {what}.",
        hint="Pass --overwrite to replace it, or choose another folder.",
    )


def check_free_space(out: Path, needed: int, reusable: int = 0) -> None:
    """Refuse before writing when the output would not fit on its disk.

    ``reusable`` counts bytes already in OUT that the merge will keep or replace.
    """
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free + reusable:
        raise ResourceError(
            f"the merged model needs {fmt_bytes(needed)} but only "
            f"{fmt_bytes(free + reusable)} is free at {probe}.",
            hint="Free some space or choose an output folder on another disk.",
        )


def fmt_bytes(n: int) -> str:
    """A size for messages: 3.2 GiB, 12.5 KiB (never a bare "0.00 GiB")."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """An output folder being written."""

    def __init__(self, path: Path):
        self.path = path
        self.work = path / WORK_DIR

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)

    def clear(self, planned: list[str]) -> None:
        """Make OUT stop looking complete, then drop old weights and the files we will write.

        The index goes first so that a crash from here on never leaves an OUT
        that looks complete. Other files of the user's are left alone.
        """
        for name in [INDEX_NAME] + [
            e.name for e in self.path.iterdir() if e.is_file() and e.name.endswith(_MODEL_SUFFIXES)
        ]:
            (self.path / name).unlink(missing_ok=True)
        for name in planned:
            (self.path / name).unlink(missing_ok=True)
        for tmp in self.work.glob("*.partial"):
            tmp.unlink()
        fsync_dir(self.path)

    def temp_path(self, name: str) -> Path:
        return self.work / (name.replace("/", "__") + ".partial")

    def commit(self, tmp: Path, name: str) -> None:
        """fsync ``tmp`` and rename it to OUT/name."""
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        dest = self.path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.temp_path(name)
        try:
            tmp.write_bytes(data)
            self.commit(tmp, name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no partial file
            raise

    def copy_file(self, src: Path, name: str) -> None:
        tmp = self.temp_path(name)
        try:
            shutil.copyfile(src, tmp)
            self.commit(tmp, name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
