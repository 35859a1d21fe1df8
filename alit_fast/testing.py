"""Small configurations and inputs for tests, smoke runs and benchmarks at reduced sizes."""
from __future__ import annotations

import torch

from .config import ALITConfig, VQGANConfig


def tiny_config(**changes) -> ALITConfig:
    """A model small enough for unit tests: 32x32 images, an 8x8 grid, 4 tokens per iteration."""
    base = ALITConfig(
        image_size=32,
        patch_size=4,
        width=64,
        layers=2,
        heads=2,
        tokens_per_iter=4,
        iterations=3,
        latent_dim=12,
        codebook_size=64,
        vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48),
    )
    return base.replace(**changes)


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)
