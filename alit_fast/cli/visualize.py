"""``alit-fast visualize``: token sheets (reconstruction at every token count, the decoder's attention
to each of the first K tokens) and, for several images, all of them sorted by the token count a
criterion chose. One PNG."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..inference import check_criterion_fits, criterion_name, parse_criterion
from ..io.images import PREPROCESSING, describe_notes, find_images, image_notes, load_image
from ..io.visualize import sorted_by_count, stack, token_sheet
from ..files import write_atomic
from ._common import (
    OneLineParser,
    UsageError,
    add_model_args,
    check_output_file,
    check_positive,
    device_from,
    load_model_or_raise,
    run_command,
)
from .demo import DEMO_CRITERION

PROG = "alit-fast visualize"
MAX_PANEL = 2048  # pixels on a side of one enlarged image


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Draw what ALIT's tokens hold, as one PNG.", epilog=PREPROCESSING)
    p.add_argument("inputs", nargs="+", help="image files and/or directories (searched recursively)")
    add_model_args(p, "demo")
    p.add_argument("--out", default="alit_viz.png", help="the PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--tokens-shown", type=int, default=8, help="attention maps for the first K tokens (default 8)")
    p.add_argument("--layer", default="mean", help="decoder layer of the maps: 'mean' over all (default) or an index")
    p.add_argument("--sheets", type=int, default=4, help="token sheets for the first N images (default 4)")
    p.add_argument("--criterion", default=DEMO_CRITERION, help=f"criterion of the sorted grid (default {DEMO_CRITERION}, the demo's)")
    p.add_argument("--max-images", type=int, default=64, help="at most this many images are read (default 64)")
    p.add_argument("--scale", type=int, default=4, help="pixel enlargement of every panel (default 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    for flag, value in (("--tokens-shown", args.tokens_shown), ("--max-images", args.max_images),
                        ("--scale", args.scale), ("--batch-size", args.batch_size)):
        check_positive(flag, value)
    if args.sheets < 0:
        raise UsageError(f"--sheets must be >= 0, got {args.sheets}")
    layer: str | int = args.layer
    if layer != "mean":
        try:
            layer = int(layer)
        except ValueError:
            raise UsageError(f"--layer must be 'mean' or a layer index, got {args.layer!r}") from None
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: the picture is a PNG; give a .png name")
    check_output_file(args.out, replaceable=lambda path: args.overwrite, overwrite_flag="--overwrite")
    missing = [p for p in args.inputs if not os.path.exists(p)]
    if missing:
        raise UsageError(f"no such file or directory: {missing[0]}")
    paths = find_images(args.inputs)[: args.max_images]
    if not paths:
        raise UsageError(f"no images found in {', '.join(args.inputs)}")
    if args.sheets == 0 and len(paths) < 2:  # no token sheet, and one image makes no sorted sheet
        raise UsageError("--sheets 0 with a single image draws nothing; give --sheets >= 1 or more images")
    device = device_from(args.device)
    model = load_model_or_raise(args.checkpoint, args.backend, device)
    cfg = model.config
    if args.tokens_shown > cfg.max_tokens:
        raise UsageError(f"--tokens-shown {args.tokens_shown}: the model makes at most {cfg.max_tokens} tokens")
    if cfg.image_size * args.scale > MAX_PANEL:  # a typo must not build a picture of gigabytes
        raise UsageError(f"--scale {args.scale}: panels of {cfg.image_size * args.scale} pixels; at most "
                         f"{max(1, MAX_PANEL // cfg.image_size)} for this model's {cfg.image_size}-pixel images")
    depth = cfg.layers
    if layer != "mean" and not -depth <= layer < depth:
        raise UsageError(f"--layer {layer}: the decoder has {depth} layers")
    spec = args.criterion
    try:
        criterion = parse_criterion(spec)
        check_criterion_fits(model, criterion)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--criterion {spec}: {exc}") from exc
    images = []
    with image_notes() as notes:
        for path in paths:
            try:
                images.append(load_image(path, cfg.image_size))
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read image {path}: {exc}") from exc
    if describe_notes(notes, cfg.image_size):
        print(f"{PROG}: {describe_notes(notes, cfg.image_size)}", file=sys.stderr)
    batch = torch.stack(images).to(device)
    sheets = []
    if args.sheets:
        sheets.append(token_sheet(model, batch[: args.sheets], first=args.tokens_shown, layers=layer, scale=args.scale))
    if len(paths) > 1:
        tokens = model.encode(batch, criterion, batch_size=args.batch_size)
        counts = [int(n) for n in tokens.lengths.tolist()]
        sheets.append(sorted_by_count(batch.cpu(), counts, scale=args.scale))
    picture = stack(sheets) if len(sheets) > 1 else sheets[0]
    write_atomic(args.out, lambda tmp: picture.image.save(tmp, format="PNG"))
    what = f"{min(len(paths), args.sheets)} token sheet(s)"
    if len(paths) > 1:
        what += f", {len(paths)} images sorted by {criterion_name(criterion)}"
    print(f"wrote {args.out}: {what}")
    return 0
