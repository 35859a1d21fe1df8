"""Continuous batching: adaptive encoding that keeps ``batch_size`` slots busy.

The compacting encoder (``encode``) starts a batch together and lets it shrink as images stop, so
by its last iterations a batch of 256 may hold a few dozen images. Here every slot that frees up
is refilled in the same step by the next image of the input stream, which starts at iteration 0
while its neighbours are at others: one encoder step runs images at different iterations.

The step runs on packed tokens (``ops.VarlenLayout``): image s at iteration t is a sequence of
g*g + 1 + T*(t+1) rows laid after the others' with no padding. The per-token layers (LayerNorm,
projections, MLP, the latent quantizer) see exactly the valid tokens; the attention finds each
sequence from the layout. The decoder judges the images at their own counts the same way
(``ALITCore.decode_logits_packed``). Every index of the packed layouts is built on the host from
host-known counts: a step makes one device-to-host read (which judged images stop; the entering
images' out-of-reach flags; the finished images' codes, a step late; the sanity flags).

Each image gets the tokens ``encode`` gives it (same criterion, bounds and fallback): its
stopping point depends on its own values only, whatever the batch size or slot it ran in.
``halting`` is "off" (the encode default): a halting mask would need every image's logits at every
iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..models import ALITCore
from ..models.alit import image_range_error, image_shape_error, images_in_range
from ..ops import VarlenLayout, concat_ranges, to_device
from .criteria import DEFAULT_CRITERION, Criterion, StepView, TokenCount, criterion_name, parse_criterion
from .encode import (
    CountChoice, _check_batch_size, _per_row, bound_decides, finite_outputs, check_criterion_fits, check_fallback,
    iteration_range, out_of_reach, reads_are_free, token_batch_from_host,
)
from .tokens import TokenBatch


@dataclass
class StreamStats:
    """What a continuous-batching run did, counted on the host (for benchmarks)."""

    steps: int = 0
    images: int = 0
    slot_steps: int = 0  # sum over steps of the images in the step
    encoder_tokens: int = 0  # packed encoder input rows (the last block may compute fewer)
    attention_padded: int = 0  # rows the padded attention call computed beyond them
    reads: int = 0  # device-to-host reads

    @property
    def mean_active(self) -> float:
        return self.slot_steps / max(self.steps, 1)


@dataclass
class _Ready:
    """Images whose base tokenizer has run, waiting for a slot (rows in stream order)."""

    ids: list[int]
    images: torch.Tensor  # [r, 3, H, W]
    carry: torch.Tensor  # [r, g*g+1+T, W] the encoder input of iteration 0
    target: torch.Tensor  # [r, g*g] codes, or the VAE's [r, g*g, C] latents
    latents: torch.Tensor | None  # [r, g*g, C] base latents, when the criterion reads them
    never: torch.Tensor | None  # [r] bool: out of reach (criterion.never_met)

    def take(self, n: int) -> tuple["_Ready", "_Ready"]:
        def cut(t, lo, hi):
            return None if t is None else t[lo:hi]

        parts = [
            _Ready(self.ids[lo:hi], *(cut(t, lo, hi) for t in (self.images, self.carry, self.target, self.latents, self.never)))
            for lo, hi in ((0, n), (n, len(self.ids)))
        ]
        return parts[0], parts[1]

    @staticmethod
    def join(a: "_Ready", b: "_Ready") -> "_Ready":
        if not a.ids:
            return b

        def cat(x, y):
            return None if x is None else torch.cat([x, y])

        return _Ready(a.ids + b.ids, *(cat(x, y) for x, y in
                                        zip((a.images, a.carry, a.target, a.latents, a.never),
                                            (b.images, b.carry, b.target, b.latents, b.never))))


@dataclass
class _Options:
    criterion: Criterion
    first: int
    last: int  # iterations at most (for a fixed count: that count's)
    best: bool
    scored: bool
    prune: bool
    batch_size: int
    generator: torch.Generator | None


class _Stream:
    """The slots, the packed encoder state and the pending results of one ``encode_stream``."""

    def __init__(self, model: ALITCore, source: Iterator[tuple[int, torch.Tensor]], opts: _Options,
                 stats: StreamStats | None) -> None:
        cfg = model.config
        self.model, self.source, self.opts, self.stats = model, source, opts, stats or StreamStats()
        self.T, self.G1, self.width = cfg.tokens_per_iter, cfg.grid_size**2 + 1, cfg.max_tokens
        B = opts.batch_size
        self.image: list[int | None] = [None] * B  # stream id of each slot's image
        self.count = [0] * B  # iterations run by each slot's image
        self.skip = [False] * B  # out of reach: run without judging to the last count
        self.device = model.latent_tokens.device
        self.ready = _Ready([], None, None, None, None, None)
        self.exhausted = False
        self.out: torch.Tensor | None = None  # the previous step's packed encoder output
        self.rows: dict[int, tuple[int, int]] = {}  # slot -> (offset, length) in self.out
        self.buffers: dict[str, torch.Tensor] = {}
        self.choice = CountChoice(opts.criterion, "best" if opts.best else "max", B, self.device)
        self.ok = torch.ones((), dtype=torch.bool, device=self.device)  # images in range, outputs finite
        self.pending: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # retired, not read yet
        self.results: dict[int, tuple[int, list]] = {}
        self.caller_inference = False  # whether the caller iterates under inference_mode (set per step)

    # ------------------------------------------------------------------ input
    def _prepare(self) -> None:
        """Run the base tokenizer on the next ``batch_size`` images of the stream (once per that
        many images, as the compacting encoder does per chunk)."""
        ids, images = [], []
        # the caller's iterator runs in the caller's own inference mode (not the steps'), without
        # gradients as the rest of encode_stream: tensors it makes and keeps stay what they were
        with torch.inference_mode(self.caller_inference), torch.no_grad():
            for i, image in self.source:
                ids.append(i)
                images.append(image)
                if len(ids) == self.opts.batch_size:
                    break
            else:
                self.exhausted = True
        if not ids:
            return
        model, opts = self.model, self.opts
        batch = model.model_images(torch.stack(images))
        self.ok = self.ok & images_in_range(batch)
        carry, base = model.start_carry(batch, None, opts.generator)
        latents = None
        if opts.criterion.needs_latents:
            latents = base.target if model.config.is_vae else base.z.flatten(2).transpose(1, 2)
        never = out_of_reach(opts.criterion, model, batch) if opts.prune else None
        self.ready = _Ready.join(self.ready, _Ready(ids, batch, carry, base.target, latents, never))

    def _admit(self) -> tuple[list[int], _Ready]:
        """Fill free slots from the ready images (preparing more when needed)."""
        free = [s for s, i in enumerate(self.image) if i is None]
        while len(self.ready.ids) < len(free) and not self.exhausted:
            self._prepare()
        entering, self.ready = self.ready.take(min(len(free), len(self.ready.ids)))
        slots = free[: len(entering.ids)]
        if not slots:
            return slots, entering
        if not self.buffers:
            self._allocate(entering)
        (index,) = to_device(slots, device=self.device)
        for name, rows in (("images", entering.images), ("target", entering.target), ("latents", entering.latents)):
            if rows is not None:
                self.buffers[name].index_copy_(0, index, rows)
        self.choice.reset(index)
        for s, i in zip(slots, entering.ids):
            self.image[s], self.count[s], self.skip[s] = i, 0, False
        if entering.never is not None and reads_are_free(self.device):
            # out-of-reach images skip the decoder from their first count
            self._out_of_reach([s for s, f in zip(slots, entering.never.tolist()) if f])
            entering.never = None
        return slots, entering

    def _out_of_reach(self, slots: list[int]) -> None:
        """These slots' images can meet the criterion at no count: they run to the last count
        without judging, which their choice takes (as if they had met the criterion there)."""
        for s in slots:
            self.skip[s] = True
        if self.opts.best and slots:
            self.choice.settle(slots, self.opts.last)

    def _allocate(self, like: _Ready) -> None:
        B = self.opts.batch_size
        for name in ("images", "target", "latents"):
            t = getattr(like, name)
            if t is not None:
                self.buffers[name] = t.new_zeros((B, *t.shape[1:]))
        quantized = self.model.config.quantize_latent
        d = () if quantized else (self.model.config.latent_dim,)
        dtype = torch.int64 if quantized else like.carry.dtype
        self.buffers["codes"] = torch.full((B, self.width, *d), -1 if quantized else 0, dtype=dtype, device=self.device)
        if self.opts.best:
            self.buffers["best_codes"] = self.buffers["codes"].clone()

    # ------------------------------------------------------------------ one step
    def step(self) -> bool:
        """Run one iteration for every occupied slot (filling the free ones first); False when
        there was nothing left to run."""
        entering_slots, entering = self._admit()
        # longest first: sequences of one length lie together (one attention call per length on a CPU)
        active = sorted((s for s, i in enumerate(self.image) if i is not None), key=lambda s: -self.count[s])
        if not active:
            return False
        plan, counts, code_rows, out_rows = self._plan(active, entering_slots, entering)
        previous = self.out if self.out is not None else self.model.latent_tokens[:0].detach()
        fresh = entering.carry.flatten(0, 1) if entering_slots else previous[:0]
        x_out, vq = packed_step(self.model, previous, fresh, plan)
        tokens = vq.indices if vq.indices is not None else vq.z_q
        codes = self.buffers["codes"]
        codes.view(-1, *codes.shape[2:]).index_copy_(0, code_rows, tokens.to(codes.dtype))
        for s in active:
            self.count[s] += 1
        lengths = plan.layout.lengths
        self.out, self.rows = x_out, out_rows
        stop, judged, finite = self._judge(active, counts, vq.z_q)
        self.ok = self.ok & finite
        st = self.stats
        st.steps, st.slot_steps, st.encoder_tokens = st.steps + 1, st.slot_steps + len(active), st.encoder_tokens + sum(lengths)
        st.attention_padded += plan.layout.padded_rows(self.model.backend, self.device)
        never = entering.never if entering_slots else None
        flags = self._read(stop, never)
        self._finish(active, judged, flags, entering_slots if never is not None else [])
        return True

    def _plan(self, active: list[int], entering_slots: list[int], entering: _Ready
              ) -> tuple["StepPlan", list[int], torch.Tensor, dict[int, tuple[int, int]]]:
        """The step's packed layout, built on the host: every active slot's sequence in ``active`` order
        (a continuing image's previous output rows, then its iteration's T new latent rows; an
        entering image's iteration-0 rows); with each image's token count, its code buffer rows, and
        where each image that goes on finds its rows in the step's output (offset, length).

        An image at its last count leaves after this step whatever it is judged: the encoder's last
        block computes its latent rows alone (as ``ALITCore.step(final=True)`` does for a batch)."""
        T, G1, P = self.T, self.G1, self.out.shape[0] if self.out is not None else 0
        new_at = P + self.model.config.iterations * T  # after [previous | latent table]
        L0 = entering.carry.shape[1] if entering_slots else 0
        place = {s: k for k, s in enumerate(entering_slots)}
        starts, sizes = [], []
        for s in active:
            if s in place:
                starts.append(new_at + place[s] * L0)
                sizes.append(L0)
            else:
                offset, n = self.rows[s]
                starts += [offset, P + self.count[s] * T]
                sizes += [n, T]
        counts = [T * (self.count[s] + 1) for s in active]
        layout = VarlenLayout.from_lengths([G1 + n for n in counts], self.device)
        ending = np.asarray([self.count[s] + 1 >= self.opts.last for s in active])
        # each sequence's kept rows: all of them, or its latents alone when it ends here
        first_kept = np.asarray(layout.offsets) + np.where(ending, G1, 0)
        kept = np.asarray(counts) + np.where(ending, 0, G1)
        out_at = np.cumsum(kept) - kept
        rows = [concat_ranges(starts, sizes), concat_ranges(out_at + np.where(ending, 0, G1), counts),
                concat_ranges(np.asarray(active) * self.width, counts)]
        if ending.any():
            rows.append(concat_ranges(first_kept, kept))
        input_rows, latent_rows, code_rows, *keep = to_device(*rows, device=self.device)
        out_rows = {s: (int(o), int(n)) for s, o, n, e in zip(active, out_at, kept, ending) if not e}
        return StepPlan(layout, input_rows, latent_rows, *keep), counts, code_rows, out_rows

    def _judge(self, active: list[int], counts: list[int], z_q: torch.Tensor):
        """Ask the criterion about the images due for judging; returns (their stop flags on the
        device or None, those slots, whether the step's outputs are finite)."""
        opts, T = self.opts, self.T
        judged = [s for s in active if self._due(s)]
        if not judged:
            return None, judged, finite_outputs(z_q, None)
        at = {s: k for k, s in enumerate(active)}
        starts = np.cumsum(counts) - np.asarray(counts)
        rows = concat_ranges(starts[[at[s] for s in judged]], [counts[at[s]] for s in judged])
        rows, slot_index, image_ids, at_count = to_device(
            rows, judged, [self.image[s] for s in judged], [self.count[s] for s in judged], device=self.device)
        z = z_q.index_select(0, rows)
        logits = self.model.decode_logits_packed(z, [counts[at[s]] for s in judged]) if opts.criterion.needs_logits else None
        buf = self.buffers
        view = StepView(self.model, at_count - 1, at_count * T, image_ids, buf["target"][slot_index],
                        buf["images"][slot_index], logits,
                        buf["latents"][slot_index] if "latents" in buf else None)
        stop, better = self.choice.update(view, at_count, slot_index)
        if opts.best:
            codes, best = buf["codes"], buf["best_codes"]
            best[slot_index] = torch.where(_per_row(better, best), codes[slot_index], best[slot_index])
        return stop, judged, finite_outputs(z_q, logits)

    def _due(self, s: int) -> bool:
        opts, count = self.opts, self.count[s]
        if not opts.scored or self.skip[s]:
            return False
        return opts.first <= count < opts.last or (opts.best and count == opts.last)

    # ------------------------------------------------------------------ the one read per step
    def _read(self, stop: torch.Tensor | None, never: torch.Tensor | None) -> list:
        """One device-to-host read: [ok, stop flags, never flags, pending results]."""
        dtype = torch.int64 if self.model.config.quantize_latent else torch.float64
        parts = [self.ok.view(1)]
        parts += [t.reshape(-1) for t in (stop, never) if t is not None]
        for _, lengths, rows in self.pending:
            parts += [lengths, rows.reshape(-1)]
        values = torch.cat([p.to(dtype) for p in parts]).tolist()
        self.stats.reads += 1
        if not values[0]:
            self._raise_bad()
        used = 1 + sum(t.numel() for t in (stop, never) if t is not None)
        self._collect(values[used:])
        return values[1:used]

    def _collect(self, values: list) -> None:
        """Store the pending results read in ``values`` (lengths then rows, per retirement)."""
        at = 0
        per_row = self.width * (1 if self.model.config.quantize_latent else self.model.config.latent_dim)
        for ids, _, _ in self.pending:
            n = len(ids)
            lengths = values[at : at + n]
            at += n
            for k, i in enumerate(ids):
                self.results[i] = (int(lengths[k]), values[at + k * per_row : at + (k + 1) * per_row])
            at += n * per_row
        self.pending = []

    def _raise_bad(self) -> None:
        images = [t for t in (self.buffers.get("images"), self.ready.images) if t is not None]
        images = torch.cat(images)
        if not bool(images_in_range(images)):
            raise ValueError(image_range_error(images))
        raise FloatingPointError("encode: the model produced NaN or inf (are its weights finite?)")

    def _finish(self, active: list[int], judged: list[int], flags: list, entering_slots: list[int]) -> None:
        """Act on the step's read: mark the entering images out of reach, retire the images that
        stopped or reached the last count (their codes are gathered now, read with the next step)
        and free their slots."""
        opts, T = self.opts, self.T
        n = len(judged)
        out_of_reach = [s for s, f in zip(entering_slots, flags[n:]) if f]
        self._out_of_reach(out_of_reach)
        # the bound wins over a stop that rounding let through in the same read (see CountChoice.settle)
        stopped = {s for s, f in zip(judged, flags[:n]) if f and self.count[s] < opts.last} - set(out_of_reach)
        done = [s for s in active if s in stopped or self.count[s] >= opts.last]
        if not done:
            return
        index, host_lengths = to_device(done, [self.count[s] * T for s in done], device=self.device)
        codes = self.buffers["codes"].index_select(0, index)
        if opts.best:
            lengths = self.choice.chosen(opts.last).index_select(0, index) * T
            codes = torch.where(_per_row(self.choice.met.index_select(0, index), codes), codes,
                                self.buffers["best_codes"].index_select(0, index))
        else:
            lengths = host_lengths
        self.pending.append(([self.image[s] for s in done], lengths, codes))
        for s in done:
            self.image[s] = None
        self.stats.images += len(done)

    def flush(self) -> None:
        """Read the results retired by the last step (one read, when there are any)."""
        if self.pending:
            self._read(None, None)


@dataclass
class StepPlan:
    """The device indices of one packed encoder step (built on the host, see ``_Stream._plan``)."""

    layout: VarlenLayout  # the images' sequences, g*g + 1 + their token count each
    input_rows: torch.Tensor  # each packed input row's row in [ln_recursive([previous | latent table]) | entering]
    latent_rows: torch.Tensor  # the output rows of the images' latent tokens, image after image
    keep: torch.Tensor | None = None  # the packed rows the encoder's last block computes (None: all)


def packed_step(model: ALITCore, previous: torch.Tensor, entering: torch.Tensor, plan: StepPlan):
    """One encoder iteration for images at different iterations, on packed tokens: the previous
    step's output [P, W] (continuing images take their rows and their iteration's new latents,
    then ``encoder_ln_recursive``, as ``ALITCore.next_state``), entering images' iteration-0 states
    [e * (g*g+1+T), W] (``initial_state``), the encoder, the latent quantizer. Returns (the packed
    output, the QuantizedLatents of every image's latents, packed). Tensors only: torch.compile
    traces it whole (fullgraph)."""
    table = model.latent_table().flatten(0, 1).to(previous.dtype)
    source = torch.cat([model.encoder_ln_recursive(torch.cat([previous, table])), entering.to(previous.dtype)])
    x_out = model.encoder(source.index_select(0, plan.input_rows), plan.layout, keep=plan.keep)
    return x_out, model.quantize_latents(x_out.index_select(0, plan.latent_rows))


def _stream_images(model: ALITCore, items: Iterable[torch.Tensor], sizes: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(stream id, image [3, H, W]) for every image of ``items`` (each [3, H, W] or [b, 3, H, W]);
    ``sizes`` gets each item's image count as it is read. Shapes are checked here (host metadata)."""
    next_id = 0
    for k, item in enumerate(items):
        batch = item[None] if isinstance(item, torch.Tensor) and item.dim() == 3 else item
        message = image_shape_error(batch, model.config)
        if message is not None:
            raise ValueError(f"item {k} of the stream: {message}")
        sizes.append(batch.shape[0])
        for image in batch:
            yield next_id, image
            next_id += 1


@torch.no_grad()
def encode_stream(
    model: ALITCore,
    images: Iterable[torch.Tensor],
    criterion: "str | Criterion | Callable[[StepView], object]" = DEFAULT_CRITERION,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 32,
    fallback: str = "max",
    generator: torch.Generator | None = None,
    stats: StreamStats | None = None,
) -> Iterator[TokenBatch]:
    """Encode a stream of images with continuous batching; yields one TokenBatch per item of
    ``images`` (an item is an image [3, H, W] or a batch [b, 3, H, W]), in input order, as soon
    as that item's images and every earlier item's are done.

    ``batch_size`` slots run at once; a slot whose image stops takes the next image of the stream
    in the same step. Each image gets the tokens ``encode(model, images, criterion, min_tokens,
    max_tokens, fallback=fallback)`` gives it. A VAE model that samples its posterior draws it
    with ``generator`` per ``batch_size`` images of the stream, as ``encode`` does per chunk of
    ``batch_size``. ``stats`` (a StreamStats) is filled in if given."""
    crit = parse_criterion(criterion)
    check_fallback(crit, fallback)
    check_criterion_fits(model, crit)
    first, last = iteration_range(model, min_tokens, max_tokens)
    _check_batch_size(batch_size)
    if isinstance(crit, TokenCount):
        last = min(last, max(first, -(-crit.tokens // model.config.tokens_per_iter)))
    best = fallback == "best"
    scored = not isinstance(crit, TokenCount)
    prune = bound_decides(crit, best)
    extra = {"criterion": criterion_name(crit)}
    if fallback != "max":
        extra["fallback"] = fallback
    opts = _Options(crit, first, last, best, scored, prune, int(batch_size), generator)
    sizes: list[int] = []
    stream = _Stream(model, _stream_images(model, images, sizes), opts, stats)
    emitted, next_id, running = 0, 0, True
    while running:
        # the compute runs under inference_mode (less bookkeeping per op), as encode's does; the
        # tokens are built outside it from host values, so they are ordinary tensors
        stream.caller_inference = torch.is_inference_mode_enabled()
        with torch.inference_mode():
            running = stream.step()
            if not running:
                stream.flush()
        while emitted < len(sizes) and all(i in stream.results for i in range(next_id, next_id + sizes[emitted])):
            ids = range(next_id, next_id + sizes[emitted])
            yield token_batch_from_host(model, [stream.results.pop(i) for i in ids], extra)
            next_id += sizes[emitted]
            emitted += 1
