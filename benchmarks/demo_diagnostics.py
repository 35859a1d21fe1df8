"""Where the demo model's extra tokens go: the figures README > Training and RESULTS.md quote
beside `alit-fast demo --evaluate` and `benchmarks.adaptive_vs_official`.

    python -m benchmarks.demo_diagnostics [--checkpoint demo]

Prints, on held-out images: the VQGAN's own reconstruction error; the NLL of the true codes at
each iteration, from all latents and from the first iteration's slots alone (re-encoded latents
drift), and how many of those first codes survive to the last iteration; and, for the official
procedure at batch 1, how many images meet its pixel threshold and the tokens of those that fall
back to their lowest-error iteration.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from alit_fast.inference import official_encode
from alit_fast.io import load
from alit_fast.inference.criteria import l1_per_image
from alit_fast.training.data import SyntheticImages
from alit_fast.cli.demo import HELD_OUT_SEED, demo_images


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--pixel-threshold", type=float, default=0.07)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-codes", metavar="CHECKPOINT",
                        help="also: how many grid codes this model's VQGAN shares with that model's (e.g. before stage 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint, backend="torch")
    cfg = model.config

    held_out = SyntheticImages(cfg.image_size, length=100, seed=HELD_OUT_SEED)
    images = torch.stack([held_out[i]["image"] for i in range(len(held_out))])
    base = model.encode_base(images)
    vqgan_l1 = l1_per_image(images, model.base_tokenizer.decode_indices(base.gt_indices).clamp(0, 1)).mean()
    print(f"VQGAN alone, {len(images)} held-out synthetic images: L1 {float(vqgan_l1):.4f}")
    if args.compare_codes:
        other = load(args.compare_codes, backend="torch")
        same = float((other.encode_base(images).gt_indices == base.gt_indices).float().mean())
        print(f"grid codes the same as {args.compare_codes}'s VQGAN gives: {same:.2f}")

    # flat colours, few shapes, many shapes: the levels whose codes a model can learn to carry
    simple = torch.stack([images[i] for i in range(len(held_out)) if held_out.level(i) <= 2])
    gt = model.encode_base(simple).gt_indices
    records = model.rollout(simple)
    T = cfg.tokens_per_iter

    def nll(z_q: torch.Tensor) -> float:
        return float(F.cross_entropy(model.decode_logits(z_q).transpose(1, 2), gt))

    print(f"NLL of the true codes, {len(simple)} flat / few-shape / many-shape images:")
    for rec in records:
        print(f"  {T * (rec.iteration + 1):>4} tokens: all {nll(rec.z_q):.3f}   first {T} slots alone {nll(rec.z_q[:, :T]):.3f}")
    kept = float((records[-1].indices[:, :T] == records[0].indices).float().mean())
    print(f"first {T} codes unchanged from the first to the last iteration: {kept:.2f}")

    items = demo_images(cfg.image_size, per_level=8, photos=True, seed=HELD_OUT_SEED)
    met, fallback = [], []
    for item in items:
        enc = official_encode(model, item.image[None], threshold=args.pixel_threshold, halting="off")
        (met if min(enc.errors) < args.pixel_threshold else fallback).append(enc.num_tokens)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(f"official procedure, batch 1, {len(items)} images: {len(met)} meet {args.pixel_threshold} "
          f"({mean(met):.1f} tokens on average), {len(fallback)} fall back ({mean(fallback):.1f} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
