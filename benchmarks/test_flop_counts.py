"""The analytic FLOP counts behind the floors in RESULTS.md and the GPU report, checked against
what torch's FlopCounterMode sees in a real (tiny) rollout."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from alit_fast.testing import random_images, tiny_config
from alit_fast.ops.attention import attention_math
from benchmarks.cases import AttnShape, Sizes, attention_flops, build_model, mixed_lengths, rollout_flops


def test_attention_formula_matches_flop_counter():
    shape = AttnShape(B=2, H=3, D=32, L=77, dtype=torch.float32, mixed=False)
    q, k, v = (torch.randn(2, 77, 3, 32) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        attention_math(q, k, v)  # QK^T and PV as explicit matmuls, which the counter sees
    assert counter.get_total_flops() == attention_flops(shape, None, backward=False)


def _rollout_attention(cfg, batch: int) -> float:
    """The attention FLOPs of a rollout's encoder and decoder blocks, every iteration."""
    return sum(
        2 * cfg.layers * attention_flops(AttnShape(batch, cfg.heads, cfg.head_dim, cfg.num_image_tokens + cfg.tokens_per_iter * (t + 1),
                                                   torch.float32, False), None, backward=False)
        for t in range(cfg.iterations)
    )


def test_rollout_formula_matches_flop_counter():
    cfg = tiny_config(layers=1)
    model = build_model(cfg, torch.device("cpu")).eval()
    images = random_images(2, cfg.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.rollout(images)
    # the counter has no formula for the CPU's fused SDPA kernel: add the attention by hand
    assert counter.get_total_flops() + _rollout_attention(cfg, 2) == rollout_flops(cfg, 2)


def test_mixed_lengths_count_only_valid_tokens():
    sizes = Sizes.gpu()
    shape = AttnShape(B=32, H=8, D=128, L=513, dtype=torch.bfloat16, mixed=True)
    lengths = mixed_lengths(shape, sizes)
    assert int(lengths.max()) == 513 and int(lengths.min()) == 289
    full = attention_flops(AttnShape(32, 8, 128, 513, torch.bfloat16, False), None, False)
    assert full == 4 * 32 * 8 * 513**2 * 128
    assert attention_flops(shape, lengths, False) < full
    assert attention_flops(shape, lengths, True) == 3.5 * attention_flops(shape, lengths, False)


def test_official_rollout_formula_counts_every_row():
    cfg = tiny_config(layers=1)
    model = build_model(cfg, torch.device("cpu")).eval().set_backend("official")
    images = random_images(1, cfg.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.rollout(images)
    # nn.MultiheadAttention's fast path calls the fused SDPA, which the counter does not see
    assert counter.get_total_flops() + _rollout_attention(cfg, 1) == rollout_flops(cfg, 1, official=True)
    assert rollout_flops(cfg, 1, official=True) > rollout_flops(cfg, 1)  # the rows alit_fast skips
