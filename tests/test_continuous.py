"""Continuous 1D tokens (quantize_latent=False) on both base tokenizers, the VAE variant through
encode / decode / criteria / the CLI, and every official layout through load_official."""
import numpy as np
import pytest
import torch
from PIL import Image

from alit_fast import ALIT, load_official
from alit_fast.cli.decode import main as decode_main
from alit_fast.cli.encode import main as encode_main
from alit_fast.inference import TokenBatch, decode_logits
from alit_fast.models import BaseOutput
from alit_fast.testing import count_syncs, random_images, tiny_config, tiny_vae_config
from tests._single_thread import one_thread  # noqa: F401

LAYOUTS = {
    "vqgan-quantized": tiny_config(),
    "vqgan-continuous": tiny_config(quantize_latent=False),
    "vae-quantized": tiny_vae_config(),
    "vae-continuous": tiny_vae_config(quantize_latent=False),
}


def _model(name: str, seed: int = 0) -> ALIT:
    torch.manual_seed(seed)
    return ALIT(LAYOUTS[name]).eval()


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in LAYOUTS}


def _fixed_base(model, images):
    """The base output with a fixed posterior sample for the VAE (so runs can be compared)."""
    return model.encode_base(images, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_loads_through_load_official(models, name):
    model = models[name]
    state = dict(model.state_dict())
    # a stage-2 file also holds the discriminators and LPIPS: ignored for inference
    state["gan_losses.0.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["gan_losses.3.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    loaded = load_official({"model": {}, "ema": state}, num_heads=2).eval()
    assert loaded.config == model.config
    assert type(loaded.base_tokenizer) is type(model.base_tokenizer)
    assert (loaded.quantize is None) == (not model.config.quantize_latent)
    images = random_images(2, 32)
    base = _fixed_base(model, images)
    with torch.no_grad():
        a = model.rollout(images, base=base)
        b = loaded.rollout(images, base=base)
    for x, y in zip(a, b):
        assert torch.equal(x.z_q, y.z_q) and torch.equal(x.logits, y.logits)


def test_continuous_tokens_are_the_unnormalized_projection(models):
    model = models["vqgan-continuous"]
    images = random_images(2, 32, seed=1)
    with torch.no_grad():
        recs = model.rollout(images)
        want = model.pre_quantizer_mlp(model.encoder_ln_post(recs[1].latents))
    assert recs[1].indices is None and torch.equal(recs[1].tokens, recs[1].z_q)
    assert torch.equal(recs[1].z_q, want)
    assert not torch.allclose(want.norm(dim=-1), torch.ones(2, 8))
    assert float(recs[1].vq_loss) == 0.0


@pytest.mark.parametrize("name", ["vqgan-continuous", "vae-continuous"])
def test_encode_gives_the_rollout_vectors_and_decode_its_outputs(models, name):
    model = models[name]
    images = random_images(3, 32, seed=2)
    gen = torch.Generator().manual_seed(0)
    tokens = model.encode(images, "tokens:8", generator=gen)
    assert tokens.continuous and tokens.codes.dtype == torch.float32 and tokens.codes.shape == (3, 8, 12)
    with torch.no_grad():
        rec = model.rollout(images, iterations=2, base=_fixed_base(model, images))[1]
    assert torch.equal(tokens.codes, rec.z_q)
    torch.testing.assert_close(decode_logits(model, tokens), rec.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vqgan-continuous", "vae-continuous", "vae-quantized"])
def test_mixed_lengths_decode_as_each_image_alone(models, name):
    model = models[name]
    images = random_images(3, 32, seed=3)
    base = _fixed_base(model, images)
    with torch.no_grad():
        recs = model.rollout(images, base=base)
    seqs = [recs[i].tokens[i] for i in range(3)]  # image i with 4 * (i + 1) tokens
    tokens = TokenBatch.from_sequences(seqs, model.config.codebook_size, config_json=model.config.to_json())
    assert tokens.lengths.tolist() == [4, 8, 12]
    together = decode_logits(model, tokens)
    pixels = model.decode(tokens)
    for i in range(3):
        alone = TokenBatch.from_sequences([seqs[i]], model.config.codebook_size, config_json=model.config.to_json())
        torch.testing.assert_close(together[i : i + 1], decode_logits(model, alone), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together[i], recs[i].logits[i], rtol=1e-4, atol=1e-5)
        want = model.reconstruct(recs[i].logits[i : i + 1]).clamp(0, 1)
        torch.testing.assert_close(pixels[i : i + 1], want, rtol=0, atol=1e-3)


def test_continuous_batch_round_trips_through_a_file(models, tmp_path):
    model = models["vae-continuous"]
    images = random_images(4, 32, seed=4)
    tokens = model.encode(images, "code-mae:1e9", min_tokens=4, generator=torch.Generator().manual_seed(0))
    tokens.names = [f"img{i}.png" for i in range(4)]
    path = tmp_path / "t.safetensors"
    tokens.save(path)
    back = TokenBatch.load(path)
    assert back.continuous and back.codes.dtype == torch.float32
    assert torch.equal(back.codes, tokens.codes) and torch.equal(back.lengths, tokens.lengths)
    assert back.names == tokens.names and back.config_json == tokens.config_json
    assert torch.equal(model.decode(back), model.decode(tokens))
    # half precision halves the file and says so
    half = tokens.with_dtype(torch.float16)
    half.save(tmp_path / "h.safetensors")
    back16 = TokenBatch.load(tmp_path / "h.safetensors")
    assert back16.codes.dtype == torch.float16 and torch.equal(back16.codes, half.codes)
    assert (tmp_path / "h.safetensors").stat().st_size < path.stat().st_size
    # the checksum catches a changed vector
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        TokenBatch.load(path)


def test_token_kinds_cannot_be_mixed_up(models):
    images = random_images(2, 32, seed=5)
    continuous = models["vqgan-continuous"].encode(images, "tokens:4")
    ids = models["vqgan-quantized"].encode(images, "tokens:4")
    with pytest.raises(ValueError, match="continuous vectors, but this model's 1D tokens are code ids"):
        models["vqgan-quantized"].decode(continuous, check_config=False)
    with pytest.raises(ValueError, match="code ids, but this model's 1D tokens are continuous vectors"):
        models["vqgan-continuous"].decode(ids, check_config=False)
    with pytest.raises(ValueError, match="not mixed with ids"):
        TokenBatch.cat([TokenBatch(b.codes, b.lengths, continuous.codebook_size) for b in (continuous, ids)])
    bad = TokenBatch(continuous.codes.clone(), continuous.lengths, continuous.codebook_size)
    bad.codes[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        models["vqgan-continuous"].decode(bad)


def test_vae_criteria(models):
    model = models["vae-quantized"]
    images = random_images(3, 32, seed=6)
    with pytest.raises(ValueError, match="code-acc:0.5 does not apply to a model on the VAE"):
        model.encode(images, "code-acc:0.5")
    with pytest.raises(ValueError, match="code-mae:0.1 does not apply to a model on the VQGAN"):
        models["vqgan-quantized"].encode(images, "code-mae:0.1")
    base = _fixed_base(model, images)
    with torch.no_grad():
        recs = model.rollout(images, base=base)
    errors = torch.stack([(r.logits - r.gt_indices).abs().flatten(1).mean(1) for r in recs], 1)  # [B, iterations]
    threshold = float(errors.median())
    tokens = model.encode(images, f"code-mae:{threshold}", generator=torch.Generator().manual_seed(0))
    met = errors <= threshold
    want = [4 * (int(row.nonzero()[0]) + 1) if row.any() else 12 for row in met]
    assert tokens.lengths.tolist() == want
    pixel = model.encode(images, "pixel-l1:0.99", generator=torch.Generator().manual_seed(0))
    assert pixel.lengths.tolist() == [4, 4, 4]


def test_encode_and_decode_cli_with_continuous_tokens(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "vae.safetensors"
    model = ALIT(tiny_vae_config(quantize_latent=False))
    model.save(str(checkpoint))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    out = tmp_path / "tokens.safetensors"
    assert encode_main([str(folder), "--checkpoint", str(checkpoint), "--criterion", "code-mae:0.5",
                        "--out", str(out), "--quiet"]) == 0
    tokens = TokenBatch.load(out)
    assert tokens.continuous and len(tokens) == 3
    assert decode_main([str(out), "--out", str(tmp_path / "recon"), "--batch-size", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["im0.png", "im1.png", "im2.png"]


@pytest.mark.host_triton
def test_triton_backend_matches_torch_on_the_vae_variant(models):
    # the quantized layout reaches both Triton ops (attention and the nearest code); two iterations
    # keep the interpreter's time down
    model = models["vae-quantized"]
    images = random_images(2, 32, seed=7)
    base = BaseOutput(z=_fixed_base(model, images).z)
    with torch.no_grad():
        ref = model.rollout(images, base=base, iterations=2)
        model.set_backend("triton")
        try:
            got = model.rollout(images, base=base, iterations=2)
        finally:
            model.set_backend("torch")
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.latents, a.latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        if a.indices is not None:
            assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("name", ["vae-continuous", "vae-quantized"])
def test_sync_budget_holds_for_the_vae_and_continuous_tokens(models, name):
    model = models[name]
    images = random_images(3, 32, seed=8)
    gen = torch.Generator().manual_seed(0)
    with count_syncs() as rollout:
        with torch.no_grad():
            model.rollout(images, generator=gen, halting="official")
    with count_syncs() as fixed:
        tokens = model.encode(images, "tokens:8", generator=gen)
    with count_syncs() as scored:
        model.encode(images, "code-mae:0.01", generator=gen)  # never met: judged at iterations 1 and 2
    with count_syncs() as decoded:
        model.decode(tokens)
    assert (rollout.total, fixed.total, scored.total, decoded.total) == (0, 1, 3, 1), (
        dict(rollout), dict(fixed), dict(scored), dict(decoded))


def test_static_shapes_give_the_same_continuous_tokens(models):
    model = models["vqgan-continuous"]
    images = random_images(5, 32, seed=9)

    def every_other(view):  # image i stops after i % 3 + 1 iterations
        return view.rows % 3 < view.iteration + 1

    compact = model.encode(images, every_other)
    static = model.encode(images, every_other, static_shapes=True)
    assert compact.lengths.tolist() == [4, 8, 12, 4, 8]
    assert torch.equal(compact.lengths, static.lengths) and torch.equal(compact.codes, static.codes)
    # start/step by hand: each image's vectors are those of its last iteration
    state = model.start(images)
    state.step()
    state.finish([0, 1])
    state.step()
    seqs = state.sequences()
    assert [s.shape for s in seqs] == [(4, 12)] * 2 + [(8, 12)] * 3
    with torch.no_grad():
        recs = model.rollout(images, iterations=2)
    assert torch.equal(seqs[0], recs[0].z_q[0]) and torch.equal(seqs[4], recs[1].z_q[4])
