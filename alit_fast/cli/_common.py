"""What the file commands share: model loading with one-line errors, the device, common flags."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..io import ALIT, CheckpointError, load_model
from ..ops import BACKENDS


def checkpoint_spec(spec: str) -> str:
    """What a token file records as its model: a name as is, a file as an absolute path."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def load_model_or_report(spec: str, backend: str, device: str | torch.device, prog: str) -> ALIT | None:
    """load_model, or None after a one-line message: a wrong path or name is not worth a traceback."""
    try:
        return load_model(spec, backend, device)
    except (FileNotFoundError, CheckpointError, RuntimeError, ValueError) as exc:
        print(f"{prog}: cannot load the model {spec!r}: {exc}", file=sys.stderr)
        return None


def device_from(name: str) -> torch.device:
    """The --device value; raises ValueError for a malformed name or a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_output_file(path: str) -> None:
    """Refuse before any work an --out that cannot be written: a directory, or a missing or
    read-only parent folder."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path}: the folder {parent} is not writable")


def add_model_args(parser: argparse.ArgumentParser, checkpoint_default: str | None) -> None:
    parser.add_argument(
        "--checkpoint",
        default=checkpoint_default,
        help="an alit_fast .safetensors file, an official checkpoint (.pth), or a bundled model name (demo)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=16, help="images run at once")
