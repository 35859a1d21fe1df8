"""Every size of an ALIT model and its base tokenizer (VQGAN or KL-VAE), in one place.

"Official" here and across the package means the authors' code, github.com/ShivamDuggal4/adaptive-length-tokenizer
at commit 8c0b4ec29c76963ad81ffdd91c9afd901f5215f5 (cited below as "official repo @ 8c0b4ec, FILE").
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# per-iteration weights of the code (NLL) loss in the official recipe
OFFICIAL_ITERATION_WEIGHTS = (2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class VQGANConfig:
    """The MAGE variant of taming's VQGAN (official repo @ 8c0b4ec, base_tokenizers/configs/vqgan.yaml)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    in_channels: int = 3
    dropout: float = 0.0
    # GroupNorm: min(norm_groups, channels // min_group_channels) groups. The official models get
    # 32. Narrow models want several channels per group: at one channel per group GroupNorm is
    # instance norm, which erases each channel's spatial mean (a flat colour cannot pass).
    norm_groups: int = 32
    min_group_channels: int = 1

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class VAEConfig:
    """LDM's KL-VAE as MAR's KL-16 and ALIT build it (official repo @ 8c0b4ec, base_tokenizers/vae_ldm.py)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    embed_dim: int = 16
    # encoder levels whose resolution (image_size / 2**level) is listed get attention blocks;
    # the decoder has none outside its middle
    attn_resolutions: tuple[int, ...] = (16,)
    in_channels: int = 3
    dropout: float = 0.0
    norm_groups: int = 32
    # ALIT multiplies the posterior sample by this before using it (and never divides it back)
    scale: float = 0.2325

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


BASE_TOKENIZERS = ("vqgan", "vae")
# fields added with the VAE variant: left out of to_json at their defaults, so every config
# written before them (model files, token files, base caches) still compares equal
_OPTIONAL_FIELDS = ("base_tokenizer", "quantize_latent", "vae")


@dataclass(frozen=True)
class ALITConfig:
    image_size: int = 256
    patch_size: int = 16
    width: int = 1024
    layers: int = 8
    heads: int = 8
    tokens_per_iter: int = 32
    iterations: int = 8
    latent_dim: int = 12
    codebook_size: int = 4096
    commitment_cost: float = 0.25
    mlp_ratio: int = 4
    halting_threshold: float = 0.55
    # None: the official weights, padded with 1.0 past the eighth iteration
    iteration_weights: tuple[float, ...] | None = None
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    # "vqgan": the decoder predicts VQGAN codes; "vae": it regresses the KL-VAE's scaled latents
    base_tokenizer: str = "vqgan"
    # False: continuous 1D tokens (the factorized latent_dim vectors), no latent codebook
    quantize_latent: bool = True
    vae: VAEConfig = field(default_factory=VAEConfig)

    def __post_init__(self) -> None:
        # sizes first: a zero or negative one would fail below as a ZeroDivisionError or a shape error
        sizes = ("image_size", "patch_size", "width", "layers", "heads", "tokens_per_iter", "iterations", "latent_dim",
                 "codebook_size", "mlp_ratio")
        bad = [f"{n} must be a whole number >= 1, got {getattr(self, n)!r}" for n in sizes
               if isinstance(getattr(self, n), bool) or not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if bad:
            raise ValueError("invalid ALITConfig: " + "; ".join(bad))
        if isinstance(self.vqgan, dict):
            vq = dict(self.vqgan)
            vq["ch_mult"] = tuple(vq.get("ch_mult", VQGANConfig.ch_mult))
            object.__setattr__(self, "vqgan", VQGANConfig(**vq))
        if isinstance(self.vae, dict):
            vae = dict(self.vae)
            for key in ("ch_mult", "attn_resolutions"):
                vae[key] = tuple(vae.get(key, getattr(VAEConfig, key)))
            object.__setattr__(self, "vae", VAEConfig(**vae))
        # what a variant does not use is reset to its default, so that two configs of the same model
        # compare equal (a checkpoint shows no VQGAN sizes for a VAE model, no codebook for continuous tokens)
        if self.base_tokenizer == "vae":
            object.__setattr__(self, "vqgan", VQGANConfig())
        if self.quantize_latent is False:
            object.__setattr__(self, "codebook_size", ALITConfig.codebook_size)
        if self.iteration_weights is None:
            weights = tuple(OFFICIAL_ITERATION_WEIGHTS[: self.iterations]) + (1.0,) * max(
                0, self.iterations - len(OFFICIAL_ITERATION_WEIGHTS)
            )
            object.__setattr__(self, "iteration_weights", weights)
        else:
            object.__setattr__(self, "iteration_weights", tuple(float(w) for w in self.iteration_weights))
        problems = []
        if self.base_tokenizer not in BASE_TOKENIZERS:
            problems.append(f"base_tokenizer must be one of {BASE_TOKENIZERS}, got {self.base_tokenizer!r}")
        if not isinstance(self.quantize_latent, bool):
            problems.append(f"quantize_latent must be True or False, got {self.quantize_latent!r}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        base_name, factor = ("VAE", self.vae.downsample_factor) if self.is_vae else ("VQGAN", self.vqgan.downsample_factor)
        if self.image_size % factor or self.image_size // factor != self.grid_size:
            problems.append(
                f"the {base_name} grid (image_size {self.image_size} / {factor}) must equal "
                f"the patch grid (image_size / patch_size = {self.grid_size})"
            )
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width <= self.base_channels:
            problems.append(f"width {self.width} must exceed the {base_name}'s {self.base_channels} latent channels")
        if len(self.iteration_weights) != self.iterations:
            problems.append(f"iteration_weights has {len(self.iteration_weights)} entries for {self.iterations} iterations")
        if problems:
            raise ValueError("invalid ALITConfig: " + "; ".join(problems))

    @property
    def is_vae(self) -> bool:
        return self.base_tokenizer == "vae"

    @property
    def base_channels(self) -> int:
        """Channels of the base tokenizer's latent grid (VQGAN z_channels or the VAE's embed_dim)."""
        return self.vae.embed_dim if self.is_vae else self.vqgan.z_channels

    @property
    def decoder_out_dim(self) -> int:
        """Per grid cell, what the decoder head outputs: logits over the VQGAN codebook, or the
        VAE's latent vector."""
        return self.vae.embed_dim if self.is_vae else self.vqgan.codebook_size

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """2D tokens plus the class token."""
        return self.grid_size**2 + 1

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iter * self.iterations

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        defaults = {"base_tokenizer": "vqgan", "quantize_latent": True, "vae": dataclasses.asdict(VAEConfig())}
        # a VQGAN model carries no VAE settings (and a VAE one keeps its VQGAN defaults only as unused fields)
        if self.base_tokenizer == "vqgan":
            data.pop("vae")
        for key in _OPTIONAL_FIELDS:
            if key in data and data[key] == defaults[key]:
                data.pop(key)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ALITConfig":
        data = json.loads(text)
        if data.get("iteration_weights") is not None:
            data["iteration_weights"] = tuple(data["iteration_weights"])
        return cls(**data)

    def replace(self, **changes) -> "ALITConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ALITConfig] = {
    "alit_tiny": ALITConfig(width=512, layers=8, heads=8),
    "alit_small": ALITConfig(width=1024, layers=8, heads=8),
    "alit_base": ALITConfig(width=768, layers=12, heads=12),
    "alit_semilarge": ALITConfig(width=1024, layers=16, heads=16),
    # the other released IN100 models (official repo @ 8c0b4ec, adaptive_tokenizers/pretrained_models/download.py);
    # the VAE yaml's (adaptive_tokenizers/configs/adaptive_vae.yaml) halting threshold is 0.025
    "alit_small_vqgan_continuous": ALITConfig(width=1024, layers=8, heads=8, quantize_latent=False),
    "alit_small_vae": ALITConfig(width=1024, layers=8, heads=8, base_tokenizer="vae", halting_threshold=0.025),
    "alit_small_vae_continuous": ALITConfig(
        width=1024, layers=8, heads=8, base_tokenizer="vae", halting_threshold=0.025, quantize_latent=False
    ),
    # sized to train in half an hour on two CPU cores: 32x32 images, an 8x8 grid, 8..64 tokens
    "demo": ALITConfig(
        image_size=32,
        patch_size=4,
        width=128,
        layers=2,
        heads=2,
        tokens_per_iter=8,
        iterations=8,
        latent_dim=12,
        codebook_size=1024,
        vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=512, min_group_channels=4),
    ),
}


def get_config(name_or_config: str | ALITConfig) -> ALITConfig:
    if isinstance(name_or_config, ALITConfig):
        return name_or_config
    if name_or_config not in PRESETS:
        raise ValueError(f"unknown preset {name_or_config!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name_or_config]
