"""The nn layer: the VQGAN and KL-VAE base tokenizers, the transformer blocks and ALIT's recurrent core.

Nothing here reads files, chooses token counts or validates more than its own inputs; inference
(alit_fast.inference) and file I/O (alit_fast.io) build on it.
"""
from .alit import (
    HALTING_MODES,
    ALITCore,
    BaseOutput,
    IterationOutput,
    LatentDecoder,
    LatentQuantizer,
    LossOutput,
    QuantizedLatents,
)
from .transformer import PackedAttention, ResidualAttentionBlock, Transformer, run_blocks
from .vae import VAEBaseTokenizer
from .vqgan import BaseTokenizer, VQGANQuantizer

__all__ = [
    "ALITCore",
    "BaseOutput",
    "BaseTokenizer",
    "HALTING_MODES",
    "IterationOutput",
    "LatentDecoder",
    "LatentQuantizer",
    "LossOutput",
    "PackedAttention",
    "QuantizedLatents",
    "ResidualAttentionBlock",
    "Transformer",
    "VAEBaseTokenizer",
    "VQGANQuantizer",
    "run_blocks",
]
