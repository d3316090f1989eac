"""A seeded fuzz of every file a merge reads: a refusal with a documented code, never exit 70.

Each case damages one input of the tiny workspace from test_bad_input.py (a
shard header, config.json, the index, adapter_config.json, the adapter's
header, OUT's journal) or puts a filesystem oddity in a file's place, runs
``shardmerge merge`` in-process under an alarm (a hang fails the case), and
checks: exit 0 or a documented refusal code, a message naming the damaged
file's folder, no traceback, the inputs' bytes unchanged, and an OUT that
does not look complete after a refusal. Seeds are fixed, so a failure
reproduces; the whole file runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_bad_input import INDEX, SHARD1, SHARD2, Workspace, assert_not_complete

from shardmerge.cli import main

REFUSAL_CODES = {2, 3, 4, 5, 6}  # README "Exit codes"
CASE_SECONDS = 20  # a case that takes longer is a hang
CASES_PER_KIND = 25

ODD_VALUES: list[object] = [
    None, True, -1, 0, 2**70, 10**400, 1e308, -0.5, "", "F32", "x" * 300, [], [1, "a"], {},
    {"a": {"b": [None]}}, json.loads("[" * 80 + "]" * 80),
]  # fmt: skip


class CaseHung(BaseException):
    """Raised by the alarm; a BaseException so no handler of ours turns it into an exit code."""


@contextlib.contextmanager
def alarm(seconds: int):
    def hung(signum, frame):
        raise CaseHung(f"the case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _slots(doc: object) -> list[tuple[object, object]]:
    """Every (container, key) inside ``doc``, at any depth."""
    slots: list[tuple[object, object]] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for key in keys:
            slots.append((node, key))
            if isinstance(node[key], (dict, list)) and node[key]:
                stack.append(node[key])
    return slots


def _mutate_doc(doc: object, rng: random.Random) -> object:
    """``doc`` with one value anywhere inside it replaced by an odd one, or deleted."""
    slots = _slots(doc) if isinstance(doc, (dict, list)) else []
    if not slots or rng.random() < 0.05:
        return rng.choice(ODD_VALUES)
    container, key = rng.choice(slots)
    if isinstance(container, dict) and rng.random() < 0.15:
        del container[key]
    else:
        container[key] = rng.choice(ODD_VALUES)
    return doc


def _damage_bytes(data: bytes, rng: random.Random) -> bytes:
    """Truncated, a few bytes changed, or a slice repeated."""
    how = rng.randrange(3)
    if how == 0:
        return data[: rng.randrange(len(data))]
    if how == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    i = rng.randrange(len(data))
    return data[:i] + data[i : i + rng.randint(1, 64)] * 3 + data[i:]


def damage_json_file(path: Path, rng: random.Random) -> None:
    if rng.random() < 0.7:
        path.write_text(json.dumps(_mutate_doc(json.loads(path.read_text()), rng)))
    else:
        path.write_bytes(_damage_bytes(path.read_bytes(), rng))


def damage_header(path: Path, rng: random.Random) -> None:
    """A safetensors file with its header JSON mutated (data kept) or its bytes damaged."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    if rng.random() < 0.3:
        path.write_bytes(_damage_bytes(blob[: 8 + n], rng) + blob[8 + n :])
        return
    raw = json.dumps(_mutate_doc(json.loads(blob[8 : 8 + n]), rng)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def put_oddity(path: Path, rng: random.Random) -> None:
    """A folder, a FIFO or a symlink loop where the file was."""
    path.unlink()
    kind = rng.choice(["folder", "fifo", "loop"])
    if kind == "fifo":
        try:
            os.mkfifo(path)
            return
        except OSError:
            kind = "folder"  # no FIFOs on this filesystem
    if kind == "loop":
        path.symlink_to(path.name)
    else:
        path.mkdir()


def _targets(ws: Workspace) -> dict[str, Path]:
    return {
        "config": ws.base / "config.json",
        "index": ws.base / INDEX,
        "shard1": ws.base / SHARD1,
        "shard2": ws.base / SHARD2,
        "adapter_config": ws.adapter / "adapter_config.json",
        "adapter_weights": ws.adapter / "adapter_model.safetensors",
    }


Damage = Callable[[Path, random.Random], None]
KINDS: dict[str, tuple[str, Damage]] = {
    "config": ("config", damage_json_file),
    "index": ("index", damage_json_file),
    "header": ("shard1", damage_header),
    "header2": ("shard2", damage_header),
    "adapter_config": ("adapter_config", damage_json_file),
    "adapter_header": ("adapter_weights", damage_header),
    "oddity_config": ("config", put_oddity),
    "oddity_shard": ("shard2", put_oddity),
    "oddity_adapter": ("adapter_config", put_oddity),
}


def _snapshot(root: Path) -> dict[str, object]:
    """What each entry under ``root`` is: file bytes, or the kind of a non-file (never read)."""
    snap: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            is_file = p.is_file() and not p.is_symlink()
            snap[str(p.relative_to(root))] = p.read_bytes() if is_file else st.st_mode
    return snap


def _merge(ws: Workspace, *args: str):
    argv = ["merge", str(ws.base), str(ws.adapter), "-o", str(ws.out), "-q", *args]
    with alarm(CASE_SECONDS):
        return CliRunner().invoke(main, argv, catch_exceptions=True)


def _check(ws: Workspace, result, target: Path, before: dict) -> None:
    assert isinstance(result.exception, (SystemExit, type(None))), (
        f"uncaught {result.exception!r}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert _snapshot(ws.inputs) == before, "an input was changed"
    if result.exit_code == 0:
        return  # the damage left a valid input (a value nothing reads)
    assert result.exit_code in REFUSAL_CODES, f"exit {result.exit_code}:\n{result.output}"
    assert str(target.parent) in result.stderr, f"the message names no file:\n{result.stderr}"
    assert_not_complete(ws.out)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fuzz_one_input(tmp_path, kind):
    which, damage = KINDS[kind]
    for case in range(CASES_PER_KIND):
        rng = random.Random(f"{kind}-{case}")
        ws = Workspace(tmp_path / str(case))
        target = _targets(ws)[which]
        damage(target, rng)
        before = _snapshot(ws.inputs)
        _check(ws, _merge(ws), target, before)


@pytest.mark.parametrize("case", range(12))
def test_fuzz_journal(tmp_path, case):
    """A damaged journal in an unfinished OUT: refused naming it, or resumed when still valid."""
    rng = random.Random(f"journal-{case}")
    ws = Workspace(tmp_path)
    assert _merge(ws).exit_code == 0
    journal = ws.out / ".shardmerge" / "journal.json"
    (ws.out / INDEX).unlink()  # unfinished, as a crash leaves it
    if case == 11:
        put_oddity(journal, rng)
    else:
        damage_json_file(journal, rng)
    before = _snapshot(ws.inputs)
    result = _merge(ws)
    _check(ws, result, journal, before)
    if result.exit_code == 0:
        assert (ws.out / INDEX).is_file()
