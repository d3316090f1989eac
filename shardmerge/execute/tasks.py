"""Shard tasks: what every executor runs (plain data), and the protocol an executor implements.

A task is one base shard and the outputs still needing it; running it writes
each output's shard to the temporary path it is given and returns one
ShardResult per output. An executor runs tasks in any order and on any
machine that sees the paths, and hands each result to ``commit`` in the
driver's process: the driver alone renames files into place, records the
journal and writes the index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .jobs import ShardJob
from .pipeline import Progress, ShardResult


@dataclass(frozen=True)
class ShardTask:
    """One base shard, planned for each output (by index) still needing it."""

    outputs: tuple[int, ...]
    jobs: tuple[ShardJob, ...]  # the same base shard, one job per output
    dests: tuple[str, ...]  # where each output's shard is written before its commit


# Called in the driver's process with an output's index and that output's result.
Commit = Callable[[int, ShardResult], None]


class Executor(Protocol):
    def run(
        self, tasks: list[ShardTask], device: str, progress: Progress | None, commit: Commit
    ) -> None:
        """Run every task; commit each result; raise the first task's failure."""

    def close(self) -> None:
        """Let go of what the executor holds (a cluster connection); called once, at the end."""

    def stats(self) -> dict:
        """Where the work ran, for the report (empty: this machine)."""
