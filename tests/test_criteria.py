import math

import pytest
import torch

from alit_fast import ALIT
from alit_fast.inference.criteria import (
    DEFAULT_CRITERION,
    CodeAccuracy,
    CodeNLL,
    FunctionCriterion,
    PixelL1,
    StepView,
    TokenCount,
    criterion_name,
    l1_per_image,
    parse_criterion,
    pixels_from_logits,
)
from alit_fast.testing import random_images, tiny_config, tiny_vae_config
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ALIT(tiny_config()).eval()


def _view(model, logits=None, gt=None, images=None, num_tokens=8, pixels=None):
    n = (logits if logits is not None else gt if gt is not None else images).shape[0]
    return StepView(
        model=model,
        iteration=num_tokens // 4 - 1,
        num_tokens=num_tokens,
        rows=torch.arange(n),
        gt_indices=gt if gt is not None else torch.zeros(n, 64, dtype=torch.int64),
        images=images if images is not None else torch.zeros(n, 3, 32, 32),
        logits=logits,
        _pixels=pixels,
    )


def _logits_with_accuracy(gt, correct_cells, K=48):
    """Logits whose argmax is the true code in the first ``correct_cells[i]`` cells of image i."""
    logits = torch.zeros(*gt.shape, K)
    wrong = (gt + 1) % K
    for i, k in enumerate(correct_cells):
        target = torch.cat([gt[i, :k], wrong[i, k:]])
        logits[i].scatter_(1, target[:, None], 5.0)
    return logits


def test_parse_criterion_strings_objects_and_callables():
    assert parse_criterion("tokens:64") == TokenCount(64)
    assert parse_criterion("code-acc:0.9") == CodeAccuracy(0.9)
    assert parse_criterion("code-nll:1.5") == CodeNLL(1.5)
    assert parse_criterion(" PIXEL-L1 : 0.05") == PixelL1(0.05)
    crit = CodeAccuracy(0.5)
    assert parse_criterion(crit) is crit
    assert isinstance(parse_criterion(lambda view: True), FunctionCriterion)
    for name in ("tokens:64", "code-acc:0.9", "code-nll:1.5", "pixel-l1:0.05"):
        assert criterion_name(parse_criterion(name)) == name
    with pytest.raises(ValueError, match="unknown criterion"):
        parse_criterion("psnr:30")
    with pytest.raises(ValueError, match="not a number"):
        parse_criterion("code-acc:high")
    with pytest.raises(TypeError):
        parse_criterion(0.9)


def test_token_count_needs_no_decoder(model):
    crit = TokenCount(8)
    assert not crit.needs_logits
    gt = torch.zeros(3, 64, dtype=torch.int64)
    assert crit(_view(model, gt=gt, num_tokens=8)).tolist() == [True] * 3
    assert crit(_view(model, gt=gt, num_tokens=4)).tolist() == [False] * 3


def test_code_accuracy_is_the_fraction_of_argmax_hits(model):
    gt = torch.randint(0, 48, (3, 64), generator=torch.Generator().manual_seed(0))
    logits = _logits_with_accuracy(gt, [64, 58, 57])  # 1.0, 0.906, 0.891
    view = _view(model, logits=logits, gt=gt)
    torch.testing.assert_close(CodeAccuracy(0.9).score(view), torch.tensor([1.0, 58 / 64, 57 / 64]))
    assert CodeAccuracy(0.9)(view).tolist() == [True, True, False]
    assert CodeAccuracy(58 / 64)(view).tolist() == [True, True, False]  # >= the threshold


def test_code_nll_is_the_mean_negative_log_likelihood_of_the_true_codes(model):
    K = 48
    gt = torch.randint(0, K, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = torch.zeros(2, 64, K)  # image 0: uniform -> NLL = log K
    logits[1].scatter_(1, gt[1, :, None], 10.0)  # image 1: confident and right
    view = _view(model, logits=logits, gt=gt)
    score = CodeNLL(1.5).score(view)
    assert score[0].item() == pytest.approx(math.log(K), rel=1e-5)
    assert score[1].item() == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + K - 1)), rel=1e-4)
    assert CodeNLL(1.5)(view).tolist() == [False, True]
    assert CodeNLL(math.log(K) + 1e-4)(view).tolist() == [True, True]


def test_pixel_l1_compares_each_image_to_its_reconstruction(model):
    images = torch.full((3, 3, 32, 32), 0.5)
    pixels = images + torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1)
    view = _view(model, logits=torch.zeros(3, 64, 48), images=images, pixels=pixels)
    torch.testing.assert_close(PixelL1(0.05).score(view), torch.tensor([0.01, 0.05, 0.2]))
    assert PixelL1(0.05)(view).tolist() == [True, False, False]  # strictly below, as officially


def test_pixel_l1_decodes_the_soft_code(model):
    images = random_images(2, 32)
    logits = torch.randn(2, 64, 48)
    view = _view(model, logits=logits, images=images)
    with torch.no_grad():
        recon = model.base_tokenizer.decode_latents(model.soft_code(logits)).clamp(0, 1)
    expected = (images - recon).abs().mean((1, 2, 3))
    torch.testing.assert_close(PixelL1(1.0).score(view), expected)


def test_function_criterion_broadcasts_and_checks_its_answer(model):
    gt = torch.zeros(3, 64, dtype=torch.int64)
    view = _view(model, gt=gt)
    assert FunctionCriterion(lambda v: True)(view).tolist() == [True] * 3
    assert FunctionCriterion(lambda v: v.rows == 1)(view).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="2 decisions for 3"):
        FunctionCriterion(lambda v: [True, False])(view)


# ---------------------------------------------------------------------- the length encode picks
def _stop_after(iterations_per_image, log=None):
    """A callable criterion: image i may stop once it has run iterations_per_image[i] iterations."""

    def criterion(view):
        if log is not None:
            log.append((view.iteration, view.rows.tolist(), view.logits is not None))
        need = torch.tensor(iterations_per_image)[view.rows]
        return view.iteration + 1 >= need

    return criterion


def test_encode_stops_each_image_at_its_own_length(model):
    images = random_images(4, 32, seed=5)
    log = []
    tokens = model.encode(images, _stop_after([1, 3, 2, 99], log))
    assert tokens.lengths.tolist() == [4, 12, 8, 12]  # 99: never met -> max_tokens
    # the criterion is asked only while an image may still stop early, for the active rows only
    assert [(it, rows) for it, rows, _ in log] == [(0, [0, 1, 2, 3]), (1, [1, 2, 3])]
    with torch.no_grad():
        full = model.rollout(images)
    for i, n in enumerate(tokens.lengths.tolist()):
        assert torch.equal(tokens[i], full[n // 4 - 1].indices[i])


def test_encode_min_and_max_tokens_round_to_whole_iterations(model):
    images = random_images(3, 32, seed=6)
    assert model.encode(images, _stop_after([1, 1, 1]), min_tokens=5).lengths.tolist() == [8] * 3
    assert model.encode(images, _stop_after([3, 3, 3]), max_tokens=11).lengths.tolist() == [8] * 3
    # a fixed count must be one the model makes: a multiple of 4 up to 12 here
    for bad in ("tokens:5", "tokens:1000"):
        with pytest.raises(ValueError, match="multiples of 4 up to 12"):
            model.encode(images, bad)
    with pytest.raises(ValueError, match="below one iteration"):
        model.encode(images, "tokens:4", max_tokens=3)
    with pytest.raises(ValueError, match="leave no token count"):
        model.encode(images, "tokens:4", min_tokens=9, max_tokens=8)


def test_encode_with_code_and_pixel_criteria_at_the_extremes(model):
    images = random_images(3, 32, seed=7)
    for always in ("code-acc:0", "code-nll:1e9", "pixel-l1:1"):
        assert model.encode(images, always).lengths.tolist() == [4] * 3, always
    for never in ("code-acc:1", "code-nll:0", "pixel-l1:1e-9"):
        assert model.encode(images, never).lengths.tolist() == [12] * 3, never


def test_encode_runs_the_decoder_only_when_a_criterion_needs_it(model, monkeypatch):
    images = random_images(2, 32, seed=8)
    calls = []
    original = model.decode_logits
    monkeypatch.setattr(model, "decode_logits", lambda z_q, *a: calls.append(z_q.shape) or original(z_q, *a))
    model.encode(images, "tokens:8")
    assert calls == []
    model.encode(images, "code-acc:1")  # never met: judged after iterations 1 and 2, not after the last
    assert calls == [(2, 4, 12), (2, 8, 12)]
    calls.clear()
    model.encode(images, "code-acc:1", min_tokens=8)
    assert calls == [(2, 8, 12)]
    calls.clear()
    model.encode(images, "code-acc:0", batch_size=1)  # everything stops at once, one image at a time
    assert calls == [(1, 4, 12), (1, 4, 12)]


class _TableScore(CodeAccuracy):
    """A code-acc criterion whose score per (image, iteration) comes from a table."""

    def __init__(self, table, threshold):
        super().__init__(threshold)
        self.table = torch.tensor(table, dtype=torch.float64)

    def score(self, view):
        return self.table[view.rows, view.iteration]


def test_best_fallback_takes_each_unmet_images_best_scoring_count(model):
    images = random_images(4, 32, seed=9)
    scores = [
        [0.1, 0.9, 0.2],  # meets at 8 tokens: the first count that meets wins, not the best
        [0.3, 0.5, 0.4],  # never meets: its best is 8 tokens
        [0.4, 0.4, 0.1],  # never meets, tie: the earlier count wins (the official argmin's rule)
        [0.1, 0.2, 0.3],  # never meets: best at the last count
    ]
    crit = _TableScore(scores, threshold=0.8)
    assert model.encode(images, crit).lengths.tolist() == [8, 12, 12, 12]
    tokens = model.encode(images, crit, fallback="best")
    assert tokens.lengths.tolist() == [8, 8, 4, 12]
    assert tokens.extra["fallback"] == "best"
    with torch.no_grad():
        full = model.rollout(images)
    for i, n in enumerate(tokens.lengths.tolist()):
        assert torch.equal(tokens[i], full[n // 4 - 1].indices[i])
    # the same per image whatever the batching, and min/max_tokens bound the counts it picks from
    assert model.encode(images, crit, fallback="best", batch_size=3).lengths.tolist() == [8, 8, 4, 12]
    assert model.encode(images, crit, fallback="best", min_tokens=8).lengths.tolist() == [8, 8, 8, 12]
    assert model.encode(images, crit, fallback="best", max_tokens=8).lengths.tolist() == [8, 8, 4, 8]


def test_best_fallback_with_pixel_l1_follows_the_official_rule_per_image(model):
    images = random_images(5, 32, seed=10)
    with torch.no_grad():
        errors = torch.stack(
            [l1_per_image(images, pixels_from_logits(model, rec.logits)) for rec in model.rollout(images)], 1
        )
    threshold = float(errors.median())
    expected = []
    for row in errors.tolist():
        below = [t for t, e in enumerate(row) if e < threshold]
        expected.append(4 * (1 + (below[0] if below else min(range(3), key=row.__getitem__))))
    assert model.encode(images, f"pixel-l1:{threshold}", fallback="best").lengths.tolist() == expected


def test_best_fallback_needs_a_criterion_with_a_score(model):
    images = random_images(2, 32, seed=11)
    with pytest.raises(ValueError, match="needs a criterion with a score"):
        model.encode(images, "tokens:8", fallback="best")
    with pytest.raises(ValueError, match="needs a criterion with a score"):
        model.encode(images, lambda view: True, fallback="best")
    with pytest.raises(ValueError, match="unknown fallback"):
        model.encode(images, "code-acc:0.5", fallback="min")


@pytest.mark.parametrize("spec,message", [
    ("code-acc:1.5", r"code-acc:1.5: the threshold must be a finite number in \[0.0, 1.0\]"),
    ("code-acc:nan", "code-acc:nan: the threshold must be a finite number"),
    ("code-acc:-0.1", "code-acc"),
    ("code-nll:-1", r"code-nll:-1.0: the threshold must be a finite number in \[0.0, inf\)"),
    ("code-nll:inf", "code-nll:inf"),
    ("pixel-l1:-1", r"pixel-l1:-1.0: the threshold must be a finite number in \(0.0, 1.0\]"),
    ("pixel-l1:0", "pixel-l1:0.0"),
    ("pixel-l1:2", "pixel-l1:2.0"),
    ("tokens:0", "tokens:0: the token count must be a whole number >= 1"),
    ("tokens:-8", "tokens:-8"),
    ("tokens:7.5", "'7.5' is not a whole number"),
    ("code-acc:high", "'high' is not a number"),
])
def test_criterion_values_out_of_range_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_criterion(spec)


def test_a_callable_returning_scores_instead_of_bools_is_refused(model):
    images = random_images(2, 32)
    with pytest.raises(ValueError, match="must return bools"):
        model.encode(images, lambda view: torch.full((view.rows.numel(),), 0.3))


@pytest.mark.parametrize("kwargs", [{"min_tokens": 0}, {"max_tokens": -4}, {"min_tokens": 2.5}, {"batch_size": 0},
                                    {"batch_size": -1}])
def test_encode_bounds_and_batch_size_are_checked(model, kwargs):
    with pytest.raises(ValueError, match="must be"):
        model.encode(random_images(2, 32), "tokens:4", **kwargs)


@pytest.mark.parametrize("make_config", [tiny_config, tiny_vae_config], ids=["vqgan", "vae"])
def test_default_criterion_is_the_official_pixel_rule_and_fits_every_base(make_config):
    # a code criterion as the default raised on every VAE-based model
    assert parse_criterion(DEFAULT_CRITERION) == PixelL1(0.07)
    torch.manual_seed(0)
    model = ALIT(make_config()).eval()
    images = random_images(3, model.config.image_size)
    gen = torch.Generator().manual_seed(1)  # the VAE's posterior sample
    default = model.encode(images, generator=gen)
    explicit = model.encode(images, criterion="pixel-l1:0.07", generator=torch.Generator().manual_seed(1))
    assert torch.equal(default.lengths, explicit.lengths)
