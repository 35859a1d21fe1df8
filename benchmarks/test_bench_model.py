"""Whole-model cases: one transformer block, one full rollout, adaptive encoding against the
official evaluation procedure, and a training step per backend (eager and torch.compile) against
the official-style reference (backend "official", fp16 autocast, all iterations)."""
from __future__ import annotations

import pytest

from benchmarks.cases import (
    MODEL_BACKENDS,
    TRAIN_VARIANTS,
    block_case,
    build_model,
    encode_case,
    official_encode_case,
    rollout_case,
    train_case,
)


@pytest.fixture(scope="module")
def model(sizes, device):
    return build_model(sizes.model, device)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_block(run_case, sizes, device, backend):
    run_case(block_case(backend, sizes, device), "block fwd+bwd (bf16 autocast)", provider=backend)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_rollout(run_case, model, sizes, device, backend):
    run_case(rollout_case(model, backend, sizes, device), "rollout (bf16 autocast, all iterations)", provider=backend)


@pytest.mark.parametrize("provider", ["triton-bf16", "torch-bf16", "official-b1-fp32"])
def test_adaptive_encode(run_case, model, sizes, device, provider):
    if provider == "official-b1-fp32":
        case = official_encode_case(model, sizes, device)
    else:
        case = encode_case(model, provider.split("-")[0], sizes, device)
    run_case(case, "adaptive encode", provider=provider)


@pytest.mark.parametrize("variant", [v[0] for v in TRAIN_VARIANTS])
def test_train_step(run_case, sizes, device, variant):
    run_case(train_case(variant, sizes, device), "training step", provider=variant)
