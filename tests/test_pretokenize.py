"""`alit-fast pretokenize`: sharded token files plus one index, the same bytes after a kill and a
resume, the same under torchrun as in one process, read back by alit_fast.tokens.open_dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alit_fast.cli import main as cli_main
from alit_fast.cli.demo import DEMO_CRITERION
from alit_fast.inference import TokenBatch
from alit_fast.io import token_dataset as tds
from alit_fast.io.images import load_image
from alit_fast.tokens import open_dataset
from tests._single_thread import one_thread  # noqa: F401

CRITERION = DEMO_CRITERION  # scored: the demo model stops simple images early


@pytest.fixture(autouse=True)
def images_written_long_ago():
    """The images here are written moments before each run; the rule that redoes an image written
    within a file-time tick of its stamp (tested on its own below) would redo every shard. (Its own
    MonkeyPatch: a test's ``monkeypatch.undo()`` leaves it.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tds, "RACY_NS", 0)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from alit_fast.cli.demo import demo_images
    from alit_fast.io.pretrained import pretrained_path

    root = tmp_path_factory.mktemp("pt")
    (root / "model.safetensors").write_bytes(pretrained_path("demo").read_bytes())
    images = root / "images"
    images.mkdir()
    for i, item in enumerate(demo_images(48, per_level=2, photos=False)[:7]):
        array = (item.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(array[: 32 + 2 * i]).save(images / f"{i:02d}.png")  # odd shapes: the crop matters
    return root


def _run(setup: Path, out: Path, *extra: str) -> int:
    return cli_main(["pretokenize", str(setup / "images"), "--checkpoint", str(setup / "model.safetensors"),
                     "--out", str(out), "--shard-size", "3", "--batch-size", "2", "--criterion", CRITERION, *extra])


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_shards_and_index_hold_every_image_in_order(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(setup, out) == 0
    assert sorted(_files(out)) == ["index.json", *(f"shard-{k:05d}.{kind}" for k in range(3)
                                                   for kind in ("safetensors", "stamps.json"))]
    index = json.loads((out / "index.json").read_text())
    assert index["images"] == 7 and [s["images"] for s in index["shards"]] == [3, 3, 1]
    paths = sorted(str(p) for p in (setup / "images").iterdir())
    assert [item[0] for item in index["items"]] == paths
    assert [(item[2], item[3]) for item in index["items"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    # the codes equal a plain encode of the same images
    model = __import__("alit_fast").load(setup / "model.safetensors")
    batch = torch.stack([load_image(p, 32) for p in paths])
    expected = TokenBatch.cat([model.encode(batch[lo : lo + 2], CRITERION) for lo in (0, 3, 6)] +
                              [model.encode(batch[2:3], CRITERION), model.encode(batch[5:6], CRITERION)])
    dataset = open_dataset(out / "index.json")
    by_path = dict(zip([0, 1, 3, 4, 6, 2, 5], range(7)))  # order of the concatenation above
    for i in range(7):
        item = dataset[i]
        assert item.path == paths[i] and item.length == len(item.codes)
        assert torch.equal(item.codes, expected[by_path[i]])
    assert len(set(dataset.lengths)) > 1
    summary = capsys.readouterr().out
    assert "7 images in 3 shards" in summary and "tokens |" in summary


def test_killed_run_resumes_to_the_same_bytes(setup, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert _run(setup, whole) == 0
    out = tmp_path / "killed"
    real_save, saved = TokenBatch.save, []

    def dying_save(self, path):
        if len(saved) == 2:  # the third shard's save dies half-way, leaving its temporary file
            Path(f"{path}.tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        saved.append(path)
        real_save(self, path)

    monkeypatch.setattr(TokenBatch, "save", dying_save)
    assert _run(setup, out) == 130  # Ctrl-C: one line, the shell's status
    monkeypatch.undo()
    assert not (out / "index.json").exists() and (out / "shard-00002.safetensors.tmp").exists()
    assert _run(setup, out) == 0
    assert "2 shards kept from an earlier run" in capsys.readouterr().out
    assert _files(out) == _files(whole)


def test_damaged_shard_is_redone(setup, tmp_path):
    out = tmp_path / "out"
    assert _run(setup, out) == 0
    before = _files(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _run(setup, out) == 0
    assert _files(out) == before


def test_two_process_torchrun_equals_one_process(setup, tmp_path):
    one = tmp_path / "one"
    assert _run(setup, one) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "alit_fast.cli.pretokenize", str(setup / "images"), "--checkpoint", str(setup / "model.safetensors"),
           "--out", str(tmp_path / "two"), "--shard-size", "3", "--batch-size", "2", "--criterion", CRITERION,
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _files(tmp_path / "two") == _files(one)


def test_tar_shards_are_read_member_by_member(setup, tmp_path):
    tar_path = tmp_path / "data.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("03.png", "01.png"):
            tar.add(setup / "images" / name, arcname=f"sample/{name}")
        info = tarfile.TarInfo("sample/01.cls")
        info.size = 1
        import io

        tar.addfile(info, io.BytesIO(b"7"))
    out = tmp_path / "out"
    assert cli_main(["pretokenize", str(tar_path), "--checkpoint", str(setup / "model.safetensors"),
                     "--out", str(out), "--criterion", CRITERION]) == 0
    dataset = open_dataset(out)
    assert [dataset[i].path for i in range(2)] == [f"{tar_path}::sample/03.png", f"{tar_path}::sample/01.png"]
    model = __import__("alit_fast").load(setup / "model.safetensors")
    single = model.encode(load_image(setup / "images" / "03.png", 32)[None], CRITERION)
    assert torch.equal(dataset[0].codes, single[0])


def test_unreadable_images_are_listed_not_dropped(setup, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("00.png", "01.png"):
        (images / name).write_bytes((setup / "images" / name).read_bytes())
    (images / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert cli_main(["pretokenize", str(images), "--checkpoint", str(setup / "model.safetensors"), "--out", str(out),
                     "--criterion", CRITERION]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["images"] == 2 and list(index["skipped"]) == [str(images / "bad.png")]
    assert "1 unreadable" in capsys.readouterr().out


def test_output_with_other_files_or_another_run_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _run(setup, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alit-fast pretokenize: ") and "notes.txt" in err and "\n" not in err
    out2 = tmp_path / "out2"
    assert _run(setup, out2) == 0
    before = _files(out2)
    assert _run(setup, out2, "--shard-size", "2") == 2  # another plan
    assert "--overwrite" in capsys.readouterr().err and _files(out2) == before
    assert _run(setup, out2, "--shard-size", "2", "--overwrite") == 0
    assert len(json.loads((out2 / "index.json").read_text())["shards"]) == 4


@pytest.mark.parametrize("argv,needle", [
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--criterion", "code-acc:7"], "--criterion"),
    (["--criterion", "tokens:5"], "--criterion"),
])
def test_bad_options_are_one_line(setup, tmp_path, capsys, argv, needle):
    assert _run(setup, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alit-fast pretokenize: ") and needle in err and "\n" not in err


def test_open_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="index not found"):
        open_dataset(tmp_path / "nothing.json")
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="not a token dataset index"):
        open_dataset(tmp_path)


def test_encode_with_shard_size_writes_the_same_dataset(setup, tmp_path, capsys):
    assert _run(setup, tmp_path / "a") == 0
    assert cli_main(["encode", str(setup / "images"), "--checkpoint", str(setup / "model.safetensors"),
                     "--out", str(tmp_path / "b"), "--shard-size", "3", "--batch-size", "2",
                     "--criterion", CRITERION]) == 0
    assert _files(tmp_path / "b") == _files(tmp_path / "a")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # argparse's exit, one line
        cli_main(["encode", str(setup / "images"), "--out", str(tmp_path / "c"), "--shard-size", "3", "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alit-fast encode: ") and "--quiet" in err and "\n" not in err


def test_fallback_and_token_bounds_are_part_of_the_plan(setup, tmp_path, capsys):
    assert _run(setup, tmp_path / "a", "--max-tokens", "32") == 0
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert max(item[1] for item in index["items"]) <= 32 and "max_tokens=32" in index["criterion"]
    assert _run(setup, tmp_path / "a") == 2  # another plan in the same directory
    assert _run(setup, tmp_path / "b", "--min-tokens", "40", "--max-tokens", "32") == 2
    assert "--min-tokens 40 is above --max-tokens 32" in capsys.readouterr().err


# ---------------------------------------------------------------------------- resumes and changed images
def _copy_images(setup: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(setup / "images", to))


def _run_on(setup: Path, inputs: list, out: Path, *extra: str, shard_size: str = "3") -> int:
    return cli_main(["pretokenize", *map(str, inputs), "--checkpoint", str(setup / "model.safetensors"),
                     "--out", str(out), "--shard-size", shard_size, "--batch-size", "2", "--criterion", CRITERION,
                     *extra])


@pytest.fixture()
def encoded(monkeypatch) -> list[int]:
    """The shards a run encodes (rather than keeps), in order."""
    import alit_fast.cli.pretokenize as pretokenize_cli

    seen, real = [], pretokenize_cli.encode_shard

    def spy(plan, k, *args):
        seen.append(k)
        return real(plan, k, *args)

    monkeypatch.setattr(pretokenize_cli, "encode_shard", spy)
    return seen


def _later(path: Path, seconds: int = 5) -> None:
    """As if written again a little later (file systems with coarse times included)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_an_image_replaced_in_place_redoes_only_its_shard(setup, tmp_path, encoded, capsys):
    images = _copy_images(setup, tmp_path / "images")
    out = tmp_path / "out"
    assert _run_on(setup, [images], out) == 0
    kept = {name: (out / name).stat().st_mtime_ns for name in ("shard-00000.safetensors", "shard-00002.safetensors")}
    before = _files(out)
    (images / "04.png").write_bytes((setup / "images" / "06.png").read_bytes())  # another image, the same name
    _later(images / "04.png")
    encoded.clear()
    capsys.readouterr()
    assert _run_on(setup, [images], out) == 0
    assert encoded == [1]
    line = capsys.readouterr().out.splitlines()[0]
    assert "2 shards kept from an earlier run; 1 redone because their images changed" in line, line
    after = _files(out)
    assert after["shard-00001.safetensors"] != before["shard-00001.safetensors"]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert all(after[name] == before[name] for name in kept)
    fresh = tmp_path / "fresh"
    assert _run_on(setup, [images], fresh) == 0
    assert after == _files(fresh)  # the new image's tokens, as a run from scratch has them


def test_a_touched_image_with_the_same_bytes_redoes_its_shard_to_the_same_bytes(setup, tmp_path, encoded, capsys):
    # the stamps are metadata (size, modification time): reading every image to hash it would cost
    # about as much as the encode the resume saves, so a touched file is a change, safely
    images = _copy_images(setup, tmp_path / "images")
    out = tmp_path / "out"
    assert _run_on(setup, [images], out) == 0
    before = _files(out)
    _later(images / "02.png")
    encoded.clear()
    capsys.readouterr()
    assert _run_on(setup, [images], out) == 0
    assert encoded == [0] and "1 redone because their images changed" in capsys.readouterr().out
    after = _files(out)
    assert after.pop("shard-00000.stamps.json") != before.pop("shard-00000.stamps.json")  # the new time
    assert after == before


def test_a_shard_without_its_stamps_record_is_redone(setup, tmp_path, encoded, capsys):
    out = tmp_path / "out"
    assert _run(setup, out) == 0
    before = _files(out)
    (out / "shard-00001.stamps.json").unlink()  # as an earlier alit_fast left its shards
    encoded.clear()
    assert _run(setup, out) == 0
    assert encoded == [1] and _files(out) == before
    assert "redone because their images changed" not in capsys.readouterr().out  # they may not have


def test_a_run_killed_before_a_shards_stamps_record_redoes_that_shard(setup, tmp_path, monkeypatch, encoded):
    whole = tmp_path / "whole"
    assert _run(setup, whole) == 0
    out = tmp_path / "killed"
    real = tds.write_atomic

    def dying(path, write):
        if str(path).endswith("shard-00001.stamps.json"):  # killed after the shard, half-way through its record
            Path(f"{path}.tmp").write_text("{")
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(tds, "write_atomic", dying)
    assert _run(setup, out) == 130
    monkeypatch.setattr(tds, "write_atomic", real)
    assert (out / "shard-00001.safetensors").exists() and (out / "shard-00001.stamps.json.tmp").exists()
    encoded.clear()
    assert _run(setup, out) == 0
    assert encoded == [1, 2] and _files(out) == _files(whole)


def test_copies_of_a_data_set_at_other_times_give_the_same_shards_and_index(setup, tmp_path, monkeypatch):
    import shutil

    first = tmp_path / "first"
    _copy_images(setup, first / "images")
    second = Path(shutil.copytree(first, tmp_path / "second"))
    for i, path in enumerate(sorted((second / "images").iterdir())):
        os.utime(path, ns=(10**18 + i, 10**18 + 7 * i))  # other times than the first copy's
    runs = {}
    for copy in (first, second):
        monkeypatch.chdir(copy)  # the same source names ("images/00.png", ...): the same plan
        assert _run_on(setup, ["images"], tmp_path / f"out-{copy.name}") == 0
        runs[copy.name] = _files(tmp_path / f"out-{copy.name}")
    stamps = [name for name in runs["first"] if name.endswith(".stamps.json")]
    assert len(stamps) == 3 and all(runs["first"][name] != runs["second"][name] for name in stamps)
    for run in runs.values():  # the times live in the stamps records alone
        for name in stamps:
            del run[name]
    assert sorted(runs["first"]) == ["index.json", *(f"shard-{k:05d}.safetensors" for k in range(3))]
    assert runs["first"] == runs["second"]


def test_overwrite_removes_another_plans_stamps_records_but_never_a_users_file(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(setup, out) == 0  # shards 0..2 of three images
    assert _run(setup, out, "--shard-size", "4") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run(setup, out, "--shard-size", "4", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", *(f"shard-{k:05d}.{kind}" for k in range(2)
                                                                     for kind in ("safetensors", "stamps.json"))]
    (out / "shard-00007.stamps.json").write_text('{"my": "notes"}')  # looks like ours, is not
    capsys.readouterr()
    for extra in ((), ("--overwrite",)):
        assert _run(setup, out, "--shard-size", "4", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert "did not write (shard-00007.stamps.json)" in err and "\n" not in err
    assert (out / "shard-00007.stamps.json").read_text() == '{"my": "notes"}'


def _tar(path: Path, members: dict[str, bytes], mtime: int = 1_700_000_000) -> Path:
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_member_replaced_redoes_the_tars_shards_and_keeps_the_others(setup, tmp_path, encoded, capsys):
    png = {name: (setup / "images" / name).read_bytes() for name in ("01.png", "03.png", "05.png", "06.png")}
    tar = _tar(tmp_path / "data.tar", {"s/a.png": png["01.png"], "s/b.png": png["03.png"]})
    inputs = [tar, setup / "images" / "05.png"]
    out = tmp_path / "out"
    assert _run_on(setup, inputs, out, shard_size="1") == 0
    before = _files(out)
    _tar(tar, {"s/a.png": png["01.png"], "s/b.png": png["06.png"]})  # b.png re-downloaded as another image
    _later(tar)
    encoded.clear()
    capsys.readouterr()
    assert _run_on(setup, inputs, out, shard_size="1") == 0
    assert encoded == [0, 1]  # the tar changed: each of its members' shards (the file's is kept)
    assert "2 redone because their images changed" in capsys.readouterr().out
    after = _files(out)
    assert after["shard-00002.safetensors"] == before["shard-00002.safetensors"]
    assert after["shard-00001.safetensors"] != before["shard-00001.safetensors"]
    fresh = tmp_path / "fresh"
    assert _run_on(setup, inputs, fresh, shard_size="1") == 0
    assert after == _files(fresh)


def test_a_tar_members_stamp_holds_its_header_as_well_as_the_tars_size_and_time(tmp_path):
    tar = _tar(tmp_path / "d.tar", {"a.png": b"x" * 10, "b.png": b"y" * 10})
    st = tar.stat()
    first = tds.source_stamps([f"{tar}::a.png", f"{tar}::b.png", str(tmp_path / "gone.png")])
    assert first[0] == [f"{tar}::a.png", [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, 10, 1_700_000_000]]
    assert first[2] == [str(tmp_path / "gone.png"), None]  # a missing image is stamped too: its return is a change
    _tar(tar, {"a.png": b"x" * 10, "b.png": b"y" * 10}, mtime=1_700_000_001)  # the same size; reset the tar's time
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = tds.source_stamps([f"{tar}::a.png", f"{tar}::b.png", str(tmp_path / "gone.png")])
    assert tar.stat().st_size == st.st_size and second != first and second[2] == first[2]


def test_a_stamps_record_of_other_shard_bytes_does_not_count(setup, tmp_path, encoded):
    # killed between a redone shard and its record, with the images then put back as they were
    # (a backup restored with its times): the earlier record matches the images, not the shard
    images = _copy_images(setup, tmp_path / "images")
    out = tmp_path / "out"
    assert _run_on(setup, [images], out) == 0
    before, record = _files(out), (out / "shard-00001.stamps.json").read_bytes()
    original, st = (images / "04.png").read_bytes(), (images / "04.png").stat()
    (images / "04.png").write_bytes((setup / "images" / "06.png").read_bytes())
    _later(images / "04.png")
    assert _run_on(setup, [images], out) == 0
    (out / "shard-00001.stamps.json").write_bytes(record)
    (images / "04.png").write_bytes(original)
    os.utime(images / "04.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    encoded.clear()
    assert _run_on(setup, [images], out) == 0
    shards = lambda files: {name: data for name, data in files.items() if not name.endswith(".stamps.json")}  # noqa: E731
    assert encoded == [1] and shards(_files(out)) == shards(before)  # (the record now holds the restored files' ctimes)


def test_an_image_replaced_with_the_same_size_and_modification_time_redoes_its_shard(setup, tmp_path, encoded, capsys):
    # cp -p, rsync -a or a restored backup keep a file's times; an uncompressed format keeps its size
    images = tmp_path / "bmp"
    images.mkdir()
    for i in range(4):
        Image.open(setup / "images" / f"{i:02d}.png").convert("RGB").crop((0, 0, 32, 32)).save(images / f"{i:02d}.bmp")
    out = tmp_path / "out"
    assert _run_on(setup, [images], out, shard_size="2") == 0
    st = (images / "01.bmp").stat()
    (images / "01.bmp").write_bytes((images / "03.bmp").read_bytes())
    os.utime(images / "01.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (images / "01.bmp").stat().st_size == st.st_size and (images / "01.bmp").stat().st_mtime_ns == st.st_mtime_ns
    encoded.clear()
    assert _run_on(setup, [images], out, shard_size="2") == 0
    assert encoded == [0] and "1 redone because their images changed" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert _run_on(setup, [images], fresh, shard_size="2") == 0
    assert TokenBatch.load(out / "shard-00000.safetensors").codes.equal(TokenBatch.load(fresh / "shard-00000.safetensors").codes)


def test_an_image_written_just_before_its_stamp_is_redone_on_resume(setup, tmp_path, encoded, capsys):
    # a file written again within the same file-time tick as its stamp would look unchanged
    images = _copy_images(setup, tmp_path / "images")  # written now: within RACY_NS of the stamps
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tds, "RACY_NS", 3600 * 10**9)
        assert _run_on(setup, [images], out) == 0
    record = json.loads((out / "shard-00000.stamps.json").read_text())
    assert all(stamp[0] == "unsure" for _, stamp in record["sources"])
    encoded.clear()
    capsys.readouterr()
    assert _run_on(setup, [images], out) == 0  # their times now vouch for them: redone once, then kept
    assert encoded == [0, 1, 2] and "3 redone because their images changed" in capsys.readouterr().out
    encoded.clear()
    assert _run_on(setup, [images], out) == 0
    assert encoded == []


def test_an_unreadable_tar_member_is_recorded_the_same_way_in_every_run(setup, tmp_path):
    # Pillow names an in-memory file by its address: the reason must not carry it into the shards
    tar = _tar(tmp_path / "d.tar", {"a.png": (setup / "images" / "01.png").read_bytes(), "bad.png": b"not a png"})
    runs = {}
    for name in ("one", "two"):
        assert _run_on(setup, [tar], tmp_path / name) == 0
        runs[name] = {k: v for k, v in _files(tmp_path / name).items() if not k.endswith(".stamps.json")}
    assert runs["one"] == runs["two"]
    reason = json.loads((tmp_path / "one" / "index.json").read_text())["skipped"][f"{tar}::bad.png"]
    assert reason.startswith(f"bad.png in {tar}: ") and "0x" not in reason


def test_tar_members_read_by_their_offsets_are_the_bytes_tarfile_gives(tmp_path):
    import gzip
    import io

    members = {"a.png": b"first a", "b.png": b"bee" * 300, "a2.png": b"x"}
    tar = _tar(tmp_path / "d.tar", members)
    with tarfile.open(tar, "a") as t:  # a repeated name (the last one counts) and a link to a member
        info = tarfile.TarInfo("a.png")
        info.size = 8
        t.addfile(info, io.BytesIO(b"second a"))
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.LNKTYPE, "b.png"
        t.addfile(link)
    zipped = tmp_path / "z.tar"  # gzip inside a .tar name: no offsets to seek to
    zipped.write_bytes(gzip.compress(tar.read_bytes()))
    for path in (tar, zipped):
        with tarfile.open(path) as t:
            expected = {name: t.extractfile(name).read() for name in ("a.png", "b.png", "a2.png", "link.png")}
        assert expected["a.png"] == b"second a" and expected["link.png"] == members["b.png"]
        assert {name: tds._tar_member_bytes(str(path), name) for name in expected} == expected
    with pytest.raises(OSError, match="gone.png cannot be read from"):
        tds._tar_member_bytes(str(tar), "gone.png")


def test_a_tars_headers_are_read_once_for_all_its_members(tmp_path, monkeypatch):
    # finding a member by name walks the headers before it: per image, a big tar cost O(members)
    tar = _tar(tmp_path / "d.tar", {f"{i:03d}.png": bytes([i]) * 10 for i in range(50)})
    opened, real = [], tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    assert [tds._tar_member_bytes(str(tar), f"{i:03d}.png") for i in range(50)] == [bytes([i]) * 10 for i in range(50)]
    assert len(opened) == 1
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))  # changed: read again
    assert tds._tar_member_bytes(str(tar), "007.png") == bytes([7]) * 10 and len(opened) == 2


@pytest.mark.parametrize("shard_size", ["1", "3"])
def test_the_room_asked_for_covers_what_the_run_writes_with_long_source_names(setup, tmp_path, monkeypatch, shard_size):
    import alit_fast.cli.pretokenize as pretokenize_cli

    deep = tmp_path.joinpath(*["a_rather_long_folder_name"] * 8)  # names of ~250 characters, stored thrice
    deep.parent.mkdir(parents=True)
    images = _copy_images(setup, deep)
    asked, real = [], pretokenize_cli.check_free_space
    monkeypatch.setattr(pretokenize_cli, "check_free_space", lambda path, need, what: asked.append(need) or real(path, need, what))
    out = tmp_path / "out"
    assert cli_main(["pretokenize", str(images), "--checkpoint", str(setup / "model.safetensors"), "--out", str(out),
                     "--shard-size", shard_size, "--criterion", "tokens:8"]) == 0
    written = sum(p.stat().st_size for p in out.iterdir())
    assert len(asked) == 1 and written <= asked[0], (written, asked)


def test_a_users_file_named_like_a_killed_save_is_neither_claimed_nor_removed(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-notes.safetensors.tmp").write_text("mine")
    assert _run(setup, out, "--overwrite") == 2
    assert "did not write (shard-notes.safetensors.tmp)" in capsys.readouterr().err
    assert (out / "shard-notes.safetensors.tmp").read_text() == "mine"


def test_an_image_file_whose_name_holds_the_tar_separator_is_read_as_a_file(setup, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "notes::01.png").write_bytes((setup / "images" / "01.png").read_bytes())
    out = tmp_path / "out"
    assert _run_on(setup, [images], out) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["images"] == 1 and not index["skipped"]
    assert tds.source_stamps([str(images / "notes::01.png")])[0][1][0] == (images / "notes::01.png").stat().st_size


def _written_dataset(folder: Path, continuous: bool, shards: int = 3, per: int = 5) -> tuple[Path, list[torch.Tensor]]:
    """A dataset as pretokenize writes it (shards, index), of seeded random tokens of every length."""
    g = torch.Generator().manual_seed(3)
    plan = tds.Plan(tuple(f"img{i:03d}.png" for i in range(shards * per)), per, "{}", "seeded", "tokens:8", 4)
    everything = []
    for k in range(shards):
        lengths = torch.randint(0, 9, (per,), generator=g)
        seqs = [torch.randn(int(n), 3, generator=g) if continuous else torch.randint(0, 40, (int(n),), generator=g)
                for n in lengths]
        batch = TokenBatch.from_sequences(seqs, 40, names=list(plan.shard_sources(k)), checkpoint="seeded",
                                          extra={"plan": plan.fingerprint, "shard": str(k), "skipped": "{}"})
        batch.save(tds.shard_path(folder, k))
        everything += seqs
    tds.write_index(folder, plan)
    return folder, everything


@pytest.mark.parametrize("continuous", [False, True])
def test_shuffled_reads_give_each_images_codes_and_check_each_shard_once(tmp_path, monkeypatch, continuous):
    folder, expected = _written_dataset(tmp_path, continuous)
    hashed, real = [], tds._file_sha256
    monkeypatch.setattr(tds, "_file_sha256", lambda path: hashed.append(path) or real(path))
    dataset = open_dataset(folder)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    for i in order + order:
        item = dataset[i]
        assert torch.equal(item.codes, expected[i] if continuous else expected[i].to(torch.int64)), i
        assert item.length == len(expected[i]) and item.path == f"img{i:03d}.png"
    assert sorted(p.name for p in hashed) == [f"shard-{k:05d}.safetensors" for k in range(3)]  # once each


def test_a_dataset_keeps_few_shards_open_and_travels_to_workers_without_them(tmp_path, monkeypatch):
    import pickle

    folder, expected = _written_dataset(tmp_path, continuous=False, shards=4)
    monkeypatch.setattr(tds.TokenDataset, "OPEN_FILES", 2)
    dataset = open_dataset(folder)
    for i in reversed(range(len(dataset))):
        assert torch.equal(dataset[i].codes, expected[i].to(torch.int64))
        assert len(dataset._open) <= 2
    copy = pickle.loads(pickle.dumps(dataset))  # a DataLoader worker's (spawn)
    assert not copy._open and torch.equal(copy[7].codes, expected[7].to(torch.int64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda item: item.length)
    assert sorted(loader) == sorted(len(s) for s in expected)


def test_a_shard_replaced_after_it_was_checked_is_refused_not_read_at_its_old_places(tmp_path, monkeypatch):
    folder, expected = _written_dataset(tmp_path, continuous=False, shards=2)
    monkeypatch.setattr(tds.TokenDataset, "OPEN_FILES", 1)  # every change of shard reopens its file
    dataset = open_dataset(folder)
    assert torch.equal(dataset[0].codes, expected[0].to(torch.int64)) and dataset[5].length == len(expected[5])
    other = tmp_path / "other"
    other.mkdir()
    _written_dataset(other, continuous=False, shards=2, per=5)
    replacement = TokenBatch.load(other / "shard-00000.safetensors")
    replacement.lengths = replacement.lengths.flip(0)  # other places for the same images
    replacement.codes = replacement.codes.flip(0)
    replacement.save(folder / "shard-00000.safetensors")  # a new run writing into the folder meanwhile
    with pytest.raises(ValueError, match="was replaced or changed after it was checked against index.json"):
        dataset[1]


def test_a_shard_cut_short_after_it_was_checked_is_refused_in_one_line(tmp_path, monkeypatch):
    # read through a descriptor, not a memory map: a file truncated under it is an error, not a crash
    folder, expected = _written_dataset(tmp_path, continuous=False, shards=1, per=6)
    dataset = open_dataset(folder)
    assert torch.equal(dataset[0].codes, expected[0].to(torch.int64))
    shard = folder / "shard-00000.safetensors"
    with open(shard, "r+b") as f:  # cut in place: the descriptor kept open still names this file
        f.truncate(shard.stat().st_size - sum(len(s) for s in expected[3:]) * 2 - 1)
    with pytest.raises(ValueError, match="cut short after it was checked"):
        for i in range(6):
            dataset[i]


@pytest.mark.skipif(subprocess.run(["tar", "--version"], capture_output=True).returncode != 0, reason="GNU tar")
def test_a_sparse_tar_member_is_read_as_its_contents_not_its_stored_bytes(tmp_path):
    hole = tmp_path / "hole.ppm"
    with open(hole, "wb") as f:
        f.write(b"P6 64 64 255\n")
        f.seek(64 * 64 * 3 - 4096, 1)  # a hole GNU tar stores as nothing
        f.write(os.urandom(4096))
    (tmp_path / "after.bin").write_bytes(os.urandom(64 * 1024))  # bytes that a wrong read would take instead
    tar = tmp_path / "s.tar"
    made = subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(tmp_path), "hole.ppm", "after.bin"],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"GNU tar cannot write sparse members here: {made.stderr[:100]!r}")
    with tarfile.open(tar) as t:
        assert t.getmember("hole.ppm").issparse() or pytest.skip("this file system made no hole")
        expected = t.extractfile("hole.ppm").read()
    assert tds._tar_member_bytes(str(tar), "hole.ppm") == expected == hole.read_bytes()
