"""What reading costs on pretokenize's data paths, per image: members of a webdataset ``.tar`` (the
images it encodes) and a tokenized data set read in shuffled and in file order (what a generator's
training loop does).

    python -m benchmarks.data_access [--members 2000] [--shards 20] [--per-shard 1000]

Both are built in a temporary folder from seeded random data (a 32x32 PNG per member; random codes
of every length up to 64 per image). Times are wall-clock means over every read, first reads
included (a shard is checked against the index the first time it is read).
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
    args = parser.parse_args(argv)
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
