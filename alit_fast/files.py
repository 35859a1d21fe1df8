"""Writing a file all at once: a temporary file beside it, then a rename.

A kill mid-write leaves the old file or the new one, never half of one; the new one is on the
disk before it replaces the old (fsync), so a power cut cannot leave an empty file either. The result gets the
permissions an ordinary ``open()`` would give under the user's umask: safetensors creates its
files private (0600), which on a shared machine hides models and token files from the group the
user meant to share them with.
"""
from __future__ import annotations

import os
from typing import Callable


def _umask() -> int:
    try:  # Linux: readable without touching it (setting it, even briefly, races other threads' files)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it; put it straight back
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file, which is flushed to the disk and then replaces
    ``path``; on error (Ctrl-C included) the temporary file is removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:  # a file system without POSIX modes (vfat, some network mounts)
            pass
        # without it a power cut after the rename can leave an empty file where the old one was
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync(os.path.dirname(os.path.abspath(path)))  # the rename itself


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync (some network and virtual ones)
        pass
    finally:
        os.close(fd)
