import pytest
import torch

from alit_fast import ALIT, PRESETS, ALITConfig
from alit_fast.testing import tiny_config


def transformer_params(width: int, layers: int, mlp_ratio: int = 4) -> int:
    # ln_1, in_proj (w+b), out_proj (w+b), ln_2, c_fc, c_proj
    per_block = 2 * width + 3 * width * width + 3 * width + width * width + width + 2 * width
    per_block += mlp_ratio * width * width + mlp_ratio * width + mlp_ratio * width * width + width
    return layers * per_block


def alit_params_outside_base(cfg: ALITConfig) -> int:
    """Closed form, written independently of the modules."""
    W, T, I, G2 = cfg.width, cfg.tokens_per_iter, cfg.iterations, cfg.grid_size**2
    embeddings = 2 * (G2 + 1) * W + 4 * W + 2 * T * W + I * T * W
    norms = 3 * 2 * W
    pre_quant = W * cfg.latent_dim + cfg.latent_dim
    decoder = I * T * W + cfg.latent_dim * W + W + 2 * 2 * W
    # the VAE variant regresses the embed_dim latents and feeds them (not z) beside the patches
    out, base = (cfg.vae.embed_dim, cfg.vae.embed_dim) if cfg.base_tokenizer == "vae" else (cfg.vqgan.codebook_size, cfg.vqgan.z_channels)
    decoder += 2 * W * W + 2 * W + 2 * W * out + out
    patch = (W - base) * 3 * cfg.patch_size**2 + (W - base)
    vq = cfg.codebook_size * cfg.latent_dim if cfg.quantize_latent else 0
    return embeddings + norms + pre_quant + decoder + patch + vq + 2 * transformer_params(W, cfg.layers, cfg.mlp_ratio)


def count(model: torch.nn.Module) -> tuple[int, int]:
    sd = model.state_dict()
    outside = sum(v.numel() for k, v in sd.items() if not k.startswith("base_tokenizer."))
    return outside, sum(v.numel() for v in sd.values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_closed_form(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = ALIT(cfg)
    outside, _ = count(model)
    assert outside == alit_params_outside_base(cfg)


def test_alit_small_parameter_count_matches_official():
    with torch.device("meta"):
        model = ALIT("alit_small")
    outside, total = count(model)
    assert outside == 207_532_812
    assert total == 262_048_399


def test_preset_sizes_follow_the_facts():
    assert (PRESETS["alit_tiny"].width, PRESETS["alit_tiny"].layers, PRESETS["alit_tiny"].heads) == (512, 8, 8)
    assert (PRESETS["alit_small"].width, PRESETS["alit_small"].head_dim) == (1024, 128)
    assert (PRESETS["alit_base"].width, PRESETS["alit_base"].layers, PRESETS["alit_base"].heads) == (768, 12, 12)
    assert (PRESETS["alit_semilarge"].layers, PRESETS["alit_semilarge"].heads) == (16, 16)
    small = PRESETS["alit_small"]
    assert (small.num_image_tokens, small.max_tokens, small.iteration_weights[0]) == (257, 256, 2.5)


def test_config_json_round_trip():
    cfg = tiny_config()
    assert ALITConfig.from_json(cfg.to_json()) == cfg


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="grid"):
        tiny_config(patch_size=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        tiny_config(heads=3)
    with pytest.raises(ValueError, match="iteration_weights"):
        tiny_config(iteration_weights=(1.0, 2.0))


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="alit_small"):
        ALIT("alit_huge")


def test_the_late_weights_config_is_the_demo_preset_with_reversed_iteration_weights():
    import dataclasses
    from pathlib import Path

    from alit_fast.config import OFFICIAL_ITERATION_WEIGHTS, PRESETS
    from alit_fast.training.utils import resolve_config

    path = Path(__file__).resolve().parents[1] / "configs" / "demo_late_weights.json"
    cfg = resolve_config(str(path))
    assert cfg.iteration_weights == tuple(reversed(OFFICIAL_ITERATION_WEIGHTS))
    assert cfg == dataclasses.replace(PRESETS["demo"], iteration_weights=cfg.iteration_weights)
