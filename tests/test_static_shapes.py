"""Fixed-shape inference: finished images stay in the batch behind a mask, so each iteration's
shapes depend on the iteration index alone; a compiled step compiles once per iteration index
and never again, whichever images stop where. Results equal the compacting mode's."""
from __future__ import annotations

import pytest
import torch

from alit_fast import ALIT
from alit_fast.inference import FunctionCriterion, compile_step
from alit_fast.testing import random_images, tiny_config
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ALIT(tiny_config(halting_threshold=0.02)).eval()


def stop_pattern(shift: int) -> FunctionCriterion:
    """Image i may stop after iteration (i + shift) % 3: a spread of lengths a random model cannot give."""
    return FunctionCriterion(lambda view: (view.rows + shift) % 3 <= view.iteration, needs_logits=False)


def _same_tokens(a, b) -> None:
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("halting", ["off", "threshold"])
def test_static_shapes_encode_equals_the_compacting_encode(model, halting):
    images = random_images(6, 32, seed=4)
    for criterion in (stop_pattern(0), "code-acc:0.99", "pixel-l1:0.3"):
        compacting = model.encode(images, criterion, halting=halting)
        static = model.encode(images, criterion, halting=halting, static_shapes=True)
        _same_tokens(compacting, static)
        if criterion is not None and not isinstance(criterion, str):
            assert compacting.lengths.tolist() == [4, 8, 12, 4, 8, 12]  # images did stop apart
    best = model.encode(images, "code-nll:0.01", fallback="best", static_shapes=True)
    _same_tokens(best, model.encode(images, "code-nll:0.01", fallback="best"))


def test_static_shapes_keep_the_batch_whole(model):
    images = random_images(4, 32, seed=5)
    state = model.start(images, static_shapes=True)
    first = state.step()
    state.finish([True, False, False, True])
    second = state.step()
    assert first.latents.shape[0] == second.latents.shape[0] == 4
    assert state.iterations.tolist() == [1, 2, 2, 1]
    compacting = model.start(images)
    compacting.step()
    compacting.finish([True, False, False, True])
    assert compacting.step().latents.shape[0] == 2
    assert torch.equal(compacting.indices, state.indices)


def test_compiled_step_compiles_once_per_iteration_and_never_again(model):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    step_fn = compile_step(model, backend="eager")
    images = random_images(6, 32, seed=6)
    first = model.encode(images, stop_pattern(0), step_fn=step_fn)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == model.config.iterations  # one per iteration index
    for shift in (1, 2):
        other = model.encode(images.flip(0), stop_pattern(shift), step_fn=step_fn)
        _same_tokens(other, model.encode(images.flip(0), stop_pattern(shift)))
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"], dict(counters["recompiles"])
    _same_tokens(first, model.encode(images, stop_pattern(0)))
    assert compile_step(model, backend="eager") is step_fn  # made once per model
