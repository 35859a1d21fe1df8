"""Continuous batching (``encode_stream``) against the compacting encoder (``encode``), same model,
same images, same criterion, one run.

    python -m benchmarks.continuous_batching [--checkpoint demo] [--per-level 32] [--batch 32] [--threads 1]

Images: the five-level held-out mix of alit_fast.cli.demo (synthetic complexity levels at seeds
training and calibration never used, plus the photo crops). Per encoder: images/s (best of
``--repeats`` timed runs, the two encoders in turn), op calls per encoded image (every aten op dispatched, counted in one
extra run, views left out: the CPU's proxy for GPU kernel launches), steps, mean images per step and the
padded-token fraction (attention rows computed for padding / all of them; the per-token layers
pad nothing; the
compacting encoder's batches are all at one length, so it has none, and loses occupancy instead).
Both encoders must give every image the same count (checked). The same table again for held-out
photo crops (``--photo-crops``: random crops of scikit-image's sample photographs at a seed
training never used, from close-ups to whole scenes). Then a mixed-length decode: the
packed decoder as ``decode`` runs it (``decode_logits_mixed``) against the padded one
(``decode_logits`` with lengths) on a batch whose images have 8..64 tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alit_fast.cli.demo import HELD_OUT_SEED, demo_images
from alit_fast.inference import StreamStats, TokenBatch
from alit_fast.inference.encode import decode_logits_mixed
from alit_fast.io import load
from alit_fast.training.data import PhotoCrops


# ops that only make a new view or hand a tensor back: no kernel launch on a GPU
_NO_KERNEL = {"aten.lift_fresh", "aten.detach", "aten._unsafe_view", "aten.alias"}


class _OpCount(TorchDispatchMode):
    """Counts the aten ops that would launch work: views (``is_view``) and no-ops left out."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not (func.is_view or name in _NO_KERNEL):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _interleaved_best(fns: dict, repeats: int) -> dict:
    """Best time of each function over ``repeats`` rounds that run them in turn (A B A B ...), so
    that a load that comes and goes on a shared machine falls on both alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def _ops(fn) -> int:
    with _OpCount() as counter:
        fn()
    return sum(counter.calls.values())


def compacting_occupancy(lengths: list[int], batch: int, T: int) -> tuple[int, int]:
    """(steps, image-iterations) of the compacting encoder: a chunk runs as many steps as its
    longest image's iterations (an out-of-reach image runs to the last count as its length says)."""
    steps = sum(max(lengths[lo : lo + batch]) // T for lo in range(0, len(lengths), batch))
    return steps, sum(lengths) // T


def encoders(model, images: torch.Tensor, criterion: str, fallback: str, batch: int, repeats: int) -> dict:
    T = model.config.tokens_per_iter
    G1 = model.config.grid_size**2 + 1

    def compacting():
        return model.encode(images, criterion=criterion, fallback=fallback, batch_size=batch)

    def stream(stats=None):
        # the stream's items are batches of ``batch`` images: as many TokenBatches as the compacting
        # encoder's chunks, so that building them costs both the same
        return TokenBatch.cat(list(model.encode_stream(list(images.split(batch)), criterion=criterion, fallback=fallback,
                                                       batch_size=batch, stats=stats)))

    reference, stats = compacting(), StreamStats()
    streamed = stream(stats)
    same = torch.equal(reference.lengths, streamed.lengths)
    lengths = reference.lengths.tolist()
    steps, slot_steps = compacting_occupancy(lengths, batch, T)
    n = len(lengths)
    best = _interleaved_best({"compacting": compacting, "continuous": stream}, repeats)
    rows = {name: dict(images_per_s=n / best[name], ops_per_image=_ops(fn) / n)
            for name, fn in (("compacting", compacting), ("continuous", stream))}
    # the compacting encoder's rows are exact (every batch at one length): the padding it avoids
    # is paid as idle batch rows, its mean images per step
    rows["compacting"].update(steps=steps, mean_active=slot_steps / steps, padded_fraction=0.0)
    rows["continuous"].update(steps=stats.steps, mean_active=stats.mean_active,
                              padded_fraction=stats.attention_padded / (stats.encoder_tokens + stats.attention_padded),
                              encoder_rows=stats.encoder_tokens, reads=stats.reads)
    return dict(same_counts=same, mean_tokens=sum(lengths) / n, images=n, rows=rows, G1=G1)


def mixed_decode(model, batch: int, repeats: int, seed: int = 0) -> dict:
    """Packed vs padded decoder on a batch of 8..64-token images (uniform counts in steps of T): the
    packed one as ``decode`` runs it for mixed lengths (``decode_logits_mixed``), the padded one with key lengths."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    T = cfg.tokens_per_iter
    counts = (torch.randint(8 // T, min(64, cfg.max_tokens) // T + 1, (batch,), generator=g) * T).tolist()
    padded = torch.randn(batch, max(counts), cfg.latent_dim, generator=g)  # values past a count are never read
    lengths = torch.tensor(counts)
    with torch.no_grad():
        def packed_call():  # what decode runs for a batch of mixed lengths
            return decode_logits_mixed(model, padded, counts)

        best = _interleaved_best({"packed": packed_call, "padded": lambda: model.decode_logits(padded, lengths)},
                                 4 * repeats)  # short calls: more rounds
        packed_s, padded_s = best["packed"], best["padded"]
        ops = (_ops(packed_call), _ops(lambda: model.decode_logits(padded, lengths)))
    return dict(counts=counts, packed_ms=1e3 * packed_s, padded_ms=1e3 * padded_s, speedup=padded_s / packed_s,
                packed_ops=ops[0], padded_ops=ops[1])


def photo_crops(size: int, count: int) -> torch.Tensor | None:
    """``count`` held-out photo crops [count, 3, size, size], or None without scikit-image."""
    crops = PhotoCrops(size, length=count, seed=HELD_OUT_SEED)
    try:
        return torch.stack([crops[i]["image"] for i in range(count)])
    except ImportError:
        return None


def run(checkpoint: str, per_level: int, batch: int, threads: int, criteria: list[str], repeats: int,
        photos: int = 0) -> dict:
    torch.set_num_threads(threads)
    model = load(checkpoint, backend="torch")
    items = demo_images(model.config.image_size, per_level=per_level, photos=True, seed=HELD_OUT_SEED)
    sets = {"held-out mix": torch.stack([it.image for it in items])}
    crops = photo_crops(model.config.image_size, photos) if photos else None
    if crops is not None:
        sets["photo crops"] = crops
    results = {}
    for name, images in sets.items():
        for spec in criteria:
            criterion, _, fallback = spec.partition(",")
            results.setdefault(name, {})[spec] = encoders(model, images, criterion, fallback or "max", batch, repeats)
    return dict(checkpoint=checkpoint, batch=batch, threads=threads, repeats=repeats,
                machine=platform.processor() or platform.machine(), torch=torch.__version__,
                encode=results["held-out mix"], photos=results.get("photo crops"), decode=mixed_decode(model, batch, repeats))


def print_table(result: dict) -> None:
    print(f"{result['checkpoint']}, batch {result['batch']}, {result['threads']} thread(s), {result['machine']}, "
          f"torch {result['torch']}, best of {result['repeats']}")
    print("the held-out mix:")
    print_rows(result["encode"])
    if result.get("photos"):
        print("held-out photo crops:")
        print_rows(result["photos"])
    d = result["decode"]
    print(f"mixed-length decode of {len(d['counts'])} images with {min(d['counts'])}..{max(d['counts'])} tokens: packed "
          f"{d['packed_ms']:.2f} ms, padded {d['padded_ms']:.2f} ms ({d['speedup']:.2f}x); ops {d['packed_ops']} vs {d['padded_ops']}")


def print_rows(encode: dict) -> None:
    print(f"{'criterion':<26} {'encoder':<11} {'images/s':>9} {'ratio':>6} {'ops/image':>10} {'ratio':>6} "
          f"{'steps':>6} {'imgs/step':>9} {'padded':>7}")
    for spec, r in encode.items():
        base = r["rows"]["compacting"]
        for name, row in r["rows"].items():
            print(f"{spec:<26} {name:<11} {row['images_per_s']:>9.1f} {row['images_per_s'] / base['images_per_s']:>5.2f}x "
                  f"{row['ops_per_image']:>10.0f} {row['ops_per_image'] / base['ops_per_image']:>5.2f}x {row['steps']:>6} "
                  f"{row['mean_active']:>9.1f} {100 * row['padded_fraction']:>6.2f}%")
        print(f"{'':<26} {r['images']} images, mean {r['mean_tokens']:.1f} tokens, same counts: {r['same_counts']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--per-level", type=int, default=32, help="held-out synthetic images per complexity level")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--criteria", nargs="+", default=["fast-pixel-l1:0.07,max", "pixel-l1:0.07,best"],
                        help="CRITERION[,FALLBACK] rows")
    parser.add_argument("--photo-crops", type=int, default=128, help="held-out photo crops for the second table (0: none)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    result = run(args.checkpoint, args.per_level, args.batch, args.threads, args.criteria, args.repeats, args.photo_crops)
    print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
