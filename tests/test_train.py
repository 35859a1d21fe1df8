"""Training: loss goes down on both backends, exact resume, DDP (2 processes, gloo), checkpoints,
NaN handling, the datasets and the base cache."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import alit_fast
from alit_fast import ALIT
from alit_fast.training.base_cache import BaseCacheDataset
from alit_fast.cli.cache_base import main as cache_main
from alit_fast.training.data import (
    ImageFolder,
    Mixture,
    SyntheticImages,
    random_resized_crop,
    random_resized_crop_box,
)
from alit_fast.testing import tiny_config
from alit_fast.training.train import EXIT_NONFINITE
from alit_fast.training.train import main as train_main


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(dataclasses.asdict(tiny_config())))
    return str(path)


def _run(tiny_json: str, out: Path, *extra: str) -> int:
    argv = ["--config", tiny_json, "--data", "synthetic", "--data-length", "16", "--batch-size", "4",
            "--lr", "3e-3", "--threads", "1", "--no-progress", "--out", str(out), *extra]
    return train_main(argv)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_few_steps_lower_the_loss(tiny_json, tmp_path, backend):
    # the triton kernels run in the interpreter on CPUs: a smaller run
    steps, n = ("8", "4") if backend == "torch" else ("2", "2")
    try:
        ALIT(tiny_config()).set_backend(backend)
    except NotImplementedError:
        pytest.skip(f"backend {backend} not implemented yet")
    # one fixed batch: the loss on it must fall
    rc = _run(tiny_json, tmp_path, "--backend", backend, "--steps", steps, "--data-length", n, "--batch-size", n,
              "--warmup", "0", "--halting", "off", "--lr", "1e-2")
    assert rc == 0
    losses = [r["loss"] for r in _log(tmp_path)]
    assert len(losses) == int(steps)
    assert losses[-1] < losses[0] * 0.97, losses
    assert all(set(r["per_iteration"]) == {"0", "1", "2"} for r in _log(tmp_path))


def test_resume_is_exact(tiny_json, tmp_path):
    # 16 items / batch 4 = 4 steps per epoch: the split at step 3 is mid-epoch and the run crosses
    # an epoch; halting and iteration sampling exercise the model's random stream
    common = ("--steps", "6", "--halting", "stochastic", "--sample-grad-iters", "2", "--save-every", "100", "--ema", "0.9",
              "--restart-dead-codes", "2")
    assert _run(tiny_json, tmp_path / "full", *common) == 0
    assert _run(tiny_json, tmp_path / "split", *common, "--stop-at", "3") == 0
    assert len(_log(tmp_path / "split")) == 3
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert _run(tiny_json, tmp_path / "split", *common, "--resume") == 0
    full, split = _log(tmp_path / "full"), _log(tmp_path / "split")
    keys = ("step", "loss", "per_iteration", "nll", "lr", "codes_moved")
    assert [{k: r[k] for k in keys} for r in full] == [{k: r[k] for k in keys} for r in split]
    assert sum(r["codes_moved"] for r in full) > 0
    a = alit_fast.load(tmp_path / "full" / "ema.safetensors")
    b = alit_fast.load(tmp_path / "split" / "ema.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_cpu_resume_on_other_threads_continues_and_says_it_matches_only_to_rounding(tiny_json, tmp_path, capsys):
    common = ("--steps", "3", "--halting", "off", "--save-every", "100")
    assert _run(tiny_json, tmp_path, *common, "--stop-at", "1") == 0
    threads = torch.get_num_threads()
    try:
        assert _run(tiny_json, tmp_path, *common, "--resume", "--threads", "2") == 0
    finally:
        torch.set_num_threads(threads)
    said = capsys.readouterr().out
    assert "computed on 1 CPU threads and this one on 2" in said and "only to rounding" in said


def test_checkpoints_load(tiny_json, tmp_path):
    assert _run(tiny_json, tmp_path, "--steps", "2", "--halting", "off") == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and {"model", "ema", "optimizer", "scheduler", "rng", "generator"} <= set(ckpt)
    model = alit_fast.load(tmp_path / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
    ema = alit_fast.load(tmp_path / "ema.safetensors")
    assert ema.config == model.config == tiny_config()
    # the VQGAN is frozen: it never leaves its initial values
    assert alit_fast.load_official(tmp_path / "checkpoint.pt").config.width == tiny_config().width


def test_init_loads_only_the_vqgan(tiny_json, tmp_path):
    donor = ALIT(tiny_config())
    torch.nn.init.normal_(donor.base_tokenizer.codebook)
    from safetensors.torch import save_file

    save_file({f"base_tokenizer.{k}": v.contiguous() for k, v in donor.base_tokenizer.state_dict().items()},
              str(tmp_path / "vq.safetensors"))
    assert _run(tiny_json, tmp_path / "run", "--steps", "1", "--halting", "off", "--init", str(tmp_path / "vq.safetensors"),
                "--linear-init-std", "0.1") == 0
    trained = alit_fast.load(tmp_path / "run" / "model.safetensors")
    assert torch.equal(trained.base_tokenizer.codebook, donor.base_tokenizer.codebook)
    assert 0.05 < float(trained.decoder.ffn[0].weight.detach().std()) < 0.15  # re-initialised, then one small step


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tiny_json, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = ALIT.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ALIT, "forward", poisoned)
    rc = _run(tiny_json, tmp_path, "--steps", "5", "--save-every", "2", "--halting", "off")
    assert rc == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 3" in err and "(step 2)" in err
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "model.safetensors").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from alit_fast.training import utils as train_utils

    path = tmp_path / "checkpoint.pt"
    train_utils.atomic_torch_save({"step": 1}, path)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_utils.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        train_utils.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}


def test_torchrun_two_processes_agree(tiny_json, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alit_fast.train",
           "--config", tiny_json, "--data", "synthetic", "--data-length", "16", "--batch-size", "2", "--steps", "2",
           "--lr", "3e-3", "--halting", "stochastic", "--sample-grad-iters", "1", "--restart-dead-codes", "1",
           "--no-progress", "--weights-digest",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digests = dict(re.findall(r"rank (\d) weights sha256 ([0-9a-f]{64})", proc.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    log = _log(tmp_path)
    assert len(log) == 2 and log[0]["codes_moved"] > 0  # rank 0 alone writes the log
    assert alit_fast.load(tmp_path / "model.safetensors").config == tiny_config()


def test_torchrun_stops_every_rank_together_when_one_rank_sees_nan(tiny_json, tmp_path):
    # one cached latent is NaN, so only the rank that draws it goes bad; before the loss and the
    # health flag were read together, that rank raised inside the VQ and the other hung
    torch.manual_seed(0)
    ALIT(tiny_config()).save(str(tmp_path / "init.safetensors"))
    cache = tmp_path / "cache"
    assert cache_main(["--data", "synthetic", "--data-length", "8", "--out", str(cache), "--init",
                       str(tmp_path / "init.safetensors")]) == 0
    z = np.load(cache / "z.npy", mmap_mode="r+")
    z[5, 0, 0, 0] = np.nan
    z.flush()
    del z
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alit_fast.train",
           "--config", tiny_json, "--data", "synthetic", "--data-length", "8", "--batch-size", "2", "--steps", "6",
           "--halting", "off", "--base-cache", str(cache), "--init", str(tmp_path / "init.safetensors"),
           "--save-every", "1", "--no-progress", "--out", str(tmp_path / "run")]
    # a hang of the healthy rank would run into the timeout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "non-finite loss or gradient" in proc.stderr, proc.stderr[-3000:]
    assert "ValueError" not in proc.stderr  # no stray error from inside the model
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # nothing saved after the bad step
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_checkpoint_keeps_both_random_streams(tiny_json, tmp_path):
    assert _run(tiny_json, tmp_path, "--steps", "2", "--halting", "stochastic", "--sample-grad-iters", "1") == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    (streams,) = ckpt["generator"]  # one process: one entry
    assert set(streams) == {"sample", "halting"}
    assert not torch.equal(streams["sample"], streams["halting"])  # two streams, not one twice


# ---------------------------------------------------------------------------- data
def test_random_resized_crop_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(100, 60, rng)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 60
        assert 0.8 * 6000 * 0.95 <= w * h <= 6000
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = random_resized_crop(image, 32, np.random.default_rng(2))
    assert out.size == (32, 32) and out.mode == "RGB"


def test_image_folder(tmp_path):
    for i, (size, sub) in enumerate([((40, 30), ""), ((20, 50), "a/b")]):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10 * i, 100, 200)).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, 16, seed=3)
    assert len(ds) == 2
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert torch.equal(ds[0]["image"], ds[0]["image"])  # a function of (seed, epoch, index)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", 16)
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing", 16)


def test_synthetic_images_are_deterministic_and_labelled():
    a, b, c = SyntheticImages(32, 20, seed=1), SyntheticImages(32, 20, seed=1), SyntheticImages(32, 20, seed=2)
    for i in range(10):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == i % 5
    a.set_epoch(7)
    assert torch.equal(a[3]["image"], b[3]["image"])
    assert not torch.equal(a[4]["image"], c[4]["image"])
    # complexity, measured as mean absolute neighbour difference, grows with the label
    roughness = {}
    for i in range(20):
        img = a[i]["image"]
        assert img.shape == (3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
        r = float((img[:, :, 1:] - img[:, :, :-1]).abs().mean() + (img[:, 1:] - img[:, :-1]).abs().mean())
        roughness.setdefault(a[i]["label"], []).append(r)
    means = [np.mean(roughness[level]) for level in range(5)]
    assert means[0] == 0.0 and means == sorted(means), means


def test_synthetic_levels_grow_in_compressed_size():
    # a model-free measure of information content: the label order must be the zlib order too
    import zlib

    data = SyntheticImages(32, 100, seed=3)
    sizes = {}
    for i in range(len(data)):
        pixels = (data[i]["image"] * 255).round().to(torch.uint8).numpy().tobytes()
        sizes.setdefault(data[i]["label"], []).append(len(zlib.compress(pixels, 9)))
    means = [np.mean(sizes[level]) for level in range(5)]
    assert means == sorted(means) and means[3] > 1.5 * means[2], means


def test_dataset_specs():
    from alit_fast.training.data import build_dataset

    synthetic = build_dataset("synthetic:013", 16, length=6)
    assert [synthetic[i]["label"] for i in range(6)] == [0, 1, 3, 0, 1, 3]


def test_photo_crops_and_mixture():
    pytest.importorskip("skimage")
    from alit_fast.training.data import PhotoCrops

    photos = PhotoCrops(24, 6, seed=0, names=("astronaut", "camera"))
    item = photos[1]
    assert item["image"].shape == (3, 24, 24) and item["label"] == -1
    first = photos[0]["image"]
    photos.set_epoch(1)
    assert not torch.equal(first, photos[0]["image"])  # new crops every epoch
    mix = Mixture([SyntheticImages(24, 4), photos])
    assert len(mix) == 10 and mix[5]["index"] == 5 and mix[5]["label"] == -1 and mix[2]["label"] == 2


# ---------------------------------------------------------------------------- base cache
def test_cache_base_round_trip(tiny_json, tmp_path):
    torch.manual_seed(0)
    model = ALIT(tiny_config())
    model.save(str(tmp_path / "init.safetensors"))
    cache = tmp_path / "cache"
    rc = cache_main(["--data", "synthetic", "--data-length", "8", "--out", str(cache), "--init",
                     str(tmp_path / "init.safetensors"), "--batch-size", "3"])
    assert rc == 0 and (cache / "index.json").exists() and not (cache.with_name("cache.partial")).exists()
    ds = BaseCacheDataset(cache)
    ds.check_model(model)
    assert len(ds) == 8
    images = torch.stack([ds[i]["image"] for i in range(8)])
    base = model.encode_base(images)
    z = torch.stack([ds[i]["z"] for i in range(8)])
    gt = torch.stack([ds[i]["gt_indices"] for i in range(8)])
    assert torch.allclose(z, base.z, atol=1e-5) and torch.equal(gt, base.gt_indices)
    assert [ds[i]["label"] for i in range(8)] == [i % 5 for i in range(8)]
    # training from the cache: same losses as running the VQGAN (synthetic images need no augmentation)
    common = ("--steps", "2", "--halting", "off", "--data-length", "8", "--init", str(tmp_path / "init.safetensors"))
    assert _run(tiny_json, tmp_path / "plain", *common) == 0
    assert _run(tiny_json, tmp_path / "cached", *common, "--base-cache", str(cache)) == 0
    for a, b in zip(_log(tmp_path / "plain"), _log(tmp_path / "cached")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    other = ALIT(tiny_config())
    with pytest.raises(ValueError, match="other VQGAN weights"):
        ds.check_model(other)


def test_activation_checkpointing_trains_to_the_same_losses(tiny_json, tmp_path):
    common = ("--steps", "3", "--halting", "off", "--warmup", "0", "--ema", "0")
    assert _run(tiny_json, tmp_path / "plain", *common) == 0
    assert _run(tiny_json, tmp_path / "ckpt", *common, "--activation-checkpointing") == 0
    plain, ckpt = [r["loss"] for r in _log(tmp_path / "plain")], [r["loss"] for r in _log(tmp_path / "ckpt")]
    assert ckpt == pytest.approx(plain, rel=1e-5)


# ---------------------------------------------------------------------------- nothing a user has is lost
def test_training_refuses_to_replace_an_earlier_run(tiny_json, tmp_path, capsys):
    assert _run(tiny_json, tmp_path, "--steps", "1", "--halting", "off") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert _run(tiny_json, tmp_path, "--steps", "1", "--halting", "off") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert _run(tiny_json, tmp_path, "--steps", "1", "--halting", "off", "--overwrite") == 0


def test_a_killed_save_leaves_nothing_that_blocks_the_next_start(tiny_json, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".checkpoint.pt.tmp12345"
    stale.write_bytes(b"half a checkpoint")
    assert _run(tiny_json, tmp_path, "--steps", "1", "--halting", "off") == 0
    assert not stale.exists()


def test_resume_survives_a_log_line_cut_off_by_a_kill(tiny_json, tmp_path):
    assert _run(tiny_json, tmp_path, "--steps", "3", "--halting", "off", "--stop-at", "2") == 0
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the kill came mid-write
    assert _run(tiny_json, tmp_path, "--steps", "3", "--halting", "off", "--resume") == 0
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--save-every", "0"), ("--lr", "-1"),
                                        ("--steps", "0"), ("--log-every", "0"), ("--lr", "nan")])
def test_training_rejects_bad_numbers(tiny_json, tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(tiny_json, tmp_path, flag, value)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "log.jsonl").exists()


def test_cache_base_never_deletes_what_it_did_not_write(tmp_path, capsys):
    torch.manual_seed(0)
    ALIT(tiny_config()).save(str(tmp_path / "init.safetensors"))
    common = ["--data", "synthetic", "--data-length", "4", "--init", str(tmp_path / "init.safetensors")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cache_main(common + ["--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "not empty" in capsys.readouterr().err
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / "a.png")
    for out in (folder, folder / "cache"):
        assert cache_main(["--data", str(folder), "--init", str(tmp_path / "init.safetensors"), "--out", str(out)]) == 2
        assert "overlaps the --data folder" in capsys.readouterr().err
    assert (folder / "a.png").exists()
    cache = tmp_path / "cache"
    assert cache_main(common + ["--out", str(cache)]) == 0
    assert cache_main(common + ["--out", str(cache)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cache_main(common + ["--out", str(cache), "--overwrite"]) == 0


def test_fp16_steps_the_grad_scaler_skips_do_not_stop_the_run(tiny_json, tmp_path, monkeypatch):
    # a GradScaler's first steps overflow as a rule and are skipped: that is how it finds its
    # scale, not a diverged run (an inf gradient norm stopped such a run before). The tiny model
    # does not overflow at the default 65536, so start the scale where it must.
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**40))
    assert _run(tiny_json, tmp_path, "--amp", "fp16", "--steps", "3", "--halting", "off") == 0
    log = _log(tmp_path)
    assert len(log) == 3 and not any(math.isfinite(r["grad_norm"]) for r in log), [r["grad_norm"] for r in log]
    assert all(r["loss"] < float("inf") for r in log)


# ---------------------------------------------------------------------- the VQGAN's own training
def _vqgan_run(tiny_json: str, data: Path, out: Path, *extra: str) -> int:
    from alit_fast.training.vqgan import main as vqgan_main

    argv = ["--config", tiny_json, "--data", str(data), "--steps", "20", "--batch-size", "2", "--crop", "16",
            "--log-every", "1", "--restart-every", "3", "--threads", "1", "--out", str(out), *extra]
    return vqgan_main(argv)


@pytest.fixture()
def six_images(tmp_path) -> Path:
    folder = tmp_path / "six"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # 3 batches of 2 per epoch: a split at step 8 is mid-epoch, and the run crosses 6 epochs
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_vqgan_resume_is_exact(tiny_json, six_images, tmp_path, monkeypatch):
    import alit_fast.training.vqgan as vqgan

    assert _vqgan_run(tiny_json, six_images, tmp_path / "full") == 0
    real = vqgan._train_step

    def killed_before_step_12(run, images, args):
        if run.step == 11:  # the last checkpoint was at step 8 (--log-every 1: one every 8 steps)
            raise KeyboardInterrupt
        return real(run, images, args)

    monkeypatch.setattr(vqgan, "_train_step", killed_before_step_12)
    assert _vqgan_run(tiny_json, six_images, tmp_path / "split") == 130
    monkeypatch.setattr(vqgan, "_train_step", real)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert _vqgan_run(tiny_json, six_images, tmp_path / "split", "--resume") == 0

    def log(out):
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in (out / "log.jsonl").read_text().splitlines()]

    assert log(tmp_path / "split") == log(tmp_path / "full") and len(log(tmp_path / "full")) == 20
    assert sum(r["restarted"] for r in log(tmp_path / "full")) > 0  # the restarts' random stream is resumed too
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "vqgan.safetensors"), load_file(tmp_path / "split" / "vqgan.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vqgan_resume_refuses_other_options_and_a_run_that_saved_no_checkpoint(tiny_json, six_images, tmp_path, capsys):
    out = tmp_path / "run"
    assert _vqgan_run(tiny_json, six_images, out, "--steps", "8") == 0
    capsys.readouterr()
    assert _vqgan_run(tiny_json, six_images, out, "--steps", "8", "--resume", "--lr", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr 0.001 -> 0.5" in err[0], err
    old = tmp_path / "old"  # what a version that could not resume left
    old.mkdir()
    torch.save({"step": 8, "optimizer": {}}, old / "optimizer.pt")
    assert _vqgan_run(tiny_json, six_images, old, "--resume") == 2
    assert "saved no checkpoint" in capsys.readouterr().err


def test_vqgan_resume_with_no_checkpoint_yet_starts_from_step_0(tiny_json, six_images, tmp_path, capsys):
    assert _vqgan_run(tiny_json, six_images, tmp_path / "run", "--steps", "2", "--resume") == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_vqgan_time_limit_leaves_a_checkpoint_and_the_log_of_an_uninterrupted_run(tiny_json, six_images, tmp_path):
    assert _vqgan_run(tiny_json, six_images, tmp_path / "full", "--log-every", "2") == 0
    split = tmp_path / "split"
    assert _vqgan_run(tiny_json, six_images, split, "--log-every", "2", "--time-limit", "1e-9") == 0  # stops at step 1
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == 1
    spelled = str(six_images) + "/"  # the same folder spelled otherwise is the same data
    assert _vqgan_run(tiny_json, Path(spelled), split, "--log-every", "2", "--resume") == 0

    def log(out):
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in (out / "log.jsonl").read_text().splitlines()]

    assert log(split) == log(tmp_path / "full")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "vqgan.safetensors"), load_file(split / "vqgan.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vqgan_resume_on_other_threads_continues_and_says_it_matches_only_to_rounding(tiny_json, six_images, tmp_path, capsys):
    out = tmp_path / "run"
    assert _vqgan_run(tiny_json, six_images, out, "--time-limit", "1e-9") == 0  # stops at step 1, on 1 thread
    assert _vqgan_run(tiny_json, six_images, out, "--resume") == 0
    assert "threads" not in capsys.readouterr().out  # the same threads: nothing to say
    other = tmp_path / "other"
    assert _vqgan_run(tiny_json, six_images, other, "--time-limit", "1e-9") == 0
    threads = torch.get_num_threads()
    try:
        assert _vqgan_run(tiny_json, six_images, other, "--resume", "--threads", "2") == 0
    finally:
        torch.set_num_threads(threads)
    said = capsys.readouterr().out
    assert "computed on 1 CPU threads and this one on 2" in said and "only to rounding" in said


def test_a_time_limited_overwrite_run_says_to_resume_in_place_of_overwrite(tiny_json, six_images, tmp_path, capsys):
    from alit_fast.errors import ON_INTERRUPT

    out = tmp_path / "run"
    assert _vqgan_run(tiny_json, six_images, out, "--time-limit", "1e-9", "--overwrite") == 0
    assert "continue with --resume in place of --overwrite" in capsys.readouterr().out
    assert _vqgan_run(tiny_json, six_images, out, "--resume") == 0  # what it said works
    assert all("in place of --overwrite" in ON_INTERRUPT[p] for p in ("alit-fast train", "python -m alit_fast.train_vqgan"))


def test_vqgan_resume_of_a_finished_run_changes_nothing(tiny_json, six_images, tmp_path, capsys):
    out = tmp_path / "run"
    assert _vqgan_run(tiny_json, six_images, out, "--steps", "4") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _vqgan_run(tiny_json, six_images, out, "--steps", "4", "--resume") == 0
    assert "already ended at step 4" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_vqgan_never_replaces_another_kind_of_run(tiny_json, six_images, tmp_path, capsys):
    out = tmp_path / "alit_run"  # what alit-fast train leaves: its checkpoint.pt holds no VQGAN
    out.mkdir()
    torch.save({"model": {}, "step": 3}, out / "checkpoint.pt")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = (out / "checkpoint.pt").read_bytes()
    for flag in ("--overwrite", "--resume"):
        assert _vqgan_run(tiny_json, six_images, out, flag) == 2
        assert "another kind of run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
