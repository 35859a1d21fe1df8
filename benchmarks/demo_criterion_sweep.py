"""Choose a model's demo stopping criterion on validation images, then measure it on the held-out set.

    python -m benchmarks.demo_criterion_sweep --checkpoint demo \
        --criterion pixel-l1:0.08 --criterion pixel-l1:0.1 --criterion code-acc:0.6 ...

Every candidate is scored on a validation set of synthetic images (its own seed, used neither by
training nor by ``alit-fast demo --evaluate``): the Spearman correlation between the chosen token
count and the complexity level. The best one (ties: fewer tokens on average) is then run once on
the held-out set, so the held-out figure is not itself the result of a search. This is how the
bundled demo model's criterion was chosen after stage 2 (README > Training, RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

import torch

from alit_fast.cli.demo import HELD_OUT_SEED, evaluate_claims
from alit_fast.inference import parse_criterion
from alit_fast.io import load

VALIDATION_SEED = 555_555


def sweep(model, criteria: list[str], per_level: int, validation_seed: int = VALIDATION_SEED) -> dict:
    """Validation figures for every criterion, the chosen one, and its held-out figures."""
    rows = {}
    for spec in criteria:
        figures = evaluate_claims(model, spec, per_level=per_level, seed=validation_seed)
        mean_tokens = sum(figures.tokens_per_level.values()) / len(figures.tokens_per_level)
        rows[spec] = {"spearman": figures.spearman, "mean_tokens": mean_tokens, "tokens_per_level": figures.tokens_per_level}
    # NaN (every image at one count) ranks last
    chosen = max(rows, key=lambda s: (-math.inf if math.isnan(rows[s]["spearman"]) else rows[s]["spearman"], -rows[s]["mean_tokens"]))
    held_out = evaluate_claims(model, chosen, per_level=per_level, seed=HELD_OUT_SEED)
    return {"validation_seed": validation_seed, "validation": rows, "chosen": chosen, "held_out": asdict(held_out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--criterion", action="append", required=True, help="a candidate (repeatable)")
    parser.add_argument("--per-level", type=int, default=20, help="images per complexity level in each set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    for spec in args.criterion:
        try:
            parse_criterion(spec)
        except (TypeError, ValueError) as exc:
            parser.error(str(exc))
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint, backend="torch")
    result = sweep(model, args.criterion, args.per_level)
    print(f"validation set (seed {result['validation_seed']}, {args.per_level} images per level):")
    for spec, row in result["validation"].items():
        levels = " ".join(f"{t:5.1f}" for t in row["tokens_per_level"].values())
        mark = "  <- chosen" if spec == result["chosen"] else ""
        print(f"  {spec:<16} Spearman {row['spearman']:.3f}  tokens per level {levels}{mark}")
    held = result["held_out"]
    levels = " ".join(f"{t:5.1f}" for t in held["tokens_per_level"].values())
    print(f"held-out set (seed {HELD_OUT_SEED}), {result['chosen']}: Spearman {held['spearman']:.3f}  tokens per level {levels}")
    print("  mean L1 per token count: " + " ".join(f"{n}:{e:.4f}" for n, e in held["error_per_tokens"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
