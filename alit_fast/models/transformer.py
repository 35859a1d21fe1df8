"""Pre-LayerNorm transformer blocks laid out like the official checkpoints.

The attention keeps nn.MultiheadAttention's parameter layout (``in_proj_weight`` packs q, k, v in
that order) so official weights load as they are, but calls the backend's attention op on views
of the packed projection, with no transposes or copies in between.

Every block also runs on packed tokens: x [N, W] holding sequences of different lengths one after
another, described by an ``ops.VarlenLayout`` passed where ``lengths`` goes. The per-token layers
(LayerNorm, projections, MLP) then do no work for padding; only the attention sees the sequences.

A block can also be asked for some rows only (``keep``): every row still serves as a key and value,
but the output projection, the residual and the MLP run for the kept rows alone. The decoder keeps
only its grid cells in its last block (its latent rows' outputs are never read: about a third of
that block's per-token work at the demo model's typical counts). And a caller whose sequences
share rows can hand the first block their projection, computed once (``first_qkv``): the decoder's
masked queries, the same for every image, are two thirds of its rows.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..ops import VarlenLayout, attention, attention_varlen


Rows = "slice | torch.Tensor"


def select_rows(x: torch.Tensor, keep: "Rows | None", packed: bool) -> torch.Tensor:
    """The rows ``keep`` of [B, L, ...] (a slice of the sequence dim) or of packed [N, ...] (an
    index tensor over dim 0); all of ``x`` when None."""
    if keep is None:
        return x
    if packed:
        return x.index_select(0, keep)
    return x[:, keep]


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
        if self.backend == "official" and lengths is None:
            return self._official_forward(x)
        return self.attend(self.project(x), lengths)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The packed q/k/v projection of each row: [..., W] -> [..., 3W]."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def attend(
        self, qkv: torch.Tensor, lengths: "torch.Tensor | VarlenLayout | None" = None, keep: "Rows | None" = None
    ) -> torch.Tensor:
        """Attention and the output projection from projected rows ([B, L, 3W], or packed [N, 3W]
        with a ``VarlenLayout``)."""
        W = qkv.shape[-1] // 3
        if isinstance(lengths, VarlenLayout):
            N = qkv.shape[0]
            out = attention_varlen(qkv.view(N, 3, self.heads, W // self.heads), lengths, backend=self.backend, validate=False)
            out = select_rows(out, keep, packed=True)
            return self.out_proj(out.reshape(out.shape[0], W))
        B, L = qkv.shape[:2]
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).unbind(2)
        # lengths are checked once per batch by the model, not at every layer
        out = select_rows(attention(q, k, v, lengths, backend=self.backend, validate=False), keep, packed=False)
        return self.out_proj(out.reshape(B, out.shape[1], W))

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

    def forward(
        self,
        x: torch.Tensor,
        lengths: "torch.Tensor | VarlenLayout | None" = None,
        keep: "Rows | None" = None,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``keep``: only these rows come out (see ``select_rows``); all of ``x`` is attended to.
        ``qkv``: ``project(x)``, when the caller has it (computed once for rows shared by many sequences)."""
        packed = isinstance(lengths, VarlenLayout)
        if self.attn.backend == "official" and lengths is None:
            # the official code computes every row of every sequence and slices afterwards: its
            # baseline's costs stay its own
            x = x + self.attn(self.ln_1(x))
            return select_rows(x + self.mlp(self.ln_2(x)), keep, packed)
        h = self.attn.attend(self.project(x) if qkv is None else qkv, lengths, keep)
        x = select_rows(x, keep, packed) + h
        return x + self.mlp(self.ln_2(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """What the attention reads of each row: the q/k/v projection of its LayerNorm, [..., 3W]."""
        return self.attn.project(self.ln_1(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(
        self, x: torch.Tensor, lengths: "torch.Tensor | VarlenLayout | None" = None, keep: "Rows | None" = None
    ) -> torch.Tensor:
        return run_blocks(self.transformer, x, lengths, keep)


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    lengths: "torch.Tensor | VarlenLayout | None" = None,
    keep: "Rows | None" = None,
    first_qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``blocks`` in order (to [B, L, W], or packed [N, W] with a ``VarlenLayout``); the last
    returns only the rows ``keep`` (all when None); ``first_qkv``: the first block's ``project(x)``,
    when the caller has it. Blocks flagged ``checkpoint_activations`` keep
    only their input for the backward pass and recompute the rest: 8 iterations x all layers of
    activations are what fills memory in training, and recomputing a block costs about a third of
    its forward+backward."""
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        rows = keep if i == last else None
        qkv = first_qkv if i == 0 else None
        if block.checkpoint_activations and torch.is_grad_enabled() and x.requires_grad:
            x = torch.utils.checkpoint.checkpoint(block, x, lengths, rows, qkv, use_reentrant=False)
        else:
            x = block(x, lengths, rows, qkv)
    return x
