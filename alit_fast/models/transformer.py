"""Pre-LayerNorm transformer blocks laid out like the official checkpoints.

The attention keeps nn.MultiheadAttention's parameter layout (``in_proj_weight`` packs q, k, v in
that order) so official weights load as they are, but calls the backend's attention op on views
of the packed projection, with no transposes or copies in between.

Every block also runs on packed tokens: x [N, W] holding sequences of different lengths one after
another, described by an ``ops.VarlenLayout`` passed where ``lengths`` goes. The per-token layers
(LayerNorm, projections, MLP) then do no work for padding; only the attention sees the sequences.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..ops import VarlenLayout, attention, attention_varlen


class PackedAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.backend = "auto"
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, lengths: "torch.Tensor | VarlenLayout | None" = None) -> torch.Tensor:
        if isinstance(lengths, VarlenLayout):
            return self._varlen_forward(x, lengths)
        B, L, W = x.shape
        if self.backend == "official" and lengths is None:
            return self._official_forward(x)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, W // self.heads)
        q, k, v = qkv.unbind(2)
        # lengths are checked once per batch by the model, not at every layer
        out = attention(q, k, v, lengths, backend=self.backend, validate=False)
        return self.out_proj(out.reshape(B, L, W))

    def _varlen_forward(self, x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
        N, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(N, 3, self.heads, W // self.heads)
        out = attention_varlen(qkv, layout, backend=self.backend, validate=False)
        return self.out_proj(out.reshape(N, W))

    def _official_forward(self, x: torch.Tensor) -> torch.Tensor:
        # the official blocks call nn.MultiheadAttention on [L, B, W] tensors; same math, its own copies
        out, _ = F.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1),
            embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            in_proj_weight=self.in_proj_weight, in_proj_bias=self.in_proj_bias,
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.out_proj.weight, out_proj_bias=self.out_proj.bias,
            training=self.training, need_weights=False,
        )
        return out.transpose(0, 1)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.checkpoint_activations = False
        hidden = width * mlp_ratio
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=nn.GELU(approximate="none"),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: torch.Tensor, lengths: "torch.Tensor | VarlenLayout | None" = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), lengths)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, lengths: "torch.Tensor | VarlenLayout | None" = None) -> torch.Tensor:
        return run_blocks(self.transformer, x, lengths)


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, lengths: "torch.Tensor | VarlenLayout | None" = None
) -> torch.Tensor:
    """Apply ``blocks`` in order (to [B, L, W], or packed [N, W] with a ``VarlenLayout``). Blocks flagged ``checkpoint_activations`` keep only their input
    for the backward pass and recompute the rest: 8 iterations x all layers of activations are what
    fills memory in training, and recomputing a block costs about a third of its forward+backward."""
    for block in blocks:
        if block.checkpoint_activations and torch.is_grad_enabled() and x.requires_grad:
            x = torch.utils.checkpoint.checkpoint(block, x, lengths, use_reentrant=False)
        else:
            x = block(x, lengths)
    return x
