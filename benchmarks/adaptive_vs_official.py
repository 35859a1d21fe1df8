"""End-to-end adaptive encoding: alit_fast against the official procedure, same model, same images.

    python -m benchmarks.adaptive_vs_official [--checkpoint demo] [--per-level 8] [--out results.json]

The official procedure (alit_fast.inference.official_encode) runs every iteration and a pixel decode
at each, then picks one length per batch: the first below the pixel threshold, else the one with
the lowest error; its evaluation runs batch 1, fp32. alit_fast stops each image at its own count
(compaction), with a code criterion (no pixel decode) or the pixel criterion, and an image that
never meets it gets the maximum count (fallback "max") or its best-scoring one (fallback "best",
the official rule per image). Every row also reports the mean pixel L1 of what it chose (decoded
outside the timed region), so that a row cannot look fast by choosing worse tokens.
Held-out images: the synthetic complexity levels (seeds training never used) and photo crops.
Prints one table; the figures quoted in benchmarks/RESULTS.md come from this script.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from alit_fast.inference import official_encode
from alit_fast.io import load
from alit_fast.inference.criteria import l1_per_image
from alit_fast.cli.demo import DEMO_CRITERION, HELD_OUT_SEED, demo_images
from alit_fast.inference import TokenBatch


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(
    checkpoint: str, per_level: int, code_criteria: list[str], pixel_threshold: float, batch: int, threads: int
) -> dict:
    torch.set_num_threads(threads)
    model = load(checkpoint, backend="torch")
    items = demo_images(model.config.image_size, per_level=per_level, photos=True, seed=HELD_OUT_SEED)
    images = torch.stack([it.image for it in items])
    n = images.shape[0]
    # warm-up of both kernel sets: allocator, first-call costs
    model.encode(images[:2], criterion=code_criteria[0])
    official_encode(model.set_backend("official"), images[:2], threshold=pixel_threshold, halting="off")
    model.set_backend("torch")

    rows = {}

    def record(name: str, seconds: float, tokens: TokenBatch) -> None:
        error = l1_per_image(images, model.decode(tokens, batch_size=batch)).mean()
        rows[name] = dict(
            seconds=seconds,
            images_per_s=n / seconds,
            mean_tokens=float(tokens.lengths.float().mean()),
            mean_l1=float(error),
        )

    def official(batch_size: int, kernels: str) -> None:
        def go():
            sequences = []
            for lo in range(0, n, batch_size):
                enc = official_encode(model, images[lo : lo + batch_size], threshold=pixel_threshold, halting="off")
                sequences += list(enc.indices)
            return TokenBatch.from_sequences(sequences, model.config.codebook_size)

        model.set_backend(kernels)
        seconds, tokens = _timed(go)
        model.set_backend("torch")
        record(f"official procedure, {kernels} kernels, batch {batch_size}", seconds, tokens)

    # the official code's kernels (nn.MultiheadAttention math, the full distance matrix) are the
    # baseline; the same procedure on alit_fast's torch kernels shows what the procedure alone costs
    official(1, "official")
    official(1, "torch")
    official(batch, "official")
    for criterion in (*code_criteria, f"pixel-l1:{pixel_threshold}"):
        for fallback in ("max", "best"):
            name = f"alit_fast {criterion}, fallback {fallback}, batch {batch}"
            record(name, *_timed(lambda: model.encode(images, criterion=criterion, batch_size=batch, fallback=fallback)))
    return dict(
        checkpoint=checkpoint,
        images=n,
        threads=threads,
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--per-level", type=int, default=8, help="held-out synthetic images per complexity level")
    parser.add_argument(
        "--code-criterion",
        action="append",
        dest="code_criteria",
        help=f"a code criterion to time; repeat for several (default {DEMO_CRITERION}, the demo's)",
    )
    parser.add_argument("--pixel-threshold", type=float, default=0.07, help="the official default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    result = run(args.checkpoint, args.per_level, args.code_criteria or [DEMO_CRITERION], args.pixel_threshold, args.batch, args.threads)
    base = result["rows"]["official procedure, official kernels, batch 1"]
    print(f"{result['images']} held-out images, {result['threads']} threads, torch {result['torch']}")
    print(f"{'procedure':<56} {'images/s':>9} {'vs official B1':>15} {'mean tokens':>12} {'mean L1':>8}")
    for name, row in result["rows"].items():
        ratio = row["images_per_s"] / base["images_per_s"]
        print(f"{name:<56} {row['images_per_s']:>9.2f} {ratio:>14.2f}x {row['mean_tokens']:>12.1f} {row['mean_l1']:>8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
