"""What the file commands share: model loading with one-line errors, the device, output checks,
common flags. User errors are raised as UsageError; ``run_command`` prints them as one line
(``alit-fast <command>: ...``, exit 2) and lets every other exception (a bug) keep its traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter

import torch

from ..io import ALIT, CheckpointError, load
from ..io.images import default_workers
from ..inference import (
    DEFAULT_CRITERION,
    Criterion,
    TokenCount,
    check_criterion_fits,
    check_fallback,
    criterion_name,
    iteration_range,
    parse_criterion,
)
from ..ops import BACKENDS
from ..errors import OneLineParser, UsageError, one_line, run_command
from ..training.utils import check_free_space, check_writable

__all__ = ["OneLineParser", "UsageError", "one_line", "run_command"]


def checkpoint_spec(spec: str) -> str:
    """What a token file records as its model: a name as is, a file as an absolute path."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def load_model_or_raise(spec: str, backend: str, device: str | torch.device) -> ALIT:
    """alit_fast.load; a missing, unreadable or unfitting checkpoint is a UsageError naming it."""
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model = load(spec, device=device, backend=backend)
    except (FileNotFoundError, CheckpointError, ValueError, OSError) as exc:
        raise UsageError(f"cannot load the model {spec!r}: {one_line(exc)}") from exc
    for warning in said:  # e.g. weights read as official layout: one line, not a source listing
        print(f"note: {one_line(warning.message)}", file=sys.stderr)
    return model


def device_from(name: str) -> torch.device:
    """The --device value; raises ValueError for a malformed name or a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_output_file(path: str, replaceable=None, flag: str = "--out", overwrite_flag: str | None = None) -> None:
    """Refuse before any work an --out that cannot be written: a directory, or a missing or
    read-only parent folder; and one that exists but is not a file this command writes
    (``replaceable(path)`` says whether it is): a user's file is never overwritten."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist")
    check_writable(parent, f"{flag} {path}")
    if replaceable is not None and os.path.exists(path) and not replaceable(path):
        way_out = f"pass {overwrite_flag}" if overwrite_flag else "remove it first"
        raise UsageError(f"{flag} {path} exists and is not a file this command wrote; it is left alone "
                         f"(give another name, or {way_out})")


def check_output_dir(path: str, flag: str = "--out") -> None:
    """Refuse before any work an output folder that is a file, or lies under one."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path}: {probe} is a file, not a folder")
    check_writable(probe, f"{flag} {path}")


def check_positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")


def add_model_args(parser: argparse.ArgumentParser, checkpoint_default: str | None) -> None:
    parser.add_argument(
        "--checkpoint",
        default=checkpoint_default,
        help="what alit_fast.load takes: a bundled model name (demo), an alit_fast .safetensors file, an official "
             "checkpoint (.pth), a model directory, or hf-hub:OWNER/REPO[@REVISION]",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=16, help="images run at once")


def add_reader_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="image-reading threads, reading ahead of the encode in order (0: read on the main thread; "
                             "default: the cores this process may use, shared among torchrun's local ranks, at most 8); "
                             "the tokens are the same for any count")


def check_workers(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")


def histogram(lengths: list[int], tokens_per_iter: int, max_tokens: int, width: int = 40) -> str:
    """One text bar per possible token count."""
    counts = Counter(lengths)
    top = max(counts.values()) if counts else 1
    lines = []
    for n in range(tokens_per_iter, max_tokens + 1, tokens_per_iter):
        bar = "#" * round(width * counts.get(n, 0) / top)
        lines.append(f"  {n:>5} tokens | {bar} {counts.get(n, 0)}")
    return "\n".join(lines)


CRITERION_HELP = ("when an image has enough tokens: tokens:N, code-acc:F, code-nll:F, pixel-l1:F or code-mae:F "
                  f"(default: the criterion the model recommends, else {DEFAULT_CRITERION}, the official encode rule)")


def parse_encode_options(args: argparse.Namespace) -> Criterion | None:
    """The criterion of an encoding command (None: the model's, known once it is loaded), once
    --criterion, --fallback, --batch-size, --min-tokens and --max-tokens are known to make sense
    (before any model is loaded)."""
    criterion = None if args.criterion is None else _criterion(args.criterion, args.fallback)
    if hasattr(args, "workers"):
        check_workers(args)
    for flag in ("--batch-size", "--min-tokens", "--max-tokens"):
        check_positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.min_tokens is not None and args.max_tokens is not None and args.min_tokens > args.max_tokens:
        raise UsageError(f"--min-tokens {args.min_tokens} is above --max-tokens {args.max_tokens}")
    return criterion


def _criterion(text: str, fallback: str) -> Criterion:
    try:
        criterion = parse_criterion(text)
        check_fallback(criterion, fallback)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--criterion {text}: {exc}") from exc
    return criterion


def check_encode_options(model: ALIT, criterion: Criterion | None, args: argparse.Namespace) -> Criterion:
    """The encoding options against the loaded model: a criterion its base can score (None: the
    one the model recommends), and token bounds on its grid of counts. Returns the criterion."""
    if criterion is None:
        criterion = _criterion(model.default_criterion, args.fallback)
        args.criterion = model.default_criterion
    try:
        check_criterion_fits(model, criterion)
    except ValueError as exc:
        raise UsageError(f"--criterion {args.criterion}: {exc}") from exc
    try:
        iteration_range(model, args.min_tokens, args.max_tokens)
    except ValueError as exc:
        raise UsageError(str(exc).replace("min_tokens", "--min-tokens").replace("max_tokens", "--max-tokens")) from exc
    return criterion


def unmet_line(lengths: list[int], criterion: Criterion, args: argparse.Namespace, max_tokens: int) -> str | None:
    """One line on the images that reached the most tokens allowed without meeting the criterion at
    fewer (with --fallback max, the only way to get there); None when there are none."""
    if isinstance(criterion, TokenCount) or args.fallback != "max":
        return None
    top = args.max_tokens if args.max_tokens is not None else max_tokens
    at_top = sum(1 for n in lengths if n >= top)
    if not at_top:
        return None
    return (f"{at_top} of {len(lengths)} images did not meet {criterion_name(criterion)} below the maximum and got "
            f"{top} tokens; a looser --criterion lets more of them stop earlier")
