"""Files written all at once: whole or not at all, with the permissions the user's umask gives."""
import os
import stat

import pytest
import torch

from alit_fast import ALIT
from alit_fast.files import write_atomic
from alit_fast.inference import TokenBatch
from alit_fast.testing import tiny_config


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_model_and_token_files_get_the_umask_permissions_not_private_ones(tmp_path, umask, mask):
    umask(mask)
    torch.manual_seed(0)
    model = ALIT(tiny_config())
    model.save(str(tmp_path / "model.safetensors"))
    codes = torch.randint(0, 16, (2, 8), dtype=torch.int32)
    codes[0, 4:] = -1
    tokens = TokenBatch(codes=codes, lengths=torch.tensor([4, 8]), codebook_size=16)
    tokens.save(str(tmp_path / "tokens.safetensors"))
    assert _mode(tmp_path / "model.safetensors") == 0o666 & ~mask
    assert _mode(tmp_path / "tokens.safetensors") == 0o666 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_a_write_replaces_the_file_in_one_step(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    write_atomic(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["weights.bin"]


def test_the_new_file_reaches_the_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
    from alit_fast.training.utils import atomic_torch_save

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 3}, target)  # the trainers' checkpoints share the one writer
    tmp = f"{target}.tmp"
    assert events[:2] == [("fsync", tmp), ("replace", tmp)]
    assert events[2] == ("fsync", str(tmp_path))  # then the folder, so the rename itself is kept
    assert torch.load(target, weights_only=True) == {"step": 3}


def test_two_runs_taking_over_one_stale_lock_at_once_leave_the_first_ones_lock(tmp_path, monkeypatch):
    # where the file system has no flock, staleness is judged by pid: the takeover must not race
    import json
    import socket

    from alit_fast import files

    monkeypatch.setattr(files, "fcntl", None)
    lock, here = tmp_path / files.LOCK_NAME, socket.gethostname()
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": here}))  # a killed run's
    os.utime(lock, (1e9, 1e9))
    real = files._read_lock

    def another_run_takes_it_over_meanwhile(path):
        holder = real(path)
        if holder.get("pid") == 2**22 + 12345:  # between this run's read and its removal
            os.remove(path)
            with open(path, "w") as f:
                json.dump({"pid": 1, "host": here, "command": "the other run"}, f)
        return holder

    monkeypatch.setattr(files, "_read_lock", another_run_takes_it_over_meanwhile)
    with pytest.raises(files.FolderBusy, match="the other run, pid 1"):
        files.acquire_lock(tmp_path, "this run")
    assert json.loads(lock.read_text())["pid"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == [lock.name]


def _lock_as_another_process(path):
    """An open file description flocked on ``path``: what another live run holds (flock locks
    belong to the open file description, so this process's own acquire_lock conflicts with it)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_flocked_lock_refuses_by_name_and_is_free_the_moment_its_holder_lets_go(tmp_path):
    import json
    import socket

    from alit_fast import files

    lock, here = tmp_path / files.LOCK_NAME, socket.gethostname()
    fd = _lock_as_another_process(lock)
    os.write(fd, json.dumps({"pid": 1, "host": here, "command": "alit-fast pretokenize", "flock": True}).encode())
    with pytest.raises(files.FolderBusy, match=f"alit-fast pretokenize, pid 1 on {here}"):
        files.acquire_lock(tmp_path, "this run")
    os.close(fd)  # the holder is killed: the kernel lets go of its lock (pid 1 lives on: by pid it would look held)
    path = files.acquire_lock(tmp_path, "this run")
    assert json.loads(lock.read_text())["command"] == "this run"
    files.release_lock(path)
    assert not lock.exists()


def test_a_flock_lock_left_by_a_dead_run_whose_pid_is_reused_is_taken_over(tmp_path):
    # by pid alone a reused pid would look alive forever; the unheld flock says the run is gone
    import json
    import socket

    from alit_fast import files

    lock = tmp_path / files.LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "old run", "flock": True}))
    path = files.acquire_lock(tmp_path, "this run")
    assert json.loads(lock.read_text())["command"] == "this run"
    files.release_lock(path)


def test_three_runs_racing_for_one_lock_leave_exactly_one_holder(tmp_path, monkeypatch):
    """The race the pid scheme lost: two runs take over a stale lock while a third creates a new
    one. With flock, whoever holds the lock holds it; the others are refused."""
    import fcntl

    from alit_fast import files

    lock = tmp_path / files.LOCK_NAME
    lock.write_text('{"pid": 4194305, "host": "gone", "flock": true}')  # a dead run's, on another host
    real = fcntl.flock
    other = []

    def others_arrive(fd, op):  # between this run's open and its flock: one run removes the file, one makes a new one
        if not other:
            other.append(None)
            os.remove(lock)
            other[0] = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            real(other[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", others_arrive)
    with pytest.raises(files.FolderBusy):
        files.acquire_lock(tmp_path, "this run")
    monkeypatch.setattr(files.fcntl, "flock", real)
    with pytest.raises(files.FolderBusy):  # the other run still holds it
        files.acquire_lock(tmp_path, "a third run")
    os.close(other[0])


def test_an_in_process_command_that_did_not_release_its_lock_does_not_block_the_next(tmp_path):
    from alit_fast import files

    files.acquire_lock(tmp_path, "a command that raised")  # never released
    path = files.acquire_lock(tmp_path, "the next command")
    files.release_lock(path)
    assert not (tmp_path / files.LOCK_NAME).exists()


def test_a_lock_recorded_by_another_host_is_never_taken_over(tmp_path):
    # some file systems (NFS with local_lock, Lustre localflock) lock per host only: an unheld
    # flock there says nothing about a run on another host
    import json

    from alit_fast import files

    lock = tmp_path / files.LOCK_NAME
    lock.write_text(json.dumps({"pid": 7, "host": "node7", "command": "alit-fast train", "flock": True}))
    with pytest.raises(files.FolderBusy, match="alit-fast train, pid 7 on node7"):
        files.acquire_lock(tmp_path, "this run")
    assert json.loads(lock.read_text())["host"] == "node7"


@pytest.mark.parametrize("errno_name", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_file_system_without_flock_falls_back_to_the_pid_scheme_and_leaves_no_stray_file(tmp_path, monkeypatch,
                                                                                           errno_name):
    import errno
    import json

    from alit_fast import files

    def no_flock(fd, op):  # what a Lustre noflock mount or an NFS without a lock manager answers
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    for _ in range(2):  # a second run right after the first is not refused as "one starting now"
        path = files.acquire_lock(tmp_path, "this run")
        holder = json.loads((tmp_path / files.LOCK_NAME).read_text())
        assert holder["command"] == "this run" and "flock" not in holder
        files.release_lock(path)
        assert not list(tmp_path.iterdir())


def test_a_lock_that_fails_to_be_written_is_not_left_held(tmp_path, monkeypatch):
    import errno

    from alit_fast import files

    real = os.write

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        files.acquire_lock(tmp_path, "this run")
    monkeypatch.setattr(os, "write", real)
    path = files.acquire_lock(tmp_path, "the next run")  # not refused by a descriptor nobody owns
    files.release_lock(path)


def test_a_lock_file_this_user_cannot_write_is_judged_by_the_pid_scheme(tmp_path, monkeypatch):
    import json
    import socket

    from alit_fast import files

    lock = tmp_path / files.LOCK_NAME
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # another user's, stale
    os.utime(lock, (1e9, 1e9))
    real = os.open

    def not_writable(path, flags, *mode):
        if os.fspath(path) == str(lock) and flags & os.O_RDWR and not flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *mode)

    monkeypatch.setattr(os, "open", not_writable)
    path = files.acquire_lock(tmp_path, "this run")  # taken over by rename, as the folder allows
    assert json.loads(lock.read_text())["command"] == "this run"
    files.release_lock(path)


def test_a_lock_is_released_through_any_spelling_of_its_path(tmp_path):
    from alit_fast import files

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    path = files.acquire_lock(tmp_path / "link", "this run")
    files.release_lock(str(tmp_path / "real" / files.LOCK_NAME))
    assert not (tmp_path / "real" / files.LOCK_NAME).exists()
    files.release_lock(files.acquire_lock(tmp_path / "real", "the next run"))  # nothing was left held
    assert path


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_killed_runs_lock_is_free_at_once_though_its_forked_workers_live_on(tmp_path):
    """DataLoader workers are forked while the run holds its lock: their copies of the descriptor
    must not keep the lock held after the run itself is SIGKILLed."""
    import signal
    import subprocess
    import sys
    import time

    from alit_fast import files

    worker_pid = tmp_path / "worker.pid"
    script = f"""
import os, signal, time
from alit_fast.files import acquire_lock
acquire_lock({str(tmp_path)!r}, "killed run")
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
open({str(worker_pid)!r}, "w").write(str(child))
os.kill(os.getpid(), signal.SIGKILL)
"""
    run = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert run.returncode == -signal.SIGKILL
    worker = int(worker_pid.read_text())
    try:
        assert files._alive(worker)  # the worker outlives the run
        path = files.acquire_lock(tmp_path, "this run")  # FolderBusy while the worker held a copy
        files.release_lock(path)
    finally:
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.05)
