"""Third-party weight files (pytorch-fid's Inception, torchvision's VGG16) found where torch hub
caches them, ``torch.hub.get_dir()/checkpoints/``, or at a path the user gives. Nothing downloads:
this machine or a cluster node may be offline, and a silent fetch would hide which file a number
came from."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def hub_checkpoint_path(file_name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def find_weights_file(
    path: str | os.PathLike | None, file_name: str, url: str, needed_by: str, error: type[Exception], flag: str
) -> Path:
    """``path``, else torch hub's cached ``file_name``; missing: ``error`` with one line saying which
    file, where it goes and where to get it. ``flag``: the CLI option that passes the file (e.g.
    "--fid-weights PATH"), offered only when no path was given."""
    target = Path(path) if path is not None else hub_checkpoint_path(file_name)
    if not target.is_file():
        if path is not None:
            raise error(f"{needed_by} needs {file_name}: the file given, {target}, does not exist")
        raise error(f"{needed_by} needs {file_name}: {target} not found; download {url} and put it there "
                    f"(torch hub's cache), or pass {flag}")
    return target


def read_state_file(path: str | os.PathLike, error: type[Exception]) -> dict:
    """The state dict a weights file holds (``torch.load``, weights only); ``error`` names a file
    that cannot be read or holds something else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{path} could not be read as a torch state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise error(f"{path} holds a {type(state).__name__}, not a state dict")
    return state
