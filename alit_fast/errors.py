"""User errors: what the user got wrong is one line, ``<prog>: <message>``, and exit status 2;
every other exception is a bug and keeps its traceback. A leaf: training and the CLI both raise
UsageError, and every command runs through ``run_command``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class UsageError(ValueError):
    """Something the user got wrong (an option, a file): the command prints it as one line,
    ``<prog>: <message>``, and exits with status 2. Every other exception is a bug and keeps its
    traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``<prog>: <message>``, exit 2) like every other
    user error, not a usage block followed by the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def one_line(message: object) -> str:
    """A message on one line (CheckpointError lists its problems on several)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_command(
    prog: str, body: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None, speak: bool = True
) -> int:
    """Run a command's body: a UsageError becomes one line on stderr (unless ``speak`` is off, e.g.
    on every torchrun rank but the first, which all see the same error) and exit status 2."""
    try:
        return int(body(argv) or 0)
    except UsageError as exc:
        if speak:
            sys.stdout.flush()
            print(f"{prog}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
