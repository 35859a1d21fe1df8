"""alit_fast: fast, faithful ALIT (Adaptive Length Image Tokenization) with Triton kernels."""
from .checkpoint import CheckpointError, infer_config, load, load_official
from .config import PRESETS, ALITConfig, VQGANConfig, get_config
from .model import ALIT, HALTING_MODES, IterationOutput, LossOutput
from .ops import BACKENDS
from .pretrained import load_pretrained

__version__ = "0.1.0"

__all__ = [
    "ALIT",
    "ALITConfig",
    "BACKENDS",
    "CheckpointError",
    "HALTING_MODES",
    "IterationOutput",
    "LossOutput",
    "PRESETS",
    "VQGANConfig",
    "get_config",
    "infer_config",
    "load",
    "load_official",
    "load_pretrained",
]
