"""``alit-fast demo``: adaptive tokenization of a bundled set of images, from flat colours to
noise (and a few photographs), with the demo model; ``--evaluate`` prints the paper-claim figures.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from ..evaluation.metrics import spearman
from ..files import write_atomic
from ..inference import check_criterion_fits, l1_per_image, parse_criterion, pixels_from_logits
from ..io.images import center_crop, to_tensor
from ..training.data import COMPLEXITY_LEVELS, SyntheticImages, item_rng, load_photos, synthetic_image
from ..ops import BACKENDS
from ._common import (
    OneLineParser,
    UsageError,
    check_output_file,
    check_positive,
    load_model_or_raise,
    run_command,
)

DEMO_CRITERION = "pixel-l1:0.12"  # chosen on validation images after stage 2 (benchmarks/demo_criterion_sweep.py)
DEMO_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")
# the demo's own images and the held-out evaluation images use seeds that training does not
DEMO_SEED = 2024
HELD_OUT_SEED = 777_777


@dataclass
class DemoImage:
    name: str
    image: torch.Tensor  # [3, S, S] in [0, 1]
    level: int  # synthetic complexity level; -1 for photographs


def demo_images(size: int, per_level: int = 2, photos: bool = True, seed: int = DEMO_SEED) -> list[DemoImage]:
    """Synthetic images ordered from simple to complex, then photo crops if scikit-image is there."""
    items = []
    for level, level_name in enumerate(COMPLEXITY_LEVELS):
        for k in range(per_level):
            pixels = synthetic_image(size, level, item_rng(seed, level, k))
            items.append(DemoImage(f"{level_name}-{k}", to_tensor(pixels), level))
    if photos:
        try:
            pictures = load_photos(DEMO_PHOTOS)
        except ImportError:
            pictures = []
        items += [DemoImage(name, to_tensor(center_crop(p, size)), -1) for name, p in zip(DEMO_PHOTOS, pictures)]
    return items


# ---------------------------------------------------------------------- the paper-claim figures
@dataclass
class ClaimFigures:
    spearman: float  # chosen token count vs complexity label
    tokens_per_level: dict[int, float]  # mean chosen token count per complexity level
    error_per_tokens: dict[int, float]  # mean L1 reconstruction error at every token count
    num_images: int

    @property
    def error_falls(self) -> bool:
        errors = list(self.error_per_tokens.values())
        return all(b <= a for a, b in zip(errors, errors[1:]))

    def report(self) -> str:
        lines = [f"held-out synthetic images: {self.num_images}"]
        lines.append(f"Spearman(token count, complexity level) = {self.spearman:.3f}")
        for level, tokens in self.tokens_per_level.items():
            lines.append(f"  level {level} ({COMPLEXITY_LEVELS[level]}): {tokens:.1f} tokens on average")
        lines.append("mean L1 reconstruction error per token count" + (" (falls monotonically)" if self.error_falls else ""))
        for n, err in self.error_per_tokens.items():
            lines.append(f"  {n:>4} tokens: {err:.4f}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_claims(
    model, criterion: str = DEMO_CRITERION, per_level: int = 20, seed: int = HELD_OUT_SEED, batch_size: int = 25
) -> ClaimFigures:
    """The paper's two claims measured on held-out synthetic images: the token count a criterion
    picks rises with complexity, and reconstruction error falls as tokens go from min to max."""
    cfg = model.config
    data = SyntheticImages(cfg.image_size, length=per_level * len(COMPLEXITY_LEVELS), seed=seed)
    device = model.latent_tokens.device
    images = torch.stack([data[i]["image"] for i in range(len(data))]).to(device)
    labels = [data.level(i) for i in range(len(data))]
    lengths = model.encode(images, criterion, batch_size=batch_size).lengths.tolist()

    error_sum = torch.zeros(cfg.iterations, dtype=torch.float64)
    for lo in range(0, len(images), batch_size):
        chunk = images[lo : lo + batch_size]
        for rec in model.rollout(chunk):
            error_sum[rec.iteration] += l1_per_image(chunk, pixels_from_logits(model, rec.logits)).double().sum().cpu()
    errors = (error_sum / len(images)).tolist()
    per_level_tokens = {
        level: float(np.mean([n for n, lv in zip(lengths, labels) if lv == level])) for level in sorted(set(labels))
    }
    return ClaimFigures(
        spearman=spearman(lengths, labels),
        tokens_per_level=per_level_tokens,
        error_per_tokens={cfg.tokens_per_iter * (t + 1): e for t, e in enumerate(errors)},
        num_images=len(images),
    )


# ---------------------------------------------------------------------- the picture
def _tile(image: torch.Tensor, side: int) -> Image.Image:
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array).resize((side, side), Image.NEAREST)


# the picture's rows, top to bottom, named in its left margin
GRID_ROWS = ("input", "reconstruction", "error, 4|x - x'|", "tokens chosen")
ERROR_GAIN = 4.0  # the error row shows 4 x |x - x'| (clipped), so small errors stay visible


def make_grid(items: list[DemoImage], reconstructions: torch.Tensor, lengths: list[int], side: int = 128) -> Image.Image:
    """One column per image, headed by its name; rows (labelled on the left): the input, its
    reconstruction, the per-pixel error, and the number of tokens the criterion chose."""
    pad, head, text_h, margin = 4, 16, 18, 112
    rows_top = [head + pad + r * (side + pad) for r in range(3)]
    count_y = rows_top[2] + side + pad
    grid = Image.new("RGB", (margin + len(items) * (side + pad) + pad, count_y + text_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(GRID_ROWS):
        y = rows_top[r] + side // 2 - 6 if r < 3 else count_y + 2
        draw.text((pad, y), label, fill="black")
    for k, (item, recon, n) in enumerate(zip(items, reconstructions, lengths)):
        x = margin + pad + k * (side + pad)
        draw.text((x + 2, 2), item.name[:20], fill="gray")
        error = ((item.image.float() - recon.float().cpu()).abs().mean(0, keepdim=True) * ERROR_GAIN).expand(3, -1, -1)
        for r, tile in enumerate((item.image, recon, error)):
            grid.paste(_tile(tile, side), (x, rows_top[r]))
        draw.text((x + 2, count_y + 2), f"{n} tokens", fill="black")
    return grid


# ---------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__)
    p.add_argument("--checkpoint", default="demo", help="the model (default: the bundled demo model)")
    p.add_argument("--criterion", default=DEMO_CRITERION)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--out", default="alit_demo.png", help="where the PNG grid goes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out this command did not write (its own PNG is replaced anyway)")
    p.add_argument("--per-level", type=int, default=2, help="synthetic images per complexity level")
    p.add_argument("--no-photos", action="store_true", help="leave out the scikit-image photographs")
    p.add_argument("--evaluate", action="store_true", help="also print the paper-claim figures on held-out images")
    p.add_argument("--eval-per-level", type=int, default=20)
    p.add_argument("--eval-seed", type=int, default=HELD_OUT_SEED, help="the held-out set (training never used it)")
    return p


PROG = "alit-fast demo"
# a PNG text chunk marking the grids this command writes, so a rerun replaces its own picture and
# never a user's file of the same name
MARK = ("Software", PROG)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _written_here(path: str) -> bool:
    try:
        with Image.open(path) as picture:
            return picture.info.get(MARK[0]) == MARK[1]
    except (OSError, ValueError):
        return False


def _save(grid: Image.Image, path: str) -> None:
    """Through a temporary file: a full disk keeps the earlier picture and leaves no half of one."""
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    options = {}
    if image_format == "PNG":
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_text(*MARK)
    write_atomic(path, lambda tmp: grid.save(tmp, format=image_format, **options))


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    check_positive("--per-level", args.per_level)
    check_positive("--eval-per-level", args.eval_per_level)
    try:
        criterion = parse_criterion(args.criterion)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    check_output_file(args.out, replaceable=lambda path: args.overwrite or _written_here(path), overwrite_flag="--overwrite")
    if not args.out.lower().endswith(IMAGE_SUFFIXES):
        raise UsageError(f"--out {args.out}: give an image file name ({', '.join(IMAGE_SUFFIXES)})")
    model = load_model_or_raise(args.checkpoint, args.backend, "cpu")
    try:
        check_criterion_fits(model, criterion)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    cfg = model.config
    items = demo_images(cfg.image_size, args.per_level, photos=not args.no_photos)
    images = torch.stack([it.image for it in items])
    tokens = model.encode(images, args.criterion)
    reconstructions = model.decode(tokens)
    errors = l1_per_image(images, reconstructions).tolist()
    lengths = tokens.lengths.tolist()

    print(f"criterion {args.criterion}; {cfg.tokens_per_iter}..{cfg.max_tokens} tokens per image")
    print(f"{'image':<22}{'level':>6}{'tokens':>8}{'L1':>9}")
    for item, n, err in zip(items, lengths, errors):
        level = str(item.level) if item.level >= 0 else "photo"
        print(f"{item.name:<22}{level:>6}{n:>8}{err:>9.4f}")
    _save(make_grid(items, reconstructions, lengths), args.out)
    print(f"wrote {args.out}")
    if args.evaluate:
        print()
        print(evaluate_claims(model, args.criterion, per_level=args.eval_per_level, seed=args.eval_seed).report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
