"""``python -m shardmerge`` and the ``shardmerge`` command: a quiet Ctrl-C from the first moment."""

from __future__ import annotations

from .runtime import exit_on_interrupt, ignore_interrupt


def entry() -> None:
    """Run the command line; Ctrl-C during start-up exits 130 without a traceback."""
    exit_on_interrupt()  # before the CLI's imports: click now, torch later
    from .cli import main

    try:
        main()
    finally:
        # The command is over and its exit status decided: a Ctrl-C while the
        # interpreter shuts down must not turn it into a death by signal.
        ignore_interrupt()


if __name__ == "__main__":
    entry()
