"""The one JSON reader: bounded in size and nesting depth, errors naming the file.

Every JSON document shardmerge reads (config.json, the shard index,
adapter_config.json, safetensors headers and their metadata, OUT's journal,
a provenance record) goes through ``parse_json`` or ``read_json_file``, so a
hostile or damaged file is a refusal naming it, never a RecursionError deep
in the standard library or a reader blocked on a FIFO.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, ShardmergeError

# Real configs, indexes and headers nest 3-5 levels; 64 leaves room and stays far
# below the interpreter's recursion limit, which the stdlib parser would hit.
MAX_JSON_DEPTH = 64
# The reference safetensors limit for headers; also ample for the largest index.
MAX_JSON_BYTES = 100_000_000

ErrorFactory = Callable[[str], ShardmergeError]


def json_depth_problem(doc: object, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``doc`` nests too deeply (None when it does not); iterative, so any depth is safe."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > limit:
            return f"it nests deeper than {limit} levels"
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return None


def parse_json(
    text: str | bytes, error: ErrorFactory, *, object_pairs_hook: Callable | None = None
) -> object:
    """Parse a JSON document; anything wrong is ``error(what)``: invalid, too deep or too big."""
    if len(text) > MAX_JSON_BYTES:
        raise error(f"it is {len(text)} bytes, more than the {MAX_JSON_BYTES} accepted")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        # The stdlib parser recurses per level; far past our own limit anyway.
        raise error(f"it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"not valid JSON ({str(e)[:200]})") from None
    problem = json_depth_problem(doc)
    if problem:
        raise error(problem)
    return doc


def read_regular_file(path: Path, error: ErrorFactory, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Opened without blocking and checked with fstat, so a FIFO or a folder in
    its place is refused rather than read (a FIFO would block forever).
    Raises FileNotFoundError when nothing is there; every other problem is ``error``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"it cannot be opened ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error("it is not a regular file")
        if st.st_size > limit:
            raise error(f"it is {st.st_size} bytes, more than the {limit} accepted")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:  # grown since fstat
                raise error(f"it is more than the {limit} bytes accepted")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"it cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_json(path: Path, what: str, hint: str | None = None) -> dict:
    """Read a JSON object from ``path``; errors name the file and what it is for."""

    def error(problem: str) -> InputError:
        return InputError(f"{path}: {what} cannot be used: {problem}.", hint=hint)

    try:
        raw = read_regular_file(path, error)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} is missing.", hint=hint) from None
    doc = parse_json(raw, error)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: {what} must be a JSON object.", hint=hint)
    return doc
