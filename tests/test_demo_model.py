"""The bundled demo model keeps showing the paper's two claims (README > Training)."""
import pytest
import torch

import alit_fast
from alit_fast.cli.demo import DEMO_CRITERION, evaluate_claims
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def demo_model():
    return alit_fast.load_pretrained("demo").eval()


def test_bundled_demo_model_shows_the_papers_claims(demo_model):
    figures = evaluate_claims(demo_model, DEMO_CRITERION)
    assert figures.num_images == 100
    assert figures.spearman >= 0.6, figures.report()
    assert figures.error_falls, figures.report()
    errors = list(figures.error_per_tokens.values())
    assert errors[-1] < errors[0] - 0.01, figures.report()


def test_bundled_demo_model_stops_flat_images_early_and_noise_late(demo_model):
    figures = evaluate_claims(demo_model, DEMO_CRITERION, per_level=4)
    assert figures.tokens_per_level[0] <= 16 and figures.tokens_per_level[4] == demo_model.config.max_tokens
