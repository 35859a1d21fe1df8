"""``alit-fast encode`` and ``alit-fast decode``: adaptive-length tokenization of image files."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from .adaptive import FALLBACKS, check_fallback
from .criteria import criterion_name, parse_criterion
from .image_io import find_images, load_image, save_image
from .ops import BACKENDS
from .tokens import TokenBatch


# ---------------------------------------------------------------------- model loading
def checkpoint_spec(spec: str) -> str:
    """What a token file records as its model: a name as is, a file as an absolute path."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def load_model(spec: str, backend: str = "torch", device: str | torch.device = "cpu"):
    """An ALIT from an alit_fast safetensors file, an official checkpoint, or a bundled name ("demo")."""
    from .checkpoint import CheckpointError, load, load_official

    if not os.path.exists(spec):
        if os.sep in spec or spec.endswith((".safetensors", ".pth", ".pt", ".ckpt")):
            raise FileNotFoundError(f"checkpoint not found: {spec}")
        try:
            from .pretrained import load_pretrained
        except ImportError as exc:
            raise RuntimeError(f"bundled models ({spec!r}) need alit_fast.pretrained, which is missing") from exc
        model = load_pretrained(spec)
    elif spec.endswith(".safetensors"):
        try:
            model = load(spec)
        except CheckpointError:  # a safetensors file without our metadata: official weights re-saved
            model = load_official(spec)
    else:
        model = load_official(spec)
    return model.to(device).set_backend(backend).eval()


def load_model_or_report(spec: str, backend: str, device: str | torch.device, prog: str):
    """load_model, or None after a one-line message: a wrong path or name is not worth a traceback."""
    from .checkpoint import CheckpointError

    try:
        return load_model(spec, backend, device)
    except (FileNotFoundError, CheckpointError, RuntimeError, ValueError) as exc:
        print(f"{prog}: cannot load the model {spec!r}: {exc}", file=sys.stderr)
        return None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _add_model_args(parser: argparse.ArgumentParser, checkpoint_default: str | None) -> None:
    parser.add_argument(
        "--checkpoint",
        default=checkpoint_default,
        help="an alit_fast .safetensors file, an official checkpoint (.pth), or a bundled model name (demo)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=16, help="images run at once")


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
    _add_model_args(p, "demo")
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


def encode_main(argv: list[str] | None = None) -> int:
    args = _encode_parser().parse_args(argv)
    try:
        criterion = parse_criterion(args.criterion)
        check_fallback(criterion, args.fallback)  # before any model or file is loaded
    except ValueError as exc:
        print(f"alit-fast encode: {exc}", file=sys.stderr)
        return 2
    files = find_images(args.inputs)
    if not files:
        print("alit-fast encode: no image files found", file=sys.stderr)
        return 2
    model = load_model_or_report(args.checkpoint, args.backend, _device(args.device), "alit-fast encode")
    if model is None:
        return 2
    cfg = model.config
    device = model.latent_tokens.device

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


# ---------------------------------------------------------------------- decode
def _decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alit-fast decode", description="Decode a token file back to PNG images.")
    p.add_argument("tokens", help="a file written by alit-fast encode")
    _add_model_args(p, None)
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


def decode_main(argv: list[str] | None = None) -> int:
    args = _decode_parser().parse_args(argv)
    tokens = TokenBatch.load(args.tokens)
    spec = args.checkpoint or tokens.checkpoint
    if spec is None:
        print("alit-fast decode: the token file names no checkpoint; pass --checkpoint", file=sys.stderr)
        return 2
    model = load_model_or_report(spec, args.backend, _device(args.device), "alit-fast decode")
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
