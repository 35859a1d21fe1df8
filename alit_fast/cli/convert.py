"""``alit-fast convert``: an official ALIT checkpoint (or an alit_fast training checkpoint) into a
model directory in the Hugging Face Hub layout, ready for ``alit_fast.load(DIR)`` or an upload."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from ..files import WRITE_ERRNOS
from ..io import CheckpointError, load_official
from ..io.weights import read_checkpoint_file
from ._common import OneLineParser, UsageError, check_free_space, check_output_dir, check_positive, run_command
from ..io.repo import REPO_FILES, push_to_hub, save_pretrained

PROG = "alit-fast convert"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="An official ALIT checkpoint (or an alit_fast training checkpoint) to a Hub-layout model directory.")
    p.add_argument("checkpoint", help="an official .pth checkpoint (model/ema dict or raw state dict)")
    p.add_argument("out", help="the directory to write (model.safetensors, config.json, README.md)")
    p.add_argument("--entry", choices=("ema", "model"), default=None,
                   help="which weights of a model/ema checkpoint to take (default: ema when present)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, which no tensor shape shows (default: the preset that matches the shapes)")
    p.add_argument("--repo-id", default=None, help="OWNER/REPO named in the model card (and the upload target with --push)")
    p.add_argument("--push", action="store_true", help="also upload the directory to --repo-id on the Hub")
    p.add_argument("--overwrite", action="store_true", help="replace the model files of an existing directory")
    return p


def _source(path: str, entry: str | None) -> str | Mapping:
    """The path itself, or the chosen entry of a model/ema checkpoint (with its recorded config)."""
    if entry is None:
        return path
    raw = read_checkpoint_file(path)
    if not isinstance(raw, Mapping) or not isinstance(raw.get(entry), Mapping):
        have = sorted(k for k, v in raw.items() if isinstance(v, Mapping)) if isinstance(raw, Mapping) else []
        raise CheckpointError(f"{path} has no {entry!r} entry (it has: {', '.join(have) or 'none'})")
    picked = {entry: raw[entry]}
    if isinstance(raw.get("config"), str):
        picked["config"] = raw["config"]
    return picked


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"{args.checkpoint}: " + ("is a directory" if os.path.isdir(args.checkpoint) else "no such file"))
    check_positive("--num-heads", args.num_heads)
    if args.push and not args.repo_id:
        raise UsageError("--push needs --repo-id OWNER/REPO")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"{args.out} exists and is not a directory")
    present = [n for n in REPO_FILES if os.path.exists(os.path.join(args.out, n))]
    if present and not args.overwrite:
        raise UsageError(f"{args.out} already holds {', '.join(present)}; pass --overwrite to replace them")
    check_output_dir(args.out)
    try:
        model = load_official(_source(args.checkpoint, args.entry), num_heads=args.num_heads)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        check_free_space(args.out, weights + (1 << 20), args.out)
        save_pretrained(model, args.out, repo_id=args.repo_id, overwrite=args.overwrite)
        if args.push:
            print(push_to_hub(model, args.repo_id))
    except (CheckpointError, ValueError, OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise  # a full disk or a read-only place: run_command's 'cannot write FILE' line
        raise UsageError(str(exc)) from exc  # run_command puts it on one line
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
