"""``alit-fast encode``: adaptive-length tokenization of image files."""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

from ..inference import FALLBACKS, TokenBatch, check_criterion_fits, check_fallback, criterion_name, parse_criterion
from ..io.images import find_images, load_image
from ._common import add_model_args, check_output_file, checkpoint_spec, device_from, load_model_or_report


# ---------------------------------------------------------------------- reporting
def histogram(lengths: list[int], tokens_per_iter: int, max_tokens: int, width: int = 40) -> str:
    """One text bar per possible token count."""
    counts = Counter(lengths)
    top = max(counts.values()) if counts else 1
    lines = []
    for n in range(tokens_per_iter, max_tokens + 1, tokens_per_iter):
        bar = "#" * round(width * counts.get(n, 0) / top)
        lines.append(f"  {n:>5} tokens | {bar} {counts.get(n, 0)}")
    return "\n".join(lines)


def _chunks(items: list, size: int):
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


# ---------------------------------------------------------------------- encode
def _encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alit-fast encode", description="Adaptive-length tokenization of image files.")
    p.add_argument("inputs", nargs="+", help="image files and/or directories (searched recursively)")
    add_model_args(p, "demo")
    p.add_argument(
        "--criterion",
        default="code-acc:0.9",
        help="when an image has enough tokens: tokens:N, code-acc:F, code-nll:F or pixel-l1:F (default code-acc:0.9)",
    )
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="max",
        help="an image that never meets the criterion gets max_tokens (max) or its best-scoring count (best, the official rule)",
    )
    p.add_argument("--halting", choices=("off", "threshold", "stochastic"), default="off")
    p.add_argument("--out", default="tokens.safetensors")
    p.add_argument("--quiet", action="store_true", help="no per-image lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _encode_parser().parse_args(argv)
    try:  # everything a user can get wrong, before any model or file is loaded
        criterion = parse_criterion(args.criterion)
        check_fallback(criterion, args.fallback)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_output_file(args.out)
        device = device_from(args.device)
    except ValueError as exc:
        print(f"alit-fast encode: {exc}", file=sys.stderr)
        return 2
    files = find_images(args.inputs)
    if not files:
        print("alit-fast encode: no image files found", file=sys.stderr)
        return 2
    model = load_model_or_report(args.checkpoint, args.backend, device, "alit-fast encode")
    if model is None:
        return 2
    cfg = model.config
    try:
        check_criterion_fits(model, criterion)
    except ValueError as exc:
        print(f"alit-fast encode: {exc}", file=sys.stderr)
        return 2

    batches: list[TokenBatch] = []
    skipped: list[str] = []
    model_seconds = 0.0
    started = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", desc="encode", file=sys.stderr)
    for group in _chunks(files, max(1, args.batch_size)):
        images, names = [], []
        for path in group:
            try:
                images.append(load_image(path, cfg.image_size))
                names.append(str(path))
            except Exception as exc:  # any unreadable file is reported and skipped, never fatal
                skipped.append(str(path))
                tqdm.write(f"skipped {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if images:
            t0 = time.perf_counter()
            tokens = model.encode(
                torch.stack(images).to(device),
                criterion,
                min_tokens=args.min_tokens,
                max_tokens=args.max_tokens,
                halting=args.halting,
                fallback=args.fallback,
            )
            model_seconds += time.perf_counter() - t0
            tokens.names = names
            batches.append(tokens)
            if not args.quiet:
                for name, n in zip(names, tokens.lengths.tolist()):
                    tqdm.write(f"{n:>5} tokens  {name}")
        bar.update(len(group))
    bar.close()
    elapsed = time.perf_counter() - started

    if not batches:
        print(f"alit-fast encode: none of the {len(files)} files could be read", file=sys.stderr)
        return 1
    result = TokenBatch.cat(batches)
    result.checkpoint = checkpoint_spec(args.checkpoint)
    result.extra["criterion"] = criterion_name(criterion)
    result.save(args.out)

    lengths = result.lengths.tolist()
    print(f"\nencoded {len(lengths)} images -> {args.out} (criterion {criterion_name(criterion)})")
    print(histogram(lengths, cfg.tokens_per_iter, cfg.max_tokens))
    print(
        f"mean {sum(lengths) / len(lengths):.1f} tokens per image; "
        f"{len(lengths) / max(model_seconds, 1e-9):.1f} images/s in the model, "
        f"{len(lengths) / max(elapsed, 1e-9):.1f} images/s overall"
    )
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}")
    return 0
