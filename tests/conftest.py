import os

# Triton kernels run in the interpreter where there is no GPU; this must be set before triton loads.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
