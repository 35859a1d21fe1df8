"""Where an adaptive encode's CPU time goes: torch.profiler over one ``model.encode`` call.

    python -m benchmarks.profile_encode [--checkpoint demo] [--criterion code-acc:0.4] [--fallback best]

Same held-out images, batch and thread count as benchmarks.adaptive_vs_official; prints the share
of self CPU time of the heaviest ops (the profile shares RESULTS.md quotes come from here).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from alit_fast.io import load
from alit_fast.cli.demo import DEMO_CRITERION, HELD_OUT_SEED, demo_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--criterion", default=DEMO_CRITERION)
    parser.add_argument("--fallback", default="max")
    parser.add_argument("--per-level", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint, backend="torch")
    items = demo_images(model.config.image_size, per_level=args.per_level, photos=True, seed=HELD_OUT_SEED)
    images = torch.stack([it.image for it in items])

    def encode():
        return model.encode(images, criterion=args.criterion, batch_size=args.batch, fallback=args.fallback)

    encode()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encode()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.criterion}, fallback {args.fallback}, {len(images)} images, batch {args.batch}, "
          f"{args.threads} thread(s): {total / 1e3:.0f} ms of self CPU time")
    for e in events[: args.top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.key:<50} {e.count:>7} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
