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
    (e.vqgan_run / "vqgan.safetensors").write_bytes(b"an earlier run's weights")
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
    ("load-directory", lambda e, o: alit_fast.load(o), CheckpointError, "directory"),
    ("load-garbage", lambda e, o: alit_fast.load(e.garbage_st), CheckpointError, "garbage.safetensors"),
    ("load-truncated", lambda e, o: alit_fast.load(e.trunc_model), CheckpointError, "trunc.safetensors"),
    ("load-a-torch-pickle", lambda e, o: alit_fast.load(e.pickle_pth), CheckpointError, "plain.pth"),
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
    with pytest.raises(KeyboardInterrupt):
        cli_main(["train", *_kill_run_args(env, killed)])
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
    for load in (alit_fast.load, alit_fast.load_official):
        with pytest.raises(ValueError, match="map_location"):
            load(env.model if load is alit_fast.load else env.pickle_pth, map_location=where)
