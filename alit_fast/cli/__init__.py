"""The ``alit-fast`` console script: one entry point, one module per subcommand."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv); imported lazily so `alit-fast --help` stays fast
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("alit_fast.cli.demo", "main", "adaptively tokenize the bundled images with the demo model"),
    "train": ("alit_fast.training.stages", "main",
              "training: stage 1, or stage 2 with --stage finetune (also: python -m alit_fast.train)"),
    "cache-base": ("alit_fast.cli.cache_base", "main", "run the frozen VQGAN once over a dataset and store its outputs"),
    "encode": ("alit_fast.cli.encode", "main", "adaptive-length tokenization of image files"),
    "decode": ("alit_fast.cli.decode", "main", "decode a token file back to images"),
    "convert": ("alit_fast.cli.convert", "main", "an official checkpoint -> a Hub-layout model directory"),
    "evaluate": ("alit_fast.cli.evaluate", "main", "L1/L2/PSNR/SSIM/LPIPS/rFID at every token count and per criterion"),
    "pretokenize": ("alit_fast.cli.pretokenize", "main", "a dataset -> sharded token files and one index (resumable, torchrun)"),
    "calibrate": ("alit_fast.cli.calibrate", "main", "fit a model's decode-free pixel-L1 estimate (--criterion fast-pixel-l1:F)"),
    "visualize": ("alit_fast.cli.visualize", "main", "reconstructions per token count, token attention maps, images by token count"),
}


def _usage() -> str:
    lines = ["usage: alit-fast COMMAND [options]", "", "commands:"]
    width = max(map(len, COMMANDS)) + 1
    lines += [f"  {name:<{width}} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines.append("\n`alit-fast COMMAND --help` describes a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"alit-fast: unknown command {name!r} (one of {', '.join(COMMANDS)}; see alit-fast --help)", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from ..errors import run_command  # the one place user errors become one line

    # a UsageError (a user error) is one line and exit status 2; any other exception is a bug and
    # keeps its traceback. Each command's main does the same, so this only catches one that escapes.
    return run_command(f"alit-fast {name}", getattr(importlib.import_module(module), func), rest)


if __name__ == "__main__":
    sys.exit(main())
