"""The stage-2 discriminators in checkpoints: read from an official stage-2 checkpoint
(``gan_losses.{i}.discriminator.main.*`` inside its ``model`` / ``ema`` state dicts), from an
alit_fast stage-2 ``checkpoint.pt`` (its ``discriminators`` entry) or ``discriminators.safetensors``,
and written in the official names, so either kind continues the other's fine-tuning.

Model loading (``load_official``) ignores these keys; only stage-2 training reads them. The
official files also hold a frozen LPIPS copy per iteration (``gan_losses.{i}.perceptual_loss.*``),
which is not read here: LPIPS comes from its own weight files (alit_fast.io.lpips_weights).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .weights import CheckpointError, read_checkpoint_file, strip_wrappers

DISCRIMINATOR_PREFIX = "gan_losses."
_KEY = re.compile(r"^gan_losses\.(\d+)\.discriminator\.(.+)$")
# where a checkpoint dict keeps its state dicts, in the order looked at: the live discriminators
# first (an official ``ema`` holds an average of them, or their start values: its update skips buffers)
_ENTRIES = ("discriminators", "model", "ema", "state_dict")


def discriminator_state(discriminators: torch.nn.ModuleList) -> dict[str, torch.Tensor]:
    """One state dict for all iterations' discriminators, in the official key names."""
    return {f"{DISCRIMINATOR_PREFIX}{i}.discriminator.{k}": v for i, d in enumerate(discriminators)
            for k, v in d.state_dict().items()}


def read_discriminators(
    path_or_state: str | os.PathLike | Mapping, map_location: str | torch.device = "cpu"
) -> dict[int, dict[str, torch.Tensor]]:
    """{iteration: that discriminator's state dict (``main.*`` keys)}; empty if there are none."""
    raw = path_or_state if isinstance(path_or_state, Mapping) else read_checkpoint_file(path_or_state)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"the checkpoint holds a {type(raw).__name__}, not a state dict")
    candidates = [raw[e] for e in _ENTRIES if isinstance(raw.get(e), Mapping)] + [raw]
    for state in candidates:
        found: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            m = _KEY.match(strip_wrappers(key))
            if m:
                found.setdefault(int(m.group(1)), {})[m.group(2)] = value.to(map_location)
        if found:
            return found
    return {}


__all__ = ["DISCRIMINATOR_PREFIX", "discriminator_state", "read_discriminators"]
