"""``alit-fast decode``: a token file back to PNG images."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..inference import TokenBatch
from ..io.images import save_image
from ._common import add_model_args, device_from, load_model_or_report


def _decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alit-fast decode", description="Decode a token file back to PNG images.")
    p.add_argument("tokens", help="a file written by alit-fast encode")
    add_model_args(p, None)
    p.add_argument("--out", default="decoded", help="output directory")
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
    tokens = TokenBatch.load(args.tokens)
    spec = args.checkpoint or tokens.checkpoint
    if spec is None:
        print("alit-fast decode: the token file names no checkpoint; pass --checkpoint", file=sys.stderr)
        return 2
    model = load_model_or_report(spec, args.backend, device_from(args.device), "alit-fast decode")
    if model is None:
        return 2
    if tokens.config_json is not None and tokens.config_json != model.config.to_json():
        print("alit-fast decode: warning: the tokens were encoded by a model with another config", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    names = _output_names(tokens)
    started = time.perf_counter()
    step = max(1, args.batch_size)
    with tqdm(total=len(tokens), unit="img", desc="decode", file=sys.stderr) as bar:
        for lo in range(0, len(tokens), step):
            part = TokenBatch(tokens.codes[lo : lo + step], tokens.lengths[lo : lo + step], tokens.codebook_size)
            for j, image in enumerate(model.decode(part)):
                save_image(image, os.path.join(args.out, names[lo + j]))
            bar.update(len(part))
    elapsed = time.perf_counter() - started
    print(f"decoded {len(tokens)} images -> {args.out} ({len(tokens) / max(elapsed, 1e-9):.1f} images/s)")
    return 0
