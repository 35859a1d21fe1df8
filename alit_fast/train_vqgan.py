"""``python -m alit_fast.train_vqgan``: the demo VQGAN's training; the code is alit_fast.training.vqgan."""
import sys

from .training.vqgan import main

if __name__ == "__main__":
    sys.exit(main())
