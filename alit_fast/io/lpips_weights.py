"""Weights for the in-project LPIPS (alit_fast.models.lpips): torchvision's VGG16 file and the
lpips package's v0.1 linear heads, read unchanged. Nothing downloads: a missing file is a one-line
error naming it and where it goes.

- VGG16: ``vgg16-397923af.pth`` (torchvision's IMAGENET1K_V1 weights) in torch hub's cache,
  ``torch.hub.get_dir()/checkpoints/``, where torchvision itself would keep it; or a path.
- Heads: ``lpips/weights/v0.1/vgg.pth`` inside an installed ``lpips`` package, found without
  importing it (lpips imports torchvision, which does not import with every torch build); or a
  path.
- Or both from an official ALIT stage-2 checkpoint, which stores the LPIPS it trained with
  (torchvision's VGG16 and taming's copy of the v0.1 heads) under
  ``gan_losses.{i}.perceptual_loss.{net.slice*,lin*}``: ``load_lpips(checkpoint=...)``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.lpips import LPIPS, TAP_CHANNELS
from .hub_cache import find_weights_file, hub_checkpoint_path, read_state_file

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
HEADS_IN_PACKAGE = ("weights", "v0.1", "vgg.pth")


class LPIPSWeightsError(FileNotFoundError):
    """A weights file for LPIPS is missing or does not hold what LPIPS needs (one-line message)."""


def default_vgg16_path() -> Path:
    return hub_checkpoint_path(VGG16_FILE)  # where torchvision itself keeps it


def find_vgg16(path: str | os.PathLike | None = None) -> Path:
    """The VGG16 weights file: ``path``, else torch hub's cache."""
    return find_weights_file(path, VGG16_FILE, VGG16_URL, "LPIPS (torchvision's VGG16)", LPIPSWeightsError, "--lpips-vgg PATH")


def _lpips_package_dir() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # a top-level name: locates, does not import
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    try:
        return Path(importlib.metadata.distribution("lpips").locate_file("lpips"))
    except importlib.metadata.PackageNotFoundError:
        return None


def find_lpips_heads(path: str | os.PathLike | None = None) -> Path:
    """The lpips v0.1 VGG heads: ``path``, else the file inside the installed lpips package."""
    if path is not None:
        target = Path(path)
        if not target.is_file():
            raise LPIPSWeightsError(f"LPIPS heads file {target} not found (lpips's weights/v0.1/vgg.pth)")
        return target
    package = _lpips_package_dir()
    if package is None:
        raise LPIPSWeightsError(
            "LPIPS needs the lpips package's v0.1 VGG heads (lpips/weights/v0.1/vgg.pth): `pip install lpips` "
            "(it need not import) or pass the file's path"
        )
    target = package.joinpath(*HEADS_IN_PACKAGE)
    if not target.is_file():
        raise LPIPSWeightsError(f"LPIPS heads file {target} not found in the installed lpips package; pass its path")
    return target


def lpips_state_dict(vgg: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LPIPS's state dict from torchvision's VGG16 dict (``features.*``; ``classifier.*`` is
    dropped) and lpips's heads dict (``lin{k}.model.1.weight``, or ``lins.{k}.model.1.weight``
    as lpips also names them)."""
    state = {k: v for k, v in vgg.items() if k.startswith("features.")}
    for k in range(len(TAP_CHANNELS)):
        for name in (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight"):
            if name in heads:
                state[f"lins.{k}.1.weight"] = heads[name]
                break
    return state


# gan_losses.{copy}.perceptual_loss.: net.slice{s}.{torchvision index}.{weight|bias} or lin{k}.model.1.weight
_OFFICIAL_KEY = re.compile(
    r"^(?:module\.)?gan_losses\.(\d+)\.perceptual_loss\."
    r"(?:net\.slice\d\.(\d+)\.(weight|bias)|lin(\d)\.model\.1\.weight)$"
)


def lpips_state_from_official(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """LPIPS's state dict from an official stage-2 checkpoint dict (its ``model`` or ``ema``
    entry, or the state dict itself): the copy of iteration 0 (all copies are the same frozen
    weights). Empty if it holds none."""
    for entry in ("model", "ema", "state_dict", None):
        state = checkpoint.get(entry) if entry is not None else checkpoint
        if not isinstance(state, Mapping):
            continue
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            m = _OFFICIAL_KEY.match(key) if isinstance(key, str) else None
            if m is None or m.group(1) != "0":
                continue
            if m.group(2) is not None:
                out[f"features.{m.group(2)}.{m.group(3)}"] = value
            else:
                out[f"lins.{m.group(4)}.1.weight"] = value
        if out:
            return out
    return {}


def _check(model: LPIPS, state: dict[str, torch.Tensor], vgg_path: Path, heads_path: Path) -> None:
    expected = model.state_dict()
    for key, ref in expected.items():
        source = heads_path if key.startswith("lins.") else vgg_path
        if key not in state:
            name = f"lin{key.split('.')[1]}.model.1.weight" if key.startswith("lins.") else key
            raise LPIPSWeightsError(f"{source} has no {name}; is it the right file?")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise LPIPSWeightsError(f"{source}: {key} has shape {list(state[key].shape)}, expected {list(ref.shape)}")


def load_lpips(
    vgg_path: str | os.PathLike | None = None,
    heads_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | Mapping | None = None,
) -> LPIPS:
    """A frozen LPIPS in eval mode (dropout off) with the real weights; inputs in [-1, 1].
    ``checkpoint``: take every weight from an official ALIT stage-2 checkpoint instead (a path, or
    the dict itself for files that need ``torch.load(weights_only=False)``)."""
    model = LPIPS()
    if checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            source, raw = Path("the checkpoint dict"), checkpoint
        else:
            source = Path(checkpoint)
            if not source.is_file():
                raise LPIPSWeightsError(f"checkpoint {source} not found")
            raw = read_state_file(source, LPIPSWeightsError)
        state = lpips_state_from_official(raw)
        if not state:
            raise LPIPSWeightsError(f"{source} holds no gan_losses.0.perceptual_loss.* (not an official stage-2 checkpoint)")
        _check(model, state, source, source)
    else:
        vgg_file, heads_file = find_vgg16(vgg_path), find_lpips_heads(heads_path)
        vgg, heads = (read_state_file(f, LPIPSWeightsError) for f in (vgg_file, heads_file))
        state = lpips_state_dict(vgg, heads)
        _check(model, state, vgg_file, heads_file)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False).eval()
    return model.to(device) if device is not None else model


__all__ = [
    "LPIPSWeightsError",
    "VGG16_FILE",
    "default_vgg16_path",
    "find_lpips_heads",
    "find_vgg16",
    "load_lpips",
    "lpips_state_dict",
    "lpips_state_from_official",
]
