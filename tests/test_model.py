import pytest
import torch

from alit_fast import ALIT
from alit_fast.testing import random_images, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ALIT(tiny_config()).eval()


def test_rollout_shapes_per_iteration(model):
    cfg = model.config
    images = random_images(3, cfg.image_size)
    with torch.no_grad():
        records = model.rollout(images)
    assert len(records) == cfg.iterations
    G2, T = cfg.grid_size**2, cfg.tokens_per_iter
    for t, rec in enumerate(records):
        assert rec.iteration == t
        assert rec.latents.shape == (3, T * (t + 1), cfg.width)
        assert rec.indices.shape == (3, T * (t + 1)) and rec.indices.dtype == torch.int64
        assert int(rec.indices.max()) < cfg.codebook_size
        assert rec.logits.shape == (3, G2, cfg.vqgan.codebook_size)
        assert rec.gt_indices.shape == (3, G2)


def test_rollout_with_fewer_iterations_is_a_prefix(model):
    images = random_images(2, model.config.image_size)
    with torch.no_grad():
        full = model.rollout(images)
        short = model.rollout(images, iterations=2)
    assert len(short) == 2
    for a, b in zip(short, full):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.logits, b.logits)


@pytest.mark.parametrize("halting", ["off", "threshold"])
def test_deterministic_halting_modes_repeat_exactly(halting):
    torch.manual_seed(1)
    model = ALIT(tiny_config(halting_threshold=0.01)).eval()
    images = random_images(2, 32)
    with torch.no_grad():
        a = model.rollout(images, halting=halting)
        b = model.rollout(images, halting=halting)
    for x, y in zip(a, b):
        assert torch.equal(x.logits, y.logits) and torch.equal(x.indices, y.indices)


def test_threshold_halting_masks_confident_cells():
    torch.manual_seed(1)
    model = ALIT(tiny_config(halting_threshold=0.0)).eval()  # every cell counts as confident
    images = random_images(2, 32)
    with torch.no_grad():
        off = model.rollout(images, halting="off")
        thr = model.rollout(images, halting="threshold")
    torch.testing.assert_close(off[0].logits, thr[0].logits)  # the first iteration sees no halting
    assert not torch.allclose(off[1].logits, thr[1].logits)
    # masked cells become positional embedding + mask token, so images no longer matter after t=0
    other = random_images(2, 32, seed=7)
    with torch.no_grad():
        thr_other = model.rollout(other, halting="threshold")
    x_a = model.apply_halting(torch.randn(2, 65 + 4, 64), torch.ones(2, 64, dtype=torch.bool))
    expected = model.encoder_positional_embedding[1:] + model.encoder_mask_token[0]
    torch.testing.assert_close(x_a[:, 1:65], expected.expand(2, -1, -1))
    assert not torch.equal(thr[1].latents, thr_other[1].latents)  # latents still carry image content


def test_stochastic_halting_follows_the_generator(model):
    logits = torch.zeros(4, 64, 48)
    gt = torch.randint(0, 48, (4, 64), generator=torch.Generator().manual_seed(0))
    logits.scatter_(2, gt[..., None], 4.5)  # p(gt) ~ 0.66 >= 0.55 everywhere
    masks = [model.halting_mask(logits, gt, "stochastic", torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    assert 0 < masks[0].float().mean() < 1
    low = logits.clone()
    low.scatter_(2, gt[..., None], 0.0)  # p(gt) far below the threshold: never dropped
    assert not model.halting_mask(low, gt, "stochastic", torch.Generator().manual_seed(3)).any()


def test_stochastic_rollout_repeats_with_the_same_seed():
    torch.manual_seed(2)
    model = ALIT(tiny_config(halting_threshold=0.0)).eval()
    images = random_images(2, 32)
    with torch.no_grad():
        a = model.rollout(images, halting="stochastic", generator=torch.Generator().manual_seed(5))
        b = model.rollout(images, halting="stochastic", generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x.logits, y.logits) for x, y in zip(a, b))


def test_loss_is_finite_and_reaches_every_trainable_parameter():
    torch.manual_seed(3)
    # threshold 0 masks every cell after the first iteration, so the mask token is used too
    model = ALIT(tiny_config(halting_threshold=0.0))
    out = model(random_images(2, 32), halting="threshold")
    assert torch.isfinite(out.loss)
    assert sorted(out.per_iteration) == [0, 1, 2]
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("base_tokenizer.") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("base_tokenizer."))


def test_loss_matches_its_definition(model):
    import torch.nn.functional as F

    images = random_images(2, 32)
    with torch.no_grad():
        out = model(images, halting="off")
        recs = model.rollout(images)
        codebook = model.base_tokenizer.codebook
        total = 0.0
        for rec in recs:
            nll = F.cross_entropy(rec.logits.flatten(0, 1), rec.gt_indices.flatten())
            soft = rec.logits.softmax(-1) @ codebook
            total += model.config.iteration_weights[rec.iteration] * nll + F.mse_loss(soft, codebook[rec.gt_indices]) + rec.vq_loss
    torch.testing.assert_close(out.loss, torch.as_tensor(total, dtype=torch.float32))


def test_sample_grad_iters_takes_the_loss_at_k_iterations(model):
    images = random_images(2, 32)
    out = model(images, halting="off", sample_grad_iters=1, generator=torch.Generator().manual_seed(0))
    assert len(out.per_iteration) == 1
    full = model(images, halting="off")
    (t,) = out.per_iteration
    assert float(out.per_iteration[t]) == pytest.approx(float(full.per_iteration[t]), rel=1e-5)


def test_vq_straight_through_and_loss(model):
    z = torch.randn(2, 5, 12, requires_grad=True)
    q = model.quantize(z)
    zn = torch.nn.functional.normalize(z, dim=-1)
    codes = torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1)
    expected_idx = torch.cdist(zn.detach().reshape(-1, 12).double(), codes.double()).argmin(1).view(2, 5)
    assert torch.equal(q.indices, expected_idx)
    torch.testing.assert_close(q.z_q, codes[expected_idx])
    mse = torch.nn.functional.mse_loss(codes[expected_idx], zn)
    torch.testing.assert_close(q.loss, 1.25 * mse)
    q.z_q.sum().backward()  # straight through: d z_q / d zn is the identity
    zn_leaf = z.detach().clone().requires_grad_(True)
    torch.nn.functional.normalize(zn_leaf, dim=-1).sum().backward()
    torch.testing.assert_close(z.grad, zn_leaf.grad)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(2, 3, 16, 16), r"shape \[B, 3, 32, 32\]"),
        (torch.rand(2, 1, 32, 32), r"shape \[B, 3, 32, 32\]"),
        (torch.rand(3, 32, 32), r"shape \[B, 3, 32, 32\]"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "float tensor"),
        (torch.rand(2, 3, 32, 32) * 255, r"values in \[0, 1\]"),
        (torch.full((1, 3, 32, 32), float("nan")), r"values in \[0, 1\]"),
        (torch.rand(2, 3, 32, 32) - 0.5, r"values in \[0, 1\]"),
        (torch.rand(0, 3, 32, 32), "empty"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_images_raise_value_error(model, images, match):
    with pytest.raises(ValueError, match=match):
        model.rollout(images)
    with pytest.raises(ValueError, match=match):
        model(images)


def test_bad_rollout_arguments_raise(model):
    images = random_images(1, 32)
    with pytest.raises(ValueError, match="halting"):
        model.rollout(images, halting="sometimes")
    with pytest.raises(ValueError, match="iterations"):
        model.rollout(images, iterations=4)
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")


def test_sample_grad_iters_decodes_and_halts_only_at_sampled_iterations(model, monkeypatch):
    calls = []
    original = model.decode_logits
    monkeypatch.setattr(model, "decode_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    model(random_images(1, 32), halting="stochastic", sample_grad_iters=2, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2


def test_soft_code_sends_no_gradient_to_the_vqgan_codebook():
    torch.manual_seed(0)
    model = ALIT(tiny_config())
    model.base_tokenizer.requires_grad_(True)  # as in stage 2, where the VQGAN is unfrozen
    logits = torch.randn(1, 64, 48, requires_grad=True)
    model.soft_code(logits).sum().backward()
    assert model.base_tokenizer.codebook.grad is None and logits.grad is not None


def test_patch_embedding_uses_the_official_init():
    torch.manual_seed(0)
    model = ALIT(tiny_config())
    assert float(model.patch_embed.weight.detach().std()) == pytest.approx(0.02, rel=0.15)
    assert not model.patch_embed.bias.any()


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = ALIT(tiny_config())
    images = random_images(2, 32)
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        model(images, halting="off").loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_sample_grad_iters_stops_after_the_last_sampled_iteration(model, monkeypatch):
    calls = []
    original = model.run_encoder
    monkeypatch.setattr(model, "run_encoder", lambda x, keep=None: calls.append(1) or original(x, keep))
    seed = next(s for s in range(100) if torch.randperm(3, generator=torch.Generator().manual_seed(s))[0] == 0)
    gen = torch.Generator().manual_seed(seed)
    expected_last = 0  # a seed whose sampled iteration is the first: the other two must not run
    out = model(random_images(1, 32), halting="off", sample_grad_iters=1, generator=gen)
    assert list(out.per_iteration) == [expected_last]
    assert len(calls) == expected_last + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_other_float_dtypes_are_converted(model, dtype):
    images = random_images(2, 32).to(dtype)
    reference = images.float()
    with torch.no_grad():
        got, want = model.rollout(images, iterations=1), model.rollout(reference, iterations=1)
    assert torch.equal(got[0].indices, want[0].indices)
    assert torch.equal(model.encode(images, "tokens:4").codes, model.encode(reference, "tokens:4").codes)


def test_images_on_another_device_are_refused(model):
    with pytest.raises(ValueError, match="images are on meta but the model is on cpu"):
        model.model_images(torch.empty(1, 3, 32, 32, device="meta"))


def test_encoder_and_decoder_are_called_as_modules(model):
    # forward hooks (and per-module compile, FSDP wrapping) only see a module that is called
    calls = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
               for name, m in (("encoder", model.encoder), ("decoder", model.decoder))]
    try:
        with torch.no_grad():
            model.rollout(random_images(1, model.config.image_size), iterations=2)
    finally:
        for h in handles:
            h.remove()
    assert calls.count("encoder") == 2 and calls.count("decoder") == 2


@pytest.mark.parametrize("entry", ["rollout", "start", "evaluate", "halting_mask"])
def test_every_entry_point_refuses_an_unknown_halting_mode_with_one_message(model, entry):
    from alit_fast.evaluation import evaluate

    images = random_images(1, model.config.image_size)
    calls = {
        "rollout": lambda: model.rollout(images, halting="sometimes"),
        "start": lambda: model.start(images, halting="sometimes"),
        "evaluate": lambda: evaluate(model, images, tokens="all", metrics="l1", halting="sometimes"),
        "halting_mask": lambda: model.halting_mask(torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.int64), "sometimes"),
    }
    with pytest.raises(ValueError, match=r"unknown halting mode 'sometimes'; expected one of \('off'"):
        calls[entry]()
