"""alit_fast: fast, faithful ALIT (Adaptive Length Image Tokenization) with Triton kernels.

Layers, each importing only the ones before it: config -> ops (backend dispatch; the Triton
kernels are alit_fast.kernels) -> models (nn only) -> inference (rollout state, criteria,
encode/decode, token batches) -> io (checkpoints, bundled models, images, the ``ALIT`` class) ->
training and cli.
"""
from .config import PRESETS, ALITConfig, VQGANConfig, get_config
from .inference import RolloutState, TokenBatch
from .evaluation import evaluate
from .io import ALIT, CheckpointError, infer_config, load, load_official, load_pretrained
from .models import HALTING_MODES, ALITCore, IterationOutput, LossOutput
from .ops import BACKENDS

__version__ = "0.1.0"

__all__ = [
    "ALIT",
    "ALITConfig",
    "ALITCore",
    "BACKENDS",
    "CheckpointError",
    "HALTING_MODES",
    "IterationOutput",
    "LossOutput",
    "PRESETS",
    "RolloutState",
    "TokenBatch",
    "VQGANConfig",
    "evaluate",
    "get_config",
    "infer_config",
    "load",
    "load_official",
    "load_pretrained",
]
