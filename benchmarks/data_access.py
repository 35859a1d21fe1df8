"""What reading costs on the data paths, per image: photos decoded on the main thread and on
reading threads (what encode and pretokenize feed the model), members of a webdataset ``.tar``,
and a tokenized data set read in shuffled and in file order (what a generator's training loop does).

    python -m benchmarks.data_access [--photos 200] [--workers N] [--members 2000] [--shards 20] [--per-shard 1000]

Both are built in a temporary folder from seeded random data (a 32x32 PNG per member; random codes
of every length up to 64 per image). Times are wall-clock means over every read, first reads
included (a shard is checked against the index the first time it is read); the photos, after a
warm-up, the fastest of three alternated rounds per thread count.
"""
from __future__ import annotations

import argparse
import io
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alit_fast.inference import TokenBatch
from alit_fast.io import token_dataset as tds
from alit_fast.io.images import default_workers, load_image, read_in_order


def write_tar(path: Path, members: int) -> list[str]:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(members):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = png.tell()
            tar.addfile(info, io.BytesIO(png.getvalue()))
    return tds.list_sources([path])


def write_tokens(folder: Path, shards: int, per_shard: int) -> None:
    g = torch.Generator().manual_seed(0)
    plan = tds.Plan(tuple(f"img{i:08d}.png" for i in range(shards * per_shard)), per_shard, "{}", "seeded", "tokens:8", 64)
    for k in range(shards):
        seqs = [torch.randint(0, 4096, (int(n),), generator=g) for n in torch.randint(1, 65, (per_shard,), generator=g)]
        TokenBatch.from_sequences(seqs, 4096, names=list(plan.shard_sources(k)), checkpoint="seeded",
                                  extra={"plan": plan.fingerprint, "shard": str(k), "skipped": "{}"}).save(tds.shard_path(folder, k))
    tds.write_index(folder, plan)


def write_photos(folder: Path, count: int) -> list[Path]:
    """JPEGs the size of an ImageNet photo (500x375), smooth enough to compress like one."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 160, 500)[None, :, None]
    paths = []
    for i in range(count):
        pixels = (rng.random((375, 500, 3)) * 64 + ramp).astype(np.uint8)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def threaded_read_ms(paths: list[Path], size: int, workers: int) -> float:
    start = time.perf_counter()
    for _ in read_in_order(paths, lambda path: load_image(path, size), workers, ahead=32):
        pass
    return (time.perf_counter() - start) / len(paths) * 1e3


def per_read_ms(read, keys: list) -> float:
    start = time.perf_counter()
    for key in keys:
        read(key)
    return (time.perf_counter() - start) / len(keys) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=2000, help="images in the tar")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--photos", type=int, default=200, help="500x375 JPEGs read at 256x256")
    parser.add_argument("--workers", type=int, default=default_workers(), help="reading threads to compare with 0")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.photos)
        threaded_read_ms(paths[:20], 256, args.workers)  # warm-up: the page cache, Pillow's first calls
        # alternated, the fastest of three each: a shared machine's load moves between rounds
        rounds = [(threaded_read_ms(paths, 256, 0), threaded_read_ms(paths, 256, args.workers)) for _ in range(3)]
        serial, threaded = min(r[0] for r in rounds), min(r[1] for r in rounds)
        print(f"{args.photos} photos (500x375 JPEG) read at 256x256: {serial:.2f} ms per image on the main thread, "
              f"{threaded:.2f} on {args.workers} reading threads ({serial / threaded:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_tar(Path(tmp) / "images.tar", args.members)
        ms = per_read_ms(lambda s: tds.read_source(s, 32), sources)
        print(f"tar of {args.members} members: {ms:.3f} ms per image read (decoded to a tensor)")
        write_tokens(Path(tmp), args.shards, args.per_shard)
        dataset = tds.open_dataset(tmp)
        order = list(range(len(dataset)))
        random.Random(0).shuffle(order)
        shuffled = per_read_ms(dataset.__getitem__, order)
        in_order = per_read_ms(tds.open_dataset(tmp).__getitem__, list(range(len(dataset))))
        print(f"token data set of {len(dataset)} images in {args.shards} shards: {shuffled:.3f} ms per image shuffled, "
              f"{in_order:.3f} ms in file order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
