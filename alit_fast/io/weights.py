"""The alit_fast model file: safetensors weights in the official key layout, the config in the
metadata. Written here, read by ``alit_fast.io.checkpoint.load``."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

METADATA_CONFIG_KEY = "alit_fast_config"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem at once."""


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Weights and config to ``path``, through a temporary file: a kill leaves the old file or the new."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={METADATA_CONFIG_KEY: model.config.to_json(), "format": "pt"})
    os.replace(tmp, path)
