"""Images read ahead on threads: the order, the failures and the notes of reading them one by one."""
import random
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alit_fast import ALIT
from alit_fast.cli import main as cli_main
from alit_fast.inference import TokenBatch
from alit_fast.io.images import read_in_order
from alit_fast.testing import tiny_config
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


def test_reads_come_back_in_order_with_each_failure_in_its_place():
    def read(i: int) -> int:
        time.sleep(random.Random(i).random() * 0.003)  # later items often finish first
        if i % 7 == 3:
            raise ValueError(f"bad {i}")
        return i * i

    for workers in (0, 1, 4):
        got = list(read_in_order(range(40), read, workers, ahead=8))
        assert [item for item, _, _ in got] == list(range(40))
        assert all((value == i * i and exc is None) if i % 7 != 3 else (value is None and str(exc) == f"bad {i}")
                   for i, value, exc in got)


def test_reading_ahead_is_bounded():
    started, lock, most = [], threading.Lock(), [0]
    consumed = [0]

    def read(i: int) -> int:
        with lock:
            started.append(i)
            most[0] = max(most[0], len(started) - consumed[0])
        return i

    for _ in read_in_order(range(200), read, workers=4, ahead=6):
        consumed[0] += 1
    assert most[0] <= 6 + 1  # the items queued ahead of the one being handed over


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    torch.manual_seed(0)
    ALIT(tiny_config()).save(str(root / "tiny.safetensors"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(13):  # some of other sizes (a note each), one that cannot be decoded
        side = 32 if i % 3 else 40 + i
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    (images / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged past the header")
    return root


@pytest.mark.parametrize("command", ["encode", "pretokenize"])
def test_any_number_of_reading_threads_gives_the_same_tokens_skips_and_notes(folder, tmp_path, capsys, command):
    said = {}
    for workers in ("0", "3"):
        out = tmp_path / f"out{workers}"
        extra = ["--out", str(out)] + (["--shard-size", "4"] if command == "pretokenize" else ["--quiet"])
        argv = [command, str(folder / "images"), "--checkpoint", str(folder / "tiny.safetensors"), "--criterion",
                "tokens:8", "--batch-size", "3", "--workers", workers, "--device", "cpu", *extra]
        if command == "pretokenize":
            argv.remove("--device"), argv.remove("cpu")
        assert cli_main(argv) == 0
        err = capsys.readouterr().err
        said[workers] = [line for line in err.splitlines() if "note:" in line or "skipped" in line]
    assert said["0"] == said["3"] and any("were not 32x32" in line for line in said["0"])
    if command == "encode":
        a, b = TokenBatch.load(tmp_path / "out0"), TokenBatch.load(tmp_path / "out3")
        assert a.names == b.names and torch.equal(a.padded(), b.padded()) and len(a) == 12
    else:
        files = lambda out: {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".stamps.json")}  # noqa: E731
        assert files(tmp_path / "out0") == files(tmp_path / "out3")


def test_a_negative_worker_count_is_refused_in_one_line(folder, tmp_path, capsys):
    assert cli_main(["encode", str(folder / "images"), "--checkpoint", str(folder / "tiny.safetensors"), "--workers", "-1",
                     "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers must be >= 0" in err[0]


def test_a_reader_stopped_early_drops_its_queued_reads_rather_than_running_them():
    # Ctrl-C (or an error in the model) must not wait for every image read ahead
    def slow(i: int) -> int:
        time.sleep(0.2)
        return i

    reads = read_in_order(range(100), slow, workers=2, ahead=20)
    assert next(reads)[0] == 0
    started = time.perf_counter()
    reads.close()
    assert time.perf_counter() - started < 0.5  # not the 19 queued reads (about 2 s on 2 threads)


def test_default_reading_threads_share_the_cores_among_torchruns_local_ranks(monkeypatch):
    from alit_fast.io import images

    monkeypatch.setattr(images.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert images.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert images.default_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert images.default_workers() == 1


def test_an_error_that_is_not_the_images_stops_pretokenize_from_a_reading_thread(folder, tmp_path, monkeypatch):
    import alit_fast.cli.pretokenize as pretokenize_cli

    def broken(source, size):
        raise RuntimeError("a bug, not a bad image")

    monkeypatch.setattr(pretokenize_cli, "read_source", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["pretokenize", str(folder / "images"), "--checkpoint", str(folder / "tiny.safetensors"), "--criterion",
                  "tokens:8", "--workers", "2", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("command", [["pretokenize"], ["encode", "--shard-size", "4"]])
def test_a_negative_worker_count_is_refused_by_the_dataset_commands_too(folder, tmp_path, capsys, command):
    assert cli_main([*command, str(folder / "images"), "--checkpoint", str(folder / "tiny.safetensors"), "--workers", "-1",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers must be >= 0" in err[0]


def test_an_image_pillow_fails_on_without_an_oserror_is_skipped_not_fatal(folder, tmp_path, monkeypatch, capsys):
    # a decompression bomb (a giant panorama in a web data set) raises neither OSError nor ValueError
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 600)  # a 40x40 image is then past twice the limit
    out = tmp_path / "out"
    assert cli_main(["pretokenize", str(folder / "images"), "--checkpoint", str(folder / "tiny.safetensors"),
                     "--criterion", "tokens:8", "--out", str(out)]) == 0
    import json

    skipped = json.loads((out / "index.json").read_text())["skipped"]
    bombs = [reason for reason in skipped.values() if "DecompressionBombError" in reason]
    assert bombs and all("cannot be decoded" in reason for reason in bombs)
