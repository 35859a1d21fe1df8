"""``alit-fast cache-base``: run the frozen VQGAN once over a dataset and keep its outputs.

Stage 1 never changes the VQGAN, so its encoder output z and code indices are the same every
epoch for the same image. The cache stores them as memory-mapped numpy arrays
(``z.npy`` [N, C, g, g], ``gt_indices.npy`` [N, g*g]) plus ``index.json`` (data source, image
paths, config, a digest of the VQGAN weights). ``alit-fast train --base-cache DIR`` then reads
them instead of running the VQGAN.

The cache is of CENTER CROPS (image folders: shorter side resized, central square; photo crops:
their epoch-0 crops; synthetic images are fixed anyway): a run that reads it trains without
random augmentation, because an augmented image would need a fresh VQGAN pass.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import PRESETS, ALITConfig
from .data import ImageFolder, build_dataset
from .model import ALIT
from .train_utils import resolve_config, weights_digest

INDEX = "index.json"
FORMAT_VERSION = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="alit-fast cache-base", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an image folder, or synthetic / photos / demo")
    p.add_argument("--data-length", type=int, default=None, help="items in a synthetic/photos/demo dataset")
    p.add_argument("--out", required=True, help="the cache directory to write")
    p.add_argument("--config", default=None, help="preset or JSON file (default: the config in --init, else 'demo')")
    p.add_argument("--init", default=None, help="checkpoint with the VQGAN weights (official or alit_fast)")
    p.add_argument("--backend", default="torch", choices=("torch", "triton"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="storage type of z")
    p.add_argument("--seed", type=int, default=0, help="the seed of synthetic/photo data (use the training --seed)")
    p.add_argument("--workers", type=int, default=0)
    return p.parse_args(argv)


def vqgan_digest(model: ALIT) -> str:
    return weights_digest(model.base_tokenizer)


def source_dataset(meta: dict) -> Dataset:
    """The (non-augmented) image dataset a cache was built from."""
    return build_dataset(meta["data"], meta["image_size"], seed=meta["seed"], augment=False, length=meta.get("data_length"))


@torch.no_grad()
def write_cache(model: ALIT, dataset: Dataset, out: str | os.PathLike, meta: dict, batch_size: int = 64,
                dtype: str = "float32", workers: int = 0) -> Path:
    """Run ``model.encode_base`` over ``dataset`` into ``out``; index.json is written last, so a
    directory without it is an unfinished cache."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = model.config
    g, C, N = cfg.grid_size, cfg.vqgan.z_channels, len(dataset)
    index_dtype = np.int16 if cfg.vqgan.codebook_size <= np.iinfo(np.int16).max else np.int32
    z_map = np.lib.format.open_memmap(tmp / "z.npy", mode="w+", dtype=np.dtype(dtype), shape=(N, C, g, g))
    gt_map = np.lib.format.open_memmap(tmp / "gt_indices.npy", mode="w+", dtype=index_dtype, shape=(N, g * g))
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
    meta = dict(meta, version=FORMAT_VERSION, count=N, z_dtype=dtype, labels=labels, config=cfg.to_json(),
                vqgan_sha256=vqgan_digest(model), image_size=cfg.image_size)
    if isinstance(dataset, ImageFolder):
        meta["root"] = str(dataset.root.resolve())
        meta["paths"] = [str(p.relative_to(dataset.root)) for p in dataset.paths]
    (tmp / INDEX).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class BaseCacheDataset(Dataset):
    """Items of the source dataset (center crops) with their cached ``z`` and ``gt_indices``."""

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

    def check_model(self, model: ALIT) -> None:
        """Refuse a cache made with another config or other VQGAN weights than ``model`` has."""
        if self.meta["config"] != model.config.to_json():
            raise SystemExit(f"--base-cache {self.dir} was written for a different config than the model's")
        if self.meta["vqgan_sha256"] != vqgan_digest(model):
            raise SystemExit(f"--base-cache {self.dir} was written with other VQGAN weights (pass the same --init)")

    def __len__(self) -> int:
        return self.meta["count"]

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # opened lazily so each loader worker maps the files itself
        if self._z is None:
            self._z = np.load(self.dir / "z.npy", mmap_mode="r")
            self._gt = np.load(self.dir / "gt_indices.npy", mmap_mode="r")
        return self._z, self._gt

    def __getitem__(self, index: int) -> dict:
        z, gt = self._arrays()
        item = dict(self.images[index])
        item["z"] = torch.from_numpy(np.array(z[index], dtype=np.float32))
        item["gt_indices"] = torch.from_numpy(np.array(gt[index], dtype=np.int64))
        return item


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .train import initial_weights, load_initial

    state, init_cfg = initial_weights(args.init) if args.init else (None, None)
    cfg: ALITConfig = resolve_config(args.config) if args.config else (init_cfg or PRESETS["demo"])
    model = ALIT(cfg)
    if state is not None:
        load_initial(model, state)
    try:
        model.set_backend(args.backend)
    except NotImplementedError as exc:
        raise SystemExit(f"backend {args.backend!r} is not available yet: {exc}") from exc
    if torch.cuda.is_available():
        model.cuda()
    meta = {"data": args.data, "data_length": args.data_length, "seed": args.seed, "init": args.init}
    dataset = source_dataset(dict(meta, image_size=cfg.image_size))
    out = write_cache(model, dataset, args.out, meta, args.batch_size, args.dtype, args.workers)
    print(f"cached {len(dataset)} items ({cfg.grid_size}x{cfg.grid_size} grid, z {args.dtype}) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
