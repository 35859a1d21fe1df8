"""Resumable rollouts: one iteration per ``step()``, so that each image stops at its own token
count while the rest of the batch carries on.

A ``RolloutState`` runs the frozen base tokenizer once and then keeps each image's encoder state
(the carry of ``ALITCore.step``) between iterations. Two ways to let images go:

- compacting (default): finished images leave the working batch (its rows are index-selected
  away), so later iterations cost only what the remaining images need. Each iteration's batch size
  then depends on the data.
- ``static_shapes=True``: every image stays in the batch behind an active mask, so each
  iteration's shapes depend on the iteration index alone. That is what CUDA graphs and
  ``torch.compile`` want (one graph per iteration index, never a recompile because images stopped
  elsewhere), at the price of computing finished rows until the batch is done.

Either way a step makes no host-device sync; ``finish`` makes at most one (none when given host
values), and the per-image results are assembled on the device.

The decoder's image-independent rows (the masked 2D queries) go through ln_pre and the first
block's q/k/v projection once per call, not once per image (``LatentDecoder.forward``): 5-7% of a
decoder call for the demo model on one CPU thread, outputs unchanged. Each iteration's new latent
tokens are not cached: a [T, W] add.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..models import ALITCore, BaseOutput, IterationOutput
from ..ops import to_device
from ..models.alit import image_shape_error

StepFn = Callable[..., "tuple[IterationOutput, torch.Tensor]"]


@dataclass
class StepOutput(IterationOutput):
    """One iteration for the images in the working batch: row j belongs to image ``rows[j]``."""

    rows: torch.Tensor | None = None


@dataclass
class ImageResult:
    """The outputs of one image's last iteration."""

    iterations: int
    latents: torch.Tensor  # [n, W]
    indices: torch.Tensor | None  # [n]; None for continuous tokens (they are z_q)
    z_q: torch.Tensor  # [n, d]
    logits: torch.Tensor | None  # [g*g, K]; None when the decoder was skipped at that iteration

    @property
    def num_tokens(self) -> int:
        return int(self.z_q.shape[0])


def compile_step(model: ALITCore, **compile_kwargs) -> StepFn:
    """``torch.compile(model.step, fullgraph=True, dynamic=False)``, made once per model and kept.

    With static shapes it compiles once per iteration index (the iteration is a Python int and the
    sequence grows by ``tokens_per_iter`` each time) and never again for other batches of the same
    size. ``compile_kwargs`` go to torch.compile (``backend``, ``mode``, ...)."""
    key = tuple(sorted(compile_kwargs.items()))
    cache = model.__dict__.setdefault("_compiled_steps", {})
    if key not in cache:
        options = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        cache[key] = torch.compile(model.step, **options)
    return cache[key]


class RolloutState:
    """A rollout that advances one iteration per ``step()`` for the images still active.

    Without ``finish`` calls, the steps give exactly the records of ``model.rollout`` with the
    same halting mode ("off" or "threshold"; "stochastic" draws depend on the batch it runs on).
    ``check_values=False`` skips the eager range check of ``images`` (a host sync): for callers
    that validate them otherwise. ``step_fn`` replaces ``model.step`` (e.g. ``compile_step``).
    """

    def __init__(
        self,
        model: ALITCore,
        images: torch.Tensor,
        halting: str = "off",
        generator: torch.Generator | None = None,
        iterations: int | None = None,
        keep_outputs: bool = True,
        base: BaseOutput | None = None,
        static_shapes: bool = False,
        check_values: bool = True,
        step_fn: StepFn | None = None,
    ) -> None:
        cfg = model.config
        model.check_halting(halting)
        self.limit = cfg.iterations if iterations is None else int(iterations)
        if not 1 <= self.limit <= cfg.iterations:
            raise ValueError(f"iterations must be in [1, {cfg.iterations}], got {self.limit}")
        if check_values:
            model.check_images(images)
        elif (message := image_shape_error(images, cfg)) is not None:
            raise ValueError(message)
        images = model.model_images(images)
        self.model = model
        self.images = images
        self.halting = halting
        self.generator = generator
        self.keep_outputs = keep_outputs
        self.static_shapes = bool(static_shapes)
        self._step_fn = step_fn if step_fn is not None else model.step
        B = images.shape[0]
        with torch.no_grad():
            # the generator also draws the VAE's posterior sample (that variant has no stochastic halting)
            self._carry, self.base = model.start_carry(images, base, generator)
        device = images.device
        # per image: iterations run so far, and the tokens of the latest one: code ids (-1 past
        # them), or for continuous tokens the vectors [B, max_tokens, d] (0 past them)
        self.iterations = torch.zeros(B, dtype=torch.int64, device=device)
        if cfg.quantize_latent:
            self.indices = torch.full((B, cfg.max_tokens), -1, dtype=torch.int64, device=device)
        else:
            self.indices = torch.zeros(B, cfg.max_tokens, cfg.latent_dim, dtype=images.dtype, device=device)
        self._results: list[tuple[StepOutput, int] | None] = [None] * B
        # host copies of who is active, so that control flow never reads the device
        self._active_ids: list[int] = list(range(B))
        self.active = torch.arange(B, device=device)  # ids of the images in the working batch
        self._all_rows = self.active
        self.active_mask = torch.ones(B, dtype=torch.bool, device=device)  # static shapes: who still counts
        self._gt = self.base.target
        self._images = images
        self._t = 0
        self.last: StepOutput | None = None

    # ------------------------------------------------------------------ progress
    @property
    def done(self) -> bool:
        return not self._active_ids

    @property
    def active_ids(self) -> list[int]:
        """The images of the working batch, in row order (a host list: reading it costs no sync)."""
        return list(self._active_ids)

    @property
    def iteration(self) -> int:
        """Iterations the working batch has run (the next ``step`` runs iteration ``iteration``)."""
        return self._t

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per image so far: [B] int64."""
        return self.iterations * self.model.config.tokens_per_iter

    @property
    def working_images(self) -> torch.Tensor:
        """The images of the rows the next ``step`` computes."""
        return self._images

    @property
    def working_gt_indices(self) -> torch.Tensor:
        return self._gt

    @property
    def working_base_latents(self) -> torch.Tensor:
        """The base encoder's latents [n, g*g, C] of the rows the next ``step`` computes (the
        VAE's are its target; the VQGAN's, before quantization, are gathered here when asked)."""
        if self.model.config.is_vae:
            return self._gt
        z = self.base.z if self.static_shapes else self.base.z.index_select(0, self.active)
        return z.flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ advancing
    @torch.no_grad()
    def step(self, decode: bool = True) -> StepOutput:
        """Run the next iteration for the working batch; ``decode=False`` skips the decoder
        (it runs anyway when halting needs its logits)."""
        if self.done:
            raise RuntimeError("the rollout is finished: every image has stopped")
        t = self._t
        rec, carry = self._step_fn(
            self._carry, t, self._gt, decode=decode or self.halting != "off", halting=self.halting, generator=self.generator,
            final=t + 1 >= self.limit,
        )
        rows = self._all_rows if self.static_shapes else self.active
        out = StepOutput(**vars(rec), rows=rows)
        tokens = rec.tokens
        n = tokens.shape[1]
        if self.static_shapes:
            live = self.active_mask
            self.iterations = torch.where(live, t + 1, self.iterations)
            keep = live.view(-1, *([1] * (tokens.dim() - 1)))
            self.indices[:, :n] = torch.where(keep, tokens.to(self.indices.dtype), self.indices[:, :n])
        else:
            self.iterations[self.active] = t + 1
            self.indices[self.active, :n] = tokens.to(self.indices.dtype)
        if self.keep_outputs:
            # row j of this step is image _active_ids[j] when compacting, image j with static shapes
            for j, i in enumerate(self._active_ids):
                self._results[i] = (out, i if self.static_shapes else j)
        self._t = t + 1
        self.last = out
        self._carry = carry
        if self._t >= self.limit:
            self._retire(list(self._active_ids))
        return out

    def finish(self, which: torch.Tensor | Sequence[bool] | Sequence[int]) -> None:
        """Stop images: ``which`` is a bool mask over the rows of the last step, or image ids.

        A mask on the device is read once (one host sync); host lists or CPU tensors cost none."""
        if self.done:
            return
        values, is_mask = _host_values(which)
        if is_mask:
            rows = len(self._all_rows) if self.static_shapes else len(self._active_ids)
            if len(values) != rows:
                raise ValueError(f"finish: a mask needs {rows} entries, got {len(values)}")
            if self.static_shapes:
                stop_ids = [i for i, s in enumerate(values) if s]
            else:
                stop_ids = [self._active_ids[j] for j, s in enumerate(values) if s]
        else:
            B = self.iterations.shape[0]
            bad = [i for i in values if not 0 <= i < B]
            if bad:
                raise ValueError(f"finish: image ids must lie in [0, {B}), got {bad}")
            stop_ids = list(values)
        self._retire(stop_ids)

    def _retire(self, ids: Sequence[int]) -> None:
        stop_ids = set(ids) & set(self._active_ids)
        if not stop_ids:
            return
        device = self.iterations.device
        if self.static_shapes:
            self._active_ids = [i for i in self._active_ids if i not in stop_ids]
            mask = torch.zeros(self.iterations.shape[0], dtype=torch.bool)
            mask[self._active_ids] = True
            self.active_mask = mask.to(device)
            (self.active,) = to_device(self._active_ids, device=device)
            if self.done:
                self._carry = self._gt = self._images = None
            return
        keep_rows = [j for j, i in enumerate(self._active_ids) if i not in stop_ids]
        self._active_ids = [self._active_ids[j] for j in keep_rows]
        if not keep_rows:
            self.active = self.active[:0]
            self._carry = self._gt = self._images = None
            return
        (keep,) = to_device(keep_rows, device=device)  # a host-to-device copy, no sync (pinned on CUDA)
        self.active = self.active.index_select(0, keep)
        self._carry = self._carry.index_select(0, keep)
        self._gt = self._gt.index_select(0, keep)
        self._images = self._images.index_select(0, keep)

    # ------------------------------------------------------------------ results
    def result(self, i: int) -> ImageResult:
        """Image ``i``'s outputs at its latest iteration (needs ``keep_outputs``)."""
        if not self.keep_outputs:
            raise RuntimeError("this state was made with keep_outputs=False; only .indices and .lengths are kept")
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -len(self._results) <= i < len(self._results):
            raise IndexError(f"result({i!r}): this state holds images 0..{len(self._results) - 1}")
        entry = self._results[i]
        if entry is None:
            raise RuntimeError(f"image {i} has not run an iteration yet")
        out, j = entry
        return ImageResult(
            iterations=out.iteration + 1,
            latents=out.latents[j],
            indices=None if out.indices is None else out.indices[j],
            z_q=out.z_q[j],
            logits=None if out.logits is None else out.logits[j],
        )

    def sequences(self) -> list[torch.Tensor]:
        """Each image's latest code ids (or continuous vectors), of its own length (reads the
        lengths: one host sync)."""
        lengths = self.lengths.tolist()
        return [self.indices[i, :n] for i, n in enumerate(lengths)]


def _host_values(which) -> tuple[list, bool]:
    """(values as a Python list, whether they are a bool mask); one read for a tensor."""
    if isinstance(which, torch.Tensor):
        if which.is_floating_point() or which.is_complex():  # a float mask read as ids would stop the wrong images
            raise ValueError(f"finish: give a bool mask or integer image ids, got a {which.dtype} tensor")
        return which.reshape(-1).tolist(), which.dtype == torch.bool
    if isinstance(which, (str, bytes)):
        raise TypeError(f"finish: give a bool mask or integer image ids, got {type(which).__name__}")
    values = list(which)
    if values and all(isinstance(v, bool) for v in values):
        return values, True
    if any(isinstance(v, float) for v in values):
        raise ValueError("finish: give a bool mask or integer image ids, not floats")
    return [int(v) for v in values], False


def start(
    model: ALITCore, images: torch.Tensor, halting: str = "off", generator: torch.Generator | None = None, **kwargs
) -> RolloutState:
    return RolloutState(model, images, halting=halting, generator=generator, **kwargs)
