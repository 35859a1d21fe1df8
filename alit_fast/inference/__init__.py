"""The inference layer: resumable rollouts, stopping criteria, adaptive encode / decode, token
batches and a re-creation of the official procedure. Functions take an ``ALITCore``; the
``alit_fast.ALIT`` methods (``start``, ``encode``, ``decode``) call them."""
from .criteria import (
    CodeAccuracy,
    CodeNLL,
    Criterion,
    FunctionCriterion,
    PixelL1,
    StepView,
    TokenCount,
    criterion_name,
    l1_per_image,
    parse_criterion,
    pixels_from_logits,
)
from .encode import (
    FALLBACKS,
    OfficialEncoding,
    TokenStats,
    check_criterion_fits,
    check_fallback,
    check_token_batch,
    decode,
    decode_logits,
    encode,
    iteration_range,
    official_encode,
)
from .rollout import ImageResult, RolloutState, StepOutput, compile_step, start
from .tokens import PAD, TokenBatch, code_dtype

__all__ = [
    "CodeAccuracy",
    "CodeNLL",
    "Criterion",
    "FALLBACKS",
    "FunctionCriterion",
    "ImageResult",
    "OfficialEncoding",
    "PAD",
    "PixelL1",
    "RolloutState",
    "StepOutput",
    "StepView",
    "TokenBatch",
    "TokenCount",
    "TokenStats",
    "check_criterion_fits",
    "check_fallback",
    "check_token_batch",
    "code_dtype",
    "compile_step",
    "criterion_name",
    "decode",
    "decode_logits",
    "encode",
    "iteration_range",
    "l1_per_image",
    "official_encode",
    "parse_criterion",
    "pixels_from_logits",
    "start",
]
