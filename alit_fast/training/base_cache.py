"""The base cache: the frozen VQGAN's outputs over a dataset, computed once (``alit-fast cache-base``).

Stage 1 never changes the VQGAN, so its encoder output z and code indices are the same every
epoch for the same image. The cache stores them as memory-mapped numpy arrays
(``z.npy`` [N, C, g, g], ``gt_indices.npy`` [N, g*g]) plus ``index.json`` (data source, image
paths, config, a digest of the VQGAN weights). ``alit-fast train --base-cache DIR`` then reads
them instead of running the VQGAN.

For the VAE variant the cache holds the posterior instead (``mean.npy`` and ``std.npy``
[N, C, g, g], unscaled), so that training still draws a fresh sample of it at every step.

The cache is of CENTER CROPS (image folders: shorter side resized, central square; photo crops:
their epoch-0 crops; synthetic images are fixed anyway): a run that reads it trains without
random augmentation, because an augmented image would need a fresh VQGAN pass.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..io.images import READER_VERSION
from ..models import ALITCore
from .data import ImageFolder, build_dataset
from .utils import weights_digest

INDEX = "index.json"
FORMAT_VERSION = 1


def vqgan_digest(model: ALITCore) -> str:
    return weights_digest(model.base_tokenizer)


def source_dataset(meta: dict) -> Dataset:
    """The (non-augmented) image dataset a cache was built from."""
    return build_dataset(meta["data"], meta["image_size"], seed=meta["seed"], augment=False, length=meta.get("data_length"))


CACHE_FILES = {INDEX, "z.npy", "gt_indices.npy", "mean.npy", "std.npy"}


@torch.no_grad()
def is_base_cache(path: Path) -> bool:
    """Whether ``path`` is a directory that holds a finished cache written here (and nothing else
    a user could lose: its index names the format)."""
    index = path / INDEX
    if not index.is_file():
        return False
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "vqgan_sha256" in meta and {p.name for p in path.iterdir()} <= CACHE_FILES


def check_cache_destination(out: str | os.PathLike, data: str | None, overwrite: bool) -> Path:
    """Refuse any ``out`` whose contents would be lost: a non-empty directory that is not a cache
    written here (and a cache without ``overwrite``), a file, or a folder at, inside or around the
    image folder ``data``. Returns the resolved path."""
    out = Path(out).resolve()
    if data is not None and Path(data).exists():
        src = Path(data).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"--out {out} overlaps the --data folder {src}: the cache needs a directory of its own")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        if any(out.iterdir()):
            if not is_base_cache(out):
                raise ValueError(f"--out {out} is not empty and is not a base cache; nothing was written "
                                 "(give a new or empty directory)")
            if not overwrite:
                raise ValueError(f"--out {out} already holds a base cache; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")  # where the cache is built; a killed run's is removed
    if partial.exists() and not (partial.is_dir() and {p.name for p in partial.iterdir()} <= CACHE_FILES):
        raise ValueError(f"{partial} is in the way (the cache is built there) and is not an unfinished cache; it is "
                         "left alone: move it, or give another --out")
    return out


def write_cache(model: ALITCore, dataset: Dataset, out: str | os.PathLike, meta: dict, batch_size: int = 64,
                dtype: str = "float32", workers: int = 0) -> Path:
    """Run ``model.encode_base`` over ``dataset`` into ``out``; index.json is written last, so a
    directory without it is an unfinished cache."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        return _write_cache(model, dataset, out, tmp, meta, batch_size, dtype, workers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an unfinished cache is never left behind
        raise


def _array_file(path: Path, dtype, shape: tuple) -> np.memmap:
    """A .npy file mapped for writing, its blocks reserved on the disk first: a disk that fills up
    fails here as one ENOSPC naming the file, not later as a SIGBUS in the middle of the pass (writes
    through a map to a sparse file have no other way to fail)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: written as before
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
    return array


def _write_cache(model: ALITCore, dataset: Dataset, out: Path, tmp: Path, meta: dict, batch_size: int, dtype: str,
                 workers: int) -> Path:
    cfg = model.config
    if cfg.is_vae:
        return _write_posterior(model, dataset, out, tmp, meta, batch_size, dtype, workers)
    g, C, N = cfg.grid_size, cfg.vqgan.z_channels, len(dataset)
    index_dtype = np.int16 if cfg.vqgan.codebook_size <= np.iinfo(np.int16).max else np.int32
    z_map = _array_file(tmp / "z.npy", np.dtype(dtype), (N, C, g, g))
    gt_map = _array_file(tmp / "gt_indices.npy", index_dtype, (N, g * g))
    device = next(model.parameters()).device
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    labels = []
    for batch in loader:
        base = model.encode_base(batch["image"].to(device))
        idx = batch["index"].numpy()
        z_map[idx] = base.z.float().cpu().numpy().astype(dtype)
        gt_map[idx] = base.gt_indices.cpu().numpy().astype(index_dtype)
        labels.extend(int(v) for v in batch["label"])
    z_map.flush()
    gt_map.flush()
    del z_map, gt_map
    return _finish(model, dataset, out, tmp, meta, N, dtype, labels)


def _write_posterior(model: ALITCore, dataset: Dataset, out: Path, tmp: Path, meta: dict, batch_size: int,
                     dtype: str, workers: int) -> Path:
    """The VAE's posterior mean and std per image (no sample: training draws its own)."""
    cfg = model.config
    shape = (len(dataset), cfg.base_channels, cfg.grid_size, cfg.grid_size)
    maps = {k: _array_file(tmp / f"{k}.npy", np.dtype(dtype), shape) for k in POSTERIOR_ARRAYS}
    device = next(model.parameters()).device
    model.eval()
    labels = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
        base = model.encode_base(batch["image"].to(device))
        idx = batch["index"].numpy()
        maps["mean"][idx] = base.mean.float().cpu().numpy().astype(dtype)
        maps["std"][idx] = base.std.float().cpu().numpy().astype(dtype)
        labels.extend(int(v) for v in batch["label"])
    for m in maps.values():
        m.flush()
    del maps
    return _finish(model, dataset, out, tmp, dict(meta, base="vae"), shape[0], dtype, labels)


def _finish(model: ALITCore, dataset: Dataset, out: Path, tmp: Path, meta: dict, N: int, dtype: str,
            labels: list[int]) -> Path:
    cfg = model.config
    meta = dict(meta, version=FORMAT_VERSION, count=N, z_dtype=dtype, labels=labels, config=cfg.to_json(),
                vqgan_sha256=vqgan_digest(model), image_size=cfg.image_size, image_reader=READER_VERSION)
    if isinstance(dataset, ImageFolder):
        meta["root"] = str(dataset.root.resolve())
        meta["paths"] = [str(p.relative_to(dataset.root)) for p in dataset.paths]
    (tmp / INDEX).write_text(json.dumps(meta, indent=1))
    if out.exists():
        # only ever an empty directory or a cache written here: check_cache_destination refuses the rest
        if any(out.iterdir()) and not is_base_cache(out):
            raise ValueError(f"refusing to replace {out}: it is not a base cache")
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


POSTERIOR_ARRAYS = ("mean", "std")


class BaseCacheDataset(Dataset):
    """Items of the source dataset (center crops) with their cached ``z`` and ``gt_indices``
    (VAE: ``mean`` and ``std``)."""

    def __init__(self, cache: str | os.PathLike) -> None:
        self.dir = Path(cache)
        index = self.dir / INDEX
        if not index.exists():
            raise FileNotFoundError(f"{self.dir} is not a finished base cache (no {INDEX}); run `alit-fast cache-base`")
        self.meta = json.loads(index.read_text())
        self.images = source_dataset(self.meta)
        if isinstance(self.images, ImageFolder):
            paths = [str(p.relative_to(self.images.root)) for p in self.images.paths]
            if paths != self.meta["paths"]:
                raise ValueError(f"the images under {self.images.root} changed since the cache {self.dir} was written")
        if len(self.images) != self.meta["count"]:
            raise ValueError(f"cache {self.dir} holds {self.meta['count']} items, its source now has {len(self.images)}")
        self._z = None
        self._gt = None

    def check_model(self, model: ALITCore) -> None:
        """Refuse a cache made with another config or other VQGAN weights than ``model`` has."""
        if self.meta["config"] != model.config.to_json():
            raise ValueError(f"{self.dir} was written for a different config than the model's")
        if self.meta.get("image_reader") != READER_VERSION:
            raise ValueError(f"{self.dir} was written by an older image reader (image reader "
                             f"{self.meta.get('image_reader', 1)}, now {READER_VERSION}): rebuild it with alit-fast cache-base")
        if self.meta["vqgan_sha256"] != vqgan_digest(model):
            raise ValueError(f"{self.dir} was written with other VQGAN weights (pass the same --init)")

    def __len__(self) -> int:
        return self.meta["count"]

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # opened lazily so each loader worker maps the files itself
        if self._z is None:
            names = POSTERIOR_ARRAYS if self.meta.get("base") == "vae" else ("z", "gt_indices")
            self._z = np.load(self.dir / f"{names[0]}.npy", mmap_mode="r")
            self._gt = np.load(self.dir / f"{names[1]}.npy", mmap_mode="r")
        return self._z, self._gt

    def __getitem__(self, index: int) -> dict:
        z, gt = self._arrays()
        item = dict(self.images[index])
        if self.meta.get("base") == "vae":
            item["mean"] = torch.from_numpy(np.array(z[index], dtype=np.float32))
            item["std"] = torch.from_numpy(np.array(gt[index], dtype=np.float32))
            return item
        item["z"] = torch.from_numpy(np.array(z[index], dtype=np.float32))
        item["gt_indices"] = torch.from_numpy(np.array(gt[index], dtype=np.int64))
        return item
