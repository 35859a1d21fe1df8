"""``python -m alit_fast.train`` / ``alit-fast train``: stage 1 (train.py) by default, stage 2
(finetune.py) with ``--stage finetune``. The stage is read before parsing: stage 2 has options
of its own on top of stage 1's."""
from __future__ import annotations

import sys

from .finetune import STAGE
from .finetune import main as finetune_main
from .train import main as pretrain_main


def stage_of(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--stage" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--stage="):
            return a.split("=", 1)[1]
    return "pretrain"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if stage_of(argv) == STAGE:
        return finetune_main(argv)
    return pretrain_main(argv)
