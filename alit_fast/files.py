"""Writing a file all at once: a temporary file beside it, then a rename.

A kill mid-write leaves the old file or the new one, never half of one; the new one is on the
disk before it replaces the old (fsync), so a power cut cannot leave an empty file either. The result gets the
permissions an ordinary ``open()`` would give under the user's umask: safetensors creates its
files private (0600), which on a shared machine hides models and token files from the group the
user meant to share them with.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from typing import Callable

try:
    import fcntl
except ImportError:  # not POSIX: locks by pid alone
    fcntl = None

# the errors a full disk, a quota, a read-only mount or a forbidden folder give a writer: user
# conditions, reported in one line by the commands (alit_fast.training.utils.run_command)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)


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


class WriteIOError(OSError):
    """An I/O error (EIO) known to come from writing: worded "cannot write" by the commands, where
    a bare EIO, which a failing disk also gives a reader, is not."""


def as_os_error(exc: BaseException, path: str) -> BaseException:
    """An OSError naming ``path`` for a writer's failure that is really one (safetensors'
    SafetensorError carries ``Os { code: 28 ...}`` or, from 0.5 on, ``(os error 28)``; torch.save's
    stream writer an ``unexpected pos``; a file object's write no file name), else ``exc`` itself.
    An EIO comes back as a WriteIOError."""
    if isinstance(exc, OSError):
        if exc.errno == errno.EIO and not isinstance(exc, WriteIOError):
            return WriteIOError(errno.EIO, exc.strerror, exc.filename or path)
        return exc if exc.filename or exc.errno is None else OSError(exc.errno, exc.strerror, path)
    text = str(exc)
    code = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", text)
    if code:
        number = int(code.group(1) or code.group(2))
        return (WriteIOError if number == errno.EIO else OSError)(number, os.strerror(number), path)
    if "unexpected pos" in text or "PytorchStreamWriter failed" in text:
        return WriteIOError(errno.EIO, "the write failed (is the disk full?)", path)
    return exc


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file, which is flushed to the disk and then replaces
    ``path``; on error (Ctrl-C included) the temporary file is removed (the old ``path`` is kept)
    and a writer's disguised I/O error is raised as an OSError."""
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
    except Exception as exc:
        converted = as_os_error(exc, path)
        if converted is exc:
            raise
        raise converted from exc
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


# ---------------------------------------------------------------------------- one run per folder
LOCK_NAME = ".alit_fast.lock"


class FolderBusy(RuntimeError):
    """Another live run holds the output folder's lock."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def acquire_lock(folder: str | os.PathLike, what: str, name: str = LOCK_NAME) -> str:
    """Take ``folder``'s lock file (holding pid, host and command), or raise FolderBusy naming its
    holder. Returns the lock's path for ``release_lock``.

    Where the file system has ``flock`` the kernel (or the NFS lock manager) holds the lock for as
    long as this process keeps the file open: a killed run's lock on this host is free at once,
    whatever its pid became since, and racing runs leave one holder. Elsewhere a lock whose process
    is gone from this host is judged stale and taken over. A lock recorded by another host is never
    taken over (some file systems lock per host only): remove it by hand if that run is gone."""
    path = os.path.join(os.fspath(folder), name)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": what, "since": time.time()}
    _let_go(path)  # this process's own, left by an earlier command run in-process that ended by an exception
    taken = _acquire_flock(folder, path, mine)
    return taken if taken is not None else _acquire_by_pid(folder, path, mine)


# the locks this process holds by flock: real path -> the open descriptor that holds it
_HELD: dict[str, int] = {}
# what a file system without flock (or with it switched off) answers
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _forget_inherited_locks() -> None:
    """In a forked child (DataLoader workers, multiprocessing): drop its copies of the lock
    descriptors. A flock lasts while any copy is open, so a SIGKILLed run's lock would otherwise
    stay held until its workers exit. Closing a copy, unlike unlocking, leaves the parent's lock."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def _open_lock_file(folder, path: str) -> tuple[int, bool] | None:
    """(descriptor, whether this call created the file); None where it cannot be opened for
    writing (another user's lock: the pid scheme judges it by renaming, as the folder allows)."""
    for _ in range(3):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # released meanwhile: again
            continue
        except PermissionError:
            return None
    raise FolderBusy(f"{folder}: could not take the lock {path}")


def _acquire_flock(folder, path: str, mine: dict) -> str | None:
    """The lock by flock; None where the file system has none (or the file is another user's)."""
    if fcntl is None:
        return None
    for _ in range(3):
        opened = _open_lock_file(folder, path)
        if opened is None:
            return None
        fd, created = opened
        try:
            taken = _take_flocked(folder, path, mine, fd, created)
        except BaseException:
            os.close(fd)  # never a held lock left without an owner, whatever went wrong
            raise
        if taken is None:
            return None
        if taken:
            _HELD[os.path.realpath(path)] = fd
            return path
        os.close(fd)
    raise FolderBusy(f"{folder}: could not take the lock {path}")


def _take_flocked(folder, path: str, mine: dict, fd: int, created: bool) -> bool | None:
    """Lock ``fd`` and write this run into it: True; False to try again (the file was replaced
    meanwhile); None where the file system has no flock. Raises FolderBusy for a live holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _busy(folder, path, _read_lock(path)) from None
        if exc.errno in _NO_FLOCK:
            if created and _inode(path) == _inode(fd):  # the empty file this call made: not a lock
                os.remove(path)
            return None
        raise
    if _inode(path) != _inode(fd):  # removed or replaced between the open and the lock
        return False
    holder = _read_lock(path)
    # a run that locks by pid alone (an older version), or one on another host, may still be there
    if holder and (not holder.get("flock") or holder.get("host") != mine["host"]) and _holder_alive(holder):
        raise _busy(folder, path, holder)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({**mine, "flock": True}).encode())
    return True


def _acquire_by_pid(folder, path: str, mine: dict) -> str:
    """The lock as an exclusively created file, judged stale by its holder's pid and host."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = _stamp(path)
            holder = _read_lock(path)
            if seen is None:  # released meanwhile
                continue
            # stale: its process is gone, or it is this process's own (an earlier command run
            # in-process that ended by an exception), or it was never filled in by a killed run
            if (holder and not _holder_alive(holder)) or (not holder and _age(path) > 10):
                _remove_stale(path, seen)  # a killed run's lock
                continue
            raise _busy(folder, path, holder) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine))
        return path
    raise FolderBusy(f"{folder}: could not take the lock {path}")


def _holder_alive(holder: dict) -> bool:
    """Whether a lock's recorded holder may still run: another host's cannot be judged from here."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1)) if str(holder.get("pid", "")).lstrip("-").isdigit() else -1
    return pid != os.getpid() and _alive(pid)


def _busy(folder, path: str, holder: dict) -> FolderBusy:
    who = (f"{holder.get('command', '?')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder
           else "one starting now")
    return FolderBusy(f"{folder} is in use by another run ({who}); wait for it, or remove {path} if that run is gone")


def _let_go(path: str) -> None:
    """Release this process's flock on ``path`` without removing the file (it is taken again next)."""
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)


def _inode(path_or_fd: "str | int") -> tuple[int, int] | None:
    """Which file a path names now, or an open descriptor holds (None: no file at the path)."""
    try:
        st = os.stat(path_or_fd)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _stamp(path: str) -> tuple[int, int] | None:
    """Which file ``path`` is now (inode, modification time); None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _remove_stale(path: str, seen: tuple[int, int]) -> None:
    """Remove the lock file judged stale when it was ``seen``. Two runs may judge one stale lock at
    once: the first takes it over with a new lock, which the second must not remove, so the file is
    first moved aside (atomic) and put back when it is no longer the one judged."""
    aside = f"{path}.stale{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # the other run removed it first
        return
    if _stamp(aside) != seen:  # a live run's new lock: back in place (the caller then finds it busy)
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.remove(aside)


def _read_lock(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # empty: being written now, or by a run killed then
        return {}


def _age(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def release_lock(path: str) -> None:
    """Remove the lock if it is still this process's."""
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        try:
            if _inode(path) == _inode(fd):  # still ours: remove it
                os.remove(path)  # while still holding it, so that nobody takes the file being removed
        except OSError:
            pass
        finally:
            os.close(fd)
        return
    holder = _read_lock(path)  # the pid scheme's lock: this process's only if pid and host say so
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname() and not holder.get("flock"):
        try:
            os.remove(path)
        except OSError:
            pass
