"""Datasets for training: image folders with the official augmentation, synthetic images of known
complexity, and crops of scikit-image's bundled photographs.

Every random choice is drawn from a generator seeded by (seed, epoch, index), never from a global
or per-worker stream: an item is a pure function of those three numbers, so a resumed run (or a
run with a different number of loader workers or processes) sees exactly the same images.
Items are dicts ``{"image": float [3, S, S] in [0, 1], "label": int, "index": int}``; the label is
the complexity level for synthetic images and -1 elsewhere.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from ..errors import UsageError
from ..io.images import IMAGE_EXTENSIONS, center_crop, describe_notes, image_file_problem, image_notes, read_rgb, to_tensor

COMPLEXITY_LEVELS = ("flat", "few_shapes", "many_shapes", "texture", "noise")
# scikit-image's bundled sample photographs (all ship inside the wheel, no download)
PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "moon",
    "coins",
    "clock",
    "grass",
    "gravel",
    "brick",
    "colorwheel",
)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def _as_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return Image.fromarray(array[..., :3]).convert("RGB")


# ---------------------------------------------------------------------------- augmentation
def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A crop box (left, top, w, h) as torchvision's RandomResizedCrop samples it: area fraction
    uniform in ``scale``, aspect ratio log-uniform in ``ratio``, ten tries, then a central fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Image.Image:
    """The official training augmentation: RandomResizedCrop (bicubic) then a horizontal flip."""
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale, ratio)
    out = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


# ---------------------------------------------------------------------------- datasets
class EpochDataset(Dataset):
    """A dataset whose random choices depend on (seed, epoch, index); the trainer sets the epoch."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class UnreadableImage(UsageError):
    """An image file whose pixels cannot be decoded (its header read fine when the folder was listed)."""


class ImageFolder(EpochDataset):
    """Every image under ``root`` (recursive, sorted paths), read with Pillow.

    ``augment=True`` applies the official RandomResizedCrop(scale 0.8-1, ratio 3/4-4/3) + flip;
    ``augment=False`` takes the center crop (what the base cache stores).

    Files whose header Pillow cannot read are left out when the folder is listed (``skipped``
    names them with the reason; build_dataset prints them): the rest is indexed in sorted order,
    so a resumed run sees the same items as long as the folder does not change. A folder with no
    readable image is refused. A file that breaks later (a damaged body past a good header)
    stops the run with an UnreadableImage naming it.
    """

    def __init__(self, root: str | os.PathLike, size: int, augment: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is a file, not an image folder")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not candidates:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.paths: list[Path] = []
        self.skipped: list[str] = []
        with image_notes() as self.notes:  # what reading will convert, counted from the headers
            for path in candidates:
                problem = image_file_problem(path)
                if problem is None:
                    self.paths.append(path)
                else:
                    self.skipped.append(f"{path} ({problem})")
        if not self.paths:
            raise ValueError(f"none of the {len(candidates)} image files under {self.root} could be read: "
                             + "; ".join(self.skipped[:5]) + ("; ..." if len(self.skipped) > 5 else ""))
        self.size = size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image = read_rgb(path)
        except Exception as exc:  # Pillow's errors for a damaged body: name the file, not the decoder
            raise UnreadableImage(f"image {path} cannot be read ({type(exc).__name__}: {exc}); remove or "
                                  "replace it") from exc
        if self.augment:
            image = random_resized_crop(image, self.size, item_rng(self.seed, self.epoch, index))
        else:
            image = center_crop(image, self.size)
        return {"image": to_tensor(image), "label": -1, "index": index}


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _draw_shapes(canvas: np.ndarray, count: int, rng: np.random.Generator, min_r: float, max_r: float) -> None:
    size = canvas.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(count):
        kind = rng.integers(0, 3)
        cx, cy = rng.uniform(0, size, size=2)
        r = rng.uniform(min_r, max_r) * size
        if kind == 0:  # disc
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif kind == 1:  # axis-aligned rectangle
            rx, ry = r * rng.uniform(0.5, 1.5, size=2)
            mask = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        else:  # triangle: inside three half-planes
            angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, size=3)
            px, py = cx + r * np.cos(angles), cy + r * np.sin(angles)
            signs = []
            for i in range(3):
                j = (i + 1) % 3
                signs.append((px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i]) >= 0)
            mask = (signs[0] == signs[1]) & (signs[1] == signs[2])
        canvas[mask] = _random_colour(rng)


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    # full-contrast sums of 4-7 plane waves: every grid cell holds a different pattern, so textures
    # sit between many shapes and noise by every measure (distinct VQGAN codes, PNG size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((size, size, 3), dtype=np.float32)
    for _ in range(int(rng.integers(4, 8))):
        freq = rng.uniform(2.0, 8.0)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        if rng.random() < 0.3:
            wave = np.sign(wave)  # square-wave stripes / checks
        out += wave[..., None] * rng.uniform(-0.5, 0.5, size=3)
    amplitude = rng.uniform(0.45, 0.5)
    return out / (np.abs(out).max() + 1e-6) * amplitude + _random_colour(rng) * (1.0 - 2.0 * amplitude) + amplitude


def synthetic_image(size: int, level: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 float image in [0, 1] whose complexity grows with ``level`` (see COMPLEXITY_LEVELS)."""
    if level == 0:
        image = np.broadcast_to(_random_colour(rng), (size, size, 3)).astype(np.float32)
    elif level in (1, 2):
        image = np.empty((size, size, 3), dtype=np.float32)
        image[:] = _random_colour(rng)
        if level == 1:
            _draw_shapes(image, int(rng.integers(1, 4)), rng, 0.12, 0.3)
        else:
            _draw_shapes(image, int(rng.integers(12, 25)), rng, 0.04, 0.15)
    elif level == 3:
        image = _texture(size, rng)
    elif level == 4:
        image = rng.uniform(0.0, 1.0, size=(size, size, 3)).astype(np.float32)
    else:
        raise ValueError(f"complexity level must be in 0..{len(COMPLEXITY_LEVELS) - 1}, got {level}")
    return np.clip(image, 0.0, 1.0)


class SyntheticImages(EpochDataset):
    """Synthetic images of controlled complexity, labelled 0 (flat colour) .. 4 (pixel noise).

    Item ``i`` has level ``levels[i % len(levels)]``; its pixels depend on (seed, i) only, so the
    same index is the same image in every epoch (these images need no augmentation).
    """

    def __init__(self, size: int, length: int = 10_000, seed: int = 0, levels: tuple[int, ...] = (0, 1, 2, 3, 4)) -> None:
        super().__init__(seed)
        if not levels or any(not 0 <= lv < len(COMPLEXITY_LEVELS) for lv in levels):
            raise ValueError(f"levels must be a non-empty subset of 0..{len(COMPLEXITY_LEVELS) - 1}, got {levels}")
        self.size = size
        self.length = length
        self.levels = tuple(levels)

    def __len__(self) -> int:
        return self.length

    def level(self, index: int) -> int:
        return self.levels[index % len(self.levels)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        level = self.level(index)
        # epoch is left out on purpose: a synthetic item is fixed, which keeps its label meaningful
        image = synthetic_image(self.size, level, item_rng(self.seed, 0, index))
        return {"image": to_tensor(image), "label": level, "index": index}


def load_photos(names: tuple[str, ...] = PHOTO_NAMES) -> list[Image.Image]:
    """scikit-image's bundled sample photographs as RGB PIL images (needs the ``demo`` extra)."""
    try:
        import skimage.data
    except ImportError as exc:  # an optional dependency: tell the user which extra brings it
        raise ImportError("photo crops need scikit-image: pip install 'alit_fast[demo]'") from exc
    return [_as_rgb(getattr(skimage.data, name)()) for name in names]


class PhotoCrops(EpochDataset):
    """Random square crops of the scikit-image sample photographs, resized to ``size``.

    The crop side is log-uniform between ``min_side`` px and the photo's shorter side, so the set
    spans close-ups (smooth) to whole scenes (detailed); crops change with the epoch.
    """

    def __init__(
        self,
        size: int,
        length: int = 2_000,
        seed: int = 0,
        names: tuple[str, ...] = PHOTO_NAMES,
        min_side: int = 48,
    ) -> None:
        super().__init__(seed)
        self.size = size
        self.length = length
        self.names = tuple(names)
        self.min_side = min_side
        self._photos: list[Image.Image] | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def photos(self) -> list[Image.Image]:
        if self._photos is None:
            self._photos = load_photos(self.names)
        return self._photos

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = item_rng(self.seed, self.epoch, index)
        photo = self.photos[index % len(self.photos)]
        short = min(photo.width, photo.height)
        low = min(self.min_side, short)
        side = int(round(math.exp(rng.uniform(math.log(low), math.log(short)))))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crop = photo.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": to_tensor(crop), "label": -1, "index": index}


class Mixture(ConcatDataset):
    """Concatenated datasets that pass ``set_epoch`` on and renumber ``index`` globally."""

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = dict(super().__getitem__(index))
        item["index"] = index
        return item


def build_dataset(spec: str, size: int, seed: int = 0, augment: bool = True, length: int | None = None) -> Dataset:
    """A dataset from a command-line spec.

    ``synthetic`` (complexity levels 0..4), ``photos`` (scikit-image crops), ``demo`` (both:
    4 synthetic images for every photo crop), or a folder of images. ``synthetic:LEVELS`` and
    ``demo:LEVELS`` keep only the synthetic levels listed as digits, e.g. ``demo:0123``.
    A spec that names nothing usable is a UsageError naming ``--data`` (or ``--data-length``).
    """
    if length is not None and length < 1:
        raise UsageError(f"--data-length must be >= 1, got {length}")
    name, _, level_digits = spec.partition(":")
    try:
        if name in ("synthetic", "demo") and not os.path.isdir(spec):
            if not level_digits.isdigit() and level_digits:
                raise ValueError(f"levels are digits 0..{len(COMPLEXITY_LEVELS) - 1}, e.g. {name}:0123")
            levels = tuple(int(c) for c in level_digits) if level_digits else (0, 1, 2, 3, 4)
            if name == "synthetic":
                return SyntheticImages(size, length or 10_000, seed, levels)
            n = length or 10_000
            if n < 5:
                raise ValueError("a demo mixture needs --data-length >= 5 (4 synthetic images per photo crop)")
            return Mixture([SyntheticImages(size, n * 4 // 5, seed, levels), PhotoCrops(size, n - n * 4 // 5, seed)])
        if spec == "photos":
            return PhotoCrops(size, length or 2_000, seed)
        folder = ImageFolder(spec, size, augment=augment, seed=seed)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--data {spec}: {exc}") from exc
    if describe_notes(folder.notes):
        print(f"--data {spec}: {describe_notes(folder.notes)}", file=sys.stderr)
    if folder.skipped:
        print(f"warning: --data {spec}: skipped {len(folder.skipped)} unreadable file(s): "
              + "; ".join(folder.skipped[:20]) + ("; ..." if len(folder.skipped) > 20 else ""), file=sys.stderr)
    return folder
