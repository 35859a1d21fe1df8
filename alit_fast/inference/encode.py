"""Adaptive encoding to a TokenBatch, decoding of mixed lengths, and the official procedure.

Host-device syncs, per call and independent of the batch size: ``encode`` with a fixed token
count 1 (the one read of the codes and lengths); with a scored criterion 1 per judged iteration
(the stop decision) plus that final read; ``decode`` 1 (the token batch's lengths and code range,
read together). Images are validated once per call, and their range check and a NaN/inf check of
every iteration's outputs ride along in those reads instead of costing syncs of their own.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..models import ALITCore
from ..ops import concat_ranges, to_device
from ..models.alit import image_range_error, image_shape_error, images_in_range
from .calibration import model_calibration
from .criteria import (
    DEFAULT_CRITERION, Criterion, FastPixelL1, StepView, TokenCount, criterion_name, l1_per_image, parse_criterion, pixels_from_logits,
)
from .rollout import RolloutState, StepFn
from .tokens import TokenBatch

FALLBACKS = ("max", "best")


def iteration_range(model: ALITCore, min_tokens: int | None, max_tokens: int | None) -> tuple[int, int]:
    """(first iteration count a criterion is asked at, number of iterations at most).

    Token counts come in whole iterations: min_tokens rounds up, max_tokens rounds down."""
    cfg = model.config
    T = cfg.tokens_per_iter
    for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    lo = T if min_tokens is None else int(min_tokens)
    hi = cfg.max_tokens if max_tokens is None else int(max_tokens)
    first = max(1, -(-lo // T))
    last = min(cfg.iterations, hi // T)
    if last < 1:
        raise ValueError(f"max_tokens={hi} is below one iteration ({T} tokens)")
    if first > last:
        raise ValueError(f"min_tokens={lo} and max_tokens={hi} leave no token count in steps of {T}")
    return first, last


def check_criterion_fits(model: ALITCore, criterion: Criterion) -> None:
    """A fixed token count must be one the model can produce: a multiple of the tokens added per
    iteration, at most ``max_tokens``. Code criteria must read this model's decoder: code-acc and
    code-nll the VQGAN variant's logits, code-mae the VAE variant's latents. fast-pixel-l1 needs
    the model's calibration."""
    base = model.config.base_tokenizer
    if base not in getattr(criterion, "bases", (base,)):
        raise ValueError(f"{criterion_name(criterion)} does not apply to a model on the {base.upper()} base "
                         f"tokenizer (it reads the {' or '.join(b.upper() for b in criterion.bases)} variant's decoder)")
    if isinstance(criterion, TokenCount):
        T, most = model.config.tokens_per_iter, model.config.max_tokens
        if criterion.tokens % T or criterion.tokens > most:
            raise ValueError(f"tokens:{criterion.tokens}: this model encodes {T}, {2 * T}, ..., {most} tokens "
                             f"(multiples of {T} up to {most})")


def check_fallback(criterion: Criterion, fallback: str) -> None:
    """Raise a ValueError when ``fallback`` is unknown or cannot be used with ``criterion``."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {FALLBACKS}")
    if fallback == "best" and criterion.higher_is_better is None:
        raise ValueError(
            f"fallback 'best' needs a criterion with a score (code-acc, code-nll, code-mae, pixel-l1, fast-pixel-l1), not {criterion_name(criterion)}"
        )


def _check_batch_size(batch_size: object) -> None:
    # int(1.5) would silently run batches of 1; numpy and torch integers pass through __index__
    if batch_size is None:
        return
    try:
        whole = None if isinstance(batch_size, bool) else operator.index(batch_size)
    except TypeError:
        whole = None
    if whole is None or whole < 1:
        raise ValueError(f"batch_size must be a whole number >= 1 (or None), got {batch_size!r}")


def _finite(out) -> torch.Tensor:
    return finite_outputs(out.z_q, out.logits)


def finite_outputs(z_q: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """Whether an iteration's outputs hold no NaN or inf, as a 0-d device tensor.

    A sum is NaN or inf whenever one term is (inf - inf is NaN), and one reduction costs a tenth
    of an elementwise isfinite plus all(); sane values cannot overflow a float32 sum. z_q carries
    the straight-through form z + (codes - z): NaN wherever the encoder's or the projection's
    output was, although the codes themselves are always finite."""
    total = z_q.float().sum()
    if logits is not None:
        total = total + logits.float().sum()
    return torch.isfinite(total)


class CountChoice:
    """Each image's stopping point under ``criterion``, fed the judged steps in order (``at``: an
    iteration number of the caller's choosing, increasing): the first step whose criterion holds;
    an image that never meets it gets ``last`` (fallback "max") or its best-scoring step (fallback
    "best", the earliest of equal scores, as the official argmin). Kept on the device: no host reads.
    """

    def __init__(self, criterion: Criterion, fallback: str, batch: int, device: torch.device) -> None:
        self.criterion = criterion
        self.best = fallback == "best"
        self.met = torch.zeros(batch, dtype=torch.bool, device=device)
        self.first_met = torch.zeros(batch, dtype=torch.int64, device=device)
        if self.best:
            worst = float("-inf") if criterion.higher_is_better else float("inf")
            self.best_score = torch.full((batch,), worst, dtype=torch.float64, device=device)
            self.best_at = torch.zeros(batch, dtype=torch.int64, device=device)

    def update(
        self, view: StepView, at: int, rows: torch.Tensor | slice = slice(None), live: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Judge step ``at`` for the images ``rows`` (``live``: which of them count). Returns which
        of them meet the criterion and (fallback "best") which scored better than before."""
        stop, score = self.criterion.judge(view, with_score=self.best)
        stop = stop.to(self.met.device).reshape(-1)
        if live is not None:
            stop = stop & live
        self.first_met[rows] = torch.where(stop & ~self.met[rows], at, self.first_met[rows])
        self.met[rows] = self.met[rows] | stop
        if not self.best:
            return stop, None
        score = score.to(self.best_score)
        # strictly better, so the earliest of equal scores wins
        better = (score > self.best_score[rows]) if self.criterion.higher_is_better else (score < self.best_score[rows])
        if live is not None:
            better = better & live
        self.best_score[rows] = torch.where(better, score, self.best_score[rows])
        self.best_at[rows] = torch.where(better, at, self.best_at[rows])
        return stop, better

    def reset(self, rows: torch.Tensor) -> None:
        """Rows ``rows`` start over for new images (a continuous batch reuses its slots)."""
        self.met[rows] = False
        self.first_met[rows] = 0
        if self.best:
            self.best_score[rows] = float("-inf") if self.criterion.higher_is_better else float("inf")
            self.best_at[rows] = 0

    def settle(self, rows: "list[int]", at: int) -> None:
        """Images ``rows`` (host ids) stop at step ``at`` whatever their scores (their criterion was
        found out of reach: fallback "best" gives them the last step without judging it), also one
        that rounding let meet the criterion in the read that flagged it (the caller runs it on to ``at``)."""
        (rows,) = to_device(rows, device=self.met.device)  # a host-to-device copy, no sync
        self.first_met[rows] = at
        self.met[rows] = True

    def chosen(self, last: int) -> torch.Tensor:
        """Each image's step: int64 [batch] on the device."""
        fallback = self.best_at if self.best else torch.full_like(self.first_met, last)
        return torch.where(self.met, self.first_met, fallback)


def bound_decides(criterion: Criterion, best: bool) -> bool:
    """Whether an image that ``criterion`` can be met for at no count (``never_met``) takes the last
    count: with fallback "max" always, with "best" where the criterion takes its score to be best
    there. Every path applies it alike (encode, encode_stream, evaluate's adaptive rows)."""
    if isinstance(criterion, TokenCount) or not criterion.needs_logits:
        return False
    return not best or criterion.last_is_best_when_never_met


def out_of_reach(criterion: Criterion, model: ALITCore, images: torch.Tensor) -> torch.Tensor | None:
    """``criterion.never_met`` as bool [b] on the images' device (None: the criterion has no bound);
    a user criterion's answer of another shape is refused rather than broadcast."""
    never = criterion.never_met(model, images)
    if never is None:
        return None
    never = torch.as_tensor(never).to(device=images.device, dtype=torch.bool)
    if never.shape != (images.shape[0],):
        raise ValueError(f"{criterion_name(criterion)}: never_met must give one flag per image, "
                         f"{images.shape[0]} here; got shape {list(never.shape)}")
    return never


@dataclass
class _Chunk:
    """One chunk's result, still on the device: lengths [b], codes [b, max_tokens], flags."""

    lengths: torch.Tensor
    codes: torch.Tensor
    in_range: torch.Tensor  # 0-d bool
    finite: torch.Tensor  # 0-d bool


def _encode_chunk(
    model: ALITCore,
    images: torch.Tensor,
    criterion: Criterion,
    first: int,
    last: int,
    halting: str,
    generator: torch.Generator | None,
    fallback: str,
    offset: int,
    static_shapes: bool,
    step_fn: StepFn | None,
) -> _Chunk:
    """``offset``: where ``images`` start in the batch ``encode`` was given (criteria see those rows)."""
    in_range = images_in_range(images)
    T = model.config.tokens_per_iter
    if isinstance(criterion, TokenCount):
        # a fixed count does not depend on the images: every image stops at the same iteration
        last = min(last, max(first, -(-criterion.tokens // T)))
    state = RolloutState(
        model, images, halting=halting, generator=generator, iterations=last, keep_outputs=False,
        static_shapes=static_shapes, check_values=False, step_fn=step_fn,
    )
    finite = torch.ones((), dtype=torch.bool, device=images.device)
    best = fallback == "best"
    choice = CountChoice(criterion, fallback, images.shape[0], images.device)
    if best:
        best_codes = state.indices.clone()  # each image's codes at its best-scoring count so far
    scored = not isinstance(criterion, TokenCount)
    # an image the criterion can be met for at no count gets the last count: what fallback "max"
    # gives it, and for a criterion whose score is taken to be best there, what "best" gives it.
    # Where compaction allows (dynamic shapes, halting off) it also runs its remaining iterations
    # without the decoder (``never``, read with the first stop decision); elsewhere the same rule
    # holds on the device (``held``), so that the tokens do not depend on the path
    bounded = bound_decides(criterion, best)
    prune = bounded and not static_shapes and halting == "off"
    never = out_of_reach(criterion, model, images) if bounded else None
    held, never = (None, never) if prune else (never, None)
    skip: set[int] = set()
    if never is not None and reads_are_free(images.device):
        # out-of-reach images skip the decoder from their first count
        skip, never = {i for i, f in enumerate(never.tolist()) if f}, None
        if best and skip:
            choice.settle(sorted(skip), last)
    while not state.done:
        count = state.iteration + 1  # iterations once this step has run
        # below min_tokens nothing may stop, and at the last allowed count everything stops
        # regardless, so the criterion (and the decoder it may need) runs only in between; the
        # "best" fallback also needs the last count's score
        judge = scored and (first <= count < last or (best and count == last))
        ids = state.active_ids
        keep = [j for j, i in enumerate(ids) if i not in skip] if skip else None
        judge = judge and keep != []
        gt, working = state.working_gt_indices, state.working_images
        latents = state.working_base_latents if judge and criterion.needs_latents else None
        # the rows this step runs for (with static shapes, stopped images are computed but ignored)
        live = state.active_mask if static_shapes else None
        out = state.step(decode=judge and criterion.needs_logits and keep is None)
        finite = finite & _finite(out)
        if not judge:
            continue
        view, picked = _judged_view(model, out, count * T, offset, gt, working, latents, keep)
        # with static shapes nothing is pruned: ``live`` and ``picked`` never come together
        rows = out.rows if picked is None else out.rows.index_select(0, picked)
        if held is not None:  # out of reach: never stops, not even by rounding; its last count stands
            live = ~held.index_select(0, rows) if live is None else live & ~held.index_select(0, rows)
        stop, better = choice.update(view, count, rows, live)
        if best:
            best_codes[rows] = torch.where(_per_row(better, best_codes), state.indices[rows], best_codes[rows])
        if picked is not None:
            stop = torch.zeros(len(ids), dtype=torch.bool, device=images.device).index_copy(0, picked, stop)
        if count < last:
            # the one sync of the iteration: which images stop, (once) which can never stop, and
            # whether everything so far is sane
            hopeless = [never.index_select(0, out.rows)] if never is not None else []
            flags = torch.cat([stop, *hopeless, (in_range & finite).view(1)]).tolist()
            if not flags[-1]:
                _raise_bad_inputs(images, in_range)
            n = stop.numel()
            if never is not None:
                skip, never = {i for i, f in zip(ids, flags[n : 2 * n]) if f}, None
                if best and skip:  # their last count stands, as if they had met the criterion there
                    choice.settle(sorted(skip), last)
            # out of reach by the bound wins over a stop that rounding let through in the same read:
            # such an image gets the last count, as where the flags are read before the first step
            # (pruning needs compacting: row j is then image ids[j])
            state.finish([f and i not in skip for i, f in zip(ids, flags[:n])] if skip else flags[:n])
    lengths, codes = state.lengths, state.indices
    if best:
        lengths = choice.chosen(last) * T
        codes = torch.where(_per_row(choice.met, codes), codes, best_codes)
    if held is not None:  # they ran to the last count: its length and codes
        lengths = torch.where(held, last * T, lengths)
        codes = torch.where(_per_row(held, codes), state.indices, codes)
    return _Chunk(lengths=lengths, codes=codes, in_range=in_range, finite=finite)


def _judged_view(model: ALITCore, out, num_tokens: int, offset: int, gt: torch.Tensor, working: torch.Tensor,
                 latents: torch.Tensor | None, keep: list[int] | None) -> tuple[StepView, torch.Tensor | None]:
    """What the criterion sees: every working row, or (``keep``: their positions) only the rows
    still to be judged, decoded here on their own; returns the positions as a device index too."""
    if keep is None:
        return StepView(model, out.iteration, num_tokens, out.rows + offset, gt, working, out.logits, latents), None
    (picked,) = to_device(keep, device=working.device)  # a host-to-device copy, no sync (pinned on CUDA)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, picked)

    logits = model.decode_logits(pick(out.z_q))
    view = StepView(model, out.iteration, num_tokens, pick(out.rows) + offset, pick(gt), pick(working), logits, pick(latents))
    return view, picked


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a device value on the host costs nothing (a CPU: there is no queue to
    drain); elsewhere such reads ride along with the one the step makes anyway."""
    return device.type == "cpu"


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image bool [b] shaped to broadcast over code rows [b, n] or vector rows [b, n, d]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _raise_bad_inputs(images: torch.Tensor, in_range: torch.Tensor) -> None:
    if not bool(in_range):
        raise ValueError(image_range_error(images))
    raise FloatingPointError("encode: the model produced NaN or inf (are its weights finite?)")


@torch.no_grad()
def encode(
    model: ALITCore,
    images: torch.Tensor,
    criterion: "str | Criterion | Callable[[StepView], object]" = DEFAULT_CRITERION,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    halting: str = "off",
    generator: torch.Generator | None = None,
    fallback: str = "max",
    static_shapes: bool | None = None,
    step_fn: StepFn | None = None,
) -> TokenBatch:
    """Encode each image with the fewest tokens that meet ``criterion`` (see alit_fast.inference.criteria),
    between ``min_tokens`` and ``max_tokens``; ``batch_size`` bounds how many run at once.

    An image that never meets the criterion gets ``max_tokens`` (``fallback="max"``) or the count
    with the best score (``fallback="best"``: the official procedure's rule, applied per image; it
    costs nothing extra, since such an image runs every iteration either way).

    ``static_shapes=True`` keeps finished images in the batch behind a mask (shapes depend on the
    iteration alone: for CUDA graphs and torch.compile); it is the default when ``step_fn`` is
    given (e.g. ``compile_step(model)``). The result is the same either way."""
    crit = parse_criterion(criterion)
    check_fallback(crit, fallback)
    check_criterion_fits(model, crit)
    first, last = iteration_range(model, min_tokens, max_tokens)
    message = image_shape_error(images, model.config)
    if message is not None:
        raise ValueError(message)
    _check_batch_size(batch_size)
    images = model.model_images(images)
    static = (step_fn is not None) if static_shapes is None else bool(static_shapes)
    step = images.shape[0] if not batch_size else int(batch_size)
    extra = {"criterion": criterion_name(crit)}
    if fallback != "max":
        extra["fallback"] = fallback
    # the compute runs under inference_mode (less bookkeeping per op); the tokens are then built
    # from host values outside it, so they are ordinary tensors (editable, usable in training)
    with torch.inference_mode():
        chunks = [
            _encode_chunk(model, images[lo : lo + step], crit, first, last, halting, generator, fallback, lo, static, step_fn)
            for lo in range(0, images.shape[0], step)
        ]
        rows = _read_chunks(model, images, chunks)
    return token_batch_from_host(model, rows, extra)


def _read_chunks(model: ALITCore, images: torch.Tensor, chunks: "list[_Chunk]") -> "list[tuple[int, list]]":
    """One device-to-host read for the whole batch (lengths, codes or vectors, the two sanity
    flags): (length, padded row) per image. Continuous vectors go in float64 (exact for fp32, fp16
    and bf16 values and for the counts)."""
    lengths = torch.cat([c.lengths for c in chunks])
    codes = torch.cat([c.codes for c in chunks])
    in_range = torch.stack([c.in_range for c in chunks]).all()
    finite = torch.stack([c.finite for c in chunks]).all()
    dtype = torch.int64 if model.config.quantize_latent else torch.float64
    packed = torch.cat([torch.stack([in_range, finite]).to(dtype), lengths.to(dtype), codes.to(dtype).flatten()]).tolist()
    if not (packed[0] and packed[1]):
        _raise_bad_inputs(images, in_range)
    B = lengths.shape[0]
    per_row = codes[0].numel() if B else 0
    flat = packed[2 + B :]
    return [(int(n), flat[i * per_row : (i + 1) * per_row]) for i, n in enumerate(packed[2 : 2 + B])]


def token_batch_from_host(model: ALITCore, rows: "list[tuple[int, list]]", extra: dict) -> TokenBatch:
    """A TokenBatch from host values, one (length, padded row) per image: a row holds max_tokens
    code ids, or for continuous tokens max_tokens * latent_dim values (read as float64)."""
    cfg = model.config
    lengths = [n for n, _ in rows]
    if cfg.quantize_latent:
        return TokenBatch.from_host_rows([r for _, r in rows], lengths, cfg.codebook_size, config_json=cfg.to_json(), extra=extra)
    host_lengths = torch.tensor(lengths, dtype=torch.int64)
    longest = max(lengths, default=0)
    codes = torch.tensor([r for _, r in rows], dtype=torch.float64).view(len(rows), cfg.max_tokens, cfg.latent_dim)
    # stored as float32: exactly what the model produced (TokenBatch.with_dtype(torch.float16) halves a file)
    codes = codes[:, :longest].float()
    codes = codes.masked_fill(torch.arange(longest)[None, :, None] >= host_lengths[:, None, None], 0.0)
    return TokenBatch(codes=codes, lengths=host_lengths, codebook_size=cfg.codebook_size,
                      config_json=cfg.to_json(), extra=extra, check_lengths=False)


# ---------------------------------------------------------------------- decode
CONFIG_MISMATCH = "the tokens were encoded by a model with another config"


class ConfigMismatch(ValueError):
    """Tokens recorded as made by a model of another config (the CLI words its own advice)."""


@dataclass
class TokenStats:
    """What decoding needs to know of a token batch, read from it once."""

    lengths: list[int]
    code_min: int
    code_max: int


def check_token_batch(model: ALITCore, tokens: TokenBatch, check_config: bool = True) -> TokenStats:
    """Raise a ValueError when ``tokens`` cannot have come from a model shaped like ``model``;
    returns the lengths and code range it read (one read of the batch).

    With ``check_config`` (the default) a batch that records its encoder's config must have been
    made by a model of this config: other weights of the same shapes would decode it into
    something plausible and wrong."""
    cfg = model.config
    if not isinstance(tokens, TokenBatch):
        raise TypeError(f"decode expects a TokenBatch, got {type(tokens).__name__}")
    if check_config and tokens.config_json is not None and tokens.config_json != cfg.to_json():
        raise ConfigMismatch(f"{CONFIG_MISMATCH}; decode them with that model (or pass check_config=False to decode anyway)")
    if tokens.continuous != (not cfg.quantize_latent):
        have, want = ("continuous vectors", "code ids") if tokens.continuous else ("code ids", "continuous vectors")
        raise ValueError(f"the tokens are {have}, but this model's 1D tokens are {want}")
    if tokens.codebook_size != cfg.codebook_size:
        raise ValueError(f"the tokens use a {tokens.codebook_size}-code codebook, the model {cfg.codebook_size}")
    codes = tokens.padded(0)
    if tokens.continuous:
        if codes.shape[-1] != cfg.latent_dim:
            raise ValueError(f"the token vectors have {codes.shape[-1]} values, the model's {cfg.latent_dim}")
        # a NaN or inf anywhere makes the sum one; read with the lengths (no code range to check)
        finite = torch.isfinite(codes.float().sum()).double().view(1)
        values = torch.cat([finite, finite, tokens.lengths.double()]).tolist()
        if not values[0]:
            raise ValueError("the token vectors hold NaN or inf")
        values = [0, 0] + [int(n) for n in values[2:]]
    else:
        extremes = torch.stack([codes.min(), codes.max()]) if codes.numel() else torch.zeros(2, dtype=torch.int64)
        values = torch.cat([extremes, tokens.lengths.to(torch.int64)]).tolist()
    stats = TokenStats(lengths=values[2:], code_min=values[0], code_max=values[1])
    if stats.lengths and max(stats.lengths) > cfg.max_tokens:
        raise ValueError(f"an image has {max(stats.lengths)} tokens; the model decodes at most {cfg.max_tokens}")
    if stats.lengths and min(stats.lengths) < 1:
        raise ValueError("an image has no tokens")
    if stats.lengths and (stats.code_min < 0 or stats.code_max >= cfg.codebook_size):
        raise ValueError(f"code ids must lie in [0, {cfg.codebook_size}), got [{stats.code_min}, {stats.code_max}]")
    T = cfg.tokens_per_iter
    uneven = sorted({n for n in stats.lengths if n % T})
    if uneven:
        raise ValueError(f"token counts must be multiples of {T} (the tokens per iteration), got {uneven}")
    return stats


def _decode_logits_checked(model: ALITCore, padded: torch.Tensor, lengths: torch.Tensor, host_lengths: list[int]) -> torch.Tensor:
    """``padded``: int64 codes [b, >= max length] with valid ids past each length (or continuous
    vectors [b, >= max length, d])."""
    device = model.latent_tokens.device
    width = max(host_lengths)
    z_q = model.token_latents(padded[:, :width].to(device))
    # equal lengths take the same path as a rollout's decoder; mixed ones run packed (no padding
    # in the per-token layers), the official backend padded with a key mask, as its code would
    if min(host_lengths) == width:
        return model.decode_logits(z_q)
    if model.backend == "official":
        return model.decode_logits(z_q, lengths.to(device))
    return decode_logits_mixed(model, z_q, host_lengths)


def decode_logits_mixed(model: ALITCore, z_q: torch.Tensor, host_lengths: list[int]) -> torch.Tensor:
    """Decoder logits of padded latents [b, >= max length, d] whose images have ``host_lengths``
    tokens, through the packed decoder: the images go longest first (sequences of one length lie
    together: one attention call per length on a CPU) and their logits come back in input order."""
    order = sorted(range(len(host_lengths)), key=lambda j: -host_lengths[j])
    counts = [host_lengths[j] for j in order]
    rows, back = to_device(concat_ranges(np.asarray(order) * z_q.shape[1], counts), np.argsort(order), device=z_q.device)
    return model.decode_logits_packed(z_q.flatten(0, 1).index_select(0, rows), counts).index_select(0, back)


@torch.no_grad()
def decode_logits(model: ALITCore, tokens: TokenBatch, check_config: bool = True) -> torch.Tensor:
    """Decoder logits [B, g*g, K] for a batch of any mix of lengths, in one decoder pass."""
    stats = check_token_batch(model, tokens, check_config)
    return _decode_logits_checked(model, tokens.padded(0), tokens.lengths, stats.lengths)


@torch.no_grad()
def decode(
    model: ALITCore, tokens: TokenBatch, batch_size: int | None = None, check_config: bool = True
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] from a TokenBatch; ``batch_size`` bounds how many at once.
    ``check_config=False`` decodes tokens recorded as made by a model of another config."""
    stats = check_token_batch(model, tokens, check_config)
    if len(tokens) == 0:
        size = model.config.image_size
        return torch.zeros(0, 3, size, size, device=model.latent_tokens.device)
    _check_batch_size(batch_size)
    step = len(tokens) if not batch_size else int(batch_size)
    padded = tokens.padded(0)
    parts = []
    for lo in range(0, len(tokens), step):
        chunk = slice(lo, lo + step)
        logits = _decode_logits_checked(model, padded[chunk], tokens.lengths[chunk], stats.lengths[chunk])
        parts.append(pixels_from_logits(model, logits))
    return torch.cat(parts)


# ---------------------------------------------------------------------- the official procedure
@dataclass
class OfficialEncoding:
    iteration: int  # the chosen iteration (0-based), one for the whole batch
    num_tokens: int
    latents: torch.Tensor  # [B, n, W] encoder outputs before ln_post (what the official encode returns)
    indices: torch.Tensor | None  # [B, n]; None for continuous tokens (they are in latents' projection)
    reconstructions: torch.Tensor  # [B, 3, H, W], not clamped
    errors: list[float]  # the batch's mean L1 at every iteration


@torch.no_grad()
def official_encode(
    model: ALITCore,
    images: torch.Tensor,
    threshold: float = 0.07,
    halting: str = "official",
    generator: torch.Generator | None = None,
) -> OfficialEncoding:
    """The authors' ``encode(imgs, return_min_length_embedding=True, threshold)``, re-created for
    comparison: every iteration and every pixel decode runs, then one length is chosen for the
    whole batch: the first iteration whose batch-mean L1 is below ``threshold``, else the one with
    the lowest error. Like the official evaluation it halts as the official code does by default
    (VQGAN: stochastically; VAE: the no-op, with a sampled posterior), and does not clamp the
    reconstructions. (A baseline, so it keeps the official host reads too.)"""
    records = model.rollout(images, halting=halting, generator=generator)
    reconstructions, errors = [], []
    for rec in records:
        pixels = model.reconstruct(rec.logits)
        reconstructions.append(pixels)
        errors.append(float(l1_per_image(images, pixels).mean()))
    below = [t for t, e in enumerate(errors) if e < threshold]
    chosen = below[0] if below else min(range(len(errors)), key=errors.__getitem__)
    rec = records[chosen]
    return OfficialEncoding(
        iteration=chosen,
        num_tokens=int(rec.z_q.shape[1]),
        latents=rec.latents,
        indices=rec.indices,
        reconstructions=reconstructions[chosen],
        errors=errors,
    )
