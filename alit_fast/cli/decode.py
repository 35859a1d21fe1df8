"""``alit-fast decode``: a token file back to PNG images."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..inference import TokenBatch, check_token_batch
from ..io.images import save_image
from ._common import add_model_args, device_from, load_model_or_report


def _decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alit-fast decode", description="Decode a token file back to PNG images.")
    p.add_argument("tokens", help="a file written by alit-fast encode")
    add_model_args(p, None)
    p.add_argument("--out", default="decoded", help="output directory")
    p.add_argument("--ignore-config", action="store_true",
                   help="decode tokens recorded as encoded by a model of another config")
    return p


def _output_names(tokens: TokenBatch) -> list[str]:
    names, seen = [], set()
    for i in range(len(tokens)):
        stem = Path(tokens.names[i]).stem if tokens.names else f"{i:05d}"
        name = f"{stem}.png" if stem and f"{stem}.png" not in seen else f"{i:05d}_{stem}.png"
        seen.add(name)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    args = _decode_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"alit-fast decode: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        tokens = TokenBatch.load(args.tokens)
    except (OSError, ValueError) as exc:
        print(f"alit-fast decode: {exc}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"alit-fast decode: --out {args.out} is a file, not a directory", file=sys.stderr)
        return 2
    spec = args.checkpoint or tokens.checkpoint
    if spec is None:
        print("alit-fast decode: the token file names no checkpoint; pass --checkpoint", file=sys.stderr)
        return 2
    try:
        device = device_from(args.device)
    except ValueError as exc:
        print(f"alit-fast decode: {exc}", file=sys.stderr)
        return 2
    model = load_model_or_report(spec, args.backend, device, "alit-fast decode")
    if model is None:
        return 2
    check_config = not args.ignore_config
    try:  # the whole file, once, before any image is written
        check_token_batch(model, tokens, check_config)
    except ValueError as exc:
        hint = "; pass --ignore-config to decode anyway" if "another config" in str(exc) else ""
        print(f"alit-fast decode: {args.tokens}: {exc}{hint}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    names = _output_names(tokens)
    started = time.perf_counter()
    step = max(1, args.batch_size)
    with tqdm(total=len(tokens), unit="img", desc="decode", file=sys.stderr) as bar:
        for lo in range(0, len(tokens), step):
            part = TokenBatch(tokens.codes[lo : lo + step], tokens.lengths[lo : lo + step], tokens.codebook_size,
                              config_json=tokens.config_json)
            for j, image in enumerate(model.decode(part, check_config=check_config)):
                save_image(image, os.path.join(args.out, names[lo + j]))
            bar.update(len(part))
    elapsed = time.perf_counter() - started
    print(f"decoded {len(tokens)} images -> {args.out} ({len(tokens) / max(elapsed, 1e-9):.1f} images/s)")
    return 0
