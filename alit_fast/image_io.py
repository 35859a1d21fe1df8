"""Image files in and out for the command line: Pillow, RGB, shorter side resized and
center-cropped to the model's size (the evaluation transform of alit_fast.data)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS, center_crop, to_tensor


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly are kept whatever their suffix (a bad one is reported when read);
    directories are searched recursively for image suffixes, in sorted order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            found.append(path)
    return found


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """[3, size, size] float in [0, 1]; raises OSError (or ValueError) for a file Pillow cannot read."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return to_tensor(center_crop(rgb, size))


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an RGB image."""
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    to_pil(image).save(path)
