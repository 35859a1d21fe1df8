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
    import json
    import socket

    from alit_fast import files

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
