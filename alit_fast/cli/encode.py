"""``alit-fast encode``: adaptive-length tokenization of image files."""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..inference import (
    FALLBACKS,
    TokenBatch,
    criterion_name,
)
from ..inference.tokens import FORMAT as TOKEN_FORMAT
from ..models import HALTING_MODES
from ..io.images import (PREPROCESSING, IMAGE_EXTENSIONS, describe_notes, find_images, image_file_problem, image_notes,
                         load_image, read_in_order)
from ._common import (
    OneLineParser,
    UsageError,
    add_model_args,
    add_reader_args,
    check_encode_options,
    check_free_space,
    check_output_file,
    checkpoint_spec,
    device_from,
    CRITERION_HELP,
    histogram,
    unmet_line,
    load_model_or_raise,
    one_line,
    parse_encode_options,
    run_command,
)


# ---------------------------------------------------------------------- reporting
def _chunks(items: list, size: int):
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


# ---------------------------------------------------------------------- encode
def _encode_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Adaptive-length tokenization of image files.", epilog=PREPROCESSING)
    p.add_argument("inputs", nargs="+", help="image files and/or directories (searched recursively)")
    add_model_args(p, "demo")
    p.add_argument("--criterion", default=None, help=CRITERION_HELP)
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="max",
        help="an image that never meets the criterion gets max_tokens (max) or its best-scoring count (best, the official rule)",
    )
    p.add_argument("--halting", choices=HALTING_MODES, default="off",
                   help="dynamic halting while encoding: off (deterministic, default), threshold, stochastic, or "
                        "official (the official rule: stochastic for VQGAN models, the no-op for VAE models)")
    p.add_argument("--batching", choices=BATCHING, default="continuous",
                   help="continuous (default): a slot freed by an image that stops takes the next image at once; "
                        "compacting: a batch starts together and shrinks (what --halting other than off runs); "
                        "both give every image the same tokens")
    p.add_argument("--out", default="tokens.safetensors",
                   help="the token file to write; an existing file is replaced only if it is a token file")
    p.add_argument("--quiet", action="store_true", help="no per-image lines")
    p.add_argument("--shard-size", type=int, default=None,
                   help="write a tokenized dataset instead: --out is a directory of shards of this many images "
                        "and an index (see alit-fast pretokenize)")
    add_reader_args(p)
    return p


PROG = "alit-fast encode"
BATCHING = ("continuous", "compacting")


def is_token_file(path: str) -> bool:
    """Whether ``path`` is a token file (what --out may replace)."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == TOKEN_FORMAT
    except Exception:  # not safetensors at all
        return False


def _input_files(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(files whose header reads as an image, 'path (reason)' for those that do not)."""
    missing = [item for item in inputs if not os.path.exists(item)]
    if missing:
        raise UsageError(f"input not found: {', '.join(missing)}")
    files, skipped = [], []
    for path in find_images(inputs):
        reason = image_file_problem(path)
        if reason is None:
            files.append(path)
        else:
            skipped.append(f"{path} ({reason})")
    if not files and not skipped:
        raise UsageError(f"no image files found in {', '.join(inputs)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if not files:
        raise UsageError(f"none of the {len(skipped)} files could be read as an image: {_listing(skipped)}")
    return files, skipped


def _listing(items: list[str], most: int = 5) -> str:
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--shard-size" or a.startswith("--shard-size=") for a in argv):
        # a dataset, not a handful of files: sharded token files and an index (alit-fast pretokenize)
        from .pretokenize import main as pretokenize_main

        return pretokenize_main(argv, prog=PROG)
    return run_command(PROG, _main, argv)


# a long run saves what it has done this often (and never more than a tenth of its time): a late
# failure (a crash, Ctrl-C, a full disk) leaves the tokens of every image encoded before it
PARTIAL_EVERY_S = 120.0


def _token_file(batches: list[TokenBatch], args: argparse.Namespace, criterion, total: int | None = None) -> TokenBatch:
    result = TokenBatch.cat(batches)
    result.checkpoint = checkpoint_spec(args.checkpoint)
    result.extra["criterion"] = criterion_name(criterion)
    if total is not None:
        result.extra["partial"] = f"{len(result)} of {total} images (the run stopped before the rest)"
    return result


def _loaded_groups(files: list, skipped: list[str], args: argparse.Namespace, cfg, device, bar, clock: list[float]):
    """(names, images on ``device``) per --batch-size files that load (read ahead on --workers
    threads, in order); ``clock[0]`` adds up the seconds spent waiting for images (a stream pulls
    its images while it encodes)."""
    reads = read_in_order(files, lambda path: load_image(path, cfg.image_size), args.workers, ahead=2 * args.batch_size)
    for group in _chunks(files, args.batch_size):
        t0 = time.perf_counter()
        images, names = [], []
        for path, image, exc in itertools.islice(reads, len(group)):
            if exc is not None:  # a body that fails to decode past a good header: reported, never fatal
                skipped.append(f"{path} ({type(exc).__name__}: {one_line(exc)})")
            else:
                images.append(image)
                names.append(str(path))
        bar.update(len(group))
        clock[0] += time.perf_counter() - t0
        if images:
            yield names, torch.stack(images).to(device)


def _encoded(model, groups, criterion, args: argparse.Namespace):
    """(names, TokenBatch) per group, in order: continuous batching over the whole run, or (or
    with halting, which the stream does not run) one compacting encode per group."""
    names: list[list[str]] = []

    def images():
        for group_names, batch in groups:
            names.append(group_names)
            yield batch

    options = dict(min_tokens=args.min_tokens, max_tokens=args.max_tokens, fallback=args.fallback)
    if args.batching == "continuous" and args.halting == "off":
        results = model.encode_stream(images(), criterion, batch_size=args.batch_size, **options)
    else:
        results = (model.encode(batch, criterion, halting=args.halting, **options) for batch in images())
    for k, tokens in enumerate(results):
        yield names[k], tokens


def _encode_files(model, files: list, skipped: list[str], criterion, args: argparse.Namespace
                  ) -> tuple[list[TokenBatch], float]:
    """Every readable file's tokens, in batches; --out holds the tokens so far every
    PARTIAL_EVERY_S seconds, marked partial, until the full file replaces it."""
    cfg, device = model.config, model.latent_tokens.device
    batches: list[TokenBatch] = []
    last_save, save_cost, loading = time.perf_counter(), 0.0, [0.0]
    with tqdm(total=len(files), unit="img", desc="encode", file=sys.stderr) as bar:
        results = _encoded(model, _loaded_groups(files, skipped, args, cfg, device, bar, loading), criterion, args)
        started, saving = time.perf_counter(), 0.0
        for names, tokens in results:
            tokens.names = names
            batches.append(tokens)
            if not args.quiet:
                for name, n in zip(names, tokens.lengths.tolist()):
                    tqdm.write(f"{n:>5} tokens  {name}")
            if time.perf_counter() - last_save >= max(PARTIAL_EVERY_S, 10 * save_cost) and len(batches) * args.batch_size < len(files):
                t0 = time.perf_counter()
                _token_file(batches, args, criterion, total=len(files)).save(args.out)
                last_save, save_cost = time.perf_counter(), time.perf_counter() - t0
                saving += save_cost
        model_seconds = time.perf_counter() - started - loading[0] - saving
    return batches, model_seconds


def _main(argv: list[str] | None) -> int:
    args = _encode_parser().parse_args(argv)
    # everything a user can get wrong, before any model or file is loaded
    criterion = parse_encode_options(args)
    check_output_file(args.out, replaceable=is_token_file)
    device = device_from(args.device)
    files, skipped = _input_files(args.inputs)
    model = load_model_or_raise(args.checkpoint, args.backend, device)
    cfg = model.config
    criterion = check_encode_options(model, criterion, args)
    # the token file: at most max_tokens int32 ids and a name per image
    check_free_space(os.path.dirname(os.path.abspath(args.out)),
                     sum(4 * cfg.max_tokens + 2 * len(str(p)) + 16 for p in files) + 4096, f"--out {args.out}")

    with image_notes() as notes:
        started = time.perf_counter()
        batches, model_seconds = _encode_files(model, files, skipped, criterion, args)
    elapsed = time.perf_counter() - started

    if not batches:
        raise UsageError(f"none of the {len(skipped)} files could be read as an image: {_listing(skipped)}")
    result = _token_file(batches, args, criterion)
    result.save(args.out)

    lengths = result.lengths.tolist()
    print(f"\nencoded {len(lengths)} images -> {args.out} (criterion {criterion_name(criterion)})")
    print(histogram(lengths, cfg.tokens_per_iter, cfg.max_tokens))
    unmet = unmet_line(lengths, criterion, args, cfg.max_tokens)
    if unmet:
        print(unmet)
    print(
        f"mean {sum(lengths) / len(lengths):.1f} tokens per image; "
        f"{len(lengths) / max(model_seconds, 1e-9):.1f} images/s in the model, "
        f"{len(lengths) / max(elapsed, 1e-9):.1f} images/s overall"
    )
    if describe_notes(notes, cfg.image_size):
        print(f"{PROG}: {describe_notes(notes, cfg.image_size)}", file=sys.stderr)
    if skipped:
        # one line, after the work: the token file holds every other image (their names are in it)
        print(f"{PROG}: warning: skipped {len(skipped)} unreadable file(s): {_listing(skipped, 20)}", file=sys.stderr)
    return 0
