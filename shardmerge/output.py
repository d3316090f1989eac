"""The output folder: checks before the first byte, atomic file commits, the index last.

Every file is written under a temporary name inside ``OUT/.shardmerge/``,
fsynced and renamed into place. The index (or, for a one-file model, the
weights file) is committed last, so OUT looks complete only when it is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint import CONFIG_NAME, INDEX_NAME
from .errors import OutputError, ResourceError

WORK_DIR = ".shardmerge"
STATE_NAME = "state.json"
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def read_state(out: Path) -> dict | None:
    try:
        return json.loads((out / WORK_DIR / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None


def check_output_dir(out: Path, base: Path, adapters: list[Path], *, overwrite: bool) -> None:
    """Refuse an OUT that overlaps an input or holds something we must not clobber."""
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
        raise OutputError(f"the output path {out} exists and is not a folder.")
    if not out.exists() or overwrite:
        return
    entries = [e.name for e in out.iterdir() if e.name != WORK_DIR]
    state = read_state(out)
    if state is not None and state.get("status") != "complete":
        return  # an unfinished merge of ours: it is redone
    if not entries:
        return
    holds_model = (out / CONFIG_NAME).exists() or any(
        name.endswith(_MODEL_SUFFIXES) or name == INDEX_NAME for name in entries
    )
    what = "holds a model" if holds_model else f"is not empty ({len(entries)} entries)"
    raise OutputError(
        f"the output folder {out} {what}.",
        hint="Pass --overwrite to replace it, or choose another folder.",
    )


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the output would not fit on its disk."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    existing = sum(f.stat().st_size for f in out.glob("*") if f.is_file()) if out.is_dir() else 0
    if needed > free + existing:
        raise ResourceError(
            f"the merged model needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
            f"is free at {probe}.",
            hint="Free some space or choose an output folder on another disk.",
        )


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

    def prepare(self, *, overwrite: bool, planned: list[str]) -> None:
        """Create OUT and its work folder; on overwrite, first make OUT stop looking complete."""
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            # The index goes first so that a crash from here on never leaves
            # an OUT that looks complete.
            for name in [INDEX_NAME] + [
                e.name
                for e in self.path.iterdir()
                if e.is_file() and e.name.endswith(_MODEL_SUFFIXES)
            ]:
                (self.path / name).unlink(missing_ok=True)
            for name in planned:
                (self.path / name).unlink(missing_ok=True)
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir()
        self.write_state("running")
        fsync_dir(self.path)

    def write_state(self, status: str) -> None:
        tmp = self.work / (STATE_NAME + ".tmp")
        tmp.write_text(json.dumps({"status": status, "pid": os.getpid()}))
        os.replace(tmp, self.work / STATE_NAME)

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
        tmp.write_bytes(data)
        self.commit(tmp, name)

    def copy_file(self, src: Path, name: str) -> None:
        tmp = self.temp_path(name)
        shutil.copyfile(src, tmp)
        self.commit(tmp, name)

    def finish(self) -> None:
        self.write_state("complete")
