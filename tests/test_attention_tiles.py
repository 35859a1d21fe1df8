"""The sm_90 tiles of issue 23 under the interpreter, against float64: 128 x 128 forward, 64 x 128
dk/dv (a 128-key resident block), 128 x 128 dq, with the tail rule: a remainder of keys (queries
in dk/dv) above BLOCK_T = 16 runs as one masked full-width tile, one of at most 16 as one 16-wide
tile. Lengths hit both cases and a resident block with <= 16 valid rows; outputs start as NaN."""
from __future__ import annotations

import os

import pytest
import torch

from alit_fast.kernels import attention as kern
from alit_fast.kernels._utils import single_threaded_interpreter
from alit_fast.ops.attention import attention, attention_naive

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="triton attention needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

SM90_TILES = {"fwd": (128, 128, 8, 1), "dkdv": (64, 128, 8, 1), "dq": (128, 128, 8, 1)}


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setattr(kern, "POISON_OUTPUTS", True)
    monkeypatch.setattr(kern, "CONFIG_OVERRIDE", dict(SM90_TILES))
    monkeypatch.setattr(kern, "DQ_MODE", "separate")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with single_threaded_interpreter():
        yield
    torch.set_float32_matmul_precision(saved)


def _rel(a, ref):
    return (a.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


# L = 150: remainder 22 of 128 (> 16: one masked 128-wide tile); lengths 140 (remainder 12: one
# 16-wide tile), 129 (a resident block with one valid row), 23, 150
# tail_full: the sm_90 tail rule (one masked tile); False: sm_80 / sm_89's 16-wide tail tiles
@pytest.mark.parametrize("dtype,tol,tail_full", [(torch.float32, 1e-3, True), (torch.float16, 1e-2, True),
                                                 (torch.float32, 1e-3, False)])
def test_sm90_tiles_and_tails_match_float64(monkeypatch, dtype, tol, tail_full):
    monkeypatch.setattr(kern, "tail_full", lambda cap, ocls: tail_full)
    B, L, H, D = 4, 150, 1, 64
    g = torch.Generator().manual_seed(23)
    qkv = torch.randn(B, L, 3 * H * D, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    q, k, v = qkv.view(B, L, 3, H, D).unbind(2)
    lengths = torch.tensor([150, 140, 129, 23], dtype=torch.int32, device=DEVICE)
    out = attention(q, k, v, lengths, backend="triton")
    grad = torch.randn(B, L, H, D, generator=g).to(dtype).to(DEVICE)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_naive(*ref_in, lengths)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all(), "an element no kernel wrote"
    assert _rel(out, ref) <= tol
    for got, want in zip(dqkv.view(B, L, 3, H, D).unbind(2), ref_grads):
        assert _rel(got, want) <= tol
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-3)])
def test_forward_through_tensor_descriptors_matches_float64(monkeypatch, dtype, tol):
    """The sm_90 forward with its full K / V tiles loaded through tensor descriptors (TMA; the
    interpreter runs tl.make_tensor_descriptor too), from packed in-projection views, with lengths."""
    monkeypatch.setattr(kern, "tail_full", lambda cap, ocls: True)
    calls = []

    def forced(cap, ocls, k, v):
        calls.append(1)
        return True

    monkeypatch.setattr(kern, "use_tma", forced)
    B, L, H, D = 3, 150, 2, 64
    g = torch.Generator().manual_seed(29)
    qkv = torch.randn(B, L, 3 * H * D, generator=g).to(dtype).to(DEVICE)
    q, k, v = qkv.view(B, L, 3, H, D).unbind(2)
    lengths = torch.tensor([150, 140, 23], dtype=torch.int32, device=DEVICE)
    out = attention(q, k, v, lengths, backend="triton")
    ref = attention_naive(q.double(), k.double(), v.double(), lengths)
    assert calls, "the launcher never asked for the descriptor path"
    assert torch.isfinite(out).all(), "an element no kernel wrote"
    assert _rel(out, ref) <= tol
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
