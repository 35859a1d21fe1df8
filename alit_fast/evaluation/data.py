"""Evaluation images: the official evaluation's preprocessing, read once per image.

``crop="center"`` (default) is ``evaluate_rfid.py``'s transform: torchvision's CenterCrop to the
model's size at native resolution, no resize (an image smaller than that on a side is zero-padded
first, as torchvision does), then ToTensor. ``crop="resize"`` is its ``--testing_custom_images``
variant: the shorter side resized to the model's size (bicubic, antialiased) first.

Items are uint8 [3, S, S]; ``to_unit`` turns a batch into ToTensor's float k / 255 on the device.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io.images import find_images, read_rgb

CROPS = ("center", "resize")


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's CenterCrop window on an image at least ``size`` on each side;
    its offsets round half to even (Python's round), which decides odd margins."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def official_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: torchvision CenterCrop(size) of an RGB image, zero-padding a side
    smaller than ``size`` the way torchvision does (the extra pixel of an odd margin on the right
    / bottom)."""
    array = np.array(image, dtype=np.uint8)  # a writable copy (torch refuses read-only arrays)
    h, w = array.shape[:2]
    if h < size or w < size:
        pad_top, pad_left = max(0, (size - h) // 2), max(0, (size - w) // 2)
        pad_bottom, pad_right = max(0, (size - h + 1) // 2), max(0, (size - w + 1) // 2)
        array = np.pad(array, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        h, w = array.shape[:2]
        if h == size and w == size:
            return np.ascontiguousarray(array)
    left, top = center_crop_box(w, h, size)
    return np.ascontiguousarray(array[top : top + size, left : left + size])


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The custom-images transform: shorter side to ``size`` (bicubic), then CenterCrop."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return official_center_crop(image.resize(new, Image.BICUBIC), size)


def read_image(path: str | os.PathLike, size: int, crop: str = "center") -> torch.Tensor:
    """uint8 [3, size, size]; raises ValueError naming the file when Pillow cannot read it."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
    try:
        rgb = read_rgb(path)
    except Exception as exc:
        raise ValueError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") from exc
    array = official_center_crop(rgb, size) if crop == "center" else resize_center_crop(rgb, size)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFiles(Dataset):
    """Image files (a folder, searched recursively in sorted order, or a list) as uint8 crops.

    ``skip_unreadable``: leave out, up front, files whose header Pillow cannot read, and list them
    in ``skipped`` ("path (reason)"), so that one bad file is a named skip, not an error raised
    inside a DataLoader worker halfway through the run."""

    def __init__(self, files: "list[Path] | str | os.PathLike", size: int, crop: str = "center",
                 skip_unreadable: bool = False) -> None:
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
        self.files = find_images([files]) if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
        self.size = size
        self.crop = crop
        self.skipped: list[str] = []
        if skip_unreadable:
            readable = []
            for path in self.files:
                try:
                    with Image.open(path):  # the header only: cheap, and what most damage breaks
                        readable.append(path)
                except Exception as exc:  # Pillow raises several kinds for a file it cannot identify
                    self.skipped.append(f"{path} ({type(exc).__name__})")
            self.files = readable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_image(self.files[index], self.size, self.crop)


def to_unit(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images -> float32 k / 255 on ``device`` (ToTensor's values, bit for bit); float
    images are moved as they are."""
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch


def png_bytes_per_pixel(images_uint8: torch.Tensor) -> list[float]:
    """PNG-compressed size (Pillow's default level) per pixel of each uint8 [3, H, W] image: the
    image-complexity measure the adaptive rows correlate token counts with."""
    sizes = []
    for img in images_uint8.cpu():
        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        sizes.append(buffer.tell() / (img.shape[1] * img.shape[2]))
    return sizes
