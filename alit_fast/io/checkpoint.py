"""Checkpoints: the official ALIT layout (torch pickles) in, safetensors with the config in and out.

The filter from a file's keys to the model's (``read_state_dict``: entries ``ema``/``model``/
``state_dict``, wrapper prefixes, stage-2 discriminators) lives here at the I/O boundary, so the
model itself only ever sees its own parameter names."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from safetensors import safe_open

from ..config import ALITConfig, VAEConfig, VQGANConfig
from ..inference.calibration import METADATA_KEY as CALIBRATION_KEY, PixelL1Calibration
from .model import ALIT
from .weights import (
    METADATA_CONFIG_KEY,
    RECOMMENDED_CRITERION_KEY,
    CheckpointError,
    read_checkpoint_file,
    read_safetensors,
    save_model,
    strip_wrappers,
)

IGNORED_PREFIXES = ("gan_losses.",)
# a bare LDM / MAR KL autoencoder file (MAR's kl16.ckpt, which the official code saves as vae.ckpt)
AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping, map_location: str | torch.device) -> dict:
    """The model's tensors from a file or dict in any layout we read (see the module docstring)."""
    return read_checkpoint(path_or_state_dict, map_location)[0]


def read_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping, map_location: str | torch.device
) -> tuple[dict, ALITConfig | None]:
    """(the model's tensors, the config the file records or None). alit_fast training checkpoints
    (``checkpoint.pt``) record theirs: reading one with sizes guessed from shapes would get what no
    shape shows (the number of heads, the halting threshold, the loss weights) wrong."""
    if isinstance(path_or_state_dict, Mapping):
        raw = dict(path_or_state_dict)
    else:
        raw = read_checkpoint_file(path_or_state_dict, map_location)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"the checkpoint holds a {type(raw).__name__}, not a state dict")
    config = None
    if isinstance(raw.get("config"), str):  # an alit_fast training checkpoint
        try:
            config = ALITConfig.from_json(raw["config"])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint's recorded config cannot be read: {exc}") from exc
    for entry in ("ema", "model", "state_dict"):
        if entry in raw and isinstance(raw[entry], Mapping):
            raw = dict(raw[entry])
            break
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = strip_wrappers(key)
        if key.startswith(IGNORED_PREFIXES):
            continue
        state[key] = value
    return _as_alit_vae(state), config


def _as_alit_vae(state: dict) -> dict:
    """A bare KL autoencoder's tensors renamed into ALIT's layout (``base_tokenizer.vae.*``), so it
    initialises the VAE base tokenizer; its other entries (a training loss's) are dropped, as the
    official loader's strict=False load drops them. Any other state is returned as it is (ALIT's
    own ``encoder.*`` keys never come with a top-level ``quant_conv``)."""
    if not {"encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight"} <= set(state):
        return state
    return {f"base_tokenizer.vae.{k}": v for k, v in state.items() if k.startswith(AUTOENCODER_PREFIXES)}


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state for m in [regex.match(k)] if m}
    return max(found) + 1 if found else 0


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"cannot infer the model's sizes: the checkpoint has no key {key!r}")
    return state[key]


def _infer_vae(state: Mapping[str, torch.Tensor], image_size: int) -> VAEConfig:
    """The KL-VAE's sizes from its ``base_tokenizer.vae.*`` shapes; attention levels from which
    encoder levels hold ``attn`` keys (the GroupNorm group count, 32, shows in no shape)."""
    p = "base_tokenizer.vae."
    conv_in = _need(state, p + "encoder.conv_in.weight")
    ch = conv_in.shape[0]
    levels = _count(state, r"base_tokenizer\.vae\.encoder\.down\.(\d+)\.")
    ch_mult = tuple(_need(state, f"{p}encoder.down.{i}.block.0.conv1.weight").shape[0] // ch for i in range(levels))
    attn = tuple(
        image_size // 2**i for i in range(levels) if any(k.startswith(f"{p}encoder.down.{i}.attn.") for k in state)
    )
    return VAEConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count(state, r"base_tokenizer\.vae\.encoder\.down\.0\.block\.(\d+)\."),
        embed_dim=_need(state, p + "post_quant_conv.weight").shape[0],
        attn_resolutions=attn,
        in_channels=conv_in.shape[1],
    )


def infer_config(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> ALITConfig:
    """Read every size of the model off the tensor shapes of an official-layout state dict.

    The layout says the variant: ``base_tokenizer.vae.*`` keys mean the KL-VAE base (else the
    VQGAN), and no ``quantize.*`` keys mean continuous 1D tokens; the seven released checkpoints
    are these four layouts at three sizes."""
    pos = _need(state, "encoder_positional_embedding")
    width = pos.shape[1]
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid != pos.shape[0] - 1:
        raise CheckpointError(f"encoder_positional_embedding has {pos.shape[0]} rows, not a square grid plus one")
    layers = _count(state, r"encoder\.transformer\.(\d+)\.")
    dec_layers = _count(state, r"decoder\.transformer\.(\d+)\.")
    if layers == 0 or dec_layers != layers:
        raise CheckpointError(f"encoder has {layers} layers and decoder {dec_layers}; expected the same, nonzero")
    patch = _need(state, "patch_embed.weight")
    time = _need(state, "timestep_embedding")
    c_fc = _need(state, "encoder.transformer.0.mlp.c_fc.weight")
    quantized = "quantize.embedding.weight" in state
    variant = {"quantize_latent": quantized}
    if quantized:
        variant["codebook_size"] = state["quantize.embedding.weight"].shape[0]
    if any(k.startswith("base_tokenizer.vae.") for k in state):
        # the VAE yaml's halting threshold
        variant.update(base_tokenizer="vae", halting_threshold=0.025, vae=_infer_vae(state, grid * patch.shape[-1]))
        return _alit_config(state, width, grid, layers, patch, time, c_fc, num_heads, **variant)
    vq_in = _need(state, "base_tokenizer.vqgan.encoder.conv_in.weight")
    ch = vq_in.shape[0]
    levels = _count(state, r"base_tokenizer\.vqgan\.encoder\.down\.(\d+)\.")
    res_blocks = _count(state, r"base_tokenizer\.vqgan\.encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(
        _need(state, f"base_tokenizer.vqgan.encoder.down.{i}.block.0.conv1.weight").shape[0] // ch for i in range(levels)
    )
    vqgan = VQGANConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=res_blocks,
        z_channels=_need(state, "base_tokenizer.vqgan.encoder.conv_out.weight").shape[0],
        codebook_size=_need(state, "base_tokenizer.vqgan.quantize.embedding.weight").shape[0],
        in_channels=vq_in.shape[1],
    )
    return _alit_config(state, width, grid, layers, patch, time, c_fc, num_heads, vqgan=vqgan, **variant)


def _alit_config(state, width, grid, layers, patch, time, c_fc, num_heads, **variant) -> ALITConfig:
    patch_size = patch.shape[-1]
    return ALITConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        # the official models use as many heads as layers
        heads=num_heads if num_heads is not None else layers,
        tokens_per_iter=time.shape[1],
        iterations=time.shape[0],
        latent_dim=_need(state, "pre_quantizer_mlp.weight").shape[0],
        mlp_ratio=c_fc.shape[0] // width,
        **variant,
    )


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict that reports missing keys, unexpected keys and shape mismatches together."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: " + ", ".join(missing))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched))
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def load_official(
    path_or_state_dict: str | os.PathLike | Mapping,
    num_heads: int | None = None,
    map_location: str | torch.device = "cpu",
    backend: str = "auto",
) -> ALIT:
    """Build an ALIT whose sizes are inferred from an official checkpoint, and load its weights.

    Takes a raw state dict or a dict with ``ema`` / ``model`` entries (``ema`` preferred, as the
    official evaluation does); ``gan_losses.*`` (the stage-2 discriminators) are ignored. An
    alit_fast training checkpoint is built with the config it records (its ``ema`` weights).

    Official checkpoints record no config: every size is read off the tensor shapes, and what no
    shape shows comes from the released recipe. The number of heads is taken equal to the number
    of layers (true of every released model and preset: 8, 12, 16); pass ``num_heads`` for a
    model trained otherwise. The halting threshold and loss weights are the recipe's defaults.
    """
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"num_heads must be a whole number >= 1, got {num_heads!r}")
    state, recorded = read_checkpoint(path_or_state_dict, map_location)
    cfg = recorded if recorded is not None and num_heads is None else infer_config(state, num_heads)
    with torch.device("meta"):
        model = ALIT(cfg, backend=backend)
    model = model.to_empty(device=map_location)
    load_state_strict(model, state)
    return model


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", backend: str = "auto") -> ALIT:
    """A model file written by ``ALIT.save`` (safetensors, the config in its metadata); the
    layout-specific reader behind ``alit_fast.load``."""
    state, meta = read_safetensors(path, map_location)  # names a missing/unreadable file, checks the fingerprint
    return model_from_safetensors(os.fspath(path), state, meta, map_location, backend)


def model_from_safetensors(
    path: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, str], map_location: str | torch.device, backend: str
) -> ALIT:
    """Build the model a safetensors file's metadata describes and load its tensors."""
    if METADATA_CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} has no alit_fast config in its metadata; use load_official for official checkpoints")
    try:
        cfg = ALITConfig.from_json(meta[METADATA_CONFIG_KEY])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the config in its metadata cannot be read ({exc})") from exc
    with torch.device("meta"):
        model = ALIT(cfg, backend=backend)
    model = model.to_empty(device=map_location)
    load_state_strict(model, state)
    model.recommended_criterion = meta.get(RECOMMENDED_CRITERION_KEY)
    if CALIBRATION_KEY in meta:
        try:
            model.pixel_l1_calibration = PixelL1Calibration.from_json(meta[CALIBRATION_KEY])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    return model


__all__ = [
    "CheckpointError",
    "METADATA_CONFIG_KEY",
    "infer_config",
    "load_file",
    "load_official",
    "model_from_safetensors",
    "load_state_strict",
    "read_checkpoint",
    "read_state_dict",
    "save_model",
]
