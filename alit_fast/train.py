"""``python -m alit_fast.train``: stage-1 training; the code is alit_fast.training.train."""
import sys

from .training.train import main

if __name__ == "__main__":
    sys.exit(main())
