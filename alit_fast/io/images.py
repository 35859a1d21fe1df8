"""Image files in and out: Pillow, RGB, shorter side resized and center-cropped to the model's
size (the evaluation transform; training's augmentation is in alit_fast.training.data).

``read_rgb`` is the one reader of image files: every Pillow mode maps to 8-bit RGB by its true
range (16-bit and 32-bit integer images by 65535, float images by [0, 1]), or is refused by name;
``convert("RGB")`` alone clips 16-bit values above 255 and turns such images white. What it had
to change (an alpha channel dropped, a palette expanded) and what the preprocessing rule resized
is counted in ``image_notes`` for the command to report once."""
from __future__ import annotations

import os
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image

from ..files import write_atomic

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


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """The preprocessing rule for tensors: [B, 3, H, W] in [0, 1] with the shorter side resized to
    ``size`` (bicubic, antialiased, clamped to [0, 1]) and the central ``size`` x ``size`` square
    kept. ``model.encode`` takes only the model's size and refuses others, naming this helper."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"fit_images takes images [B, 3, H, W], got {getattr(images, 'shape', type(images).__name__)}")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = torch.nn.functional.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                                              align_corners=False).clamp_(0, 1).to(images.dtype)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top : top + size, left : left + size].contiguous()


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


# ---------------------------------------------------------------------------- modes
# modes whose values Pillow's own convert("RGB") maps correctly (8 bits per channel)
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# bumped whenever the pixels read from a file change (2: 16-bit and float images by their true range):
# a stored run made from the old pixels is another run
READER_VERSION = 2
PREPROCESSING = ("Images of any size and mode are read by one rule: 16-bit and float images by their true "
                 "range, alpha dropped, palette expanded; the shorter side resized to the model's image size "
                 "(bicubic), then centre-cropped (docs/preprocessing.md).")
_NOTES: list[Counter] = []
T = TypeVar("T")
R = TypeVar("R")
NOTE_TEXT = {
    "alpha": "had an alpha channel (dropped)",
    "palette": "were palette images (expanded to RGB)",
    "resized": "were not {size}x{size}: shorter side resized to {size}, then centre-cropped (docs/preprocessing.md)",
}


@contextmanager
def image_notes() -> Iterator[Counter]:
    """Count, while open, what ``read_rgb`` changed and what ``load_image`` resized."""
    notes: Counter = Counter()
    _NOTES.append(notes)
    try:
        yield notes
    finally:
        _NOTES.remove(notes)


_NOTES_LOCK = threading.Lock()  # images are read on several threads (read_in_order)


def _note(kind: str) -> None:
    with _NOTES_LOCK:
        for notes in _NOTES:
            notes[kind] += 1


def default_workers() -> int:
    """Image-reading threads: decoding and resizing release the GIL, and one core reads a few
    hundred photos a second, fewer than a GPU encodes. The cores this process may use (a container's
    or a job's share), split among the processes torchrun starts on this machine; at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, cores // max(1, local)))


def read_in_order(items: Iterable[T], read: Callable[[T], R], workers: int, ahead: int) -> Iterator[tuple[T, R | None, Exception | None]]:
    """(item, read(item), None) or (item, None, the exception it raised) for each item, in order,
    reading up to ``ahead`` items ahead on ``workers`` threads (0: each in turn, on this thread).
    The order, and so every result, is the serial reading's."""
    def attempt(item: T) -> tuple[R | None, Exception | None]:
        try:
            return read(item), None
        except Exception as exc:  # the caller decides which failures are the image's
            return None, exc

    if workers <= 0:
        for item in items:
            yield (item, *attempt(item))
        return
    pool, pending = ThreadPoolExecutor(workers, thread_name_prefix="alit-fast-read"), deque()
    try:
        for item in items:
            pending.append((item, pool.submit(attempt, item)))
            if len(pending) >= max(1, ahead):
                first, future = pending.popleft()
                yield (first, *future.result())
        while pending:
            first, future = pending.popleft()
            yield (first, *future.result())
    finally:
        # stopped early (Ctrl-C, an error in the model, a consumer that stops): the queued reads are
        # dropped, not run first; the few already running finish on their own
        pool.shutdown(wait=False, cancel_futures=True)


def describe_notes(notes: Counter, size: int | None = None) -> str | None:
    """One line for a command to print at its end (None when nothing was changed)."""
    parts = [f"{notes[k]} image(s) " + NOTE_TEXT[k].format(size=size) for k in NOTE_TEXT if notes.get(k)]
    return "note: " + "; ".join(parts) if parts else None


def _note_mode(mode: str, info: dict) -> None:
    if mode in ("P", "PA"):
        _note("palette")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in info):
        _note("alpha")


def scan_notes(paths: Iterable[str | os.PathLike], size: int | None = None) -> Counter:
    """What reading ``paths`` will convert (and, given ``size``, how many are not ``size`` x ``size``:
    "resized"), from their headers alone (for readers whose decoding runs in worker processes,
    where counts cannot be gathered)."""
    with image_notes() as notes:
        for path in paths:
            try:
                with Image.open(path) as image:
                    _note_mode(image.mode, image.info)
                    if size is not None and image.size != (size, size):
                        _note("resized")
            except Exception:  # unreadable: the caller skips it by name
                pass
    return notes


def _scaled(array: np.ndarray, top: float) -> Image.Image:
    gray = np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with each mode's values mapped by their true range; ValueError naming a mode or
    a value range this cannot map."""
    mode = image.mode
    _note_mode(mode, image.info)
    if mode in EIGHT_BIT_MODES + ALPHA_MODES:
        return image.convert("RGB")
    array = np.asarray(image)
    if mode in SIXTEEN_BIT_MODES:
        return _scaled(array, 65535.0)
    if mode == "I":  # 32-bit integers: 16-bit PNGs and TIFFs land here; anything wider has no known range
        low, high = int(array.min(initial=0)), int(array.max(initial=0))
        if low < 0 or high > 65535:
            raise ValueError(f"a 32-bit integer image with values in [{low}, {high}]; only 0..65535 (16-bit) "
                             "has a known range: convert it to 8 or 16 bits")
        return _scaled(array, 65535.0)
    if mode == "F":
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError(f"a floating-point image with values in [{np.nanmin(array):g}, {np.nanmax(array):g}] "
                             "(or not finite); float images must hold [0, 1]")
        return _scaled(array, 1.0)
    raise ValueError(f"images of Pillow mode {mode!r} are not supported; convert the file to RGB")


def read_rgb(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """An image file (or file object) as 8-bit RGB by its true range (see ``as_rgb``); OSError or
    ValueError for a file Pillow cannot read or a mode it cannot map."""
    with _decoded(source) as image:
        return as_rgb(image)


def _decoded(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """The image, loaded; Pillow's other failures (its plugins also raise SyntaxError, EOFError,
    DecompressionBombError, ...) as a ValueError naming them, so that a reader skips that image."""
    image = None
    try:
        image = Image.open(source)
        image.load()
        return image
    except Exception as exc:
        if image is not None:
            image.close()
        if isinstance(exc, (OSError, ValueError)):
            raise
        name = source if isinstance(source, (str, os.PathLike)) else "the image"
        raise ValueError(f"{name} cannot be decoded ({type(exc).__name__}: {exc})") from exc


def load_image(path: str | os.PathLike | IO[bytes], size: int) -> torch.Tensor:
    """[3, size, size] float in [0, 1] by the preprocessing rule (``center_crop``); raises OSError
    (or ValueError) for a file that cannot be read."""
    rgb = read_rgb(path)
    if rgb.size != (size, size):
        _note("resized")
    return to_tensor(center_crop(rgb, size))


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an RGB image."""
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Through a temporary file: a full disk leaves no half-written picture under the real name."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    image_format = Image.registered_extensions().get(extension, "PNG")
    picture = to_pil(image)
    write_atomic(path, lambda tmp: picture.save(tmp, format=image_format))


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be an image file, from its header alone (cheap: the pixels are not
    decoded), or None. A file whose body is damaged past a good header fails later, in load_image."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            _note_mode(mode, image.info)
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(exc).__name__}: {exc}"
    if mode not in EIGHT_BIT_MODES + ALPHA_MODES + SIXTEEN_BIT_MODES + ("I", "F"):
        return f"images of Pillow mode {mode!r} are not supported; convert the file to RGB"
    return None
