"""Image files in and out: Pillow, RGB, shorter side resized and center-cropped to the model's
size (the evaluation transform; training's augmentation is in alit_fast.training.data)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or HxWx3 uint8 array -> float [3, H, W] in [0, 1] (ToTensor, no mean/std)."""
    array = np.array(image, dtype=np.uint8) if isinstance(image, Image.Image) else image
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` then take the central square (the evaluation transform)."""
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


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


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be an image file, from its header alone (cheap: the pixels are not
    decoded), or None. A file whose body is damaged past a good header fails later, in load_image."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 (the header was parsed)
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(exc).__name__}: {exc}"
    return None
