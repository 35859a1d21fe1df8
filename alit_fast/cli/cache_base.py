"""``alit-fast cache-base``: run the frozen VQGAN once over a dataset and store its outputs
(alit_fast.training.base_cache describes the format)."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from ..config import PRESETS, ALITConfig
from ..io import ALIT
from ..training.base_cache import check_cache_destination, source_dataset, write_cache
from ..training.train import initial_weights, load_initial
from ..errors import OneLineParser, UsageError, run_command
from ..files import acquire_lock, release_lock
from ..training.utils import resolve_config
from ._common import check_free_space, check_output_dir


PROG = "alit-fast cache-base"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="Run the frozen VQGAN once over a dataset and store its outputs.")
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
    p.add_argument("--overwrite", action="store_true", help="replace a base cache already in --out")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.data_length is not None and args.data_length < 1:
        p.error(f"--data-length must be >= 1, got {args.data_length}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    try:  # before the model is built: nothing runs for a destination that would lose data
        check_cache_destination(args.out, args.data, args.overwrite)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    state, init_cfg = initial_weights(args.init) if args.init else (None, None)
    cfg: ALITConfig = resolve_config(args.config) if args.config else (init_cfg or PRESETS["demo"])
    meta = {"data": args.data, "data_length": args.data_length, "seed": args.seed, "init": args.init}
    dataset = source_dataset(dict(meta, image_size=cfg.image_size))  # a bad --data is refused before the model
    model = ALIT(cfg)
    if state is not None:
        load_initial(model, state)
    try:
        model.set_backend(args.backend)
    except NotImplementedError as exc:
        raise UsageError(f"backend {args.backend!r} is not available yet: {exc}") from exc
    if torch.cuda.is_available():
        model.cuda()
    # the cache is built beside --out (OUT.partial) and renamed: that folder must take it all
    parent = os.path.dirname(os.path.abspath(args.out))
    check_output_dir(parent, "--out's folder")
    per_item = cfg.grid_size ** 2 * (cfg.base_channels * 2 * np.dtype(args.dtype).itemsize + 4)
    check_free_space(parent, len(dataset) * per_item + (1 << 20), f"--out {args.out}")
    os.makedirs(parent, exist_ok=True)
    lock = acquire_lock(parent, PROG, f".{os.path.basename(os.path.abspath(args.out))}.lock")
    try:
        out = write_cache(model, dataset, args.out, meta, args.batch_size, args.dtype, args.workers)
    finally:
        release_lock(lock)
    print(f"cached {len(dataset)} items ({cfg.grid_size}x{cfg.grid_size} grid, z {args.dtype}) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
