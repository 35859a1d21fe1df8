"""The KL-VAE base tokenizer of ALIT's VAE variant: LDM's KL autoencoder as MAR's KL-16 configures
it (embed_dim 16, ch_mult (1, 1, 2, 2, 4), attention at the 16x16 level), with module names as in
the released checkpoints (``base_tokenizer.vae.*``), so they load as they are.

ALIT uses the posterior SAMPLE scaled by 0.2325 as its 2D latents (``VAEConfig.scale``), in
training and, in the official code, in evaluation too. Here the noise comes from a ``generator``
or is given (``noise``), so a run can be repeated; ``sample=False`` takes the posterior mean,
a deterministic departure from the official evaluation.

Unlike the MAGE VQGAN (models/vqgan.py) this is the plain LDM architecture: biased convolutions,
the 1x1 ``nin_shortcut`` on the block input x, strided-conv downsampling after zero padding on the
right and bottom, single-head attention blocks, ``quant_conv`` / ``post_quant_conv``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VAEConfig

LOGVAR_RANGE = (-30.0, 20.0)


def _norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=cfg.norm_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, channels as the head dimension."""

    def __init__(self, channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1, h*w, C]: one head; the 1/sqrt(C) scale is SDPA's default
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric: one zero row/column on the right and bottom only
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """``block.N`` res blocks, each followed by ``attn.N`` where the level has attention."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class VAEEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig, resolution: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        ch_in, res = cfg.ch, resolution
        for i, mult in enumerate(cfg.ch_mult):
            ch_out = cfg.ch * mult
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, ch_out, cfg))
                ch_in = ch_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(ch_in, cfg))
            level = _Level(blocks, attn)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch_in)
                res //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(ch_in, cfg)
        self.norm_out = _norm(ch_in, cfg)
        # mean and log-variance
        self.conv_out = nn.Conv2d(ch_in, 2 * cfg.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, ch_in, 3, padding=1)
        self.mid = _Mid(ch_in, cfg)
        levels: list[_Level] = [None] * len(cfg.ch_mult)  # type: ignore[list-item]
        for i in reversed(range(len(cfg.ch_mult))):
            ch_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch_in, ch_out, cfg))
                ch_in = ch_out
            level = _Level(blocks, [])
            if i != 0:
                level.upsample = Upsample(ch_in)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch_in, cfg)
        self.conv_out = nn.Conv2d(ch_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        # no clamp or tanh: the official decode returns the raw output
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig, resolution: int) -> None:
        super().__init__()
        self.encoder = VAEEncoder(cfg, resolution)
        self.decoder = VAEDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the diagonal Gaussian posterior, each [B, embed_dim, h, w]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def draw_noise(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise for a posterior sample. Without a generator it is drawn in float32 from
    the global CPU generator and moved, as the official code does (so ``torch.manual_seed`` repeats
    its draws); with one, on the generator's device."""
    if generator is None:
        return torch.randn(shape).to(device=like.device, dtype=like.dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


class VAEBaseTokenizer(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> scaled posterior latents [B, embed_dim, h, w], and back.

    Two settings that are not part of the checkpoint (attributes, defaults as the official code):
    - ``sample_posterior`` (True): the latents are a posterior sample; False takes the mean.
    - ``unscale_decode`` (False): ``decode_latents`` decodes the scaled latents as they are, as
      the official code does (it multiplies by 0.2325 on the way in and never divides on the way
      out); True divides by the scale first, which is what the VAE was trained to decode.
    """

    def __init__(self, cfg: VAEConfig, resolution: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg, resolution)
        self.sample_posterior = True
        self.unscale_decode = False

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (mean, std) [B, embed_dim, h, w]; images in [0, 1], not normalised (as ALIT)."""
        return self.vae.posterior(images)

    def latents(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        sample: bool | None = None,
    ) -> torch.Tensor:
        """The scaled latents ALIT consumes: ``scale * (mean + std * noise)``, or ``scale * mean``
        when not sampling. ``noise`` (shaped like ``mean``) overrides ``generator``."""
        sample = self.sample_posterior if sample is None else sample
        if not sample:
            return mean * self.cfg.scale
        if noise is None:
            noise = draw_noise(mean.shape, mean, generator)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise must have the posterior's shape {list(mean.shape)}, got {list(noise.shape)}")
        return (mean + std * noise.to(mean)) * self.cfg.scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, h, w], or [B, h*w, C] tokens in row-major grid order -> images
        (not clamped). See ``unscale_decode``."""
        if z.dim() == 3:
            B, n, C = z.shape
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(f"decode_latents: {n} tokens do not form a square grid")
            z = z.transpose(1, 2).reshape(B, C, side, side)
        if self.unscale_decode:
            z = z / self.cfg.scale
        return self.vae.decode(z)
