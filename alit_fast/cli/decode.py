"""``alit-fast decode``: a token file back to PNG images."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..inference import TokenBatch, check_token_batch
from ..inference.encode import CONFIG_MISMATCH, ConfigMismatch
from ..io.images import save_image
from ._common import (
    OneLineParser,
    UsageError,
    add_model_args,
    check_free_space,
    check_output_dir,
    check_positive,
    device_from,
    load_model_or_raise,
    one_line,
    run_command,
)


def _decode_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="alit-fast decode", description="Decode a token file back to PNG images.")
    p.add_argument("tokens", help="a file written by alit-fast encode")
    add_model_args(p, None)
    p.add_argument("--out", default="decoded", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace images of the same names already in --out")
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


PROG = "alit-fast decode"


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = _decode_parser().parse_args(argv)
    check_positive("--batch-size", args.batch_size)
    try:
        tokens = TokenBatch.load(args.tokens)
    except (OSError, ValueError) as exc:
        raise UsageError(one_line(exc)) from exc
    check_output_dir(args.out)  # also refuses an --out that is a file
    spec = args.checkpoint or tokens.checkpoint
    if spec is None:
        raise UsageError("the token file names no checkpoint; pass --checkpoint")
    device = device_from(args.device)
    model = load_model_or_raise(spec, args.backend, device)
    check_config = not args.ignore_config
    try:  # the whole file, once, before any image is written
        check_token_batch(model, tokens, check_config)
    except ConfigMismatch as exc:
        raise UsageError(f"{args.tokens}: {CONFIG_MISMATCH}; decode them with that model (--checkpoint) "
                         "or pass --ignore-config to decode anyway") from exc
    except ValueError as exc:
        raise UsageError(f"{args.tokens}: {exc}") from exc
    names = _output_names(tokens)
    existing = [n for n in names if os.path.exists(os.path.join(args.out, n))]
    if existing and not args.overwrite:
        raise UsageError(f"--out {args.out} already holds {len(existing)} of the images to write ({', '.join(existing[:3])}"
                         f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them")
    size = model.config.image_size
    check_free_space(args.out, len(tokens) * (3 * size * size + 1024), f"--out {args.out}")  # PNGs, uncompressed at worst
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    step = args.batch_size
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
