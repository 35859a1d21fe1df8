"""Joint (non-causal) multi-head attention over [class + 2D tokens | 1D latents].

Layout everywhere: q, k, v and the output are [B, L, H, D]; ``lengths`` (int32 [B] or None)
gives each sample's number of valid tokens. Tokens past a sample's length neither attend nor are
attended to, and their outputs are exactly 0.

Backends: ``torch`` (SDPA with a key mask) and ``triton`` (``alit_fast.kernels.attention``, wrapped as
the differentiable custom op ``alit_fast::flash_attention`` so it also works under torch.compile).
``attention_naive`` is an explicit float64 version for tests.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None, validate_values: bool = True
) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise ValueError("attention expects q, k, v to be tensors")
    if q.dim() != 4:
        raise ValueError(f"attention expects q, k, v of shape [B, L, H, D], got q {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"attention expects q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention expects q, k, v on one device, got {q.device}, {k.device}, {v.device}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise ValueError(f"lengths must be an int32 tensor or None, got {type(lengths).__name__}")
        if lengths.shape != (q.shape[0],) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"lengths must be an int32 tensor of shape [{q.shape[0]}], got {lengths.dtype} {tuple(lengths.shape)}"
            )
        # A value check reads the tensor: a graph break under torch.compile and, for lengths on a
        # GPU, a device sync at every attention call. So it runs only for host tensors outside
        # compilation, and not for model code (validate=False), which checks its lengths once per
        # batch; the kernel clamps lengths to [0, L], so an unchecked bad value stays memory-safe.
        if (
            validate_values
            and not torch.compiler.is_compiling()
            and lengths.numel() > 0
            and lengths.device.type == "cpu"
        ):
            L = q.shape[1]
            if bool(((lengths < 0) | (lengths > L)).any()):
                raise ValueError(f"lengths must lie in [0, {L}], got {lengths.tolist()}")


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, validate: bool = True
) -> torch.Tensor:
    """The torch backend: scaled_dot_product_attention with a key mask for mixed lengths."""
    _check_inputs(q, k, v, lengths, validate)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if lengths is None:
        out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        if q.device.type == "cpu":  # the CPU kernel turns a NaN query row into 0s; every other backend keeps NaN
            out = out + q.sum(-1, keepdim=True) * 0
        return out
    L = q.shape[1]
    pos = torch.arange(L, device=q.device)
    valid = pos[None, :] < lengths.to(q.device)[:, None]  # [B, L]
    # a query past its sample's length still needs one visible key, or softmax yields NaN;
    # its output is zeroed below anyway
    key_mask = valid[:, None, None, :] | ~valid[:, None, :, None]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=key_mask)
    out = out.transpose(1, 2)
    return out * valid[:, :, None, None].to(out.dtype)


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 32, 128  # mirrors kernels.attention; kept here so checks need no triton import


def _kernels():
    # imported lazily: importing alit_fast must not need triton, and TRITON_INTERPRET has to be set
    # before the kernels are decorated, which a test may do after importing alit_fast
    from alit_fast.kernels import attention as kernels

    return kernels


def _check_triton_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None, validate_values: bool = True
) -> None:
    _check_inputs(q, k, v, lengths, validate_values)
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the triton attention backend supports fp16, bf16 and fp32, got {q.dtype}")
    D = q.shape[-1]
    if not _MIN_HEAD_DIM <= D <= _MAX_HEAD_DIM:
        raise ValueError(
            f"the triton attention backend supports head_dim {_MIN_HEAD_DIM}..{_MAX_HEAD_DIM}, got {D}"
        )
    if q.shape[0] > 65535:
        raise ValueError(f"the triton attention backend supports batch sizes up to 65535, got {q.shape[0]}")
    if q.device.type == "cpu" and not _is_interpreting():
        raise ValueError(
            "the triton attention backend needs a GPU tensor (or TRITON_INTERPRET=1 for the CPU interpreter); "
            "use backend='torch' on the CPU"
        )


def _is_interpreting() -> bool:
    from alit_fast.kernels._utils import is_interpreting

    return is_interpreting()


@torch.library.custom_op("alit_fast::flash_attention", mutates_args=())
def flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, L, H, D] contiguous, lse fp32 [B, H, L]); lse is saved for the backward."""
    return _kernels().flash_attn_fwd(q, k, v, lengths)


@flash_attention_op.register_fake
def _(q, k, v, lengths):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("alit_fast::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each [B, L, H, D] contiguous; zero for tokens past a sample's length."""
    return _kernels().flash_attn_bwd(grad_out, q, k, v, out, lse, lengths)


@flash_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, lengths):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lengths)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal by-product (marked non-differentiable), so grad_lse is ignored
    q, k, v, out, lse, lengths = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    dq, dk, dv = flash_attention_backward_op(grad_out, q, k, v, out, lse, lengths)
    return dq, dk, dv, None


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("alit_fast::flash_attention_varlen", mutates_args=())
def flash_attention_varlen_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Packed sequences: qkv [N, 3, H, D], int32 offsets [B+1] -> out [N, H, D] (forward only:
    ``attention_varlen`` takes the padded kernels where a gradient is needed)."""
    q, k, v = qkv.unbind(1)
    return _kernels().flash_attn_fwd_varlen(q, k, v, cu_seqlens, max_seqlen)[0]


@flash_attention_varlen_op.register_fake
def _(qkv, cu_seqlens, max_seqlen):
    N, _, H, D = qkv.shape
    return qkv.new_empty((N, H, D))


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, validate: bool = True
) -> torch.Tensor:
    """The triton backend: FlashAttention-2-style kernels, differentiable, torch.compile-friendly.

    q, k, v may be strided views (e.g. of a packed qkv projection); the result is contiguous.
    """
    _check_triton_inputs(q, k, v, lengths, validate)
    if lengths is not None and (lengths.dtype != torch.int32 or lengths.device != q.device):
        lengths = lengths.to(device=q.device, dtype=torch.int32)
    out, _ = flash_attention_op(q, k, v, lengths)
    return out


def attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(D)) v in float64, for tests; masked rows and keys give exact 0."""
    _check_inputs(q, k, v, lengths)
    B, L, H, D = q.shape
    qd, kd, vd = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D)  # [B, H, L, L]
    if lengths is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        valid = torch.arange(L, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    # padded query rows are 0, with a length-0 sample's all -inf (NaN) rows among them; a NaN query
    # row inside a length stays NaN, as in every backend
    p = torch.softmax(s, dim=-1).masked_fill(~valid[:, None, :, None], 0.0)
    out = (p @ vd).transpose(1, 2)
    return torch.where(valid[:, :, None, None], out, 0.0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head; returns [B, L, H, D].

    ``validate=False`` skips the value check of host ``lengths`` (model code checks them once per
    batch, not at every layer).

    Backends: ``auto`` (the fastest of the next two for this shape and GPU, measured once; ``torch``
    on a CPU), ``torch`` (scaled_dot_product_attention), ``triton`` (the fused kernels) and
    ``official`` (the attention matrix materialized in the input dtype, as the official code's
    nn.MultiheadAttention math path does; kept as the baseline the benchmarks compare against).

    fp32 inputs to the triton backend follow ``torch.get_float32_matmul_precision()`` as torch's
    own matmuls do, read once per call:

    * "highest" (torch's default): exact fp32 products on the FMA units, no tensor cores; max
      error / max |reference| of out, dq, dk, dv against float64 measured 0.4-7e-6, tested to 1e-3;
    * "high" / "medium" (the same mode): tf32 tensor cores, operands truncated to 10 mantissa bits
      (as cuBLAS TF32 does; not Triton's 3-pass "tf32x3"); measured 1.6-3.1e-3, tested to 1e-2,
      fp16's bound. Set "highest" where a gradient check or an fp32 reference must match.

    16-bit inputs always use tensor cores (fp32 accumulation); see ``alit_fast.kernels.attention``.
    Pass ``lengths`` as int32 on q's device: anything else is converted here, a copy at every
    call. With that, a call makes no host sync and no host-to-device copy (so a rollout can be
    captured in a CUDA graph once the autotuner has run each shape once).
    """
    if backend == "auto":
        return attention_auto(q, k, v, lengths, validate)
    if backend == "torch":
        return attention_reference(q, k, v, lengths, validate)
    if backend == "triton":
        return attention_triton(q, k, v, lengths, validate)
    if backend == "official":
        return attention_math(q, k, v, lengths, validate)
    raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch', 'triton' or 'official'")


# --------------------------------------------------------------------------------------------
# packed variable-length entry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VarlenLayout:
    """How sequences of different lengths lie packed one after another in a [N, ...] tensor.

    ``lengths`` are host ints (the caller knows them: no sync). On the device, made with one
    host-to-device copy: ``lengths64`` (int64 [B]), ``cu_seqlens`` (int64 [B+1], FlashAttention's
    varlen offsets), and each packed row's sequence and position in a [B, max_len] padded layout
    (``row_seq``, ``row_pos``; ``pad_index`` = row_seq * max_len + row_pos). What only the padded
    path reads (``seq_lengths`` in int32, ``positions``, ``key_mask``, the padded buffer) is made
    on first use and kept."""

    lengths: tuple[int, ...]
    max_len: int
    lengths64: torch.Tensor
    cu_seqlens: torch.Tensor
    row_seq: torch.Tensor
    row_pos: torch.Tensor
    pad_index: torch.Tensor
    scratch: dict = field(default_factory=dict, compare=False, repr=False)

    def _kept(self, name, make):
        if torch.compiler.is_compiling():  # a traced graph stays pure: computed, not kept
            return make()
        if name not in self.scratch:
            self.scratch[name] = make()
        return self.scratch[name]

    @property
    def seq_lengths(self) -> torch.Tensor:
        """int32 [B] on the device (what the attention kernels take)."""
        return self._kept("seq_lengths", lambda: self.lengths64.to(torch.int32))

    @property
    def positions(self) -> torch.Tensor:
        """arange(max_len) on the device (its shape carries max_len into a traced graph)."""
        return self._kept("positions", lambda: torch.arange(self.max_len, device=self.lengths64.device))

    @property
    def key_mask(self) -> torch.Tensor | None:
        """bool [B, 1, 1, max_len], or None when every sequence has the longest length."""
        if min(self.lengths) == self.max_len:
            return None
        return self._kept("key_mask", lambda: (self.positions < self.lengths64[:, None])[:, None, None, :])

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for n in self.lengths:
            out.append(total)
            total += n
        return out

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(length, how many) of each run of consecutive sequences of one length."""
        return equal_runs(self.lengths)

    def padded_rows(self, backend: str, device: torch.device, grad: bool = False) -> int:
        """Attention rows ``attention_varlen`` computes beyond the sequences' own (for statistics)."""
        packed = _varlen_path(backend, device) == "runs" or (backend == "triton" and not grad)
        return 0 if packed else len(self.lengths) * self.max_len - self.total

    @property
    def cu_seqlens32(self) -> torch.Tensor:
        """int32 [B+1] offsets on the device (what the varlen kernel takes)."""
        return self._kept("cu_seqlens32", lambda: self.cu_seqlens.to(torch.int32))

    @classmethod
    def from_lengths(cls, lengths: "list[int] | tuple[int, ...]", device: torch.device | str) -> "VarlenLayout":
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a varlen layout needs at least one sequence, each of length >= 1, got {list(lengths)}")
        B, longest = len(lengths), max(lengths)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        # row j of sequence b sits at b * longest + j once padded
        row_pos = concat_ranges(np.zeros(B, dtype=np.int64), lengths)
        row_seq = np.repeat(np.arange(B, dtype=np.int64), lengths)
        # the offsets first: at storage offset 0 in every layout, so a graph traced with dynamic
        # shapes does not guard on where they sit (a size that can match another by chance)
        cu_seqlens, *moved = to_device(cu, lengths, row_seq, row_pos, row_seq * longest + row_pos, device=device)
        return cls(lengths, longest, moved[0], cu_seqlens, *moved[1:])

    def padded_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A zeroed [B * max_len, *like.shape[1:]] buffer of ``like``'s dtype, made once per layout."""
        key = ("buffer", tuple(like.shape[1:]), like.dtype)
        return self._kept(key, lambda: like.new_zeros((len(self.lengths) * self.max_len, *like.shape[1:])))


def equal_runs(lengths: "list[int] | tuple[int, ...]") -> list[tuple[int, int]]:
    """(length, how many) of each run of consecutive equal lengths."""
    return [(n, len(list(group))) for n, group in itertools.groupby(lengths)]


def concat_ranges(starts, lengths) -> np.ndarray:
    """concatenate([arange(s, s + n) for s, n in zip(starts, lengths)]) as int64, from host ints
    (lists or numpy arrays), without a Python loop. Index tensors of packed layouts are built this
    way, in numpy (no torch op runs for them), and moved to the device with one copy."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = starts - (ends - lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) + np.repeat(shift, lengths)


def to_device(*arrays: "np.ndarray | list[int]", device: torch.device | str) -> list[torch.Tensor]:
    """Host int arrays as int64 tensors on ``device``, moved with one copy and no sync.

    A plain ``.to("cuda")`` of pageable memory is a stream sync in PyTorch (it waits for the copy,
    so for every kernel queued before it); from pinned memory with ``non_blocking`` the copy is
    queued behind them, and PyTorch's pinned-memory allocator keeps the buffer until it is done."""
    parts = [np.asarray(a, dtype=np.int64) for a in arrays]
    host = torch.from_numpy(np.concatenate(parts))
    if torch.device(device).type == "cuda":
        moved = host.pin_memory().to(device, non_blocking=True)
    else:
        moved = host.to(device)
    return list(moved.split([len(p) for p in parts]))


def attention_varlen(
    qkv: torch.Tensor, layout: VarlenLayout, backend: str = "auto", validate: bool = True
) -> torch.Tensor:
    """Attention within each packed sequence: ``qkv`` [N, 3, H, D] (q, k, v of N packed tokens)
    -> [N, H, D]. No token attends across sequences.

    On a CPU (torch backend, or auto): one SDPA call per run of consecutive sequences of one
    length, on views of the packed rows: no padding, no mask, no copies (a caller that orders its
    sequences by length gets one call per distinct length). The triton backend without a gradient
    to keep: the Triton kernel's varlen mode, one launch that reads and writes the packed rows
    (each program finds its sequence from ``cu_seqlens``; nothing padded, nothing copied).
    Otherwise (auto on a GPU, torch on a GPU, a gradient) one padded call with per-sequence key
    lengths: the rows are scattered to [B, max_len] and gathered back (one launch whatever the mix
    of lengths; the Triton kernel skips key tiles past each length, SDPA computes them). The
    per-token work around it (projections, MLP, LayerNorm) stays packed either way."""
    if validate:
        if qkv.dim() != 4 or qkv.shape[1] != 3:
            raise ValueError(f"attention_varlen expects qkv of shape [N, 3, H, D], got {tuple(qkv.shape)}")
        if qkv.shape[0] != layout.total:
            raise ValueError(f"attention_varlen: qkv has {qkv.shape[0]} rows, the layout {layout.total}")
    if _varlen_path(backend, qkv.device) == "runs":
        return _attention_runs(qkv, layout)
    if backend == "triton" and not (torch.is_grad_enabled() and qkv.requires_grad):
        if validate:  # dtype, head dim, device; the sequence count rides where the batch size does
            one = qkv[None, :1, 0].expand(len(layout.lengths), -1, -1, -1)
            _check_triton_inputs(one, one, one, None, validate_values=False)
        return flash_attention_varlen_op(qkv, layout.cu_seqlens32, layout.max_len)
    return _attention_padded(qkv, layout, backend, backend == "torch" or _varlen_path(backend, qkv.device) == "torch")


def _varlen_path(backend: str, device: torch.device) -> str:
    """"runs" (SDPA per run of equal lengths: torch or auto on a CPU), "torch" (SDPA elsewhere) or
    "kernels" (the triton or auto backend's)."""
    on_torch = backend == "torch" or (backend == "auto" and not _auto_active(device))
    if on_torch:
        return "runs" if device.type == "cpu" else "torch"
    return "kernels"


def _attention_padded(qkv: torch.Tensor, layout: VarlenLayout, backend: str, on_torch: bool) -> torch.Tensor:
    N, _, H, D = qkv.shape
    # sizes from tensor shapes, not the host tuple: a traced graph then serves other layouts too
    B, longest = layout.lengths64.shape[0], layout.positions.shape[0]
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        buffer = qkv.new_zeros((B * longest, 3, H, D))
    else:  # in place into the layout's buffer: no autograd graph to keep
        buffer = layout.padded_buffer(qkv)
    q, k, v = buffer.index_copy_(0, layout.pad_index, qkv).view(B, longest, 3, H, D).unbind(2)
    if on_torch:
        # SDPA with the layout's key mask: the padded queries' rows are computed but never read
        # back, so neither a mask per call nor zeroed rows (attention_reference's) are needed
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=layout.key_mask)
        return out[layout.row_seq, :, layout.row_pos]  # [B, H, L, D] -> [N, H, D], one gather
    # equal lengths need no key mask (and then take the same path as an unpacked batch)
    lengths = layout.seq_lengths if layout.key_mask is not None else None
    out = attention(q, k, v, lengths, backend=backend, validate=False)
    return out.reshape(B * longest, H, D).index_select(0, layout.pad_index)


def _attention_runs(qkv: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    if torch.compiler.is_compiling() and not (torch.is_grad_enabled() and qkv.requires_grad):
        # one opaque op reading the offsets (a host tensor: no sync), so that a traced graph does not
        # unroll this layout's runs and serves every layout of its shapes (dynamic=True); forward
        # only: a traced backward keeps the loop (and a graph per layout)
        return attention_runs_op(qkv, layout.cu_seqlens)
    return _runs(qkv, layout.runs)


@torch.library.custom_op("alit_fast::attention_varlen_runs", mutates_args=(), device_types="cpu")
def attention_runs_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``attention_varlen``'s CPU path as one op: qkv [N, 3, H, D], int64 offsets [B+1] on the CPU."""
    return _runs(qkv, equal_runs(cu_seqlens.diff().tolist()))


@attention_runs_op.register_fake
def _(qkv, cu_seqlens):
    N, _, H, D = qkv.shape
    return qkv.new_empty((N, H, D))


def _runs(qkv: torch.Tensor, runs: "list[tuple[int, int]]") -> torch.Tensor:
    N, _, H, D = qkv.shape
    parts, lo = [], 0
    for length, count in runs:
        q, k, v = qkv[lo : lo + count * length].view(count, length, 3, H, D).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        parts.append(out.transpose(1, 2).reshape(count * length, H, D))
        lo += count * length
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    # the CPU kernel turns a NaN query row into 0s; keep the NaN, as attention_reference does
    return out + qkv[:, 0].sum(-1, keepdim=True) * 0


def _auto_active(device: torch.device) -> bool:
    from . import auto

    return auto.active(device)


def attention_varlen_naive(qkv: torch.Tensor, lengths: "list[int]") -> torch.Tensor:
    """The float64 oracle of ``attention_varlen``: one sequence at a time, explicit softmax."""
    parts, lo = [], 0
    for n in lengths:
        q, k, v = (t[None] for t in qkv[lo : lo + n].unbind(1))
        parts.append(attention_naive(q, k, v)[0])
        lo += n
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# auto backend
# --------------------------------------------------------------------------------------------

SDPA_BACKENDS = ("cudnn", "flash", "efficient")  # the SDPA kernels ``auto`` times against Triton's


def _sdpa_call(name: str, q, k, v, lengths, validate: bool, strict: bool = True):
    """attention_reference with SDPA's backend ``name``: alone when ``strict`` (timing: it raises if
    that backend refuses the inputs), else first, with the others and the math kernel behind it (a
    choice that must not fail: the static default, a choice measured at another length)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if strict:
        with sdpa_kernel([order[name]]):
            return attention_reference(q, k, v, lengths, validate)
    ranked = [order[name]] + [b for n, b in order.items() if n != name] + [SDPBackend.MATH]
    with sdpa_kernel(ranked, set_priority=True):
        return attention_reference(q, k, v, lengths, validate)


def auto_static_default(lengths: torch.Tensor | None) -> str:
    """The choice for a key never timed while nothing may be timed (torch.compile tracing, CUDA-graph
    capture): Triton for ragged batches (its kernels skip the padding, SDPA computes it), cuDNN SDPA
    for uniform ones (the fastest SDPA backend on Hopper at ALIT's lengths, FlashAttention-3 paper)."""
    return "triton" if lengths is not None else "sdpa-cudnn"


def auto_key(q: torch.Tensor, lengths: torch.Tensor | None) -> tuple:
    from .auto import device_name, length_bucket

    B, L, H, D = q.shape
    return ("attention", str(q.dtype).replace("torch.", ""), D, length_bucket(L), lengths is not None,
            device_name(q.device))


def _triton_takes(q, k, v, lengths) -> bool:
    try:
        _check_triton_inputs(q, k, v, lengths, validate_values=False)
    except ValueError:
        return False  # a shape the kernels do not take (head dim, batch size): SDPA only
    return True


def _auto_candidates(q, k, v, lengths, validate: bool) -> dict:
    calls = {f"sdpa-{name}": (lambda name=name: _sdpa_call(name, q, k, v, lengths, validate)) for name in SDPA_BACKENDS}
    if not _triton_takes(q, k, v, lengths):
        return calls
    return {"triton": lambda: attention_triton(q, k, v, lengths, validate), **calls}


def attention_auto(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, validate: bool = True
) -> torch.Tensor:
    """The ``auto`` backend: the fastest of the Triton kernels and each SDPA backend that accepts
    the inputs, measured once per key (see ``alit_fast.ops.auto``); ``torch`` on a CPU."""
    from . import auto

    if not auto.active(q.device):
        return attention_reference(q, k, v, lengths, validate)

    triton_ok = _triton_takes(q, k, v, lengths)
    default = auto_static_default(lengths) if triton_ok else "sdpa-cudnn"
    B, L, H, D = q.shape
    local = ("attention", q.dtype, D, auto.length_bucket(L), lengths is not None, auto.device_index(q.device))
    if torch.compiler.is_compiling():
        name = auto.traced_choice(local, default)
    else:
        name = auto.choose(auto_key(q, lengths), lambda: _auto_candidates(q, k, v, lengths, validate), default)
        auto.remember_for_tracing(local, name)
    if name == "triton" and triton_ok:
        return attention_triton(q, k, v, lengths, validate)
    if name.startswith("sdpa-") and name[5:] in SDPA_BACKENDS and not torch.compiler.is_compiling():
        return _sdpa_call(name[5:], q, k, v, lengths, validate, strict=False)
    # an SDPA choice while compiling (SDPA's own dispatcher: no backend context in the graph), or a
    # name from an older cache file
    return attention_reference(q, k, v, lengths, validate)


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, validate: bool = True
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with the [B, H, L, L] matrix materialized, in the input dtype."""
    _check_inputs(q, k, v, lengths, validate)
    B, L, H, D = q.shape
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = (qt * D**-0.5) @ kt.transpose(-1, -2)
    if lengths is not None:
        valid = torch.arange(L, device=q.device)[None, :] < lengths.to(q.device)[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = (p @ vt).transpose(1, 2)
    if lengths is not None:  # padded rows are 0 (a length-0 sample's NaN too); a NaN query row stays NaN
        out = torch.where(valid[:, :, None, None], out, 0.0)
    return out
