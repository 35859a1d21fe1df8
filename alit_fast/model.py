"""ALIT: a recurrent transformer that turns the 2D tokens of a frozen VQGAN into 1D latent tokens,
``tokens_per_iter`` more at every iteration, and a decoder that predicts the VQGAN codes back.

Data flow: images -> base tokenizer (z, gt codes) -> 2D tokens -> rollout
(encoder -> latent quantizer -> decoder -> logits over the VQGAN codebook) -> tokens.
Parameter names follow the official checkpoints so ``load_official`` is a plain state-dict load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ALITConfig, get_config
from .ops import check_backend, vq_nearest
from .transformer import PackedAttention, ResidualAttentionBlock, Transformer, run_blocks
from .vqgan import BaseTokenizer, VQGANQuantizer

if TYPE_CHECKING:  # adaptive inference builds on this module, so its types are imported for hints only
    from .adaptive import RolloutState
    from .criteria import Criterion
    from .tokens import TokenBatch

HALTING_MODES = ("off", "threshold", "stochastic")


@dataclass
class BaseOutput:
    """What the frozen base tokenizer gives for a batch: computed once, reusable across iterations."""

    z: torch.Tensor  # [B, C, g, g] VQGAN encoder output before quantization
    gt_indices: torch.Tensor  # [B, g*g] its code indices, row-major


@dataclass
class QuantizedLatents:
    z: torch.Tensor  # [B, n, d] l2-normalized projected latents
    z_q: torch.Tensor  # [B, n, d] straight-through quantized latents (values of the normalized codes)
    indices: torch.Tensor  # [B, n] int64
    loss: torch.Tensor  # scalar commitment + codebook loss


@dataclass
class IterationOutput:
    iteration: int
    latents: torch.Tensor  # [B, T*(t+1), W] encoder outputs before encoder_ln_post
    indices: torch.Tensor  # [B, T*(t+1)] latent code indices
    logits: torch.Tensor | None  # [B, g*g, K_base]; None where the decoder was skipped
    gt_indices: torch.Tensor  # [B, g*g]
    vq_loss: torch.Tensor
    z_q: torch.Tensor  # [B, T*(t+1), d]


@dataclass
class LossOutput:
    loss: torch.Tensor
    per_iteration: dict[int, float] = field(default_factory=dict)
    nll: dict[int, float] = field(default_factory=dict)


class LatentQuantizer(nn.Module):
    """Cosine-similarity VQ on factorized latents, with a straight-through estimator."""

    def __init__(self, codebook_size: int, dim: int, commitment_cost: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment_cost = commitment_cost
        self.backend = "torch"

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)[indices]

    def forward(self, z: torch.Tensor) -> QuantizedLatents:
        z = F.normalize(z, dim=-1)
        indices, _ = vq_nearest(z.reshape(-1, z.shape[-1]), self.embedding.weight, normalize=True, backend=self.backend)
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
        self.ffn = nn.Sequential(nn.Linear(W, 2 * W), nn.Tanh(), nn.Linear(2 * W, cfg.vqgan.codebook_size))


def _images_error(images: object, cfg: ALITConfig) -> str | None:
    if not isinstance(images, torch.Tensor):
        return f"images must be a torch.Tensor, got {type(images).__name__}"
    size = cfg.image_size
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
        return f"images must have shape [B, 3, {size}, {size}], got {list(images.shape)}"
    if images.shape[0] == 0:
        return "images is an empty batch (B=0)"
    if not images.is_floating_point():
        return f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}"
    if torch.compiler.is_compiling():
        # a value check would break the graph; eager calls have already made it
        return None
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        return f"images must have values in [0, 1], found values in [{lo:.4g}, {hi:.4g}]"
    return None


class ALIT(nn.Module):
    def __init__(self, config: ALITConfig | str = "alit_small", backend: str = "torch") -> None:
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
        self.patch_embed = nn.Conv2d(3, W - cfg.vqgan.z_channels, cfg.patch_size, stride=cfg.patch_size)
        self.quantize = LatentQuantizer(cfg.codebook_size, cfg.latent_dim, cfg.commitment_cost)
        self.base_tokenizer = BaseTokenizer(cfg.vqgan)
        self._init_linear_weights()
        # stage 1 (latent distillation) keeps the VQGAN frozen
        self.base_tokenizer.requires_grad_(False)
        self.backend = "torch"
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
    def set_backend(self, backend: str) -> "ALIT":
        """Route every attention and nearest-code call of the model through ``backend``."""
        check_backend(backend)
        self.backend = backend
        for module in self.modules():
            if isinstance(module, (PackedAttention, LatentQuantizer, VQGANQuantizer)):
                module.backend = backend
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> "ALIT":
        """Recompute each transformer block in the backward pass instead of storing its activations."""
        for module in self.modules():
            if isinstance(module, ResidualAttentionBlock):
                module.checkpoint_activations = bool(enabled)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming what is wrong with ``images`` (shape, dtype or range)."""
        message = _images_error(images, self.config)
        if message is not None:
            raise ValueError(message)

    # ------------------------------------------------------------------ the stages of a rollout
    @torch.no_grad()
    def encode_base(self, images: torch.Tensor) -> BaseOutput:
        z, gt = self.base_tokenizer.encode(images)
        return BaseOutput(z=z, gt_indices=gt)

    def image_tokens(self, images: torch.Tensor, base: BaseOutput) -> torch.Tensor:
        """[VQGAN z | patch embedding] per grid cell, l2-normalized: [B, g*g, W]."""
        feats = torch.cat([base.z.to(images.dtype), self.patch_embed(images)], dim=1)
        return F.normalize(feats.flatten(2).transpose(1, 2), dim=-1)

    def new_latents(self, iteration: int) -> torch.Tensor:
        """The ``tokens_per_iter`` latent tokens appended at ``iteration``: [1, T, W]."""
        return (self.latent_tokens + self.latent_token_positional_embedding + self.timestep_embedding[iteration])[None]

    def initial_state(self, tokens2d: torch.Tensor) -> torch.Tensor:
        B = tokens2d.shape[0]
        cls = self.encoder_class_embedding[None].expand(B, -1, -1)
        image_part = torch.cat([cls, tokens2d], dim=1) + self.encoder_positional_embedding
        x = torch.cat([image_part, self.new_latents(0).expand(B, -1, -1).to(image_part.dtype)], dim=1)
        return self.encoder_ln_pre(x)

    def next_state(self, x_out: torch.Tensor, iteration: int) -> torch.Tensor:
        """Append the latents of ``iteration`` to the encoder output of the previous one."""
        new = self.new_latents(iteration).expand(x_out.shape[0], -1, -1).to(x_out.dtype)
        return self.encoder_ln_recursive(torch.cat([x_out, new], dim=1))

    def run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.run_blocks(x)

    def quantize_latents(self, latents: torch.Tensor) -> QuantizedLatents:
        return self.quantize(self.pre_quantizer_mlp(self.encoder_ln_post(latents)))

    def decoder_queries(self) -> torch.Tensor:
        """The masked 2D tokens the decoder fills in; the same for every image: [1, g*g+1, W]."""
        G2 = self.config.grid_size**2
        masked = torch.cat([self.decoder_class_embedding[None], self.decoder_mask_token.expand(1, G2, -1)], dim=1)
        return masked + self.decoder_positional_embedding

    def decode_logits(self, z_q: torch.Tensor, latent_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Quantized latents [B, n, d] -> logits over the VQGAN codebook [B, g*g, K_base].

        ``latent_lengths`` (int [B]) marks how many of the n latents each image really has;
        the rest are padding that no query attends to.
        """
        dec = self.decoder
        B, n, _ = z_q.shape
        if n > self.config.max_tokens:
            raise ValueError(f"at most {self.config.max_tokens} latent tokens can be decoded, got {n}")
        latents = dec.decoder_embed(z_q) + dec.latent_token_positional_embedding[:n]
        queries = self.decoder_queries().expand(B, -1, -1).to(latents.dtype)
        x = dec.ln_pre(torch.cat([queries, latents], dim=1))
        lengths = None
        if latent_lengths is not None:
            # checked once here rather than in each of the attention calls below (a sync each on a GPU)
            if not torch.compiler.is_compiling() and latent_lengths.numel() and (
                int(latent_lengths.min()) < 0 or int(latent_lengths.max()) > n
            ):
                raise ValueError(f"latent_lengths must lie in [0, {n}], got {latent_lengths.tolist()}")
            lengths = (latent_lengths.to(device=x.device, dtype=torch.int32) + queries.shape[1]).contiguous()
        x = run_blocks(dec.transformer, x, lengths)
        x = dec.ln_post(x[:, 1 : queries.shape[1]])
        return dec.ffn(x)

    def soft_code(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected VQGAN code embedding under the predicted distribution: [B, g*g, C]."""
        # detached as in the official code: no gradient reaches the VQGAN codebook, even when unfrozen
        codebook = self.base_tokenizer.codebook.detach()
        return logits.float().softmax(-1).to(codebook.dtype) @ codebook

    def halting_mask(
        self, logits: torch.Tensor, gt_indices: torch.Tensor, mode: str, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Which grid cells are already reconstructed well enough to be masked out: bool [B, g*g]."""
        if mode == "off":
            return None
        p = logits.detach().float().softmax(-1).gather(-1, gt_indices[..., None]).squeeze(-1)
        confident = p >= self.config.halting_threshold
        if mode == "threshold":
            return confident
        if mode == "stochastic":
            draw = torch.bernoulli(p, generator=generator).bool() if generator is not None else torch.bernoulli(p).bool()
            return confident & draw
        raise ValueError(f"unknown halting mode {mode!r}; expected one of {HALTING_MODES}")

    def apply_halting(self, x_out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return x_out
        G2 = self.config.grid_size**2
        masked = (self.encoder_positional_embedding[1:] + self.encoder_mask_token[0]).to(x_out.dtype)
        image = torch.where(mask[..., None], masked, x_out[:, 1 : G2 + 1])
        return torch.cat([x_out[:, :1], image, x_out[:, G2 + 1 :]], dim=1)

    # ------------------------------------------------------------------ whole rollouts
    def _iterate(
        self,
        images: torch.Tensor,
        base: BaseOutput | None,
        iterations: int,
        halting: str,
        generator: torch.Generator | None,
        decode_at: set[int] | None = None,
        images_checked: bool = False,
    ):
        if halting not in HALTING_MODES:
            raise ValueError(f"unknown halting mode {halting!r}; expected one of {HALTING_MODES}")
        if not 1 <= iterations <= self.config.iterations:
            raise ValueError(f"iterations must be in [1, {self.config.iterations}], got {iterations}")
        if not images_checked:
            self.check_images(images)
        if base is None:
            base = self.encode_base(images)
        G2 = self.config.grid_size**2
        x = self.initial_state(self.image_tokens(images, base))
        for t in range(iterations):
            x_out = self.run_encoder(x)
            latents = x_out[:, G2 + 1 :]
            vq = self.quantize_latents(latents)
            # as in the official training loop, iterations without a loss are neither decoded nor halted
            logits = self.decode_logits(vq.z_q) if decode_at is None or t in decode_at else None
            # drawn at the last iteration too, so the random stream advances as the official code's does
            mask = self.halting_mask(logits, base.gt_indices, halting, generator) if logits is not None else None
            yield IterationOutput(t, latents, vq.indices, logits, base.gt_indices, vq.loss, vq.z_q)
            if t + 1 < iterations:
                x = self.next_state(self.apply_halting(x_out, mask), t + 1)

    def rollout(
        self,
        images: torch.Tensor,
        iterations: int | None = None,
        halting: str = "off",
        generator: torch.Generator | None = None,
    ) -> list[IterationOutput]:
        """Run ``iterations`` recurrent iterations (all by default); one record per iteration."""
        iterations = self.config.iterations if iterations is None else iterations
        return list(self._iterate(images, None, iterations, halting, generator))

    def forward(
        self,
        images: torch.Tensor,
        base: BaseOutput | None = None,
        halting: str = "stochastic",
        sample_grad_iters: int | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The stage-1 (latent distillation) loss, summed over the iterations it is taken at.

        Per iteration t: weight[t] * NLL(logits, gt codes) + MSE(soft code, gt code embeddings)
        + VQ loss. ``sample_grad_iters=k`` takes it at k random iterations only; the decoder (and
        so the halting) runs at those alone, as in the official training loop.
        """
        cfg = self.config
        self.check_images(images)
        if sample_grad_iters is None or sample_grad_iters >= cfg.iterations:
            selected = set(range(cfg.iterations))
        else:
            if sample_grad_iters < 1:
                raise ValueError(f"sample_grad_iters must be >= 1, got {sample_grad_iters}")
            perm = torch.randperm(cfg.iterations, generator=generator)
            selected = set(perm[:sample_grad_iters].tolist())
        codebook = self.base_tokenizer.codebook.detach()
        out = LossOutput(loss=torch.zeros(()))
        total = torch.zeros((), device=images.device, dtype=torch.float32)
        gt_code = None
        for rec in self._iterate(
            # iterations past the last sampled one cannot change the loss: they are not run
            images, base, max(selected) + 1, halting, generator, decode_at=selected, images_checked=True
        ):
            if rec.iteration not in selected:
                continue
            if gt_code is None:
                gt_code = codebook[rec.gt_indices].float()
            logits = rec.logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), rec.gt_indices.flatten())
            code_mse = F.mse_loss(self.soft_code(logits).float(), gt_code)
            term = cfg.iteration_weights[rec.iteration] * nll + code_mse + rec.vq_loss
            total = total + term
            out.per_iteration[rec.iteration] = float(term.detach())
            out.nll[rec.iteration] = float(nll.detach())
        out.loss = total
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Save weights (official key layout) and config to a safetensors file."""
        from .checkpoint import save_model

        save_model(self, path)

    # ------------------------------------------------------------------ adaptive inference (alit_fast.adaptive)
    def start(
        self, images: torch.Tensor, halting: str = "off", generator: torch.Generator | None = None, **kwargs
    ) -> RolloutState:
        """A resumable rollout: ``state.step()`` runs one more iteration for the images still active."""
        from .adaptive import start

        return start(self, images, halting=halting, generator=generator, **kwargs)

    def encode(
        self,
        images: torch.Tensor,
        criterion: str | Criterion | Callable = "code-acc:0.9",
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        **kwargs,
    ) -> TokenBatch:
        """Per-image adaptive-length code ids (a TokenBatch); see alit_fast.adaptive.encode."""
        from .adaptive import encode

        return encode(self, images, criterion, min_tokens=min_tokens, max_tokens=max_tokens, batch_size=batch_size, **kwargs)

    def decode(self, tokens: TokenBatch, batch_size: int | None = None) -> torch.Tensor:
        """Images in [0, 1] from a TokenBatch whose images may have different lengths."""
        from .adaptive import decode

        return decode(self, tokens, batch_size=batch_size)
