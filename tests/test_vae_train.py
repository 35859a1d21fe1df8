"""Stage-1 training of the VAE variant: the base cache stores the posterior (mean and std) and a
run that reads it draws the same samples, from the same device stream, as one that runs the VAE."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alit_fast import ALIT
from alit_fast.cli.cache_base import main as cache_main
from alit_fast.training.base_cache import BaseCacheDataset
from alit_fast.training.train import main as train_main
from alit_fast.testing import tiny_vae_config
from tests._single_thread import one_thread  # noqa: F401


def _run(config: str, out: Path, *extra: str) -> int:
    argv = ["--config", config, "--data", "synthetic", "--data-length", "8", "--batch-size", "4", "--lr", "3e-3",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]
    return train_main(argv)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("quantize", [True, False])
def test_vae_cache_holds_the_posterior_and_trains_like_the_vae(tmp_path, quantize):
    cfg = tiny_vae_config(quantize_latent=quantize)
    config = tmp_path / "vae.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(0)
    model = ALIT(cfg)
    init = tmp_path / "init.safetensors"
    model.save(str(init))
    cache = tmp_path / "cache"
    assert cache_main(["--data", "synthetic", "--data-length", "8", "--out", str(cache), "--init", str(init),
                       "--batch-size", "3"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "mean.npy", "std.npy"]
    ds = BaseCacheDataset(cache)
    ds.check_model(model)
    images = torch.stack([ds[i]["image"] for i in range(8)])
    base = model.encode_base(images)
    torch.testing.assert_close(torch.stack([ds[i]["mean"] for i in range(8)]), base.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack([ds[i]["std"] for i in range(8)]), base.std, rtol=0, atol=1e-5)
    # the default halting is the official one (for the VAE its no-op); the cached run samples the
    # posterior from the same device stream, so both runs see the same latents
    common = ("--steps", "2", "--init", str(init))
    assert _run(str(config), tmp_path / "plain", *common) == 0
    assert _run(str(config), tmp_path / "cached", *common, "--base-cache", str(cache)) == 0
    plain, cached = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert len(plain) == 2 and all(np.isfinite(plain))
    assert cached == pytest.approx(plain, rel=1e-4)


def test_continuous_model_refuses_dead_code_restarts(tmp_path, capsys):
    config = tmp_path / "vae.json"
    config.write_text(json.dumps(dataclasses.asdict(tiny_vae_config(quantize_latent=False))))
    assert _run(str(config), tmp_path / "run", "--steps", "1", "--restart-dead-codes", "2") == 2
    assert "no latent codebook" in capsys.readouterr().err


def test_a_bare_kl_autoencoder_file_initialises_the_vae(tmp_path):
    from alit_fast.io.checkpoint import read_checkpoint
    from alit_fast.training.train import load_initial

    torch.manual_seed(1)
    model = ALIT(tiny_vae_config())
    # MAR's kl16.ckpt layout: the autoencoder's own names under "model", plus entries ALIT has no use for
    bare = {k[len("base_tokenizer.vae."):]: v for k, v in model.state_dict().items() if k.startswith("base_tokenizer.vae.")}
    bare["loss.logvar"] = torch.zeros(())
    torch.save({"model": bare}, tmp_path / "kl16.ckpt")
    state, _ = read_checkpoint(tmp_path / "kl16.ckpt", "cpu")
    assert set(state) == {k for k in model.state_dict() if k.startswith("base_tokenizer.vae.")}
    fresh = ALIT(tiny_vae_config())
    assert load_initial(fresh, state) == "the base tokenizer (base_tokenizer.*)"
    for k, v in model.base_tokenizer.state_dict().items():
        assert torch.equal(fresh.base_tokenizer.state_dict()[k], v)
