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
