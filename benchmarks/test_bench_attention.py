"""Attention: the Triton kernel against each SDPA backend (forced alone) and eager math, at ALIT's
sequence lengths, uniform and mixed (padded batch + key mask for SDPA), forward and forward+backward.
"""
from __future__ import annotations

import pytest

from benchmarks.cases import ATTENTION_PROVIDERS, Sizes, attention_case, attention_shapes, default_device, probe

SHAPES = attention_shapes(Sizes.for_device(default_device()))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_attention(run_case, device, sizes, shape, provider, backward):
    case = attention_case(provider, shape, sizes, device, backward)
    if provider.startswith("sdpa-"):
        # SDPA refuses some backends outright (no kernel for this device, dtype or a mask)
        reason = probe(case)
        if reason is not None:
            pytest.skip(f"{provider} cannot run {shape.label}: {reason}")
    passes = "fwd+bwd" if backward else "fwd"
    run_case(case, f"attention {shape.label} {passes}", kernel=True, provider=provider, case=shape.label, passes=passes)
