"""Where an adaptive encode's CPU time goes: the split into its parts, then torch.profiler's ops.

    python -m benchmarks.profile_encode [--checkpoint demo] [--criterion pixel-l1:0.07] [--fallback best]
    python -m benchmarks.profile_encode --checkpoint seeded:alit_small --per-level 1 --batch 2

Same held-out images, batch and thread count as benchmarks.adaptive_vs_official. The split times
one ``model.encode`` call with the model's parts wrapped in timers (exclusive: a part called
inside another counts once): the base tokenizer's encoder, ALIT's encoder iterations (with the
latent quantizer), ALIT's decoder, the pixel decodes (VQGAN/VAE decoder), the criterion's own
arithmetic, and the rest (bookkeeping: compaction, the stop reads, the result). Then the share of
self CPU time of the heaviest ops (the profile shares RESULTS.md quotes come from here).
``seeded:CONFIG`` is a model of a named config with seeded random weights (timing only: it never
stops early; a fast-pixel-l1 criterion gets the demo model's calibration).
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from alit_fast.cli.demo import DEMO_CRITERION, HELD_OUT_SEED, demo_images
from alit_fast.inference import parse_criterion
from alit_fast.io import ALIT, load

# the parts of an encode, as (label, the model methods that make it up)
PARTS = (
    ("base tokenizer encoder", ("encode_base",)),
    ("ALIT encoder iterations", ("initial_state", "next_state", "run_encoder", "quantize_latents")),
    ("ALIT decoder", ("decode_logits",)),
    ("pixel decodes", ("reconstruct",)),
)


class PartTimer:
    """Exclusive CPU time of this process per label (steadier than the wall clock on a shared
    machine; with one thread, the compute itself): time inside a nested timed call goes to the
    inner label."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []  # [label, start, time spent in nested parts]

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            self._stack.append([label, time.process_time(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, nested = self._stack.pop()
                spent = time.process_time() - start
                self.totals[name] = self.totals.get(name, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1][2] += spent

        return timed


@contextmanager
def timed_parts(model, criterion, timer: PartTimer):
    """Wrap the model's parts (instance attributes shadow the methods) and the criterion's class
    methods in ``timer``; everything is put back on exit."""
    for label, names in PARTS:
        for name in names:
            setattr(model, name, timer.wrap(label, getattr(model, name)))
    cls = type(criterion)
    saved = {name: cls.__dict__.get(name) for name in ("__call__", "score")}
    for name in saved:
        setattr(cls, name, timer.wrap("criterion", getattr(cls, name)))
    try:
        yield
    finally:
        for _, names in PARTS:
            for name in names:
                delattr(model, name)
        for name, fn in saved.items():
            if fn is None:
                delattr(cls, name)
            else:
                setattr(cls, name, fn)


def seeded_model(spec: str) -> ALIT:
    """``seeded:CONFIG``: random weights from seed 0; with the demo model's calibration attached."""
    torch.manual_seed(0)
    model = ALIT(spec.split(":", 1)[1]).eval()
    model.pixel_l1_calibration = load("demo").pixel_l1_calibration
    return model


def split(model, images: torch.Tensor, criterion, batch: int, fallback: str, max_tokens: int | None = None) -> dict[str, float]:
    """Seconds per part of one encode (after a warm-up); "bookkeeping" is the remainder."""
    timer = PartTimer()
    with timed_parts(model, criterion, timer):
        start = time.process_time()
        model.encode(images, criterion=criterion, batch_size=batch, fallback=fallback, max_tokens=max_tokens)
        total = time.process_time() - start
    parts = {label: timer.totals.get(label, 0.0) for label, _ in PARTS}
    parts["criterion"] = timer.totals.get("criterion", 0.0)
    parts["bookkeeping"] = total - sum(parts.values())
    return {"total": total, **parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo", help="a model, or seeded:CONFIG (e.g. seeded:alit_small)")
    parser.add_argument("--criterion", default=DEMO_CRITERION)
    parser.add_argument("--fallback", default="max")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--per-level", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeded = args.checkpoint.startswith("seeded:")
    model = seeded_model(args.checkpoint) if seeded else load(args.checkpoint, backend="torch")
    items = demo_images(model.config.image_size, per_level=args.per_level, photos=not seeded, seed=HELD_OUT_SEED)
    images = torch.stack([it.image for it in items])
    criterion = parse_criterion(args.criterion)

    def encode():
        return model.encode(images, criterion=criterion, batch_size=args.batch, fallback=args.fallback, max_tokens=args.max_tokens)

    encode()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encode()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    cap = f", max {args.max_tokens} tokens" if args.max_tokens else ""
    print(f"{args.criterion}, fallback {args.fallback}{cap}, {len(images)} images, batch {args.batch}, "
          f"{args.threads} thread(s): {total / 1e3:.0f} ms of self CPU time")
    for e in events[: args.top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.key:<50} {e.count:>7} calls")
    parts = split(model, images, criterion, args.batch, args.fallback, args.max_tokens)
    wall = parts.pop("total")  # CPU seconds
    print(f"split of one encode ({wall * 1e3:.0f} ms CPU): "
          + ", ".join(f"{label} {100 * seconds / wall:.1f}%" for label, seconds in parts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
