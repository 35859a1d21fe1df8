"""A fault sweep over every CLI path and the public Python API (issue 14).

Each case is a user error: malformed numbers, wrong types and shapes, paths that are missing,
directories, files where folders belong, damaged files of every format the project reads,
contradictory options. The CLI must answer with exactly one line on stderr,
``<prog>: <what is wrong>``, and exit status 2 (a traceback is for bugs only); the API with an
exception of the stated type whose message names the argument. Nothing the user had may be
changed by a refused command.

CLI cases run in-process (``alit_fast.cli.main`` / the train_vqgan ``main``), on a tiny model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import alit_fast
from alit_fast import ALIT, CheckpointError, TokenBatch
from alit_fast.cli import main as cli_main
from alit_fast.config import ALITConfig
from alit_fast.inference import CodeAccuracy, parse_criterion
from alit_fast.testing import random_images, tiny_config
from alit_fast.tokens import open_dataset
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)

HAS_GPU = torch.cuda.is_available()


# ---------------------------------------------------------------------------- the files a user has
def _flip_byte(src: Path, dst: Path, offset_from_end: int = 3) -> None:
    data = bytearray(src.read_bytes())
    data[-offset_from_end] ^= 0xFF
    dst.write_bytes(bytes(data))


def _truncate(src: Path, dst: Path, fraction: float = 0.5) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])


def _edit_metadata(src: Path, dst: Path, change) -> None:
    """Rewrite a safetensors file with the same tensors and edited metadata."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("faults")
    e = SimpleNamespace(root=root)
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALIT(cfg).eval()
    e.model = root / "model.safetensors"
    model.save(e.model)
    e.other = root / "other.safetensors"  # same shapes but one: another codebook size
    ALIT(tiny_config(codebook_size=32)).save(e.other)
    e.config = root / "tiny.json"
    e.config.write_text(json.dumps(dataclasses.asdict(cfg)))
    e.other_config = root / "other.json"
    e.other_config.write_text(json.dumps(dataclasses.asdict(tiny_config(codebook_size=32))))
    e.bad_json = root / "bad.json"
    e.bad_json.write_text('{"width": 64,')
    e.unknown_field = root / "unknown.json"
    e.unknown_field.write_text(json.dumps({"width": 64, "depth": 3}))
    e.invalid_values = root / "invalid.json"
    e.invalid_values.write_text(json.dumps(dict(dataclasses.asdict(cfg), heads=3)))
    e.notes = root / "notes.txt"
    e.notes.write_text("a user's file")
    e.garbage_st = root / "garbage.safetensors"
    e.garbage_st.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    e.garbage_pth = root / "garbage.pth"
    e.garbage_pth.write_bytes(b"PK\x03\x04 not really a zip")
    e.trunc_model = root / "trunc.safetensors"
    _truncate(e.model, e.trunc_model)
    e.heads_edited = root / "heads.safetensors"
    _edit_metadata(e.model, e.heads_edited, lambda m: m.update(
        alit_fast_config=tiny_config(heads=4).to_json()))
    e.meta_not_json = root / "metajson.safetensors"
    _edit_metadata(e.model, e.meta_not_json, lambda m: m.update(alit_fast_config="{not json"))
    e.pickle_pth = root / "plain.pth"
    torch.save({"model": model.state_dict()}, e.pickle_pth)

    # image folders
    rng = np.random.default_rng(1)
    e.images = root / "images"
    e.images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(e.images / name)
    e.empty = root / "empty"
    e.empty.mkdir()
    e.corrupt = root / "corrupt"
    e.corrupt.mkdir()
    (e.corrupt / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    (e.corrupt / "y.jpg").write_bytes(b"")
    e.only_text = root / "text"
    e.only_text.mkdir()
    (e.only_text / "readme.txt").write_text("no images here")

    # token files
    tokens = model.encode(random_images(2, 32, seed=3), "tokens:8")
    tokens.checkpoint = str(e.model)
    e.tokens = root / "tokens.safetensors"
    tokens.save(e.tokens)
    e.tokens_flipped = root / "flipped.safetensors"
    _flip_byte(e.tokens, e.tokens_flipped)
    e.tokens_trunc = root / "tokens_trunc.safetensors"
    _truncate(e.tokens, e.tokens_trunc, 0.8)
    e.tokens_meta_edited = root / "tokens_meta.safetensors"
    _edit_metadata(e.tokens, e.tokens_meta_edited, lambda m: m.update(codebook_size="32"))
    e.tokens_orphan = root / "orphan.safetensors"
    tokens.checkpoint = str(root / "deleted-model.safetensors")
    tokens.save(e.tokens_orphan)
    e.png = e.images / "a.png"

    # a short training run to resume, and damaged copies of its checkpoint
    e.run = root / "run"
    assert cli_main(["train", *_train_args(e, e.run), "--steps", "1"]) == 0
    ckpt = e.run / "checkpoint.pt"
    e.ckpt_trunc = root / "ckpt_trunc" / "checkpoint.pt"
    e.ckpt_trunc.parent.mkdir()
    _truncate(ckpt, e.ckpt_trunc)
    e.ckpt_garbage = root / "ckpt_garbage.pt"
    e.ckpt_garbage.write_bytes(b"\x80\x02 not a checkpoint at all")
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    e.ckpt_incomplete = root / "ckpt_incomplete.pt"
    torch.save({k: v for k, v in full.items() if k not in ("optimizer", "rng")}, e.ckpt_incomplete)
    e.ckpt_other = root / "ckpt_other.pt"
    torch.save(dict(full, config=tiny_config(halting_threshold=0.3).to_json()), e.ckpt_other)
    e.ckpt_list = root / "ckpt_list.pt"
    torch.save([1, 2, 3], e.ckpt_list)

    # base caches
    e.cache = root / "cache"
    assert cli_main(["cache-base", "--data", "synthetic", "--data-length", "4", "--init", str(e.model),
                     "--out", str(e.cache)]) == 0
    e.cache_bad_index = root / "cache_bad"
    shutil.copytree(e.cache, e.cache_bad_index)
    (e.cache_bad_index / "index.json").write_text("{ cut off")
    e.vqgan_run = root / "vqgan_run"
    e.vqgan_run.mkdir()
    (e.vqgan_run / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run's
    e.users_log = root / "users_log"
    e.users_log.mkdir()
    (e.users_log / "log.jsonl").write_text("my own notes\n")  # a user's, under a run file's name
    return e


def _train_args(e, out: Path) -> list[str]:
    return ["--config", str(e.config), "--data", "synthetic", "--data-length", "8", "--batch-size", "4",
            "--threads", "1", "--no-progress", "--halting", "off", "--out", str(out)]


def _encode(e, out: Path, *extra: str) -> list[str]:
    return ["encode", str(e.images), "--checkpoint", str(e.model), "--out", str(out / "t.safetensors"), "--quiet", *extra]


def _decode(e, out: Path, *extra: str, tokens: Path | None = None) -> list[str]:
    return ["decode", str(tokens or e.tokens), "--checkpoint", str(e.model), "--out", str(out / "decoded"), *extra]


def _cache(e, out: Path, *extra: str) -> list[str]:
    return ["cache-base", "--data", "synthetic", "--data-length", "4", "--init", str(e.model), "--out", str(out / "c"),
            *extra]


def _train(e, out: Path, *extra: str) -> list[str]:
    return ["train", *_train_args(e, out / "run"), "--steps", "1", *extra]


def _demo(e, out: Path, *extra: str) -> list[str]:
    return ["demo", "--checkpoint", str(e.model), "--no-photos", "--out", str(out / "demo.png"), *extra]


def _vqgan(e, out: Path, *extra: str) -> list[str]:
    return ["train_vqgan", "--config", str(e.config), "--data", "synthetic", "--steps", "1", "--batch-size", "2",
            "--out", str(out / "vq"), *extra]


# (id, argv from (env, a fresh folder), a piece of the expected message)
CLI_CASES = [
    # ---- encode
    ("encode-batch-size-malformed", lambda e, o: _encode(e, o, "--batch-size", "two"), "--batch-size"),
    ("encode-batch-size-negative", lambda e, o: _encode(e, o, "--batch-size", "-3"), "--batch-size"),
    ("encode-criterion-not-a-number", lambda e, o: _encode(e, o, "--criterion", "code-acc:abc"), "not a number"),
    ("encode-criterion-unknown", lambda e, o: _encode(e, o, "--criterion", "sharpness:1"), "unknown criterion"),
    ("encode-criterion-no-value", lambda e, o: _encode(e, o, "--criterion", "code-acc"), "unknown criterion"),
    ("encode-criterion-nan", lambda e, o: _encode(e, o, "--criterion", "code-acc:nan"), "code-acc"),
    ("encode-criterion-pixel-zero", lambda e, o: _encode(e, o, "--criterion", "pixel-l1:0"), "pixel-l1"),
    ("encode-criterion-nll-negative", lambda e, o: _encode(e, o, "--criterion", "code-nll:-1"), "code-nll"),
    ("encode-criterion-tokens-zero", lambda e, o: _encode(e, o, "--criterion", "tokens:0"), "tokens"),
    ("encode-criterion-tokens-off-grid", lambda e, o: _encode(e, o, "--criterion", "tokens:13"), "multiples of 4"),
    ("encode-criterion-tokens-fraction", lambda e, o: _encode(e, o, "--criterion", "tokens:2.5"), "whole number"),
    ("encode-min-tokens-zero", lambda e, o: _encode(e, o, "--min-tokens", "0"), "--min-tokens"),
    ("encode-min-tokens-negative", lambda e, o: _encode(e, o, "--min-tokens", "-4"), "--min-tokens"),
    ("encode-min-above-max", lambda e, o: _encode(e, o, "--min-tokens", "12", "--max-tokens", "4"), "--min-tokens"),
    ("encode-max-below-one-iteration", lambda e, o: _encode(e, o, "--max-tokens", "2"), "--max-tokens"),
    ("encode-max-tokens-malformed", lambda e, o: _encode(e, o, "--max-tokens", "lots"), "--max-tokens"),
    ("encode-fallback-best-without-score", lambda e, o: _encode(e, o, "--fallback", "best", "--criterion", "tokens:8"),
     "fallback"),
    ("encode-halting-unknown", lambda e, o: _encode(e, o, "--halting", "sometimes"), "--halting"),
    ("encode-backend-unknown", lambda e, o: _encode(e, o, "--backend", "cuda"), "--backend"),
    ("encode-checkpoint-missing", lambda e, o: _encode(e, o, "--checkpoint", str(o / "none.safetensors")), "not found"),
    ("encode-checkpoint-directory", lambda e, o: _encode(e, o, "--checkpoint", str(o)), "directory"),
    ("encode-checkpoint-garbage", lambda e, o: _encode(e, o, "--checkpoint", str(e.garbage_st)), "garbage.safetensors"),
    ("encode-checkpoint-truncated", lambda e, o: _encode(e, o, "--checkpoint", str(e.trunc_model)), "trunc.safetensors"),
    ("encode-checkpoint-garbage-pth", lambda e, o: _encode(e, o, "--checkpoint", str(e.garbage_pth)), "garbage.pth"),
    ("encode-checkpoint-unknown-name", lambda e, o: _encode(e, o, "--checkpoint", "nosuchmodel"), "nosuchmodel"),
    ("encode-checkpoint-is-a-token-file", lambda e, o: _encode(e, o, "--checkpoint", str(e.tokens)), "tokens.safetensors"),
    ("encode-checkpoint-heads-edited", lambda e, o: _encode(e, o, "--checkpoint", str(e.heads_edited)), "edited"),
    ("encode-input-missing", lambda e, o: ["encode", str(o / "nope.png"), "--checkpoint", str(e.model), "--out",
                                           str(o / "t.safetensors")], "nope.png"),
    ("encode-input-empty-folder", lambda e, o: ["encode", str(e.empty), "--checkpoint", str(e.model), "--out",
                                                str(o / "t.safetensors")], "no image files"),
    ("encode-input-all-corrupt", lambda e, o: ["encode", str(e.corrupt), "--checkpoint", str(e.model), "--out",
                                               str(o / "t.safetensors")], "could be read"),
    ("encode-input-text-file", lambda e, o: ["encode", str(e.notes), "--checkpoint", str(e.model), "--out",
                                             str(o / "t.safetensors")], "could be read"),
    ("encode-out-directory", lambda e, o: _encode(e, o)[:-3] + ["--out", str(o)], "--out"),
    ("encode-out-missing-folder", lambda e, o: _encode(e, o)[:-3] + ["--out", str(o / "a" / "t.safetensors")], "--out"),
    ("encode-out-under-a-file", lambda e, o: _encode(e, o)[:-3] + ["--out", str(e.notes / "t.safetensors")], "--out"),
    ("encode-out-is-the-model", lambda e, o: _encode(e, o)[:-3] + ["--out", str(e.model)], "--out"),
    ("encode-out-is-an-input-image", lambda e, o: _encode(e, o)[:-3] + ["--out", str(e.png)], "--out"),
    ("encode-out-is-a-users-file", lambda e, o: _encode(e, o)[:-3] + ["--out", str(e.notes)], "--out"),
    ("encode-device-malformed", lambda e, o: _encode(e, o, "--device", "toaster"), "--device"),
    ("encode-device-no-gpu", lambda e, o: _encode(e, o, "--device", "cuda:0"), "--device",
     pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")),
    # ---- decode
    ("decode-tokens-missing", lambda e, o: _decode(e, o, tokens=o / "none.safetensors"), "not found"),
    ("decode-tokens-directory", lambda e, o: _decode(e, o, tokens=o), "directory"),
    ("decode-tokens-truncated", lambda e, o: _decode(e, o, tokens=e.tokens_trunc), "tokens_trunc.safetensors"),
    ("decode-tokens-flipped-byte", lambda e, o: _decode(e, o, tokens=e.tokens_flipped), "checksum"),
    ("decode-tokens-metadata-edited", lambda e, o: _decode(e, o, tokens=e.tokens_meta_edited), "checksum"),
    ("decode-tokens-is-an-image", lambda e, o: _decode(e, o, tokens=e.png), "a.png"),
    ("decode-tokens-is-a-model", lambda e, o: _decode(e, o, tokens=e.model), "not an alit_fast token file"),
    ("decode-batch-size-zero", lambda e, o: _decode(e, o, "--batch-size", "0"), "--batch-size"),
    ("decode-batch-size-malformed", lambda e, o: _decode(e, o, "--batch-size", "1.5"), "--batch-size"),
    ("decode-out-is-a-file", lambda e, o: _decode(e, o)[:-2] + ["--out", str(e.notes)], "--out"),
    ("decode-out-under-a-file", lambda e, o: _decode(e, o)[:-2] + ["--out", str(e.notes / "sub")], "--out"),
    ("decode-checkpoint-missing", lambda e, o: _decode(e, o, "--checkpoint", str(o / "m.safetensors")), "not found"),
    ("decode-checkpoint-other-config", lambda e, o: _decode(e, o, "--checkpoint", str(e.other)), "another config"),
    ("decode-checkpoint-other-codebook-ignored", lambda e, o: _decode(e, o, "--checkpoint", str(e.other),
                                                                       "--ignore-config"), "codebook"),
    ("decode-checkpoint-garbage", lambda e, o: _decode(e, o, "--checkpoint", str(e.garbage_st)), "garbage.safetensors"),
    ("decode-recorded-checkpoint-gone", lambda e, o: ["decode", str(e.tokens_orphan), "--out", str(o / "d")],
     "deleted-model.safetensors"),
    ("decode-device-malformed", lambda e, o: _decode(e, o, "--device", "gpu please"), "--device"),
    ("decode-backend-unknown", lambda e, o: _decode(e, o, "--backend", "numpy"), "--backend"),
    # ---- demo
    ("demo-per-level-zero", lambda e, o: _demo(e, o, "--per-level", "0"), "--per-level"),
    ("demo-per-level-negative", lambda e, o: _demo(e, o, "--per-level", "-1"), "--per-level"),
    ("demo-per-level-malformed", lambda e, o: _demo(e, o, "--per-level", "x"), "--per-level"),
    ("demo-criterion-unknown", lambda e, o: _demo(e, o, "--criterion", "bogus:1"), "unknown criterion"),
    ("demo-criterion-out-of-range", lambda e, o: _demo(e, o, "--criterion", "code-acc:2"), "code-acc"),
    ("demo-criterion-off-grid", lambda e, o: _demo(e, o, "--criterion", "tokens:7"), "multiples of 4"),
    ("demo-backend-unknown", lambda e, o: _demo(e, o, "--backend", "bogus"), "--backend"),
    ("demo-out-directory", lambda e, o: _demo(e, o)[:-2] + ["--out", str(o)], "--out"),
    ("demo-out-missing-folder", lambda e, o: _demo(e, o)[:-2] + ["--out", str(o / "x" / "d.png")], "--out"),
    ("demo-out-not-an-image-name", lambda e, o: _demo(e, o)[:-2] + ["--out", str(o / "grid.txt")], "--out"),
    ("demo-eval-per-level-zero", lambda e, o: _demo(e, o, "--evaluate", "--eval-per-level", "0"), "--eval-per-level"),
    ("demo-checkpoint-missing", lambda e, o: _demo(e, o, "--checkpoint", str(o / "m.safetensors")), "not found"),
    # ---- cache-base
    ("cache-data-missing-folder", lambda e, o: _cache(e, o, "--data", str(o / "nowhere")), "--data"),
    ("cache-data-empty-folder", lambda e, o: _cache(e, o, "--data", str(e.empty)), "no images"),
    ("cache-data-all-corrupt", lambda e, o: _cache(e, o, "--data", str(e.corrupt)), "could be read"),
    ("cache-data-only-text", lambda e, o: _cache(e, o, "--data", str(e.only_text)), "no images"),
    ("cache-data-is-a-file", lambda e, o: _cache(e, o, "--data", str(e.png)), "--data"),
    ("cache-data-bad-level", lambda e, o: _cache(e, o, "--data", "synthetic:9"), "--data"),
    ("cache-data-malformed-levels", lambda e, o: _cache(e, o, "--data", "synthetic:x"), "--data"),
    ("cache-data-length-zero", lambda e, o: _cache(e, o, "--data-length", "0"), "--data-length"),
    ("cache-data-length-negative", lambda e, o: _cache(e, o, "--data-length", "-3"), "--data-length"),
    ("cache-batch-size-zero", lambda e, o: _cache(e, o, "--batch-size", "0"), "--batch-size"),
    ("cache-workers-negative", lambda e, o: _cache(e, o, "--workers", "-1"), "--workers"),
    ("cache-config-unknown", lambda e, o: _cache(e, o, "--config", "nosuch"), "--config"),
    ("cache-config-bad-json", lambda e, o: _cache(e, o, "--config", str(e.bad_json)), "--config"),
    ("cache-config-unknown-field", lambda e, o: _cache(e, o, "--config", str(e.unknown_field)), "--config"),
    ("cache-config-invalid-values", lambda e, o: _cache(e, o, "--config", str(e.invalid_values)), "--config"),
    ("cache-init-missing", lambda e, o: _cache(e, o, "--init", str(o / "m.safetensors")), "--init"),
    ("cache-init-garbage", lambda e, o: _cache(e, o, "--init", str(e.garbage_st)), "--init"),
    ("cache-init-directory", lambda e, o: _cache(e, o, "--init", str(o)), "--init"),
    ("cache-init-other-config", lambda e, o: _cache(e, o, "--init", str(e.other), "--config", str(e.config)), "--init"),
    ("cache-out-is-a-file", lambda e, o: _cache(e, o)[:-2] + ["--out", str(e.notes)], "--out"),
    ("cache-dtype-unknown", lambda e, o: _cache(e, o, "--dtype", "bfloat16"), "--dtype"),
    # ---- train (also `python -m alit_fast.train`: the same main)
    ("train-data-missing-folder", lambda e, o: _train(e, o, "--data", str(o / "nowhere")), "--data"),
    ("train-data-empty-folder", lambda e, o: _train(e, o, "--data", str(e.empty)), "no images"),
    ("train-data-all-corrupt", lambda e, o: _train(e, o, "--data", str(e.corrupt)), "could be read"),
    ("train-data-length-zero", lambda e, o: _train(e, o, "--data-length", "0"), "--data-length"),
    ("train-data-smaller-than-a-batch", lambda e, o: _train(e, o, "--data-length", "2"), "fewer than one batch"),
    ("train-resume-missing-path", lambda e, o: _train(e, o, "--resume", str(o / "ckpt.pt")), "--resume"),
    ("train-resume-truncated", lambda e, o: _train(e, o, "--resume", str(e.ckpt_trunc)), "checkpoint.pt"),
    ("train-resume-garbage", lambda e, o: _train(e, o, "--resume", str(e.ckpt_garbage)), "ckpt_garbage.pt"),
    ("train-resume-incomplete", lambda e, o: _train(e, o, "--resume", str(e.ckpt_incomplete)), "optimizer"),
    ("train-resume-not-a-dict", lambda e, o: _train(e, o, "--resume", str(e.ckpt_list)), "ckpt_list.pt"),
    ("train-resume-other-config", lambda e, o: _train(e, o, "--resume", str(e.ckpt_other)), "different config"),
    ("train-resume-directory", lambda e, o: _train(e, o, "--resume", str(o)), "directory"),
    ("train-resume-and-overwrite", lambda e, o: _train(e, o, "--resume", "--overwrite"), "--overwrite"),
    ("train-warmup-negative", lambda e, o: _train(e, o, "--warmup", "-1"), "--warmup"),
    ("train-min-lr-negative", lambda e, o: _train(e, o, "--min-lr", "-1"), "--min-lr"),
    ("train-weight-decay-nan", lambda e, o: _train(e, o, "--weight-decay", "nan"), "--weight-decay"),
    ("train-betas-out-of-range", lambda e, o: _train(e, o, "--betas", "1.5", "0.9"), "--betas"),
    ("train-grad-clip-negative", lambda e, o: _train(e, o, "--grad-clip", "-1"), "--grad-clip"),
    ("train-ema-above-one", lambda e, o: _train(e, o, "--ema", "1.5"), "--ema"),
    ("train-sample-grad-iters-too-many", lambda e, o: _train(e, o, "--sample-grad-iters", "10"), "--sample-grad-iters"),
    ("train-workers-negative", lambda e, o: _train(e, o, "--workers", "-1"), "--workers"),
    ("train-threads-negative", lambda e, o: _train(e, o, "--threads", "-1"), "--threads"),
    ("train-stop-at-zero", lambda e, o: _train(e, o, "--stop-at", "0"), "--stop-at"),
    ("train-time-limit-negative", lambda e, o: _train(e, o, "--time-limit", "-1"), "--time-limit"),
    ("train-base-cache-missing", lambda e, o: _train(e, o, "--base-cache", str(o / "nocache")), "--base-cache"),
    ("train-base-cache-bad-index", lambda e, o: _train(e, o, "--base-cache", str(e.cache_bad_index)), "--base-cache"),
    ("train-base-cache-other-config", lambda e, o: _train(e, o, "--base-cache", str(e.cache), "--config",
                                                          str(e.other_config)), "--base-cache"),
    ("train-linear-init-std-negative", lambda e, o: _train(e, o, "--linear-init-std", "-1"), "--linear-init-std"),
    ("train-restart-dead-codes-negative", lambda e, o: _train(e, o, "--restart-dead-codes", "-1"), "--restart-dead-codes"),
    ("train-config-unknown", lambda e, o: _train(e, o, "--config", "nosuch"), "--config"),
    ("train-config-bad-json", lambda e, o: _train(e, o, "--config", str(e.bad_json)), "--config"),
    ("train-init-garbage", lambda e, o: _train(e, o, "--init", str(e.garbage_st)), "--init"),
    ("train-init-heads-edited", lambda e, o: _train(e, o, "--init", str(e.heads_edited)), "edited"),
    ("train-init-other-config", lambda e, o: _train(e, o, "--init", str(e.other)), "--init"),
    ("train-out-under-a-file", lambda e, o: _train(e, o)[:-2] + ["--out", str(e.notes / "run")], "--out"),
    ("train-epochs-malformed", lambda e, o: _train(e, o, "--epochs", "ten"), "--epochs"),
    ("train-lr-inf", lambda e, o: _train(e, o, "--lr", "inf"), "--lr"),
    ("train-steps-negative", lambda e, o: _train(e, o, "--steps", "-5"), "--steps"),
    ("train-amp-unknown", lambda e, o: _train(e, o, "--amp", "fp8"), "--amp"),
    # ---- python -m alit_fast.train_vqgan
    ("vqgan-steps-zero", lambda e, o: _vqgan(e, o, "--steps", "0"), "--steps"),
    ("vqgan-batch-size-zero", lambda e, o: _vqgan(e, o, "--batch-size", "0"), "--batch-size"),
    ("vqgan-lr-negative", lambda e, o: _vqgan(e, o, "--lr", "-1"), "--lr"),
    ("vqgan-log-every-zero", lambda e, o: _vqgan(e, o, "--log-every", "0"), "--log-every"),
    ("vqgan-active-codes-too-many", lambda e, o: _vqgan(e, o, "--active-codes", "1000"), "--active-codes"),
    ("vqgan-crop-negative", lambda e, o: _vqgan(e, o, "--crop", "-1"), "--crop"),
    ("vqgan-restart-every-negative", lambda e, o: _vqgan(e, o, "--restart-every", "-1"), "--restart-every"),
    ("vqgan-beta-nan", lambda e, o: _vqgan(e, o, "--beta", "nan"), "--beta"),
    ("vqgan-data-missing-folder", lambda e, o: _vqgan(e, o, "--data", str(o / "nowhere")), "--data"),
    ("vqgan-config-unknown", lambda e, o: _vqgan(e, o, "--config", "nosuch"), "--config"),
    ("vqgan-out-holds-a-run", lambda e, o: _vqgan(e, o)[:-2] + ["--out", str(e.vqgan_run)], "--overwrite"),
    ("vqgan-out-holds-a-users-log", lambda e, o: _vqgan(e, o)[:-2] + ["--out", str(e.users_log), "--overwrite"],
     "left alone"),
]


def _prog(argv: list[str]) -> str:
    return "python -m alit_fast.train_vqgan" if argv[0] == "train_vqgan" else f"alit-fast {argv[0]}"


def run_cli(argv: list[str]) -> int:
    if argv[0] == "train_vqgan":
        from alit_fast.training.vqgan import main

        call = lambda: main(argv[1:])  # noqa: E731
    else:
        call = lambda: cli_main(argv)  # noqa: E731
    try:
        return int(call() or 0)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 1


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and modification time: what a write, a truncation or a deletion changes."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _params(cases: list[tuple]) -> list:
    return [pytest.param(*c[1:3], id=c[0], marks=c[3:]) for c in cases]


@pytest.mark.parametrize("argv_of,message", _params(CLI_CASES))
def test_cli_fault_is_one_line_and_exit_2(env, tmp_path, capsys, argv_of, message):
    argv = argv_of(env, tmp_path)
    before = _snapshot(env.root)
    rc = run_cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(_prog(argv) + ": "), err
    assert message.lower() in err[0].lower(), err
    # a refused command changes nothing the user had, and leaves no partial output
    assert _snapshot(env.root) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".tmp" in p.name]


# ---------------------------------------------------------------------------- the Python API
def _model(e) -> ALIT:
    if not hasattr(e, "loaded"):
        e.loaded = alit_fast.load(e.model).eval()
    return e.loaded


def _images(n: int = 2) -> torch.Tensor:
    return random_images(n, 32, seed=5)


def _state(e):
    return _model(e).start(_images(3))


def _token_batch(**changes) -> TokenBatch:
    fields = dict(codes=torch.tensor([[1, 2, 3, 4]], dtype=torch.int32), lengths=torch.tensor([4]), codebook_size=64)
    fields.update(changes)
    return TokenBatch(**fields)


def _save_into(path_of):
    def run(e, o):
        _model(e).save(path_of(e, o))
    return run


def _stepped(e):
    state = _state(e)
    state.step()
    return state


# (id, call(env, a fresh folder), exception type(s), a piece of the message)
API_CASES = [
    ("load-missing", lambda e, o: alit_fast.load(o / "none.safetensors"), FileNotFoundError, "none.safetensors"),
    ("load-directory", lambda e, o: alit_fast.load(o), FileNotFoundError, "directory"),
    ("load-garbage", lambda e, o: alit_fast.load(e.garbage_st), CheckpointError, "garbage.safetensors"),
    ("load-truncated", lambda e, o: alit_fast.load(e.trunc_model), CheckpointError, "trunc.safetensors"),
    ("load-file-a-torch-pickle", lambda e, o: alit_fast.io.load_file(e.pickle_pth), CheckpointError, "plain.pth"),
    ("load-heads-edited", lambda e, o: alit_fast.load(e.heads_edited), CheckpointError, "edited"),
    ("load-config-not-json", lambda e, o: alit_fast.load(e.meta_not_json), CheckpointError, "config"),
    ("load-path-not-a-path", lambda e, o: alit_fast.load(123), TypeError, "path"),
    ("load-official-garbage", lambda e, o: alit_fast.load_official(e.garbage_pth), CheckpointError, "garbage.pth"),
    ("load-official-not-a-dict", lambda e, o: alit_fast.load_official(e.ckpt_list), CheckpointError, "list"),
    ("load-official-no-keys", lambda e, o: alit_fast.load_official({"x": torch.zeros(1)}), CheckpointError, "no key"),
    ("load-official-heads-zero", lambda e, o: alit_fast.load_official(e.pickle_pth, num_heads=0), ValueError, "num_heads"),
    ("load-official-heads-not-dividing", lambda e, o: alit_fast.load_official(e.pickle_pth, num_heads=3), ValueError,
     "heads"),
    ("load-pretrained-unknown", lambda e, o: alit_fast.load_pretrained("nosuch"), ValueError, "nosuch"),
    ("load-pretrained-backend-unknown", lambda e, o: alit_fast.load_pretrained("demo", backend="bogus"), ValueError,
     "backend"),
    ("encode-images-list", lambda e, o: _model(e).encode([[0.5]]), (TypeError, ValueError), "images"),
    ("encode-images-uint8", lambda e, o: _model(e).encode((_images() * 255).to(torch.uint8)), ValueError, "dtype"),
    ("encode-images-wrong-size", lambda e, o: _model(e).encode(random_images(2, 16)), ValueError, "shape"),
    ("encode-images-3d", lambda e, o: _model(e).encode(_images()[0]), ValueError, "shape"),
    ("encode-images-empty", lambda e, o: _model(e).encode(_images()[:0]), ValueError, "empty"),
    ("encode-images-nan", lambda e, o: _model(e).encode(_images().index_fill(3, torch.tensor([2]), float("nan"))),
     ValueError, "[0, 1]"),
    ("encode-images-inf", lambda e, o: _model(e).encode(_images().index_fill(3, torch.tensor([2]), float("inf"))),
     ValueError, "[0, 1]"),
    ("encode-images-0-255", lambda e, o: _model(e).encode(_images() * 255), ValueError, "[0, 1]"),
    ("encode-batch-size-fraction", lambda e, o: _model(e).encode(_images(), batch_size=1.5), (TypeError, ValueError),
     "batch_size"),
    ("encode-batch-size-bool", lambda e, o: _model(e).encode(_images(), batch_size=True), (TypeError, ValueError),
     "batch_size"),
    ("encode-batch-size-negative", lambda e, o: _model(e).encode(_images(), batch_size=-1), ValueError, "batch_size"),
    ("encode-min-tokens-string", lambda e, o: _model(e).encode(_images(), min_tokens="8"), ValueError, "min_tokens"),
    ("encode-max-tokens-zero", lambda e, o: _model(e).encode(_images(), max_tokens=0), ValueError, "max_tokens"),
    ("encode-criterion-float", lambda e, o: _model(e).encode(_images(), 0.9), TypeError, "criterion"),
    ("encode-criterion-callable-floats", lambda e, o: _model(e).encode(_images(), lambda v: v.num_tokens * 0.1),
     ValueError, "bools"),
    ("encode-criterion-callable-wrong-count", lambda e, o: _model(e).encode(_images(), lambda v: torch.ones(7) > 0),
     ValueError, "7 decisions"),
    ("encode-halting-unknown", lambda e, o: _model(e).encode(_images(), halting="sometimes"), ValueError, "halting"),
    ("encode-fallback-unknown", lambda e, o: _model(e).encode(_images(), fallback="min"), ValueError, "fallback"),
    ("decode-a-path", lambda e, o: _model(e).decode(str(e.tokens)), TypeError, "TokenBatch"),
    ("decode-batch-size-zero", lambda e, o: _model(e).decode(TokenBatch.load(e.tokens), batch_size=0), ValueError,
     "batch_size"),
    ("decode-batch-size-fraction", lambda e, o: _model(e).decode(TokenBatch.load(e.tokens), batch_size=0.5),
     (TypeError, ValueError), "batch_size"),
    ("decode-other-config", lambda e, o: alit_fast.load(e.other).decode(TokenBatch.load(e.tokens)), ValueError,
     "another config"),
    ("decode-ids-past-the-codebook", lambda e, o: _model(e).decode(_token_batch(codes=torch.tensor([[1, 2, 3, 99]]))),
     ValueError, "code ids"),
    ("decode-length-off-grid", lambda e, o: _model(e).decode(_token_batch(lengths=torch.tensor([3]))), ValueError,
     "multiples of 4"),
    ("start-halting-unknown", lambda e, o: _model(e).start(_images(), halting="x"), ValueError, "halting"),
    ("start-iterations-zero", lambda e, o: _model(e).start(_images(), iterations=0), ValueError, "iterations"),
    ("start-images-uint8", lambda e, o: _model(e).start((_images() * 255).byte()), ValueError, "dtype"),
    ("rollout-iterations-too-many", lambda e, o: _model(e).rollout(_images(), iterations=99), ValueError, "iterations"),
    ("finish-float-tensor-mask", lambda e, o: _stepped(e).finish(torch.tensor([1.0, 0.0, 0.0])), ValueError, "bool"),
    ("finish-float-list", lambda e, o: _stepped(e).finish([0.5]), ValueError, "floats"),
    ("finish-id-out-of-range", lambda e, o: _stepped(e).finish([5]), ValueError, "image ids"),
    ("finish-negative-id", lambda e, o: _stepped(e).finish([-1]), ValueError, "image ids"),
    ("finish-mask-wrong-length", lambda e, o: _stepped(e).finish([True, False]), ValueError, "3 entries"),
    ("finish-string", lambda e, o: _stepped(e).finish("all"), (TypeError, ValueError), "finish"),
    ("tokens-save-into-directory", lambda e, o: TokenBatch.load(e.tokens).save(o), (IsADirectoryError, ValueError),
     "directory"),
    ("tokens-save-missing-folder", lambda e, o: TokenBatch.load(e.tokens).save(o / "a" / "t.safetensors"),
     FileNotFoundError, "a"),
    ("tokens-save-ids-past-the-codebook", lambda e, o: _token_batch(codes=torch.tensor([[1, 2, 3, 40000]])).save(
        o / "t.safetensors"), ValueError, "code ids"),
    ("tokens-codebook-size-zero", lambda e, o: _token_batch(codebook_size=0), ValueError, "codebook_size"),
    ("tokens-lengths-past-codes", lambda e, o: _token_batch(lengths=torch.tensor([5])), ValueError, "lengths"),
    ("tokens-float-codes", lambda e, o: _token_batch(codes=torch.rand(1, 4)), ValueError, "TokenBatch"),
    ("tokens-cat-not-a-batch", lambda e, o: TokenBatch.cat([TokenBatch.load(e.tokens), "x"]), TypeError, "TokenBatch"),
    ("tokens-cat-empty", lambda e, o: TokenBatch.cat([]), ValueError, "at least one"),
    ("tokens-cat-other-models", lambda e, o: TokenBatch.cat([TokenBatch.load(e.tokens), _token_batch(codebook_size=32)]),
     ValueError,
     "different models"),
    ("tokens-load-flipped", lambda e, o: TokenBatch.load(e.tokens_flipped), ValueError, "checksum"),
    ("tokens-load-metadata-edited", lambda e, o: TokenBatch.load(e.tokens_meta_edited), ValueError, "checksum"),
    ("tokens-load-truncated", lambda e, o: TokenBatch.load(e.tokens_trunc), ValueError, "tokens_trunc"),
    ("tokens-load-a-model", lambda e, o: TokenBatch.load(e.model), ValueError, "not an alit_fast token file"),
    ("tokens-from-sequences-past-codebook", lambda e, o: TokenBatch.from_sequences([torch.tensor([40000])], 64),
     ValueError, "code ids"),
    ("save-into-directory", _save_into(lambda e, o: o), (IsADirectoryError, ValueError), "directory"),
    ("save-missing-folder", _save_into(lambda e, o: o / "a" / "m.safetensors"), FileNotFoundError, "m.safetensors"),
    ("criterion-threshold-string", lambda e, o: CodeAccuracy("0.9"), ValueError, "code-acc"),
    ("criterion-tokens-empty", lambda e, o: parse_criterion("tokens:"), ValueError, "tokens:"),
    ("criterion-code-acc-inf", lambda e, o: parse_criterion("code-acc:inf"), ValueError, "code-acc"),
    ("config-heads-zero", lambda e, o: ALITConfig(heads=0), ValueError, "heads"),
    ("config-negative-width", lambda e, o: tiny_config(width=-64), ValueError, "width"),
    ("config-iterations-zero", lambda e, o: tiny_config(iterations=0), ValueError, "iterations"),
]


@pytest.mark.parametrize("call,error,message", [pytest.param(*c[1:], id=c[0]) for c in API_CASES])
def test_api_fault_raises_a_clear_error(env, tmp_path, call, error, message):
    before = _snapshot(env.root)
    with pytest.raises(error) as info:
        call(env, tmp_path)
    assert message.lower() in str(info.value).lower()
    assert "\n" not in str(info.value).strip()
    assert _snapshot(env.root) == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------- the handler, and valid edge cases
def test_an_unknown_command_is_one_line(capsys):
    assert cli_main(["encdoe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alit-fast: unknown command 'encdoe'")


def test_a_bug_keeps_its_traceback(env, tmp_path, monkeypatch):
    # only a UsageError is a user error: anything else escapes the handler with its traceback
    import alit_fast.cli.encode as encode_cli

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(encode_cli, "load_model_or_raise", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli_main(_encode(env, tmp_path))


def test_a_partly_unreadable_folder_is_encoded_and_the_rest_named(env, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(env.images, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    out = tmp_path / "t.safetensors"
    assert cli_main(["encode", str(folder), "--checkpoint", str(env.model), "--out", str(out), "--quiet"]) == 0
    tokens = TokenBatch.load(out)
    assert sorted(Path(n).name for n in tokens.names) == ["a.png", "b.png"]
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "skipped 1 unreadable file" in warning[0] and "broken.png" in warning[0]


def test_training_skips_unreadable_files_by_name_and_stops_on_a_damaged_body(env, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.png").write_text("not an image")
    args = ["train", *_train_args(env, tmp_path / "run"), "--data", str(folder), "--steps", "1"]
    assert cli_main(args) == 0
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().err
    # a body damaged past a good header is found only when read: one line naming it, exit 2
    good = (folder / "0.png").read_bytes()
    (folder / "0.png").write_bytes(good[: len(good) // 2])
    assert cli_main(args[:-2] + ["--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alit-fast train: image ") and "0.png" in err[-1]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1  # the last checkpoint stands


# ---------------------------------------------------------------------------- kills mid-save
# a training run that SIGKILLs itself inside its Nth checkpoint write, after half the bytes are out
KILLED_MID_SAVE = r"""
import os, signal, sys
import torch
real_save, count = torch.save, [0]
def save_then_die(obj, f, *args, **kwargs):
    count[0] += 1
    if count[0] == int(os.environ["ALIT_KILL_AT_SAVE"]):
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
from alit_fast.training.train import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_run_args(env, out: Path) -> list[str]:
    return [*_train_args(env, out), "--steps", "4", "--save-every", "2", "--halting", "stochastic",
            "--sample-grad-iters", "2", "--ema", "0.9", "--lr", "3e-3"]


def _log_records(out: Path) -> list[dict]:
    keys = ("step", "loss", "per_iteration", "nll", "lr")
    return [{k: r[k] for k in keys} for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def full_run(env, tmp_path_factory) -> Path:
    """The uninterrupted run the killed ones must match."""
    full = tmp_path_factory.mktemp("full") / "run"
    assert cli_main(["train", *_kill_run_args(env, full)]) == 0
    return full


def test_a_run_killed_mid_save_resumes_exactly(env, full_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    full, killed = full_run, tmp_path / "killed"
    # SIGKILL inside the second save (step 4): the step-2 checkpoint stands, a temporary file and
    # log lines past step 2 are left behind
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, *_kill_run_args(env, killed)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, ALIT_KILL_AT_SAVE="2", OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / "checkpoint.pt.tmp").exists()
    assert torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 2
    assert cli_main(["train", *_kill_run_args(env, killed), "--resume"]) == 0
    assert not (killed / "checkpoint.pt.tmp").exists()
    assert _log_records(killed) == _log_records(full)
    a, b = alit_fast.load(full / "ema.safetensors"), alit_fast.load(killed / "ema.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_kill_during_the_first_save_lets_resume_start_cleanly(env, full_run, tmp_path, monkeypatch, capsys):
    from alit_fast.training import utils as train_utils

    full, killed = full_run, tmp_path / "killed"

    def dies_midway(obj, f, *args, **kwargs):  # the in-process stand-in for a kill
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_utils.torch, "save", dies_midway)
    assert cli_main(["train", *_kill_run_args(env, killed)]) == 130  # Ctrl-C: one line, the shell's status
    monkeypatch.undo()
    # an interrupt removes its temporary file; what a SIGKILL in each writer would leave is made here
    assert not (killed / "checkpoint.pt").exists() and not list(killed.glob("*.tmp"))
    (killed / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    (killed / ".checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")  # an older version's name
    (killed / "model.safetensors.tmp").write_bytes(b"half the final weights")  # a kill in ALIT.save
    assert cli_main(["train", *_kill_run_args(env, killed), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert _log_records(killed) == _log_records(full)
    assert not [p.name for p in killed.iterdir() if ".tmp" in p.name]


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("where", ["cuda", "toaster"])
def test_loading_onto_a_device_this_machine_lacks_says_so(env, where):
    # not "cannot be read as a safetensors file": the file is fine, the device is not
    with pytest.raises(ValueError, match=f"device.*{where}|{where}.*device"):
        alit_fast.load(env.model, device=where)
    with pytest.raises(ValueError, match="map_location"):
        alit_fast.load_official(env.pickle_pth, map_location=where)


# ---------------------------------------------------------------------------- issue 26: every input
def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)


def _mode_files(folder: Path) -> dict[str, tuple[Path, float]]:
    """One file per Pillow mode, each holding a ramp whose true mean is known."""
    folder.mkdir(exist_ok=True)
    g16 = _gradient16()
    g8 = (g16 >> 8).astype(np.uint8)
    files = {}

    def put(name, image, mean, **save):
        image.save(folder / name, **save)
        files[name] = (folder / name, mean)

    put("i16.png", Image.fromarray(g16), 0.5)
    put("i16b.tiff", Image.frombytes("I;16B", (40, 48), g16.astype(">u2").tobytes()), 0.5)
    put("i32.tiff", Image.fromarray(g16.astype(np.int32)), 0.5)
    put("float.tiff", Image.fromarray((g16 / 65535.0).astype(np.float32)), 0.5)
    put("gray.png", Image.fromarray(g8), g8.mean() / 255)
    put("bilevel.png", Image.fromarray(g8).convert("1"), None)
    put("rgba.png", Image.fromarray(np.dstack([g8, g8, g8, np.full_like(g8, 7)]), "RGBA"), g8.mean() / 255)
    put("la.png", Image.fromarray(np.dstack([g8, np.full_like(g8, 9)]), "LA"), g8.mean() / 255)
    palette = Image.fromarray(g8).convert("P")
    put("palette.png", palette, None, transparency=0)
    put("cmyk.tiff", Image.fromarray(np.dstack([g8] * 3)).convert("CMYK"), None)
    put("ycbcr.jpg", Image.fromarray(np.dstack([g8] * 3)), None, quality=95)
    return files


def test_every_image_mode_reads_by_its_true_range_in_every_reader(tmp_path):
    from alit_fast.evaluation.data import read_image
    from alit_fast.io.images import load_image, read_rgb
    from alit_fast.io.token_dataset import read_source
    from alit_fast.training.data import ImageFolder

    files = _mode_files(tmp_path / "modes")
    for name, (path, mean) in files.items():
        # the reference: the whole image at its own size, no resize to blur the ramp's ends
        whole = torch.from_numpy(np.asarray(read_rgb(path), dtype=np.float64) / 255.0)
        if mean is not None:
            assert abs(float(whole.mean()) - mean) < 0.01, name  # 16-bit: 0.500, not 0.998 (clipped at 255)
        assert abs(float(load_image(path, 32).mean()) - float(whole.mean())) < 0.05, name
        assert abs(float(read_source(str(path), 32).mean()) - float(whole.mean())) < 0.05, name
        assert abs(float(read_image(path, 32, "resize").float().mean()) / 255 - float(whole.mean())) < 0.05, name
    folder = ImageFolder(tmp_path / "modes", 32, augment=False)
    assert not folder.skipped and len(folder) == len(files)
    means = sorted(round(float(folder[i]["image"].mean()), 1) for i in range(len(folder)))
    assert means[-1] < 0.9  # no white 16-bit image in training either


@pytest.mark.parametrize("array,message", [
    (np.full((8, 8), 3.5, dtype=np.float32), "float"),
    (np.full((8, 8), -5, dtype=np.int32), "32-bit integer"),
])
def test_an_image_mode_without_a_known_range_is_refused_by_name(tmp_path, array, message):
    from alit_fast.io.images import load_image

    Image.fromarray(array).save(tmp_path / "odd.tiff")
    with pytest.raises(ValueError, match=message):
        load_image(tmp_path / "odd.tiff", 32)


def test_converted_and_resized_images_are_reported_once_with_a_count(env, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(env.images, folder)  # two RGB 40x36 images
    Image.fromarray(np.zeros((32, 32, 4), np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).convert("P").save(folder / "palette.png")
    out = tmp_path / "t.safetensors"
    assert cli_main(["encode", str(folder), "--checkpoint", str(env.model), "--out", str(out), "--quiet"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(notes) == 1
    assert "1 image(s) had an alpha channel" in notes[0] and "1 image(s) were palette" in notes[0]
    assert "2 image(s) were not 32x32" in notes[0]


def test_the_preprocessing_rule_is_in_every_image_commands_help(capsys):
    for command in ("encode", "pretokenize", "visualize"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        assert "centre-cropped" in " ".join(capsys.readouterr().out.split()), command


def test_encode_of_another_image_size_names_the_rules_helper(env):
    from alit_fast.io.images import fit_images

    model = alit_fast.load(env.model)
    images = random_images(2, 32, seed=4)
    wide = torch.nn.functional.interpolate(images, size=(32, 48), mode="bilinear")
    with pytest.raises(ValueError, match=r"fit_images\(images, 32\)"):
        model.encode(wide, "tokens:8")
    fitted = fit_images(wide, 32)
    assert fitted.shape == (2, 3, 32, 32) and len(model.encode(fitted, "tokens:8")) == 2


def _pretokenize(e, out: Path, *extra: str, checkpoint: Path | None = None, inputs=None) -> list[str]:
    return ["pretokenize", *(inputs or [str(e.images)]), "--checkpoint", str(checkpoint or e.model), "--out", str(out),
            "--shard-size", "1", "--criterion", "tokens:8", *extra]


def test_a_resume_over_other_weights_of_the_same_config_refuses_by_name(env, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    shutil.copy(env.model, weights)
    out = tmp_path / "ds"
    assert cli_main(_pretokenize(env, out, checkpoint=weights)) == 0
    index = (out / "index.json").read_bytes()
    (out / "shard-00001.safetensors").unlink()  # as if killed before the last shard
    torch.manual_seed(123)
    ALIT(tiny_config()).save(weights)  # the same path and config, other weights
    capsys.readouterr()
    assert cli_main(_pretokenize(env, out, checkpoint=weights)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model weights" in err[0] and "--overwrite" in err[0]
    assert (out / "index.json").read_bytes() == index and not (out / "shard-00001.safetensors").exists()
    assert json.loads(index)["weights_sha256"]


def test_a_users_own_index_json_is_named_and_kept_even_with_overwrite(env, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "index.json").write_text('{"my": "own notes"}')
    for extra in ((), ("--overwrite",)):
        assert cli_main(_pretokenize(env, out, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "did not write (index.json)" in err[0] and "left alone" in err[0]
        assert (out / "index.json").read_text() == '{"my": "own notes"}'


@pytest.fixture()
def dataset(env, tmp_path) -> Path:
    out = tmp_path / "ds"
    assert cli_main(_pretokenize(env, out)) == 0
    return out


def test_swapped_shards_are_refused_not_read_under_another_name(dataset):
    a, b = dataset / "shard-00000.safetensors", dataset / "shard-00001.safetensors"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(ValueError, match="sha256"):
        open_dataset(dataset)[0]


@pytest.mark.parametrize("edit,message", [
    (lambda index: index["items"][0].__setitem__(1, 64), "disagrees"),  # a token count 8 -> 64
    (lambda index: index["items"][0].__setitem__(2, 7), "outside"),  # a shard that is not there
    (lambda index: index["items"][0].__setitem__(1, -8), "malformed"),
    (lambda index: index.pop("items"), "'items'"),
    (lambda index: index.__setitem__("items", []), "do not name each"),  # every image dropped
    (lambda index: index["items"].pop(), "do not name each"),
    (lambda index: index["items"].__setitem__(1, index["items"][0]), "do not name each"),  # one read twice
])
def test_a_hand_edited_index_is_refused_by_name(dataset, edit, message):
    index = json.loads((dataset / "index.json").read_text())
    edit(index)
    (dataset / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        open_dataset(dataset)[0]


@pytest.mark.parametrize("codes,lengths,message", [
    (torch.tensor([1.7, 2.2, 3.9]), torch.tensor([3]), "float32"),  # would be truncated to 1, 2, 3
    (torch.tensor([1, 2, 3], dtype=torch.int16), torch.tensor([5, -2]), "negative token count"),
])
def test_a_hand_made_token_file_is_refused_by_name(tmp_path, codes, lengths, message):
    path = tmp_path / "hand.safetensors"
    save_file({"codes": codes, "lengths": lengths}, str(path),
              metadata={"format": "alit_fast.tokens.v1", "codebook_size": "16"})
    with pytest.raises(ValueError, match=message):
        TokenBatch.load(path)


def test_a_tar_cut_short_is_refused_not_silently_shortened(env, tmp_path, capsys):
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(8):
            data = env.png.read_bytes()
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        sixth = tar.getmembers()[5].offset
    for cut in (sixth, sixth + 100):  # at a member boundary (tarfile lists 5 members) and inside a header
        shard = tmp_path / f"cut{cut}.tar"
        shard.write_bytes(whole[:cut])
        assert cli_main(_pretokenize(env, tmp_path / f"ds{cut}", inputs=[str(shard)])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cut short" in err[0] and shard.name in err[0]
    (tmp_path / "whole.tar").write_bytes(whole)
    assert cli_main(_pretokenize(env, tmp_path / "dsw", inputs=[str(tmp_path / "whole.tar")])) == 0
    assert len(open_dataset(tmp_path / "dsw")) == 8


def test_an_edited_alit_fast_file_is_refused_not_read_as_official(env, tmp_path):
    from alit_fast.io.weights import FINGERPRINT_KEY

    with pytest.raises(CheckpointError, match="edited"):
        alit_fast.load(str(env.heads_edited))
    # the case: no fingerprint, config edited: the file is ours, so no size guessing
    edited = tmp_path / "edited.safetensors"
    _edit_metadata(env.model, edited, lambda m: (m.pop(FINGERPRINT_KEY), m.update(
        alit_fast_config=tiny_config(width=96).to_json())))
    with pytest.raises(CheckpointError, match="does not fit"):
        alit_fast.load(str(edited))
    official = tmp_path / "official.safetensors"  # official weights re-saved: inferred, with a warning
    _edit_metadata(env.model, official, lambda m: m.clear())
    with pytest.warns(UserWarning, match="official-layout"):
        assert alit_fast.load(str(official)).config.codebook_size == tiny_config().codebook_size


def _stage2(e, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "finetune", "--init", str(e.model), "--config", str(e.config), "--data", "synthetic",
            "--data-length", "4", "--batch-size", "2", "--threads", "1", "--no-progress", "--lpips", "off",
            "--disc-ndf", "8", "--steps", "1", "--out", str(out), *extra]


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["truncated", "random", "incomplete", "malicious", "stage1"])
def test_a_bad_stage2_resume_checkpoint_is_one_line(env, tmp_path, capsys, kind):
    bad = tmp_path / "checkpoint.pt"
    if kind == "truncated":
        _truncate(env.run / "checkpoint.pt", bad)
    elif kind == "random":
        bad.write_bytes(np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    elif kind == "incomplete":
        torch.save({"stage": "finetune", "config": "{}", "rng": [], "step": 1}, bad)
    elif kind == "malicious":
        torch.save({"stage": _Boom()}, bad)
    else:
        shutil.copy(env.run / "checkpoint.pt", bad)
    assert cli_main(_stage2(env, tmp_path / "run", "--resume", str(bad))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alit-fast train: --resume") and "weights_only=False" not in err[0]
    if kind == "malicious":  # named for what it would do, and no way to load it
        assert len(err) == 1 and "system" in err[0] and "weights_only=False" not in err[0]


def test_visualize_sheets_zero_with_one_image_is_one_line(env, tmp_path, capsys):
    argv = ["visualize", str(env.png), "--checkpoint", str(env.model), "--sheets", "0", "--out", str(tmp_path / "v.png")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sheets 0" in err[0]


def test_visualize_of_images_of_another_size_says_so_once_and_draws_them(env, tmp_path, capsys):
    out = tmp_path / "v.png"  # the images are 40x36, the model's 32x32
    assert cli_main(["visualize", str(env.images), "--checkpoint", str(env.model), "--sheets", "1", "--scale", "1",
                     "--out", str(out)]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert notes == ["alit-fast visualize: note: 2 image(s) were not 32x32: shorter side resized to 32, then "
                     "centre-cropped (docs/preprocessing.md)"]
    assert Image.open(out).size[0] > 32


def test_visualize_refuses_a_scale_that_would_draw_gigabytes(env, tmp_path, capsys):
    argv = ["visualize", str(env.png), "--checkpoint", str(env.model), "--scale", "1000", "--out", str(tmp_path / "v.png")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scale 1000" in err[0] and "at most 64" in err[0] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("answer", [None, "yes", object()])
def test_a_criterion_callable_returning_no_bools_is_a_type_error(env, answer):
    model = alit_fast.load(env.model)
    with pytest.raises(TypeError, match="must return bools"):
        model.encode(random_images(2, 32, seed=5), lambda view: answer)


def test_a_state_result_out_of_range_is_an_index_error(env):
    from alit_fast.inference import start

    model = alit_fast.load(env.model)
    state = start(model, random_images(2, 32, seed=6), keep_outputs=True)
    state.step()
    assert state.result(1).iterations == 1
    with pytest.raises(IndexError, match="0..1"):
        state.result(100)


def test_a_second_run_into_a_busy_folder_refuses_by_name_and_a_dead_runs_lock_is_taken_over(env, tmp_path, capsys):
    import socket

    from alit_fast.files import LOCK_NAME

    out = tmp_path / "ds"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "alit-fast pretokenize"}))
    assert cli_main(_pretokenize(env, out)) == 2  # pid 1 is alive: a run in progress
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another run" in err[0] and "pid 1" in err[0]
    assert not (out / "index.json").exists()
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # a killed run's
    assert cli_main(_pretokenize(env, out)) == 0
    assert (out / "index.json").exists() and not lock.exists()


@pytest.mark.parametrize("name,content", [("log.jsonl", b"my own notes\n"), ("log.jsonl", b'["step"]\n'),
                                          ("model.safetensors", None), ("ema.safetensors", b"not weights"),
                                          ("checkpoint.pt", b"my own checkpoint")])
def test_a_users_files_named_like_a_runs_are_named_and_kept_even_with_overwrite(env, tmp_path, capsys, name, content):
    out = tmp_path / "run"
    out.mkdir()
    if content is None:  # weights written by someone else: safetensors, but not alit_fast's
        save_file({"w": torch.zeros(2)}, str(out / name))
    else:
        (out / name).write_bytes(content)
    kept = (out / name).read_bytes()
    for extra in ((), ("--overwrite",), ("--resume",)):
        assert cli_main(["train", *_train_args(env, out), "--steps", "1", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "did not write" in err[0] and name in err[0] and "left alone" in err[0], err
        assert (out / name).read_bytes() == kept and sorted(p.name for p in out.iterdir()) == [name]


def _race(argv: list[str], runs: int = 2) -> list[tuple[int, str]]:
    """``runs`` forked processes start ``argv`` at one instant; (exit status, stderr) of each."""
    import io
    import multiprocessing
    import sys

    context = multiprocessing.get_context("fork")  # torch is loaded already: a fork starts at once
    start, results = context.Barrier(runs), context.Queue()

    def run():
        sys.stderr = io.StringIO()
        start.wait()
        try:
            rc = cli_main(argv)
        except BaseException as exc:  # a traceback: reported, not hidden
            rc = f"{type(exc).__name__}: {exc}"
        results.put((rc, sys.stderr.getvalue()))

    processes = [context.Process(target=run) for _ in range(runs)]
    for process in processes:
        process.start()
    answers = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    return answers


def test_two_pretokenize_runs_racing_into_one_folder_end_as_one_dataset(env, tmp_path):
    out = tmp_path / "ds"
    answers = _race(_pretokenize(env, out))
    codes = sorted(rc for rc, _ in answers)
    assert codes in ([0, 0], [0, 2]), answers  # the second one waited for nothing, or refused by name
    if codes == [0, 2]:
        refused = next(err for rc, err in answers if rc == 2).strip().splitlines()
        assert len(refused) == 1 and "in use by another run" in refused[0], refused
    assert len(open_dataset(out)) == 2 and open_dataset(out)[1].length == 8
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or p.name == ".alit_fast.lock"]


def test_train_into_a_busy_folder_refuses_by_name(env, tmp_path, capsys):
    import socket

    from alit_fast.files import LOCK_NAME

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "alit-fast train"}))
    assert cli_main(["train", *_train_args(env, out), "--steps", "1"]) == 2
    assert "in use by another run" in capsys.readouterr().err and not (out / "checkpoint.pt").exists()
    (out / LOCK_NAME).unlink()
    assert cli_main(["train", *_train_args(env, out), "--steps", "1"]) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end


def _read_only(monkeypatch):
    """A read-only mount, as root meets it too (os.access says yes to root; creating a file fails)."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("argv_of", [
    lambda e, o: _encode(e, o),
    lambda e, o: _pretokenize(e, o / "ds"),
    lambda e, o: ["evaluate", "--data", str(e.images), "--checkpoint", str(e.model), "--out", str(o / "ev"),
                  "--metrics", "l1", "--tokens", "8"],
    lambda e, o: _train(e, o),
    lambda e, o: _cache(e, o),
    lambda e, o: _decode(e, o),
    lambda e, o: ["convert", str(e.pickle_pth), str(o / "converted")],
    lambda e, o: ["calibrate", "--checkpoint", str(e.model), "--data", str(e.images), "--out", str(o / "c.safetensors")],
], ids=["encode", "pretokenize", "evaluate", "train", "cache-base", "decode", "convert", "calibrate"])
def test_a_read_only_output_is_refused_before_the_work(env, tmp_path, capsys, monkeypatch, argv_of):
    import alit_fast.cli.convert as convert_cli
    import alit_fast.io.pretrained as pretrained

    _read_only(monkeypatch)
    loaded = []
    monkeypatch.setattr(pretrained, "load", lambda *a, **k: loaded.append(1) or alit_fast.load(*a, **k))
    monkeypatch.setattr(convert_cli, "load_official", lambda *a, **k: loaded.append(1) or alit_fast.load_official(*a, **k))
    assert cli_main(argv_of(env, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0] and "Read-only" in err[0]
    assert not loaded  # refused before the model was even read


def test_a_disk_without_room_for_the_shards_is_refused_with_the_numbers(env, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=100))
    assert cli_main(_pretokenize(env, tmp_path / "ds")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "will be written" in err[0] and "100 B free" in err[0]
    assert not list((tmp_path / "ds").glob("shard-*"))


@pytest.mark.parametrize("argv_of", [
    lambda e, o: _encode(e, o),
    lambda e, o: ["evaluate", "--data", str(e.images), "--checkpoint", str(e.model), "--out", str(o / "ev"),
                  "--metrics", "l1", "--tokens", "8", "--workers", "0", "--quiet"],
    lambda e, o: _decode(e, o),
    lambda e, o: _train(e, o),
    lambda e, o: ["convert", str(e.pickle_pth), str(o / "converted")],
    lambda e, o: _cache(e, o),
], ids=["encode", "evaluate", "decode", "train", "convert", "cache-base"])
def test_every_writing_command_without_room_refuses_with_the_numbers_before_writing(env, tmp_path, capsys,
                                                                                   monkeypatch, argv_of):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=100))
    assert cli_main(argv_of(env, tmp_path)) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ": note: " not in ln]
    assert len(err) == 1 and "will be written" in err[0] and "100 B free" in err[0], err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def _disk_fills_up(monkeypatch, module, after: int = 100):
    """``open`` in ``module`` gives files that take ``after`` bytes, then fail as a full disk does."""
    import builtins
    import errno

    class Full:
        def __init__(self, path, mode="r", *args, **kwargs):
            self.f, self.path = builtins.open(path, mode, *args, **kwargs), path

        def write(self, data):
            self.f.write(data[:after])
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(module, "open", Full, raising=False)


def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_keeps_the_earlier_output(env, tmp_path, capsys,
                                                                                       monkeypatch):
    import alit_fast.inference.tokens as tokens_module

    out = tmp_path / "t.safetensors"
    assert cli_main(_encode(env, tmp_path)) == 0
    before = out.read_bytes()
    _disk_fills_up(monkeypatch, tokens_module)
    capsys.readouterr()
    assert cli_main(_encode(env, tmp_path, "--criterion", "tokens:4")) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("alit-fast")]
    assert len(err) == 1 and "No space left on device" in err[0] and "t.safetensors" in err[0]
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


@pytest.fixture()
def files_over_600_bytes_fail():
    """Every write past 600 bytes of a file fails (EFBIG) as a full disk does (ENOSPC): in the
    kernel, so safetensors' Rust writer, torch.save's stream writer and Pillow all meet it."""
    import contextlib
    import resource
    import signal

    @contextlib.contextmanager
    def limited():
        old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, old[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, handler)

    return limited


@pytest.mark.parametrize("argv_of,written", [
    (lambda e, o: _encode(e, o), "t.safetensors"),
    (lambda e, o: _pretokenize(e, o / "ds"), "shard-00000.safetensors"),
    (lambda e, o: ["evaluate", "--data", str(e.images), "--checkpoint", str(e.model), "--out", str(o / "ev"),
                   "--metrics", "l1", "--tokens", "8", "--workers", "0", "--quiet"], "report"),
    (lambda e, o: _decode(e, o), "00000.png"),
    (lambda e, o: _train(e, o), "checkpoint.pt"),
    (lambda e, o: ["convert", str(e.pickle_pth), str(o / "converted")], "model.safetensors"),
    (lambda e, o: _cache(e, o), "c"),
    (lambda e, o: _demo(e, o), "demo.png"),
], ids=["encode", "pretokenize", "evaluate", "decode", "train", "convert", "cache-base", "demo"])
def test_every_writing_command_on_a_full_disk_is_one_line_naming_what_it_could_not_write(
        env, tmp_path, capsys, files_over_600_bytes_fail, argv_of, written):
    argv = argv_of(env, tmp_path)
    before = _snapshot(env.root)
    with files_over_600_bytes_fail():
        rc = cli_main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if ln.startswith("alit-fast") and ": note: " not in ln and ": warning: " not in ln]
    assert rc == 2 and len(err) == 1, err
    assert "cannot write" in err[0] and written in err[0], err
    assert "File too large" in err[0] or "is the disk full?" in err[0], err  # torch.save's writer hides the errno
    assert _snapshot(env.root) == before  # nothing the user had is touched
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


def test_a_base_cache_reserves_its_arrays_so_a_disk_filling_up_is_one_line_not_a_crash(env, tmp_path, capsys,
                                                                                     monkeypatch):
    import errno
    import os

    def no_room(fd, offset, length):  # what a disk filled by someone else since the space check says
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    assert cli_main(_cache(env, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "z.npy: No space left on device" in err[0], err
    assert not list(tmp_path.iterdir())  # no unfinished cache left


def test_cache_base_keeps_a_users_folder_where_it_builds_and_clears_a_killed_runs(env, tmp_path, capsys):
    partial = tmp_path / "c.partial"  # _cache builds tmp_path / "c" there
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    assert cli_main(_cache(env, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c.partial is in the way" in err[0] and (partial / "notes.txt").read_text() == "mine"
    (partial / "notes.txt").unlink()
    (partial / "z.npy").write_bytes(b"half an array")  # what a SIGKILL mid-pass leaves
    assert cli_main(_cache(env, tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_writer_that_hides_a_full_disk_is_reported_as_one(tmp_path):
    from alit_fast.files import write_atomic

    def safetensors_like(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')

    def torch_like(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file: "
                           "unexpected pos 448 vs 384")

    def safetensors_08_like(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    def file_object_like(tmp):  # Pillow and open().write: an OSError that names no file
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    for writer, errno_expected in ((safetensors_like, 28), (torch_like, 5), (safetensors_08_like, 28),
                                   (file_object_like, 28)):
        with pytest.raises(OSError) as caught:
            write_atomic(tmp_path / "m.safetensors", writer)
        assert caught.value.errno == errno_expected and not list(tmp_path.iterdir())
        assert caught.value.filename == str(tmp_path / "m.safetensors")


def test_a_full_disk_while_training_keeps_the_last_checkpoint_and_no_partial_one(env, tmp_path, capsys, monkeypatch):
    from alit_fast.training import utils as train_utils

    out = tmp_path / "run"
    assert cli_main(["train", *_train_args(env, out), "--steps", "1"]) == 0
    good = (out / "checkpoint.pt").read_bytes()

    def fills_up(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(train_utils.torch, "save", fills_up)
    assert cli_main(["train", *_train_args(env, out), "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alit-fast train: cannot write ") and "checkpoint.pt" in err[-1]
    assert (out / "checkpoint.pt").read_bytes() == good and not list(out.glob(".checkpoint.pt.tmp*"))


def test_the_torch_backend_keeps_a_nan_query_row_nan_like_the_others():
    from alit_fast.ops.attention import attention_math, attention_naive, attention_reference

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 5, 2, 16) for _ in range(3))
    q[0, 1] = float("nan")
    for lengths in (None, torch.tensor([4, 5, 0], dtype=torch.int32)):  # a length-0 sample: all zeros
        for backend in (attention_reference, attention_math, attention_naive):
            out = backend(q, k, v, lengths)
            assert out[0, 1].isnan().all() and not out[0, 0].isnan().any() and not out[1:].isnan().any(), backend
            if lengths is not None:
                assert not out[2].any() and not out[0, 4].any(), backend


def test_a_junk_checkpoint_error_gives_no_advice_to_load_it_unsafely(env, tmp_path):
    for junk in (env.garbage_pth, env.ckpt_garbage):
        with pytest.raises(CheckpointError) as caught:
            alit_fast.load_official(junk)
        assert "weights_only=False" not in str(caught.value) and "damaged or not a checkpoint" in str(caught.value)


def test_evaluate_keeps_a_users_metrics_file_even_with_overwrite(env, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text("my own numbers")
    argv = ["evaluate", "--data", str(env.images), "--checkpoint", str(env.model), "--out", str(out), "--metrics",
            "l1", "--tokens", "8", "--workers", "0", "--quiet", "--overwrite"]
    assert cli_main(argv) == 2
    assert "left alone" in capsys.readouterr().err and (out / "metrics.json").read_text() == "my own numbers"
    (out / "metrics.json").unlink()
    assert cli_main(argv) == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert len(settings["weights_sha256"]) == 64 and settings["alit_fast_version"] == alit_fast.__version__


def test_a_long_encode_stopped_late_keeps_the_tokens_done_so_far(env, tmp_path, monkeypatch, capsys):
    import alit_fast.cli.encode as encode_cli

    real = ALIT.encode_stream  # what the command runs (continuous batching)

    def stops_on_the_second_batch(self, *args, **kwargs):
        for k, tokens in enumerate(real(self, *args, **kwargs)):
            if k == 1:
                raise KeyboardInterrupt  # or a crash, or the machine's time running out
            yield tokens

    monkeypatch.setattr(encode_cli, "PARTIAL_EVERY_S", 0.0)
    monkeypatch.setattr(ALIT, "encode_stream", stops_on_the_second_batch)
    capsys.readouterr()
    assert cli_main(_encode(env, tmp_path, "--batch-size", "1")) == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("alit-fast encode: interrupted") and "marked partial" in said
    kept = TokenBatch.load(tmp_path / "t.safetensors")
    assert [Path(n).name for n in kept.names] == ["a.png"] and kept.extra["partial"].startswith("1 of 2")
    monkeypatch.undo()
    assert cli_main(_encode(env, tmp_path, "--batch-size", "1")) == 0  # the partial file is replaced
    done = TokenBatch.load(tmp_path / "t.safetensors")
    assert len(done) == 2 and "partial" not in done.extra


def test_evaluate_and_training_report_converted_images_once(env, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(env.images, folder)
    Image.fromarray(np.full((40, 40, 4), 90, np.uint8), "RGBA").save(folder / "alpha.png")
    argv = ["evaluate", "--data", str(folder), "--checkpoint", str(env.model), "--out", str(tmp_path / "ev"),
            "--metrics", "l1", "--tokens", "8", "--workers", "0", "--quiet"]
    assert cli_main(argv) == 0
    assert [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln] == [
        "alit-fast evaluate: note: 1 image(s) had an alpha channel (dropped); 3 image(s) were not 32x32: --crop center "
        "took their central 32x32 pixels at native size (the official benchmark's crop; --crop resize sizes them as "
        "encode does)"]
    Image.fromarray(np.full((40, 40), 60, np.uint8)).convert("P").save(folder / "palette.png")  # 4 images: a batch
    assert cli_main(["train", *_train_args(env, tmp_path / "run"), "--data", str(folder), "--steps", "1"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "1 image(s) had an alpha channel" in notes[0] and "1 image(s) were palette" in notes[0]


def test_a_lock_held_by_a_live_process_refuses_and_is_taken_over_once_it_is_killed(env, tmp_path, capsys):
    import signal
    import subprocess
    import sys

    out = tmp_path / "ds"
    out.mkdir()
    import alit_fast.files

    # the lock module alone (stdlib only), not the package: no torch import to wait for
    holds = ("import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('files', sys.argv[2]); "
             "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files); "
             "files.acquire_lock(sys.argv[1], 'another run'); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", holds, str(out), alit_fast.files.__file__], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_main(_pretokenize(env, out)) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli_main(_pretokenize(env, out)) == 0  # the killed run's lock is stale


def test_an_evaluation_stopped_late_continues_from_its_saved_sums_to_the_same_report(env, tmp_path, monkeypatch,
                                                                                     capsys):
    import alit_fast.cli.evaluate as evaluate_cli

    folder = tmp_path / "three"
    shutil.copytree(env.images, folder)
    shutil.copy(env.png, folder / "c.png")

    def argv(out):
        return ["evaluate", "--data", str(folder), "--checkpoint", str(env.model), "--out", str(out), "--metrics",
                "l1,psnr", "--tokens", "4,12", "--criterion", "code-acc:0.5", "--batch-size", "1", "--workers", "0",
                "--quiet"]

    def rows(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((out / "metrics.json").read_text())["rows"]]

    assert cli_main(argv(tmp_path / "whole")) == 0
    real, calls = ALIT.rollout, []

    def crashes_on_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(evaluate_cli, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(ALIT, "rollout", crashes_on_the_third_batch)
    with pytest.raises(RuntimeError, match="stand-in"):
        cli_main(argv(tmp_path / "ev"))
    assert (tmp_path / "ev" / evaluate_cli.PROGRESS).exists()
    monkeypatch.setattr(ALIT, "rollout", real)
    other = argv(tmp_path / "ev")
    other[other.index("code-acc:0.5")] = "code-acc:0.6"
    assert cli_main(other) == 2 and "another evaluation" in capsys.readouterr().err  # other options: refused
    calls.clear()
    monkeypatch.setattr(ALIT, "rollout", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert cli_main(argv(tmp_path / "ev")) == 0
    assert len(calls) == 1  # only the third image was left
    assert rows(tmp_path / "ev") == rows(tmp_path / "whole") and not (tmp_path / "ev" / evaluate_cli.PROGRESS).exists()


def _evaluation_stopped_after_one_image(argv, monkeypatch) -> bytes:
    """Run ``argv`` (an evaluate command, batch size 1) until a stand-in crash on its second batch;
    returns the progress it saved."""
    import alit_fast.cli.evaluate as evaluate_cli

    real = ALIT.rollout
    calls = []

    def crashes_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a stand-in crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(evaluate_cli, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(ALIT, "rollout", crashes_on_the_second_batch)
    with pytest.raises(RuntimeError, match="stand-in"):
        cli_main(argv)
    monkeypatch.setattr(ALIT, "rollout", real)
    return (Path(argv[argv.index("--out") + 1]) / evaluate_cli.PROGRESS).read_bytes()


def _refused_as_another_evaluation(argv, progress: bytes, capsys) -> str:
    import alit_fast.cli.evaluate as evaluate_cli

    out = Path(argv[argv.index("--out") + 1])
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ": note: " not in ln]
    assert len(err) == 1 and "another evaluation" in err[0], err
    assert (out / evaluate_cli.PROGRESS).read_bytes() == progress and not (out / "metrics.json").exists()
    return err[0]


def test_an_evaluation_continued_over_other_weights_at_the_same_path_is_refused(env, tmp_path, monkeypatch, capsys):
    weights, out = tmp_path / "model.safetensors", tmp_path / "ev"
    shutil.copy(env.model, weights)
    argv = ["evaluate", "--data", str(env.images), "--checkpoint", str(weights), "--out", str(out), "--metrics", "l1",
            "--tokens", "8", "--batch-size", "1", "--workers", "0", "--quiet"]
    progress = _evaluation_stopped_after_one_image(argv, monkeypatch)
    torch.manual_seed(123)
    ALIT(tiny_config()).save(weights)  # the same path and config, other weights
    assert "model weights" in _refused_as_another_evaluation(argv, progress, capsys)


def test_an_evaluation_continued_over_an_image_rewritten_in_place_is_refused(env, tmp_path, monkeypatch, capsys):
    from PIL import Image, ImageOps

    folder, out = tmp_path / "images", tmp_path / "ev"
    shutil.copytree(env.images, folder)
    argv = ["evaluate", "--data", str(folder), "--checkpoint", str(env.model), "--out", str(out), "--metrics", "l1",
            "--tokens", "8", "--batch-size", "1", "--workers", "0", "--quiet"]
    progress = _evaluation_stopped_after_one_image(argv, monkeypatch)
    first = sorted(folder.iterdir())[0]
    stamp = first.stat()
    with Image.open(first) as image:
        inverted = ImageOps.invert(image.convert("RGB"))
    inverted.save(first, format=image.format)  # another image at the same path
    os.utime(first, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))  # even on a coarse clock
    _refused_as_another_evaluation(argv, progress, capsys)


def test_an_image_gone_between_the_scan_and_the_evaluation_is_one_line(env, tmp_path, monkeypatch, capsys):
    import alit_fast.cli.evaluate as evaluate_cli

    folder = tmp_path / "images"
    shutil.copytree(env.images, folder)
    gone = sorted(folder.iterdir())[0]
    real = evaluate_cli.weights_digest

    def digest_then_remove(model):  # between the readability scan and the run's identity
        gone.unlink()
        return real(model)

    monkeypatch.setattr(evaluate_cli, "weights_digest", digest_then_remove)
    argv = ["evaluate", "--data", str(folder), "--checkpoint", str(env.model), "--out", str(tmp_path / "ev"),
            "--metrics", "l1", "--tokens", "8", "--batch-size", "1", "--workers", "0", "--quiet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read the image {gone}" in err[0], err


def test_saved_evaluation_progress_restores_every_sum_and_the_halting_generator(tmp_path):
    from alit_fast.evaluation.metrics import FeatureStats, MetricSums
    from alit_fast.evaluation.run import _Pass, _restore_progress, _save_progress

    def fresh():
        return _Pass(model=None, per_image=("l1",), fixed_iters=[0], needed=[0], fixed={0: MetricSums(("l1",))},
                     fixed_feats={0: FeatureStats(4)}, gt_feats=FeatureStats(4), adaptive=[])

    sums, generator = fresh(), torch.Generator().manual_seed(7)
    sums.fixed[0].add({"l1": torch.rand(3, dtype=torch.float64)}, 3)
    sums.fixed_feats[0].add(torch.rand(3, 4))
    sums.gt_feats.add(torch.rand(3, 4))
    torch.rand(5, generator=generator)  # the stream has moved on
    _save_progress(tmp_path / "p.pt", "id", sums, generator, offset=3, seconds=1.5)
    restored, other = fresh(), torch.Generator().manual_seed(0)
    assert _restore_progress(tmp_path / "p.pt", "id", restored, other, "cpu") == {"offset": 3, "seconds": 1.5}
    assert torch.equal(restored.fixed[0].sums, sums.fixed[0].sums)
    assert torch.equal(restored.gt_feats.gram, sums.gt_feats.gram) and len(restored.gt_feats.rows) == 1
    assert torch.equal(torch.rand(4, generator=other), torch.rand(4, generator=generator))
    with pytest.raises(ValueError, match="another evaluation"):
        _restore_progress(tmp_path / "p.pt", "another id", fresh(), None, "cpu")


def test_a_base_cache_from_another_image_reader_is_refused_by_name(env, tmp_path):
    from alit_fast.training.base_cache import BaseCacheDataset

    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    model = alit_fast.load(env.model)
    BaseCacheDataset(cache).check_model(model)  # the cache as written fits
    index = json.loads((cache / "index.json").read_text())
    index.pop("image_reader")  # as written before 16-bit images were read by their range
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="older image reader"):
        BaseCacheDataset(cache).check_model(model)


def test_a_resumed_evaluation_of_a_vae_model_draws_the_same_posterior_samples(tmp_path, monkeypatch):
    """Without a halting generator the VAE's posterior noise comes from torch's global generator:
    the saved progress carries its state, so the continued pass draws what the whole one did."""
    import alit_fast.evaluation.run as run
    from alit_fast.testing import tiny_vae_config

    torch.manual_seed(0)
    model = ALIT(tiny_vae_config()).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def evaluate(**kwargs):
        torch.manual_seed(123)  # as a fresh process would start
        return run.evaluate(model, images, tokens="all", metrics="l1", batch_size=2, halting="off", **kwargs)

    whole = evaluate()
    assert not whole.settings["deterministic"] and whole.settings["seed"] is None
    real, calls = run._add_batch, []

    def stops_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "_add_batch", stops_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(progress_file=tmp_path / "p.pt", identity="same", save_every=0.0)
    monkeypatch.setattr(run, "_add_batch", real)
    resumed = evaluate(progress_file=tmp_path / "p.pt", identity="same", save_every=0.0)
    assert [r.metrics for r in resumed.rows] == [r.metrics for r in whole.rows]


def test_a_progress_file_that_cannot_be_read_for_a_reason_outside_it_is_not_called_damaged(tmp_path, monkeypatch):
    """Only a damaged file gets the advice to remove it; a permission or disk error is itself."""
    import alit_fast.evaluation.run as run

    (tmp_path / "p.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be resumed from"):
        run._restore_progress(tmp_path / "p.pt", "id", None, None, "cpu")

    def forbidden(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "p.pt"))

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(PermissionError):
        run._restore_progress(tmp_path / "p.pt", "id", None, None, "cpu")
