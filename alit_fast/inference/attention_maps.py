"""What each 1D token holds: the decoder's attention from the grid cells to each latent token.

The attention ops never form the probability matrix (the fused kernels stream it), so it is
recomputed here from each decoder block's own input with forward hooks: its LayerNorm, the same in-projection,
softmax(q k^T / sqrt(d)) with padded keys masked out, averaged over heads (what
nn.MultiheadAttention returns with need_weights). Model code is untouched and runs as usual.

The official notebook reads key column 256 + j for token j, which on a 16x16 grid is one column
early (the decoder sequence is [class | 256 masked cells | latents], so latent j is key 257 + j);
here token j is key ``grid_size**2 + 1 + j``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from ..models import ALITCore


def head_averaged_attention(attn: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention probabilities of one PackedAttention on its input ``x`` [B, L, W],
    averaged over heads: [B, L, L] (rows are queries). Keys at or past ``lengths`` get 0."""
    B, L, W = x.shape
    heads = attn.heads
    qkv = F.linear(x.float(), attn.in_proj_weight.float(), attn.in_proj_bias.float()).view(B, L, 3, heads, W // heads)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * (W // heads) ** -0.5
    if lengths is not None:
        keep = torch.arange(L, device=x.device)[None, :] < lengths.to(x.device).long()[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)


@contextmanager
def record_decoder_attention(model: ALITCore) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every decoder layer's head-averaged attention [B, L, L] is appended to
    the yielded list, layer by layer, for every decode the model runs."""
    records: list[torch.Tensor] = []

    def hook(block, args, output):
        # a block's input x: its attention reads ln_1(x) (also when handed x's projection)
        x = args[0]
        lengths = args[1] if len(args) > 1 else None
        with torch.no_grad():
            records.append(head_averaged_attention(block.attn, block.ln_1(x), lengths).cpu())

    handles = [block.register_forward_hook(hook) for block in model.decoder.transformer]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def token_attention_maps(
    model: ALITCore, z_q: torch.Tensor, first: int | None = None, layers: str | int = "mean"
) -> torch.Tensor:
    """Per image and latent token j < ``first``: the attention of the g*g grid-cell queries to
    token j, [B, first, g, g]. ``layers``: "mean" over all decoder layers, or one layer index (the
    official notebook shows layer 6 of 8)."""
    cfg = model.config
    G2, n = cfg.grid_size**2, z_q.shape[1]
    first = n if first is None else first
    if not 1 <= first <= n:
        raise ValueError(f"first must be in [1, {n}] (the tokens decoded), got {first}")
    depth = len(model.decoder.transformer)
    if layers != "mean" and not (isinstance(layers, int) and -depth <= layers < depth):
        raise ValueError(f"layers must be 'mean' or a decoder layer index in [{-depth}, {depth}), got {layers!r}")
    with record_decoder_attention(model) as records:
        model.decode_logits(z_q)
    stack = torch.stack(records)  # [layers, B, L, L]
    probs = stack.mean(0) if layers == "mean" else stack[layers]
    maps = probs[:, 1 : G2 + 1, G2 + 1 : G2 + 1 + first]  # grid-cell queries -> latent keys
    return maps.transpose(1, 2).reshape(z_q.shape[0], first, cfg.grid_size, cfg.grid_size)
