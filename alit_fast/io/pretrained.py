"""Models that ship inside the package (alit_fast/io/pretrained_models/*.safetensors), and one
resolver from a user's model spec (file or bundled name) to a loaded model."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load, load_official
from .model import ALIT

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained_models"
# name -> (file, what it is); the files are written by ALIT.save and hold the config
PRETRAINED: dict[str, tuple[str, str]] = {
    "demo": (
        "demo.safetensors",
        "the 'demo' preset (32x32 images, 8..64 tokens) with its own VQGAN, both trained on CPU by "
        "alit_fast.train_vqgan (synthetic images and scikit-image photo crops) and alit_fast.train "
        "(synthetic images)",
    ),
}


def pretrained_path(name: str = "demo") -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    path = PRETRAINED_DIR / PRETRAINED[name][0]
    if not path.exists():
        raise FileNotFoundError(f"the pretrained model file {path} is missing from this installation")
    return path


def load_pretrained(name: str = "demo", backend: str = "torch", map_location: str | torch.device = "cpu") -> ALIT:
    """A bundled model, ready for inference (eval mode, no gradients needed)."""
    model = load(pretrained_path(name), map_location=map_location, backend=backend)
    return model.eval().requires_grad_(False)


def load_model(spec: str, backend: str = "torch", device: str | torch.device = "cpu") -> ALIT:
    """An ALIT from an alit_fast safetensors file, an official checkpoint, or a bundled name ("demo")."""
    if not os.path.exists(spec):
        if os.sep in spec or spec.endswith((".safetensors", ".pth", ".pt", ".ckpt")):
            raise FileNotFoundError(f"checkpoint not found: {spec}")
        model = load_pretrained(spec)
    elif spec.endswith(".safetensors"):
        try:
            model = load(spec)
        except CheckpointError:  # a safetensors file without our metadata: official weights re-saved
            model = load_official(spec)
    else:
        model = load_official(spec)
    return model.to(device).set_backend(backend).eval()
