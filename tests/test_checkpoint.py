import os

import pytest
import torch

import alit_fast
from alit_fast import ALIT, CheckpointError, load, load_official
from alit_fast.io import load_file
from alit_fast.testing import random_images, tiny_config

# the official alit_small listing, kept in the repo so the test does not depend on ../shared
LISTING = os.path.join(os.path.dirname(__file__), "data", "official_alit_small_state_dict.txt")


def read_listing(path: str) -> dict[str, list[int]]:
    shapes = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split(" ", 1)
        shapes[key] = [int(s) for s in shape.strip()[1:-1].split(",")]
    return shapes


def test_alit_small_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = ALIT("alit_small")
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = read_listing(LISTING)
    assert set(mine) - set(official) == set()
    assert set(official) - set(mine) == set()
    assert [k for k in official if official[k] != mine[k]] == []


def test_alit_small_official_round_trip_gives_bit_identical_rollouts():
    torch.manual_seed(0)
    model = ALIT("alit_small").eval()
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "epoch": 3}
    loaded = load_official(ckpt).eval()
    assert loaded.config == model.config
    images = random_images(1, 256)
    with torch.no_grad():
        a = model.rollout(images, iterations=1)[0]
        b = loaded.rollout(images, iterations=1)[0]
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.gt_indices, b.gt_indices)


def test_load_official_infers_every_size():
    cfg = tiny_config(heads=2, layers=4, mlp_ratio=2)
    torch.manual_seed(0)
    model = ALIT(cfg)
    loaded = load_official(model.state_dict(), num_heads=2)
    assert loaded.config == cfg
    # the official rule: as many heads as layers
    assert load_official(model.state_dict()).config.heads == 4


def test_load_official_from_file_prefers_ema_and_ignores_gan_losses(tmp_path):
    torch.manual_seed(0)
    model, ema = ALIT(tiny_config()), ALIT(tiny_config())
    ema_state = {f"module.{k}": v for k, v in ema.state_dict().items()}
    ema_state["gan_losses.0.discriminator.weight"] = torch.zeros(3)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "ema": ema_state}, path)
    loaded = load_official(str(path))
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_load_official_lists_every_problem_at_once():
    torch.manual_seed(0)
    state = ALIT(tiny_config()).state_dict()
    del state["encoder_ln_post.weight"]
    del state["decoder.ffn.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["encoder_mask_token"] = torch.zeros(1, 1, 7)
    with pytest.raises(CheckpointError) as info:
        load_official(state)
    text = str(info.value)
    for needle in ("2 missing keys", "encoder_ln_post.weight", "decoder.ffn.0.bias", "1 unexpected keys", "extra.weight",
                   "1 shape mismatches", "encoder_mask_token"):
        assert needle in text


def test_load_official_reports_a_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_official("/nowhere.pth")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    path = tmp_path / "model.safetensors"
    model.save(str(path))
    loaded = load(str(path)).eval()
    assert loaded.config == model.config
    images = random_images(2, 32)
    with torch.no_grad():
        for a, b in zip(model.rollout(images), loaded.rollout(images)):
            assert torch.equal(a.logits, b.logits) and torch.equal(a.indices, b.indices)


def test_load_rejects_a_file_without_config(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="no alit_fast config"):
        load_file(str(path))


def test_a_training_checkpoint_is_read_with_the_config_it_records(tmp_path):
    cfg = tiny_config(heads=4, halting_threshold=0.3)  # nothing in the shapes says 4 heads
    torch.manual_seed(0)
    model = ALIT(cfg)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": cfg.to_json(), "step": 3}, path)
    loaded = load_official(path)
    assert loaded.config == cfg
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_official(tmp_path)
