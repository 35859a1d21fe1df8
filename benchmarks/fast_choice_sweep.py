"""Which stopping configurations can meet issue 27's quality and agreement bars, untimed.

    python -m benchmarks.fast_choice_sweep [--checkpoint demo] [--per-level 8]

One rollout of the held-out images of ``benchmarks.adaptive_vs_official`` gives, per (image,
iteration), the pixel L1 of the clamped reconstruction (what ``pixel-l1`` scores and what the
benchmark's L1 column reports), of the unclamped one (what the official procedure scores) and
``fast-pixel-l1``'s estimate. From those curves alone every (threshold, fallback, cap) is scored
in milliseconds: what the official procedure at batch 1 chooses (threshold 0.07), what the exact
and the fast rule choose, mean tokens and mean L1 on all images and on the photo crops, and the
fast rule's agreement with the exact one (the same count; a pixel L1 within 0.5%). The script
first checks that its rules choose what ``model.encode`` chooses, on two configurations, so the
sweep speaks for the package, and how often the exact rule agrees with itself on the images
nudged below one 8-bit step or mirrored. Speed is ``benchmarks.adaptive_vs_official``'s job.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from alit_fast.cli.demo import HELD_OUT_SEED, demo_images
from alit_fast.inference.calibration import cell_size, flat_latents, image_detail, latent_error, model_calibration
from alit_fast.io import load

from .adaptive_vs_official import SAME_QUALITY

THRESHOLDS = (0.065, 0.07, 0.072, 0.075, 0.08)
CHECK_CAP = 48  # the cap the benchmark's rows use with the demo model


def caps(max_tokens: int, tokens_per_iter: int) -> list[int]:
    """The model's last four token counts (the demo model's 40, 48, 56 and 64)."""
    return [n for n in range(max_tokens - 3 * tokens_per_iter, max_tokens + 1, tokens_per_iter) if n >= tokens_per_iter]


def check_cap(max_tokens: int, tokens_per_iter: int) -> int:
    return max(tokens_per_iter, min(CHECK_CAP, max_tokens) // tokens_per_iter * tokens_per_iter)


@torch.no_grad()
def curves(model, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """[N, iterations] float64: clamped and unclamped pixel L1, the fast estimate; [N] its floor."""
    calibration = model_calibration(model)
    out = {"clamped": [], "unclamped": [], "estimate": [], "floor": []}
    for lo in range(0, len(images), batch):
        x = model.model_images(images[lo : lo + batch])
        base = model.encode_base(x)
        detail = image_detail(x, cell_size(model))
        records = model.rollout(x, halting="off", base=base)
        pixels = [model.reconstruct(r.logits).float() for r in records]
        out["clamped"].append(torch.stack([(x - p.clamp(0, 1)).abs().flatten(1).mean(1) for p in pixels], 1))
        out["unclamped"].append(torch.stack([(x - p).abs().flatten(1).mean(1) for p in pixels], 1))
        errors = [latent_error(model, r.logits, flat_latents(model, base.z)) for r in records]
        out["estimate"].append(torch.stack([calibration.predict(detail, e) for e in errors], 1))
        a, b, c, d = calibration.coef
        out["floor"].append(torch.where(c + d * detail >= 0, a + b * detail, torch.full_like(detail, -1.0)))
    return {k: torch.cat(v).double() for k, v in out.items()}


def choose(scores: torch.Tensor, threshold: float, last: int, fallback: str, never: torch.Tensor | None = None) -> torch.Tensor:
    """[N] the chosen iteration: the first under ``threshold`` up to ``last``, else the fallback's
    (max: ``last``; best: the lowest score's, ties to the earlier); ``never``: images known out of
    reach, which take ``last`` under either fallback (fast-pixel-l1's rule)."""
    s = scores[:, : last + 1]
    under = s < threshold
    first = under.double().argmax(1)
    fallen = torch.full_like(first, last) if fallback == "max" else s.argmin(1)
    chosen = torch.where(under.any(1), first, fallen)
    return chosen if never is None else torch.where(never, torch.full_like(chosen, last), chosen)


def figures(c: dict, chosen: torch.Tensor, tokens_per_iter: int, rows: list[int]) -> tuple[float, float]:
    picked = chosen[rows]
    return float(((picked + 1) * tokens_per_iter).double().mean()), float(c["clamped"][rows].gather(1, picked[:, None]).mean())


def sweep(c: dict, tokens_per_iter: int, photos: list[int], official_threshold: float = 0.07) -> tuple[dict, list[dict]]:
    everyone = list(range(c["clamped"].shape[0]))
    official = choose(c["unclamped"], official_threshold, c["unclamped"].shape[1] - 1, "best")
    bars = {name: figures(c, official, tokens_per_iter, rows) for name, rows in (("all", everyone), ("photos", photos))}
    results = []
    counts = caps(c["clamped"].shape[1] * tokens_per_iter, tokens_per_iter)
    for threshold, cap, fallback in itertools.product(THRESHOLDS, counts, ("max", "best")):
        last = cap // tokens_per_iter - 1
        exact = choose(c["clamped"], threshold, last, fallback)
        fast = choose(c["estimate"], threshold, last, fallback, never=c["floor"] >= threshold)
        row = {"threshold": threshold, "cap": cap, "fallback": fallback,
               "agree": float((exact == fast).double().mean())}
        picked = c["clamped"].gather(1, fast[:, None])[:, 0]
        wanted = c["clamped"].gather(1, exact[:, None])[:, 0]
        row["same_quality"] = float(((picked - wanted).abs() <= SAME_QUALITY * wanted).double().mean())
        for name, rows in (("all", everyone), ("photos", photos)):
            row[name] = figures(c, fast, tokens_per_iter, rows)
        row["quality_bars"] = all(row[n][0] <= bars[n][0] and row[n][1] <= bars[n][1] * 1.005 for n in bars)
        results.append(row)
    return bars, results


def self_check(model, images: torch.Tensor, c: dict, batch: int) -> tuple[list[str], bool]:
    """The script's rules against ``model.encode`` (threshold 0.07, the benchmark's cap, both
    fallbacks, the default min_tokens): a line each, and whether they chose alike everywhere."""
    T = model.config.tokens_per_iter
    cap = check_cap(model.config.max_tokens, T)
    lines, alike = [], True
    for fallback in ("best", "max"):
        for criterion, scores, never in (("pixel-l1:0.07", c["clamped"], None), ("fast-pixel-l1:0.07", c["estimate"], c["floor"] >= 0.07)):
            mine = (choose(scores, 0.07, cap // T - 1, fallback, never) + 1) * T
            theirs = model.encode(images, criterion=criterion, batch_size=batch, fallback=fallback, max_tokens=cap).lengths
            lines.append(f"{criterion} fallback {fallback}, max {cap} tokens: the script's rules choose as encode on "
                         f"{int((mine == theirs).sum())}/{len(mine)} images")
            alike = alike and bool((mine == theirs).all())
    return lines, alike


def differences(c: dict, tokens_per_iter: int, cap: int) -> list[str]:
    """Where fast-pixel-l1:0.07 with fallback best differs from the exact rule, and how flat the
    exact rule's curves are where it must pick the lowest of near-equal errors."""
    T, last = tokens_per_iter, cap // tokens_per_iter - 1
    exact = choose(c["clamped"], 0.07, last, "best")
    fast = choose(c["estimate"], 0.07, last, "best", never=c["floor"] >= 0.07)
    reached = (c["clamped"][:, : last + 1] < 0.07).any(1) | (c["estimate"][:, : last + 1] < 0.07).any(1)
    pairs: dict[str, int] = {}
    for e, f in zip(exact[exact != fast].tolist(), fast[exact != fast].tolist()):
        pairs[f"{(e + 1) * T} -> {(f + 1) * T}"] = pairs.get(f"{(e + 1) * T} -> {(f + 1) * T}", 0) + 1
    differ = exact != fast
    lines = [f"fast-pixel-l1:0.07 fallback best, max {cap} tokens differs from the exact rule on {int(differ.sum())} images, "
             f"{int((differ & ~reached).sum())} of which reach 0.07 under neither rule; exact -> fast tokens: "
             + ", ".join(f"{k} ({v})" for k, v in sorted(pairs.items()))]
    if last == 0:  # a cap of one iteration: no step to speak of
        return lines
    never = ~(c["clamped"][:, : last + 1] < 0.07).any(1)
    rise = c["clamped"][never, last] - c["clamped"][never, last - 1]
    up = rise[rise > 0]
    lines.append(f"of the {int(never.sum())} images whose pixel L1 never reaches 0.07 by {cap} tokens, it rises from {cap - T} "
                 f"to {cap} tokens for {len(up)}" + (f", by {float(up.min()):.5f} to {float(up.max()):.5f} (median "
                                                    f"{float(up.median()):.5f})" if len(up) else ""))
    return lines


def self_agreement(model, images: torch.Tensor, c: dict, batch: int, seeds: int = 2) -> list[str]:
    """How often the exact rule (0.07, fallback best, the benchmark's cap) chooses the same count
    for an image and for the same image nudged by uniform noise below one 8-bit step, or mirrored:
    what "the same count" can mean where errors are near-equal."""
    T = model.config.tokens_per_iter
    last = check_cap(model.config.max_tokens, T) // T - 1
    reference = choose(c["clamped"], 0.07, last, "best")
    nudged = {}
    for seed in range(seeds):
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        nudged[f"nudged by uniform noise of +-0.5/255 (seed {seed})"] = (images + noise * 0.5 / 255).clamp(0, 1)
    nudged["mirrored left to right"] = images.flip(-1)
    lines = []
    for name, other in nudged.items():
        same = choose(curves(model, other, batch)["clamped"], 0.07, last, "best") == reference
        lines.append(f"pixel-l1:0.07 fallback best, max {(last + 1) * T} tokens, against itself on the images "
                     f"{name}: the same count for {100 * float(same.double().mean()):.0f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--per-level", type=int, default=8, help="held-out synthetic images per complexity level")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    model = load(args.checkpoint, backend="torch")
    items = demo_images(model.config.image_size, per_level=args.per_level, photos=True, seed=HELD_OUT_SEED)
    images = torch.stack([it.image for it in items])
    photos = [i for i, it in enumerate(items) if it.level < 0]
    c = curves(model, images, args.batch)
    checks, alike = self_check(model, images, c, args.batch)
    print("\n".join(checks))
    if not alike:
        print("the script's rules no longer choose as encode does: fix them before reading the sweep")
        return 1
    print("\n".join(differences(c, model.config.tokens_per_iter, check_cap(model.config.max_tokens, model.config.tokens_per_iter))))
    print("\n".join(self_agreement(model, images, c, args.batch)))
    bars, results = sweep(c, model.config.tokens_per_iter, photos)
    print(f"official procedure (batch 1, 0.07): all {bars['all'][0]:.1f} tokens, L1 {bars['all'][1]:.4f}; "
          f"photos {bars['photos'][0]:.1f} tokens, L1 {bars['photos'][1]:.4f} (the bars: tokens <=, L1 <= x 1.005)")
    print(f"{'fast-pixel-l1':<14} {'cap':>4} {'fallback':>8} {'all tokens':>10} {'all L1':>7} {'photo tokens':>12} "
          f"{'photo L1':>8} {'agree':>6} {'same L1':>8}  bars")
    for r in results:
        print(f"{r['threshold']:<14} {r['cap']:>4} {r['fallback']:>8} {r['all'][0]:>10.1f} {r['all'][1]:>7.4f} "
              f"{r['photos'][0]:>12.1f} {r['photos'][1]:>8.4f} {100 * r['agree']:>5.0f}% {100 * r['same_quality']:>7.0f}%  "
              + ("quality" + (" + agreement" if r["agree"] >= 0.9 else "") if r["quality_bars"] else ""))
    both = [r for r in results if r["quality_bars"] and r["agree"] >= 0.9]
    print(f"configurations meeting the quality bars: {sum(r['quality_bars'] for r in results)} of {len(results)}; "
          f"with >= 90% agreement too: {len(both)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
