"""The frozen base tokenizer: the MAGE variant of taming's VQGAN, module names as in its checkpoints.

Quirks kept on purpose because the released weights were trained with them:
- the 1x1 ``nin_shortcut`` of a res block is applied to the residual branch's output h,
  not to the input x, and the block returns shortcut(h) + h;
- the encoder downsamples by 2x2 average pooling (no conv), and has no attention blocks;
- there is no quant_conv / post_quant_conv, and the lookup is plain (unnormalized) nearest neighbour.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VQGANConfig
from ..ops import duplicate_map, vq_nearest
from ._cache import WeightsCache


def _norm(channels: int, cfg: VQGANConfig) -> nn.GroupNorm:
    groups = min(cfg.norm_groups, max(1, channels // cfg.min_group_channels))
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, cfg: VQGANConfig = VQGANConfig()) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels, cfg)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            # the MAGE quirk: the shortcut sees h, and x is dropped
            return self.nin_shortcut(h) + h
        return x + h


class _MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VQGANConfig) -> None:
        super().__init__()
        self.block_1 = ResBlock(channels, channels, cfg.dropout, cfg)
        self.block_2 = ResBlock(channels, channels, cfg.dropout, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], upsample: bool = False, channels: int = 0) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample:
            self.upsample = nn.Module()
            self.upsample.conv = nn.Conv2d(channels, channels, 3, padding=1)


class VQGANEncoder(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        levels = []
        ch_in = cfg.ch
        for mult in cfg.ch_mult:
            ch_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch_in, ch_out, cfg.dropout, cfg))
                ch_in = ch_out
            levels.append(_Level(blocks))
        self.down = nn.ModuleList(levels)
        self.mid = _MidBlock(ch_in, cfg)
        self.norm_out = _norm(ch_in, cfg)
        self.conv_out = nn.Conv2d(ch_in, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != last:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _MidBlock(ch_in, cfg)
        levels: list[_Level] = [None] * len(cfg.ch_mult)  # type: ignore[list-item]
        for i in reversed(range(len(cfg.ch_mult))):
            ch_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch_in, ch_out, cfg.dropout, cfg))
                ch_in = ch_out
            levels[i] = _Level(blocks, upsample=i != 0, channels=ch_in)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch_in, cfg)
        self.conv_out = nn.Conv2d(ch_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANQuantizer(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.z_channels)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        self.backend = "auto"
        self._first_copy = WeightsCache(duplicate_map)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> code indices [B, h*w], row-major over the grid."""
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        weight = self.embedding.weight
        first_copy = self._first_copy(weight) if self.backend in ("torch", "auto") else None
        # the images were validated by the caller; a NaN here would come from the weights
        indices, _ = vq_nearest(flat, weight, normalize=False, backend=self.backend, first_copy=first_copy, validate=False)
        return indices.view(B, h * w)


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VQGANEncoder(cfg)
        self.decoder = VQGANDecoder(cfg)
        self.quantize = VQGANQuantizer(cfg)


class BaseTokenizer(nn.Module):
    """images [B, 3, H, W] in [0, 1] <-> a grid of VQGAN codes. Frozen during ALIT training."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vqgan = VQGAN(cfg)

    @property
    def codebook(self) -> torch.Tensor:
        return self.vqgan.quantize.embedding.weight

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (z [B, C, h, w] before quantization, code indices [B, h*w])."""
        z = self.vqgan.encoder(images)
        return z, self.vqgan.quantize.lookup(z)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q [B, C, h, w], or [B, h*w, C] tokens in row-major grid order -> images [B, 3, H, W]."""
        if z_q.dim() == 3:
            B, n, C = z_q.shape
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(f"decode_latents: {n} tokens do not form a square grid")
            z_q = z_q.transpose(1, 2).reshape(B, C, side, side)
        return self.vqgan.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h*w] -> images [B, 3, H, W]."""
        if indices.dim() != 2:
            raise ValueError(f"decode_indices expects [B, h*w] indices, got {tuple(indices.shape)}")
        if indices.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.stack([indices.min(), indices.max()]).tolist()  # one read, not two
            if lo < 0 or hi >= self.cfg.codebook_size:
                raise ValueError(f"decode_indices: indices must lie in [0, {self.cfg.codebook_size}), got [{lo}, {hi}]")
        return self.decode_latents(self.codebook[indices])
