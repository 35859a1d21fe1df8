"""ALIT: a recurrent transformer that turns the 2D tokens of a frozen VQGAN into 1D latent tokens,
``tokens_per_iter`` more at every iteration, and a decoder that predicts the VQGAN codes back.

The VAE variant (``config.base_tokenizer == "vae"``) takes the scaled posterior sample of a KL-VAE
as its 2D latents and the decoder regresses them (16 values per grid cell instead of logits); with
``quantize_latent=False`` the 1D tokens are the continuous factorized vectors (no latent codebook).
Both run through the same ``step``; the places that differ say so.

Data flow: images -> base tokenizer (z, gt codes) -> 2D tokens -> ``step`` per iteration
(encoder -> latent quantizer -> decoder -> logits over the VQGAN codebook) -> tokens.
``step`` is the one body of an iteration: ``rollout``, the stage-1 loss (``forward``) and the
resumable inference state (alit_fast.inference) all call it.

This module is nn code only: no stopping criteria, no token files, no checkpoint files. Parameter
names follow the official checkpoints so loading one is a plain state-dict load. Inputs are
validated once per public call (``rollout``, ``forward``); the ops below them are called with
``validate=False`` and the loop makes no host-device sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ALITConfig, get_config
from ..ops import VarlenLayout, check_backend_here, concat_ranges, to_device, duplicate_map, vq_nearest
from ._cache import WeightsCache
from .transformer import PackedAttention, ResidualAttentionBlock, Transformer, run_blocks
from .vae import VAEBaseTokenizer
from .vqgan import BaseTokenizer, VQGANQuantizer

# "official": what the official code does for the variant: the VQGAN's stochastic rule, and for the
# VAE its no-op (see ALITCore.halting_mask); "threshold" is the deterministic rule that masks
HALTING_MODES = ("off", "threshold", "stochastic", "official")


@dataclass
class BaseOutput:
    """What the frozen base tokenizer gives for a batch: computed once, reusable across iterations.

    VQGAN: ``z`` and ``gt_indices``. VAE: ``z`` is the scaled latents (a posterior sample, or the
    mean); ``mean`` / ``std`` are the unscaled posterior, kept so that a cache can store them and a
    later pass draw a new sample (``z=None``: ``ALITCore.resolve_base`` samples it)."""

    z: torch.Tensor | None  # [B, C, g, g] VQGAN encoder output before quantization / VAE scaled latents
    gt_indices: torch.Tensor | None = None  # [B, g*g] VQGAN code indices, row-major; None for the VAE
    mean: torch.Tensor | None = None  # [B, C, g, g] VAE posterior mean (unscaled)
    std: torch.Tensor | None = None  # [B, C, g, g] VAE posterior std (unscaled)

    @property
    def target(self) -> torch.Tensor:
        """What the decoder learns to predict per grid cell: the VQGAN codes [B, g*g] (int64), or
        the VAE's scaled latents [B, g*g, C], row-major cells."""
        if self.gt_indices is not None:
            return self.gt_indices
        return self.z.flatten(2).transpose(1, 2)


@dataclass
class QuantizedLatents:
    z: torch.Tensor  # [B, n, d] l2-normalized projected latents (continuous tokens: the projection as is)
    z_q: torch.Tensor  # [B, n, d] straight-through quantized latents (continuous tokens: = z)
    indices: torch.Tensor | None  # [B, n] int64; None for continuous tokens
    loss: torch.Tensor  # scalar commitment + codebook loss (0 for continuous tokens)


@dataclass
class IterationOutput:
    iteration: int
    latents: torch.Tensor  # [B, T*(t+1), W] encoder outputs before encoder_ln_post
    indices: torch.Tensor | None  # [B, T*(t+1)] latent code indices; None for continuous tokens
    # the decoder's output: logits over the VQGAN codebook [B, g*g, K_base], or for the VAE
    # variant the predicted scaled latents [B, g*g, C]; None where the decoder was skipped
    logits: torch.Tensor | None
    gt_indices: torch.Tensor  # [B, g*g] the VQGAN codes; for the VAE the target latents [B, g*g, C]
    vq_loss: torch.Tensor
    z_q: torch.Tensor  # [B, T*(t+1), d] the 1D tokens as the decoder reads them

    @property
    def tokens(self) -> torch.Tensor:
        """The 1D tokens: code ids [B, n], or the continuous vectors [B, n, d]."""
        return self.indices if self.indices is not None else self.z_q


@dataclass
class LossOutput:
    """The stage-1 loss. Per-iteration terms are detached 0-d tensors on the model's device: reading
    one is a host sync, so a training loop reads them only when it logs."""

    loss: torch.Tensor
    per_iteration: dict[int, torch.Tensor] = field(default_factory=dict)
    # the code term before its weight: NLL of the VQGAN codes, or for the VAE the latents' MSE
    nll: dict[int, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------- input checks
def image_shape_error(images: object, cfg: ALITConfig) -> str | None:
    """What is wrong with the type, shape or dtype of ``images`` (host metadata: no sync), or None."""
    if not isinstance(images, torch.Tensor):
        return f"images must be a torch.Tensor, got {type(images).__name__}"
    size = cfg.image_size
    if images.dim() == 4 and images.shape[1] == 3 and (images.shape[2], images.shape[3]) != (size, size):
        return (f"images must have shape [B, 3, {size}, {size}], got {list(images.shape)}: apply the preprocessing "
                f"rule first, alit_fast.io.images.fit_images(images, {size}) (docs/preprocessing.md)")
    if images.dim() != 4 or images.shape[1] != 3:
        return f"images must have shape [B, 3, {size}, {size}], got {list(images.shape)}"
    if images.shape[0] == 0:
        return "images is an empty batch (B=0)"
    if not images.is_floating_point():
        return f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}"
    return None


def images_in_range(images: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on the images' device: every value in [0, 1] (NaN fails: aminmax
    propagates it, and NaN compares false). One reduction, no sync."""
    lo, hi = torch.aminmax(images)
    return (lo >= 0) & (hi <= 1)


def image_range_error(images: torch.Tensor) -> str:
    """The message for images that failed ``images_in_range`` (an error path: it reads values)."""
    lo, hi = torch.stack([images.min(), images.max()]).float().tolist()
    return f"images must have values in [0, 1], found values in [{lo:.4g}, {hi:.4g}]"


class LatentQuantizer(nn.Module):
    """Cosine-similarity VQ on factorized latents, with a straight-through estimator."""

    def __init__(self, codebook_size: int, dim: int, commitment_cost: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment_cost = commitment_cost
        self.backend = "auto"
        # per weights, not per call: the codebook changes only when the weights do
        self._normalized = WeightsCache(lambda w: F.normalize(w, dim=-1))
        self._first_copy = WeightsCache(lambda w: duplicate_map(F.normalize(w.float(), dim=-1)))

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return F.normalize(weight, dim=-1)[indices]  # the codebook loss needs this graph
        return self._normalized(weight)[indices]

    def forward(self, z: torch.Tensor) -> QuantizedLatents:
        z = F.normalize(z, dim=-1)
        weight = self.embedding.weight
        first_copy = self._first_copy(weight) if self.backend in ("torch", "auto") else None
        indices, _ = vq_nearest(
            z.reshape(-1, z.shape[-1]), weight, normalize=True, backend=self.backend, first_copy=first_copy, validate=False
        )
        indices = indices.view(z.shape[:-1])
        z_q = self.codes(indices).to(z.dtype)
        loss = self.commitment_cost * F.mse_loss(z_q.detach().float(), z.float()) + F.mse_loss(
            z_q.float(), z.detach().float()
        )
        return QuantizedLatents(z=z, z_q=z + (z_q - z).detach(), indices=indices, loss=loss)


class LatentDecoder(nn.Module):
    """Reconstructs the VQGAN code of every grid cell from [masked 2D queries | quantized latents]."""

    def __init__(self, cfg: ALITConfig) -> None:
        super().__init__()
        W = cfg.width
        self.latent_token_positional_embedding = nn.Parameter(W**-0.5 * torch.randn(cfg.max_tokens, W))
        self.decoder_embed = nn.Linear(cfg.latent_dim, W)
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.layers, cfg.heads, cfg.mlp_ratio).transformer
        self.ln_post = nn.LayerNorm(W)
        # logits over the VQGAN codebook, or (VAE) a regression of the latent vector
        self.ffn = nn.Sequential(nn.Linear(W, 2 * W), nn.Tanh(), nn.Linear(2 * W, cfg.decoder_out_dim))

    def forward(
        self, queries: torch.Tensor, z_q: torch.Tensor, latent_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked queries [1, g*g+1, W] and quantized latents [B, n, d] -> outputs per grid cell
        [B, g*g, decoder_out_dim]. The queries come from the caller because their parameters sit
        beside the encoder's in the official layout, not under ``decoder.``; ``latent_lengths`` as
        in ``ALITCore.decode_logits``."""
        B, n, _ = z_q.shape
        G1 = queries.shape[1]
        latents = self.decoder_embed(z_q) + self.latent_token_positional_embedding[:n]
        first, qkv = self.transformer[0], None
        if not _share_queries(first):
            x = self.ln_pre(torch.cat([queries.expand(B, -1, -1).to(latents.dtype), latents], dim=1))
        else:
            # a LayerNorm and a projection are per row: the queries, the same for every image, go
            # through ln_pre and the first block's q/k/v projection once, then are shared
            queries, latents = self.ln_pre(queries.to(latents.dtype)), self.ln_pre(latents)
            x = torch.cat([queries.expand(B, -1, -1), latents], dim=1)
            qkv = torch.cat([first.project(queries).expand(B, -1, -1), first.project(latents)], dim=1)
        lengths = None
        if latent_lengths is not None:
            # converted once here, not in each of the attention calls below
            lengths = (latent_lengths.to(device=x.device, dtype=torch.int32) + G1).contiguous()
        # only the grid cells' outputs are read: the last block computes those rows alone
        x = run_blocks(self.transformer, x, lengths, keep=slice(1, G1), first_qkv=qkv)
        return self.ffn(self.ln_post(x))

    def forward_packed(self, queries: torch.Tensor, z_q: torch.Tensor, plan: "DecoderPlan") -> torch.Tensor:
        """``forward`` on packed latents: z_q [sum(counts), d] holds image j's ``plan.counts[j]``
        latents after those of the images before it. Each image's sequence is [queries | its
        latents], packed without padding; returns [len(counts), g*g, decoder_out_dim]. Tensors in,
        tensors out (the plan's indices were built beforehand): torch.compile traces it whole."""
        G1 = queries.shape[1]
        latents = self.decoder_embed(z_q) + self.latent_token_positional_embedding.index_select(0, plan.positions)
        # a LayerNorm and a projection are per row: the queries, the same for every image, go
        # through ln_pre and the first block's q/k/v projection once, then are gathered per image
        rows = self.ln_pre(torch.cat([queries[0].to(latents.dtype), latents]))
        first = self.transformer[0]
        qkv = first.project(rows).index_select(0, plan.order) if _share_queries(first) else None
        x = run_blocks(self.transformer, rows.index_select(0, plan.order), plan.layout, keep=plan.outputs, first_qkv=qkv)
        out = self.ffn(self.ln_post(x))
        return out.view(-1, G1 - 1, out.shape[-1])


def _share_queries(first: nn.Module) -> bool:
    """Whether the decoder hands its first block the queries' projection, computed once: not on the
    official backend (its baseline computes every row of every image, as the official code does),
    nor where that block is checkpointed for a backward pass (the projection, made outside the
    checkpoint, would stay alive until the backward: the memory checkpointing is there to save)."""
    if first.attn.backend == "official":
        return False
    return not (first.checkpoint_activations and torch.is_grad_enabled())


@dataclass
class DecoderPlan:
    """The index tensors of one packed decode, built on the host from the token counts: each
    latent's position-embedding row; where each packed row comes from in [queries (G1 rows) | all
    latents]; the packed rows of the grid cells; the sequences' layout (lengths G1 + count)."""

    positions: torch.Tensor
    order: torch.Tensor
    outputs: torch.Tensor
    layout: VarlenLayout

    @classmethod
    def build(cls, counts: "list[int]", G1: int, device: torch.device | str) -> "DecoderPlan":
        n = np.asarray(counts, dtype=np.int64)
        queries = np.full_like(n, G1)
        latent_starts = G1 + np.cumsum(n) - n
        seq_starts = np.cumsum(n + G1) - (n + G1)
        positions = concat_ranges(np.zeros_like(n), n)
        order = concat_ranges(np.stack([np.zeros_like(n), latent_starts], 1).ravel(), np.stack([queries, n], 1).ravel())
        outputs = concat_ranges(seq_starts + 1, queries - 1)
        moved = to_device(positions, order, outputs, device=device)
        return cls(*moved, VarlenLayout.from_lengths([G1 + c for c in counts], device))


def _masked_queries(cls: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return torch.cat([cls[None], mask.expand(1, pos.shape[0] - 1, -1)], dim=1) + pos


class ALITCore(nn.Module):
    """The nn part of ALIT: parameters, one recurrent iteration (``step``), ``rollout`` and the
    stage-1 loss (``forward``). ``alit_fast.ALIT`` adds adaptive encoding and decoding on top."""

    def __init__(self, config: ALITConfig | str = "alit_small", backend: str = "auto") -> None:
        super().__init__()
        cfg = get_config(config)
        self.config = cfg
        W, T, G2 = cfg.width, cfg.tokens_per_iter, cfg.grid_size**2
        scale = W**-0.5

        self.encoder_positional_embedding = nn.Parameter(scale * torch.randn(G2 + 1, W))
        self.encoder_class_embedding = nn.Parameter(scale * torch.randn(1, W))
        self.encoder_mask_token = nn.Parameter(scale * torch.randn(1, 1, W))
        self.decoder_positional_embedding = nn.Parameter(scale * torch.randn(G2 + 1, W))
        self.decoder_class_embedding = nn.Parameter(scale * torch.randn(1, W))
        self.decoder_mask_token = nn.Parameter(scale * torch.randn(1, 1, W))
        self.latent_tokens = nn.Parameter(scale * torch.randn(T, W))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(T, W))
        self.timestep_embedding = nn.Parameter(scale * torch.randn(cfg.iterations, T, W))
        self.encoder_ln_pre = nn.LayerNorm(W)
        self.encoder_ln_post = nn.LayerNorm(W)
        self.encoder_ln_recursive = nn.LayerNorm(W)
        self.pre_quantizer_mlp = nn.Linear(W, cfg.latent_dim)
        self.encoder = Transformer(W, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.decoder = LatentDecoder(cfg)
        self.patch_embed = nn.Conv2d(3, W - cfg.base_channels, cfg.patch_size, stride=cfg.patch_size)
        # continuous tokens have no latent codebook (and no quantize.* keys, as the official files)
        self.quantize = LatentQuantizer(cfg.codebook_size, cfg.latent_dim, cfg.commitment_cost) if cfg.quantize_latent else None
        self.base_tokenizer = VAEBaseTokenizer(cfg.vae, cfg.image_size) if cfg.is_vae else BaseTokenizer(cfg.vqgan)
        self._init_linear_weights()
        # stage 1 (latent distillation) keeps the VQGAN frozen
        self.base_tokenizer.requires_grad_(False)
        self._queries = WeightsCache(_masked_queries)
        self._latent_table = WeightsCache(lambda tokens, pos, steps: tokens + pos + steps)
        self.backend = "auto"
        self.set_backend(backend)

    def _init_linear_weights(self) -> None:
        # as the official init: truncated normal for every linear layer and the patch embedding;
        # the VQGAN keeps its own (it is loaded from a checkpoint in practice)
        for name, module in self.named_modules():
            if name.startswith("base_tokenizer"):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ configuration
    def set_backend(self, backend: str) -> "ALITCore":
        """Route every attention and nearest-code call of the model through ``backend``; "triton"
        on a machine without a CUDA GPU (and without TRITON_INTERPRET=1) is a ValueError here."""
        check_backend_here(backend)
        self.backend = backend
        for module in self.modules():
            if isinstance(module, (PackedAttention, LatentQuantizer, VQGANQuantizer)):
                module.backend = backend
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> "ALITCore":
        """Recompute each transformer block in the backward pass instead of storing its activations."""
        for module in self.modules():
            if isinstance(module, ResidualAttentionBlock):
                module.checkpoint_activations = bool(enabled)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ input checks
    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming what is wrong with ``images`` (shape, dtype or range).

        Eager: the range check reads one value (a host sync)."""
        message = image_shape_error(images, self.config)
        if message is None and not torch.compiler.is_compiling() and not bool(images_in_range(images)):
            message = image_range_error(images)
        if message is not None:
            raise ValueError(message)

    def model_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (shape already checked) in the model's float dtype: fp16, bf16 and fp64 images
        are converted, not refused. They must be on the model's device (no silent copies)."""
        weight = self.patch_embed.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device} but the model is on {weight.device}; move one of them")
        return images if images.dtype == weight.dtype else images.to(weight.dtype)

    def assert_images(self, images: torch.Tensor) -> None:
        """``check_images`` without a host sync: the range check is a device-side assertion.

        On a CPU it raises the same ValueError at once; on a GPU an out-of-range batch fails at
        the next synchronisation with a device-side assert."""
        message = image_shape_error(images, self.config)
        if message is not None:
            raise ValueError(message)
        try:
            torch._assert_async(images_in_range(images), "images must have values in [0, 1]")
        except RuntimeError as exc:  # raised at once only where the check ran eagerly (a CPU)
            raise ValueError(image_range_error(images)) from exc

    # ------------------------------------------------------------------ the parts of an iteration
    @torch.no_grad()
    def encode_base(
        self, images: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> BaseOutput:
        """The base tokenizer's output. For the VAE: the posterior and the scaled latents drawn with
        ``generator`` (or ``noise``; the mean if ``base_tokenizer.sample_posterior`` is False)."""
        if not self.config.is_vae:
            z, gt = self.base_tokenizer.encode(images)
            return BaseOutput(z=z, gt_indices=gt)
        mean, std = self.base_tokenizer.posterior(images)
        return BaseOutput(z=self.base_tokenizer.latents(mean, std, generator, noise), mean=mean, std=std)

    def resolve_base(self, base: BaseOutput, generator: torch.Generator | None = None) -> BaseOutput:
        """``base`` with its latents: a VAE posterior given without them (a cache) is sampled here."""
        if base.z is not None:
            return base
        if base.mean is None or base.std is None:
            raise ValueError("a BaseOutput needs z, or (VAE) the posterior mean and std")
        z = self.base_tokenizer.latents(base.mean, base.std, generator)
        return BaseOutput(z=z, gt_indices=base.gt_indices, mean=base.mean, std=base.std)

    def set_latent_sampling(self, sample: bool = True) -> "ALITCore":
        """VAE only: take a posterior sample (the official behaviour) or, with False, its mean."""
        if not self.config.is_vae:
            raise ValueError("set_latent_sampling: only the VAE base tokenizer has a posterior to sample")
        self.base_tokenizer.sample_posterior = bool(sample)
        return self

    def image_tokens(self, images: torch.Tensor, base: BaseOutput) -> torch.Tensor:
        """[VQGAN z | patch embedding] per grid cell, l2-normalized: [B, g*g, W]."""
        feats = torch.cat([base.z.to(images.dtype), self.patch_embed(images)], dim=1)
        return F.normalize(feats.flatten(2).transpose(1, 2), dim=-1)

    def new_latents(self, iteration: int) -> torch.Tensor:
        """The ``tokens_per_iter`` latent tokens appended at ``iteration``: [1, T, W]."""
        return (self.latent_tokens + self.latent_token_positional_embedding + self.timestep_embedding[iteration])[None]

    def initial_state(self, tokens2d: torch.Tensor) -> torch.Tensor:
        """The encoder input of iteration 0: [class | 2D tokens | the first latents], [B, g*g+1+T, W]."""
        B = tokens2d.shape[0]
        cls = self.encoder_class_embedding[None].expand(B, -1, -1)
        image_part = torch.cat([cls, tokens2d], dim=1) + self.encoder_positional_embedding
        x = torch.cat([image_part, self.new_latents(0).expand(B, -1, -1).to(image_part.dtype)], dim=1)
        return self.encoder_ln_pre(x)

    def latent_table(self) -> torch.Tensor:
        """``new_latents`` of every iteration at once: [iterations, T, W] (row t is iteration t's)."""
        params = (self.latent_tokens, self.latent_token_positional_embedding, self.timestep_embedding)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return params[0] + params[1] + params[2]
        return self._latent_table(*params)

    def next_state(self, x_out: torch.Tensor, iteration: int) -> torch.Tensor:
        """Append the latents of ``iteration`` to the encoder output of the previous one."""
        new = self.new_latents(iteration).expand(x_out.shape[0], -1, -1).to(x_out.dtype)
        return self.encoder_ln_recursive(torch.cat([x_out, new], dim=1))

    def run_encoder(self, x: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """The encoder's output rows ``keep`` (all when None) for its input ``x`` [B, L, W]."""
        return self.encoder(x, keep=keep)

    def quantize_latents(self, latents: torch.Tensor) -> QuantizedLatents:
        z = self.pre_quantizer_mlp(self.encoder_ln_post(latents))
        if self.quantize is None:
            # continuous tokens: the projection goes to the decoder as it is (not normalized)
            return QuantizedLatents(z=z, z_q=z, indices=None, loss=z.new_zeros((), dtype=torch.float32))
        return self.quantize(z)

    def token_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the decoder reads for stored 1D tokens: the normalized codes of ids [B, n], or
        continuous vectors [B, n, d] as they are (in the model's dtype)."""
        if self.quantize is None:
            return tokens.to(self.pre_quantizer_mlp.weight.dtype)
        return self.quantize.codes(tokens)

    def decoder_queries(self) -> torch.Tensor:
        """The masked 2D tokens the decoder fills in; the same for every image: [1, g*g+1, W]."""
        params = (self.decoder_class_embedding, self.decoder_mask_token, self.decoder_positional_embedding)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return _masked_queries(*params)
        return self._queries(*params)

    def decoder_plan(self, counts: "list[int]") -> DecoderPlan:
        """The host-built indices of a packed decode of images with ``counts`` tokens (one copy to the device)."""
        if not counts or min(counts) < 1 or max(counts) > self.config.max_tokens:
            raise ValueError(f"packed decode: token counts must lie in [1, {self.config.max_tokens}], got {list(counts)}")
        return DecoderPlan.build(list(counts), self.config.grid_size**2 + 1, self.latent_tokens.device)

    def decode_logits_packed(self, z_q: torch.Tensor, counts: "list[int] | DecoderPlan") -> torch.Tensor:
        """``decode_logits`` for images of different token counts, packed: z_q [sum(counts), d]
        (image j's ``counts[j]`` latents after those of the images before it) -> [len(counts),
        g*g, K_base]. No padding in the per-token layers (see ``LatentDecoder.forward_packed``).
        Given a ``decoder_plan`` instead of the counts it runs no host code: what torch.compile traces."""
        plan = counts if isinstance(counts, DecoderPlan) else self.decoder_plan(counts)
        return self.decoder.forward_packed(self.decoder_queries(), z_q, plan)

    def decode_logits(self, z_q: torch.Tensor, latent_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Quantized latents [B, n, d] -> logits over the VQGAN codebook [B, g*g, K_base].

        ``latent_lengths`` (int [B], values in [0, n], checked by the caller) marks how many of
        the n latents each image really has; the rest are padding that no query attends to.
        """
        n = z_q.shape[1]
        if n > self.config.max_tokens:
            raise ValueError(f"at most {self.config.max_tokens} latent tokens can be decoded, got {n}")
        return self.decoder(self.decoder_queries(), z_q, latent_lengths)

    def reconstruct(self, outputs: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (not clamped) from the decoder's outputs: the VQGAN decode of the
        soft code, or the VAE decode of the predicted latents (``base_tokenizer.unscale_decode``
        False, the default: without undoing the 0.2325 scale, as the official code does)."""
        if self.config.is_vae:
            return self.base_tokenizer.decode_latents(outputs)
        return self.base_tokenizer.decode_latents(self.soft_code(outputs))

    def soft_code(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected VQGAN code embedding under the predicted distribution: [B, g*g, C]."""
        # detached as in the official code: no gradient reaches the VQGAN codebook, even when unfrozen
        codebook = self.base_tokenizer.codebook.detach()
        return logits.float().softmax(-1).to(codebook.dtype) @ codebook

    def halting_mask(
        self, logits: torch.Tensor, gt_indices: torch.Tensor, mode: str, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Which grid cells are already reconstructed well enough to be masked out: bool [B, g*g].

        VAE variant (``logits``: predicted latents, ``gt_indices``: target latents): a cell is done
        when the mean |error| over its channels is below the threshold ("threshold"). "official"
        reproduces the official code, whose mask is written into a copy and so never masks: all
        False, which still puts the mask token in the graph with weight 0 (a zero gradient, not
        None, as there)."""
        self.check_halting(mode)
        if mode == "off":
            return None
        if self.config.is_vae:
            if mode == "official":
                return torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
            error = (logits.detach().float() - gt_indices.float()).abs().mean(-1)  # "threshold"
            return error < self.config.halting_threshold
        p = logits.detach().float().softmax(-1).gather(-1, gt_indices[..., None]).squeeze(-1)
        confident = p >= self.config.halting_threshold
        if mode == "threshold":
            return confident
        # "stochastic", and "official" (the VQGAN variant's official rule is the stochastic one)
        draw = torch.bernoulli(p, generator=generator).bool() if generator is not None else torch.bernoulli(p).bool()
        return confident & draw

    def check_halting(self, mode: str) -> None:
        """Raise a ValueError for a halting mode that is unknown or that this variant cannot use."""
        if mode not in HALTING_MODES:
            raise ValueError(f"unknown halting mode {mode!r}; expected one of {HALTING_MODES}")
        if mode == "stochastic" and self.config.is_vae:
            raise ValueError(f"halting {mode!r}: the VAE variant halts deterministically; use 'threshold', 'official' or 'off'")

    def apply_halting(self, x_out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return x_out
        G2 = self.config.grid_size**2
        masked = (self.encoder_positional_embedding[1:] + self.encoder_mask_token[0]).to(x_out.dtype)
        image = torch.where(mask[..., None], masked, x_out[:, 1 : G2 + 1])
        return torch.cat([x_out[:, :1], image, x_out[:, G2 + 1 :]], dim=1)

    # ------------------------------------------------------------------ one iteration
    def step(
        self,
        carry: torch.Tensor,
        iteration: int,
        gt_indices: torch.Tensor,
        decode: bool = True,
        halting: str = "off",
        generator: torch.Generator | None = None,
        final: bool = False,
    ) -> tuple[IterationOutput, torch.Tensor | None]:
        """One recurrent iteration. ``carry`` is ``initial_state`` at iteration 0 and, after that,
        what the previous step returned (its encoder output, halted). Returns the iteration's
        outputs and the carry for the next one. ``gt_indices`` is the base's ``target`` (the VAE's
        latents for that variant).

        The decoder runs only when ``decode``; the halting mask needs its logits, so an iteration
        that is not decoded is not halted (as in the official training loop). The mask is drawn at
        the last iteration too, so a random stream advances as the official code's does.

        ``final``: no iteration follows, so no carry is needed (None is returned): the encoder's
        last block then computes the latent rows alone. The outputs are the same.
        """
        G2 = self.config.grid_size**2
        x = carry if iteration == 0 else self.next_state(carry, iteration)
        latent_rows = slice(G2 + 1, None)
        x_out = self.run_encoder(x, keep=latent_rows if final else None)
        latents = x_out if final else x_out[:, latent_rows]
        vq = self.quantize_latents(latents)
        logits = self.decode_logits(vq.z_q) if decode else None
        mask = self.halting_mask(logits, gt_indices, halting, generator) if logits is not None else None
        out = IterationOutput(iteration, latents, vq.indices, logits, gt_indices, vq.loss, vq.z_q)
        return out, None if final else self.apply_halting(x_out, mask)

    def start_carry(
        self, images: torch.Tensor, base: BaseOutput | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, BaseOutput]:
        """The base tokenizer's outputs (computed unless given) and the carry of iteration 0.
        ``generator`` draws the VAE's posterior sample (where one is drawn)."""
        base = self.encode_base(images, generator) if base is None else self.resolve_base(base, generator)
        return self.initial_state(self.image_tokens(images, base)), base

    def _check_loop_args(self, iterations: int, halting: str) -> None:
        self.check_halting(halting)
        if not 1 <= iterations <= self.config.iterations:
            raise ValueError(f"iterations must be in [1, {self.config.iterations}], got {iterations}")

    # ------------------------------------------------------------------ whole rollouts
    def rollout(
        self,
        images: torch.Tensor,
        iterations: int | None = None,
        halting: str = "off",
        generator: torch.Generator | None = None,
        base: BaseOutput | None = None,
    ) -> list[IterationOutput]:
        """Run ``iterations`` recurrent iterations (all by default); one record per iteration.
        ``generator`` (on the images' device) drives stochastic halting, and for the VAE the
        posterior sample. ``base``: the base tokenizer's output for these images, computed unless
        given (e.g. fixed posterior samples). No host sync."""
        iterations = self.config.iterations if iterations is None else iterations
        self._check_loop_args(iterations, halting)
        self.assert_images(images)
        images = self.model_images(images)
        carry, base = self.start_carry(images, base, generator)
        target = base.target
        records = []
        for t in range(iterations):
            rec, carry = self.step(carry, t, target, decode=True, halting=halting, generator=generator, final=t == iterations - 1)
            records.append(rec)
        return records

    def sample_iterations(self, count: int | None, generator: torch.Generator | None = None) -> list[int]:
        """Which iterations take the loss in a step: all, or ``count`` drawn on the host (sorted).

        ``generator`` is a CPU generator (the host stream), so the draw is the same on every device."""
        n = self.config.iterations
        if count is None or count >= n:
            return list(range(n))
        if count < 1:
            raise ValueError(f"sample_grad_iters must be >= 1, got {count}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"the iteration-sampling generator must be a CPU generator, got one on {generator.device}")
        return sorted(torch.randperm(n, generator=generator)[:count].tolist())

    def forward(
        self,
        images: torch.Tensor,
        base: BaseOutput | None = None,
        halting: str = "stochastic",
        sample_grad_iters: int | None = None,
        generator: torch.Generator | None = None,
        halting_generator: torch.Generator | None = None,
        check_images: bool = True,
    ) -> LossOutput:
        """The stage-1 (latent distillation) loss, summed over the iterations it is taken at.

        Per iteration t: weight[t] * NLL(logits, gt codes) + MSE(soft code, gt code embeddings)
        + VQ loss; for the VAE variant weight[t] * MSE(predicted latents, scaled latents) + VQ loss
        (no VQ loss for continuous tokens). For the VAE the device stream (``halting_generator``)
        draws the posterior sample. ``sample_grad_iters=k`` takes it at k random iterations only; the decoder (and
        so the halting) runs at those alone, as in the official training loop, and iterations after
        the last of them are not run (they cannot change the loss).

        Two random streams: ``generator`` (CPU) draws the iterations, ``halting_generator`` (on the
        images' device) the halting masks. Given only ``generator`` on the images' device, it
        drives both. No host sync, forward or backward. ``check_images=False`` leaves the range
        check to the caller (a distributed trainer folds it into a flag every rank reads, so one
        rank's bad batch cannot stop it alone while the others wait).
        """
        cfg = self.config
        if halting_generator is None and generator is not None and generator.device == images.device:
            halting_generator = generator
        host_generator = generator if generator is None or generator.device.type == "cpu" else None
        self._check_loop_args(cfg.iterations, halting)
        if check_images:
            self.assert_images(images)
        elif (message := image_shape_error(images, cfg)) is not None:
            raise ValueError(message)
        images = self.model_images(images)
        selected = self.sample_iterations(sample_grad_iters, host_generator)
        carry, base = self.start_carry(images, base, halting_generator)
        target = base.target
        if not cfg.is_vae:
            codebook = self.base_tokenizer.codebook.detach()
            gt_code = codebook[base.gt_indices].float()
        out = LossOutput(loss=torch.zeros((), device=images.device))
        total = torch.zeros((), device=images.device, dtype=torch.float32)
        for t in range(selected[-1] + 1):
            taken = t in selected
            rec, carry = self.step(carry, t, target, decode=taken, halting=halting, generator=halting_generator,
                                   final=t == selected[-1])
            if not taken:
                continue
            if cfg.is_vae:
                # the weight is on the code (MSE) term here; there is no NLL
                nll = F.mse_loss(rec.logits.float(), target.float())
                term = cfg.iteration_weights[t] * nll + rec.vq_loss
            else:
                logits = rec.logits.float()
                nll = F.cross_entropy(logits.flatten(0, 1), rec.gt_indices.flatten())
                code_mse = F.mse_loss(self.soft_code(logits).float(), gt_code)
                term = cfg.iteration_weights[t] * nll + code_mse + rec.vq_loss
            total = total + term
            out.per_iteration[t] = term.detach()
            out.nll[t] = nll.detach()
        out.loss = total
        return out
