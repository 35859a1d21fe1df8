"""User errors: what the user got wrong is one line, ``<prog>: <message>``, and exit status 2;
every other exception is a bug and keeps its traceback. Training and the CLI both raise
UsageError, and every command runs through ``run_command``. It sits just above ops because the
option parser refuses a backend that cannot run on this machine at the flag."""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Sequence

import torch

from .files import WRITE_ERRNOS, FolderBusy, WriteIOError
from .ops import BACKENDS, check_backend_here


class UsageError(ValueError):
    """Something the user got wrong (an option, a file): the command prints it as one line,
    ``<prog>: <message>``, and exits with status 2. Every other exception is a bug and keeps its
    traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``<prog>: <message>``, exit 2) like every other
    user error, not a usage block followed by the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = super().parse_known_args(args, namespace)
        backend, device = getattr(parsed, "backend", None), getattr(parsed, "device", None)
        if isinstance(backend, str) and backend in BACKENDS:
            # a backend that cannot run here is refused at the flag, before any work (and before
            # training creates its --out)
            where = torch.device("cpu") if device == "cpu" else None
            try:
                check_backend_here(backend, where)
            except ValueError as exc:
                self.error(f"--backend {backend}: {exc}")
        return parsed, extra


def one_line(message: object) -> str:
    """A message on one line (CheckpointError lists its problems on several)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _raised_in_a_worker(text: str) -> str:
    """The message of a user error raised in a DataLoader worker (an image damaged past its header):
    torch re-raises it with the worker's whole traceback as its message, whose last line is ours."""
    if not (text.startswith("Caught ") and " in DataLoader worker process " in text.split("\n", 1)[0]):
        return text
    last = text.strip().splitlines()[-1]  # "alit_fast.training.data.UnreadableImage: image ... cannot be read"
    return last.split(": ", 1)[-1]


# what Ctrl-C leaves, per command: how to pick up where the run stopped
ON_INTERRUPT = {
    "alit-fast train": ("rerun the command with --resume (in place of --overwrite, if given) to continue from the last "
                        "checkpoint"),
    "alit-fast pretokenize": "rerun the same command to resume: finished shards are kept",
    "alit-fast encode": ("the tokens saved before it (a long run saves every few minutes) are in --out, marked "
                         "partial; rerun the command to encode every image (with --shard-size, finished shards are kept)"),
    "python -m alit_fast.train_vqgan": ("rerun the command with --resume (in place of --overwrite, if given) to continue "
                                        "from the last checkpoint"),
    "alit-fast decode": "the images written so far are kept; rerun the command with --overwrite to write them all",
    "alit-fast evaluate": ("rerun the same command to continue from the progress saved in --out (a long run saves "
                           "every few minutes)"),
}
DEFAULT_ON_INTERRUPT = "rerun the command to start again"


def run_command(
    prog: str, body: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None, speak: bool = True
) -> int:
    """Run a command's body: a UsageError becomes one line on stderr (unless ``speak`` is off, e.g.
    on every torchrun rank but the first, which all see the same error) and exit status 2; Ctrl-C
    becomes one line saying how to resume, and exit status 130 (the shell's for SIGINT)."""
    try:
        return int(body(argv) or 0)
    except (UsageError, FolderBusy) as exc:
        message = one_line(_raised_in_a_worker(str(exc)))
    except OSError as exc:  # a full disk, a read-only or forbidden folder met while writing
        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or isinstance(exc, WriteIOError):
            message = (f"cannot write{where}: {exc.strerror or exc} (nothing half-written is left; files written "
                       "before are kept)")
        elif exc.errno == errno.EIO:  # a failing disk, device or network mount, met reading or writing
            place = f"on{where}" if where else "(no file named)"
            message = (f"input/output error {place}: {exc.strerror or exc} (a disk or file system failed; files "
                       "written before are kept)")
        else:  # a forbidden or read-only place, met past the checks made before the work
            message = f"{exc.strerror or exc}:{where}" if where else str(exc.strerror or exc)
    except KeyboardInterrupt:
        if speak:
            sys.stdout.flush()
            print(f"\n{prog}: interrupted; {ON_INTERRUPT.get(prog, DEFAULT_ON_INTERRUPT)}", file=sys.stderr, flush=True)
        return 130
    if speak:
        sys.stdout.flush()
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return 2

