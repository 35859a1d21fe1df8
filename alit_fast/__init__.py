"""alit_fast: fast, faithful ALIT (Adaptive Length Image Tokenization) with Triton kernels."""
from .ops import BACKENDS

__version__ = "0.1.0"
