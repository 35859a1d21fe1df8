"""The io layer: checkpoints (official and alit_fast), bundled models, image files, and ``ALIT``,
the model class users hold (nn core + inference methods + saving)."""
from .checkpoint import (
    CheckpointError,
    infer_config,
    load_file,
    load_official,
    load_state_strict,
    read_checkpoint,
    read_state_dict,
)
from .model import ALIT
from .pretrained import PRETRAINED, load, load_pretrained, pretrained_path
from .weights import METADATA_CONFIG_KEY, RECOMMENDED_CRITERION_KEY, save_model

__all__ = [
    "ALIT",
    "CheckpointError",
    "METADATA_CONFIG_KEY",
    "PRETRAINED",
    "RECOMMENDED_CRITERION_KEY",
    "infer_config",
    "load",
    "load_file",
    "load_official",
    "load_pretrained",
    "load_state_strict",
    "pretrained_path",
    "read_checkpoint",
    "read_state_dict",
    "save_model",
]
