"""The Triton attention's varlen mode (``flash_attn_fwd_varlen``, the ``alit_fast::flash_attention_varlen``
op): packed sequences read and written in place from FlashAttention-style offsets, against the
float64 per-sequence oracle. Compiled kernels on a GPU, the interpreter on a CPU (this module never
sets TRITON_INTERPRET: tests/conftest.py does where no GPU is present)."""
from __future__ import annotations

import pytest
import torch

from alit_fast.kernels import attention as kern
from alit_fast.kernels._utils import is_interpreting
from alit_fast.ops import VarlenLayout, attention_varlen
from alit_fast.ops.attention import attention_varlen_naive, flash_attention_varlen_op

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or is_interpreting()),
    reason="triton attention needs a GPU or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
# as tests/test_attention.py: max |error| / max |reference| against float64
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# awkward: one token, one past a tile, ALIT's 65 + 8k, a multiple of 16, two tiles and a bit
LENGTHS = [1, 17, 65, 32, 130, 33]


def _qkv(lengths: list[int], H: int, D: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), 3, H, D, generator=g).to(dtype).to(DEVICE)


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.fixture
def poison(monkeypatch):
    """Every output buffer starts as NaN: an element no program writes shows up."""
    monkeypatch.setattr(kern, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 64), (torch.float16, 40), (torch.bfloat16, 128)])
def test_varlen_forward_matches_the_float64_oracle(poison, dtype, D):
    H = 2
    qkv = _qkv(LENGTHS, H, D, dtype, seed=D)
    out, lse = kern.flash_attn_fwd_varlen(*qkv.unbind(1), _offsets(LENGTHS), max(LENGTHS))
    want = attention_varlen_naive(qkv.double(), LENGTHS)
    assert out.shape == (sum(LENGTHS), H, D) and out.dtype == dtype
    assert _rel_err(out, want) <= TOL[dtype]
    # lse: log-sum-exp of each query's scaled scores over its own sequence's keys
    parts, lo = [], 0
    for n in LENGTHS:
        q, k = qkv[lo : lo + n, 0].double(), qkv[lo : lo + n, 1].double()
        parts.append(torch.einsum("qhd,khd->hqk", q, k).div(D**0.5).logsumexp(-1))
        lo += n
    torch.testing.assert_close(lse.double(), torch.cat(parts, 1), rtol=0, atol=1e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 64, 4, 1), (64, 32, 4, 2)])
def test_varlen_forward_on_other_tiles(poison, monkeypatch, config):
    monkeypatch.setitem(kern.CONFIG_OVERRIDE, "fwd", config)
    lengths = [9, 40, 1, 64, 23]
    qkv = _qkv(lengths, 1, 32, torch.float32, seed=3)
    out, _ = kern.flash_attn_fwd_varlen(*qkv.unbind(1), _offsets(lengths), max(lengths))
    assert _rel_err(out, attention_varlen_naive(qkv.double(), lengths)) <= TOL[torch.float32]


def test_no_sequence_sees_another():
    lengths = [7, 30, 12]
    qkv = _qkv(lengths, 2, 32, torch.float32, seed=5)
    before, _ = kern.flash_attn_fwd_varlen(*qkv.unbind(1), _offsets(lengths), 30)
    qkv[7:37] = float("nan")  # the middle sequence, garbage: its neighbours must not notice
    after, _ = kern.flash_attn_fwd_varlen(*qkv.unbind(1), _offsets(lengths), 30)
    assert torch.equal(after[:7], before[:7]) and torch.equal(after[37:], before[37:])


def test_the_triton_backend_runs_the_varlen_kernel_without_padding(monkeypatch):
    calls = []
    real = kern.flash_attn_fwd_varlen
    monkeypatch.setattr(kern, "flash_attn_fwd_varlen", lambda *a, **k: calls.append(1) or real(*a, **k))
    lengths = [5, 33, 17]
    qkv = _qkv(lengths, 2, 32, torch.float32, seed=7)
    layout = VarlenLayout.from_lengths(lengths, DEVICE)
    with torch.no_grad():
        out = attention_varlen(qkv, layout, backend="triton")
    assert calls == [1] and layout.padded_rows("triton", torch.device(DEVICE)) == 0
    assert _rel_err(out, attention_varlen_naive(qkv.double(), lengths)) <= TOL[torch.float32]


def test_a_gradient_takes_the_padded_kernels_and_matches_the_oracles():
    lengths = [4, 19]
    qkv = _qkv(lengths, 1, 32, torch.float64, seed=9).float().requires_grad_(True)
    layout = VarlenLayout.from_lengths(lengths, DEVICE)
    assert layout.padded_rows("triton", torch.device(DEVICE), grad=True) == 2 * 19 - 23
    attention_varlen(qkv, layout, backend="triton").square().sum().backward()
    ref = qkv.detach().double().requires_grad_(True)
    attention_varlen_naive(ref, lengths).square().sum().backward()
    assert _rel_err(qkv.grad, ref.grad) <= TOL[torch.float32]


def test_varlen_op_traces_whole_under_torch_compile():
    lengths = [3, 21]
    qkv = _qkv(lengths, 2, 32, torch.float32, seed=11)
    cu = _offsets(lengths)

    def fn(x):
        return flash_attention_varlen_op(x * 2.0, cu, 21).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(qkv), fn(qkv), rtol=0, atol=0)


def test_varlen_op_passes_opcheck():
    lengths = [2, 17]
    torch.library.opcheck(flash_attention_varlen_op, (_qkv(lengths, 2, 32, torch.float32, seed=13), _offsets(lengths), 17),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-3)])
def test_varlen_forward_through_tensor_descriptors(monkeypatch, dtype, tol):
    """The sm_90 path: full K / V tiles through a descriptor made at each sequence's first row and
    bounded by its length (the interpreter runs tl.make_tensor_descriptor too)."""
    monkeypatch.setattr(kern, "tail_full", lambda cap, ocls: True)
    calls = []
    monkeypatch.setattr(kern, "use_tma", lambda cap, ocls, k, v: calls.append(1) or True)
    lengths = [150, 23, 64, 81]
    qkv = _qkv(lengths, 2, 64, dtype, seed=17)
    out, _ = kern.flash_attn_fwd_varlen(*qkv.unbind(1), _offsets(lengths), max(lengths))
    assert calls, "the launcher never asked for the descriptor path"
    assert _rel_err(out, attention_varlen_naive(qkv.double(), lengths)) <= tol
