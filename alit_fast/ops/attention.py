"""Joint (non-causal) multi-head attention over [class + 2D tokens | 1D latents].

Layout everywhere: q, k, v and the output are [B, L, H, D]; ``lengths`` (int32 [B] or None)
gives each sample's number of valid tokens. Tokens past a sample's length neither attend nor are
attended to, and their outputs are exactly 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"attention expects q, k, v of shape [B, L, H, D], got q {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"attention expects q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lengths is not None:
        if lengths.shape != (q.shape[0],) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"lengths must be an int32 tensor of shape [{q.shape[0]}], got {lengths.dtype} {tuple(lengths.shape)}"
            )


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch backend: scaled_dot_product_attention with a key mask for mixed lengths."""
    _check_inputs(q, k, v, lengths)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if lengths is None:
        out = F.scaled_dot_product_attention(qt, kt, vt)
        return out.transpose(1, 2)
    L = q.shape[1]
    pos = torch.arange(L, device=q.device)
    valid = pos[None, :] < lengths.to(q.device)[:, None]  # [B, L]
    # a query past its sample's length still needs one visible key, or softmax yields NaN;
    # its output is zeroed below anyway
    key_mask = valid[:, None, None, :] | ~valid[:, None, :, None]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=key_mask)
    out = out.transpose(1, 2)
    return out * valid[:, :, None, None].to(out.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head; returns [B, L, H, D]."""
    if backend == "torch":
        return attention_reference(q, k, v, lengths)
    if backend == "triton":
        raise NotImplementedError("the triton attention backend is not built yet")
    raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
