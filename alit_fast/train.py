"""``python -m alit_fast.train``: stage-1 training (alit_fast.training.train), or stage 2 with
``--stage finetune`` (alit_fast.training.finetune)."""
import sys

from .training.stages import main

if __name__ == "__main__":
    sys.exit(main())
