"""The failures a user can meet, one class per kind.

Each message says what is wrong, where, and what to do. The CLI prints the
message as one paragraph and exits with the class's ``exit_code``; nothing
here is meant to surface as a traceback.
"""

from __future__ import annotations

import reprlib

# Values echoed in messages come from files: a 400-digit number or a nested
# structure must not become a megabyte of error text.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80
_SHOWN.maxlong = 40
_SHOWN.maxother = 80
_SHOWN.maxlevel = 3


def shown(value: object) -> str:
    """A short repr of a value read from a file, for an error message."""
    return _SHOWN.repr(value)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it needs: "1 shard", "6 shards", "1 entry"."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {plural or (noun[:-1] + 'ies' if noun.endswith('ry') else noun + 's')}"


class ShardmergeError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def __reduce__(self):
        # Travels back from worker processes with its hint and exit code intact.
        return _rebuild, (type(self), self.message, self.hint)


def _rebuild(cls, message: str, hint: str | None) -> ShardmergeError:
    return cls(message, hint=hint)


class InputError(ShardmergeError):
    """A model or adapter folder is missing, unreadable or malformed."""

    exit_code = 2


class CorruptFileError(InputError):
    """A safetensors (or legacy .bin) file is damaged or not what it claims to be."""


class IncompatibleAdapterError(ShardmergeError):
    """An adapter does not fit the base model (wrong targets or shapes)."""

    exit_code = 3


class UnsupportedAdapterError(ShardmergeError):
    """An adapter kind or option that shardmerge does not merge (yet)."""

    exit_code = 4


class OutputError(ShardmergeError):
    """The output folder cannot be used as asked (overlaps inputs, holds a model)."""

    exit_code = 5


class ResourceError(ShardmergeError):
    """Not enough memory or disk for the job as planned."""

    exit_code = 6


class Interrupted(ShardmergeError):
    """Ctrl-C or SIGTERM stopped a merge; finished shards are kept for a resume."""

    exit_code = 130


class PlanErrors(ShardmergeError):
    """Several problems found while planning, reported together."""

    def __init__(self, errors: list[ShardmergeError]):
        self.errors = errors
        lines = [f"{len(errors)} problems found; nothing was written:"] if len(errors) > 1 else []
        lines += [f"- {e}" if len(errors) > 1 else str(e) for e in errors]
        super().__init__("\n".join(lines))
        # The most specific exit code of the lot: all the same kind keeps it.
        codes = {e.exit_code for e in errors}
        self.exit_code = codes.pop() if len(codes) == 1 else 1
