"""The VAE variant: the KL-VAE's key layout against the official listing, and float64 parity of the
base tokenizer and of a whole tiny rollout (latents, indices, predicted latents, loss, gradients)
with reference math written here from the official code (github.com/ShivamDuggal4/adaptive-length-tokenizer @ 8c0b4ec:
base_tokenizers/vae_ldm.py, adaptive_tokenizers/adaptive_vae.py), independently of the modules."""
import os

import pytest
import torch
import torch.nn.functional as F

from alit_fast import ALIT
from alit_fast.models import BaseOutput
from alit_fast.testing import random_images, tiny_vae_config
from tests._single_thread import one_thread  # noqa: F401

LISTING = os.path.join(os.path.dirname(__file__), "data", "official_alit_small_vae_alit_keys.txt")


# ---------------------------------------------------------------------------- key layout
def vae_listing(ch: int, mult: tuple, blocks: int, z: int, attn_levels: tuple) -> dict[str, list[int]]:
    """Every base_tokenizer.vae.* key and shape, from the description in the facts (section 3)."""
    keys: dict[str, list[int]] = {}

    def conv(name, o, i, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = [o, i, k, k], [o]

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = [c], [c]

    def res(name, i, o):
        norm(f"{name}.norm1", i), conv(f"{name}.conv1", o, i, 3), norm(f"{name}.norm2", o), conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def mid(name, c):
        res(f"{name}.mid.block_1", c, c), attn(f"{name}.mid.attn_1", c), res(f"{name}.mid.block_2", c, c)

    e, d = "base_tokenizer.vae.encoder", "base_tokenizer.vae.decoder"
    conv(f"{e}.conv_in", ch, 3, 3)
    c = ch
    for lvl, m in enumerate(mult):
        for b in range(blocks):
            res(f"{e}.down.{lvl}.block.{b}", c, ch * m)
            c = ch * m
            if lvl in attn_levels:
                attn(f"{e}.down.{lvl}.attn.{b}", c)
        if lvl != len(mult) - 1:
            conv(f"{e}.down.{lvl}.downsample.conv", c, c, 3)
    mid(e, c)
    norm(f"{e}.norm_out", c), conv(f"{e}.conv_out", 2 * z, c, 3)
    c = ch * mult[-1]
    conv(f"{d}.conv_in", c, z, 3)
    mid(d, c)
    for lvl in reversed(range(len(mult))):
        for b in range(blocks + 1):
            res(f"{d}.up.{lvl}.block.{b}", c, ch * mult[lvl])
            c = ch * mult[lvl]
        if lvl != 0:
            conv(f"{d}.up.{lvl}.upsample.conv", c, c, 3)
    norm(f"{d}.norm_out", c), conv(f"{d}.conv_out", 3, c, 3)
    conv("base_tokenizer.vae.quant_conv", 2 * z, 2 * z, 1)
    conv("base_tokenizer.vae.post_quant_conv", z, z, 1)
    return keys


def official_listing() -> dict[str, list[int]]:
    shapes = {}
    for line in open(LISTING):
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split(" ", 1)
        dims = [int(s) for s in shape.strip()[1:-1].split(",")]
        for layer in range(8) if ".transformer.0." in key else [None]:
            shapes[key if layer is None else key.replace(".transformer.0.", f".transformer.{layer}.")] = dims
    shapes.update(vae_listing(128, (1, 1, 2, 2, 4), 2, 16, attn_levels=(4,)))
    return shapes


def numel(shapes) -> int:
    total = 0
    for s in shapes:
        total += int(torch.tensor(s).prod())
    return total


def test_alit_small_vae_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = ALIT("alit_small_vae")
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = official_listing()
    assert sorted(set(mine) ^ set(official)) == []
    assert [k for k in official if official[k] != mine[k]] == []
    # the counts the facts give for the official model
    vae = {k: s for k, s in mine.items() if k.startswith("base_tokenizer.vae.")}
    assert (len(mine), len(vae)) == (535, 312)
    assert (numel(mine.values()), numel(vae.values())) == (272_107_999, 66_456_019)


def test_continuous_vae_model_has_no_quantizer_keys():
    with torch.device("meta"):
        keys = set(ALIT("alit_small_vae_continuous").state_dict())
    assert keys == set(official_listing()) - {"quantize.embedding.weight"}


def test_tiny_vae_layout_follows_the_same_rules():
    cfg = tiny_vae_config()
    with torch.device("meta"):
        model = ALIT(cfg)
    mine = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith("base_tokenizer.")}
    # attention at the 8x8 level of a 32x32 image: level 2
    assert mine == vae_listing(32, (1, 2, 2), 1, 6, attn_levels=(2,))


# ---------------------------------------------------------------------------- float64 reference math
def _gn(S, h, name):
    return F.group_norm(h, 32, S[f"{name}.weight"], S[f"{name}.bias"], eps=1e-6)


def _conv(S, h, name, stride=1, padding=None):
    w = S[f"{name}.weight"]
    return F.conv2d(h, w, S[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _res(S, h, name):
    r = _conv(S, F.silu(_gn(S, h, f"{name}.norm1")), f"{name}.conv1")
    r = _conv(S, F.silu(_gn(S, r, f"{name}.norm2")), f"{name}.conv2")
    skip = _conv(S, h, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in S else h
    return skip + r


def _attn(S, h, name):
    B, C, H, W = h.shape
    n = _gn(S, h, f"{name}.norm")
    q, k, v = (_conv(S, n, f"{name}.{p}").reshape(B, C, H * W) for p in ("q", "k", "v"))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C**-0.5, dim=2)  # rows: queries
    out = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return h + _conv(S, out, f"{name}.proj_out")


def _levels(S, prefix):
    return sorted({int(k[len(prefix):].split(".")[0]) for k in S if k.startswith(prefix)})


def ref_posterior(S, x):
    """(mean, std) of the KL-VAE posterior; S: base_tokenizer.vae.* in float64."""
    e = "encoder"
    h = _conv(S, x, f"{e}.conv_in")
    levels = _levels(S, f"{e}.down.")
    for lvl in levels:
        blocks = _levels(S, f"{e}.down.{lvl}.block.")
        for b in blocks:
            h = _res(S, h, f"{e}.down.{lvl}.block.{b}")
            if f"{e}.down.{lvl}.attn.{b}.q.weight" in S:
                h = _attn(S, h, f"{e}.down.{lvl}.attn.{b}")
        if lvl != levels[-1]:
            h = _conv(S, F.pad(h, (0, 1, 0, 1)), f"{e}.down.{lvl}.downsample.conv", stride=2, padding=0)
    h = _res(S, _attn(S, _res(S, h, f"{e}.mid.block_1"), f"{e}.mid.attn_1"), f"{e}.mid.block_2")
    h = _conv(S, F.silu(_gn(S, h, f"{e}.norm_out")), f"{e}.conv_out")
    moments = _conv(S, h, "quant_conv")
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


def ref_decode(S, z):
    d = "decoder"
    h = _conv(S, _conv(S, z, "post_quant_conv"), f"{d}.conv_in")
    h = _res(S, _attn(S, _res(S, h, f"{d}.mid.block_1"), f"{d}.mid.attn_1"), f"{d}.mid.block_2")
    for lvl in reversed(_levels(S, f"{d}.up.")):
        for b in _levels(S, f"{d}.up.{lvl}.block."):
            h = _res(S, h, f"{d}.up.{lvl}.block.{b}")
        if lvl != 0:
            h = _conv(S, F.interpolate(h, scale_factor=2.0, mode="nearest"), f"{d}.up.{lvl}.upsample.conv")
    return _conv(S, F.silu(_gn(S, h, f"{d}.norm_out")), f"{d}.conv_out")


def _ln(P, x, name):
    return F.layer_norm(x, x.shape[-1:], P[f"{name}.weight"], P[f"{name}.bias"], eps=1e-5)


def _lin(P, x, name):
    return x @ P[f"{name}.weight"].T + P[f"{name}.bias"]


def _block(P, x, name, heads):
    B, L, W = x.shape
    h = _ln(P, x, f"{name}.ln_1")
    qkv = h @ P[f"{name}.attn.in_proj_weight"].T + P[f"{name}.attn.in_proj_bias"]
    q, k, v = (t.reshape(B, L, heads, W // heads).transpose(1, 2) for t in qkv.split(W, dim=-1))
    a = torch.softmax(q @ k.transpose(-1, -2) / (W // heads) ** 0.5, dim=-1) @ v
    x = x + _lin(P, a.transpose(1, 2).reshape(B, L, W), f"{name}.attn.out_proj")
    h = _ln(P, x, f"{name}.ln_2")
    return x + _lin(P, F.gelu(_lin(P, h, f"{name}.mlp.c_fc")), f"{name}.mlp.c_proj")


def ref_rollout(P, cfg, images, z, halting):
    """Per iteration (latents, indices, predicted latents, loss term), and the summed loss; P: ALIT
    parameters in float64, z: the scaled latents [B, C, g, g]."""
    G2, T = cfg.grid_size**2, cfg.tokens_per_iter
    layers = range(cfg.layers)
    patches = F.conv2d(images, P["patch_embed.weight"], P["patch_embed.bias"], stride=cfg.patch_size)
    tok = torch.cat([z, patches], 1).flatten(2).transpose(1, 2)
    tok = tok / tok.norm(dim=-1, keepdim=True)
    gt = z.flatten(2).transpose(1, 2)
    B = images.shape[0]
    img = torch.cat([P["encoder_class_embedding"].expand(B, 1, -1), tok], 1) + P["encoder_positional_embedding"]

    def new(t):
        return (P["latent_tokens"] + P["latent_token_positional_embedding"] + P["timestep_embedding"][t]).expand(B, -1, -1)

    x = _ln(P, torch.cat([img, new(0)], 1), "encoder_ln_pre")
    queries = torch.cat([P["decoder_class_embedding"][None], P["decoder_mask_token"].expand(1, G2, -1)], 1)
    queries = (queries + P["decoder_positional_embedding"]).expand(B, -1, -1)
    records, total = [], 0.0
    for t in range(cfg.iterations):
        if t:
            x = _ln(P, torch.cat([x, new(t)], 1), "encoder_ln_recursive")
        for l in layers:
            x = _block(P, x, f"encoder.transformer.{l}", cfg.heads)
        lat = x[:, G2 + 1 :]
        zp = _lin(P, _ln(P, lat, "encoder_ln_post"), "pre_quantizer_mlp")
        idx = None
        vq = 0.0
        if cfg.quantize_latent:
            zn = zp / zp.norm(dim=-1, keepdim=True)
            book = P["quantize.embedding.weight"]
            book = book / book.norm(dim=-1, keepdim=True)
            idx = ((zn[:, :, None] - book[None, None]) ** 2).sum(-1).argmin(-1)
            code = book[idx]
            vq = 0.25 * ((code.detach() - zn) ** 2).mean() + ((code - zn.detach()) ** 2).mean()
            zq = zn + (code - zn).detach()
        else:
            zq = zp
        n = zq.shape[1]
        lat_d = _lin(P, zq, "decoder.decoder_embed") + P["decoder.latent_token_positional_embedding"][:n]
        y = _ln(P, torch.cat([queries, lat_d], 1), "decoder.ln_pre")
        for l in layers:
            y = _block(P, y, f"decoder.transformer.{l}", cfg.heads)
        y = _ln(P, y[:, 1 : G2 + 1], "decoder.ln_post")
        pred = _lin(P, torch.tanh(_lin(P, y, "decoder.ffn.0")), "decoder.ffn.2")
        term = cfg.iteration_weights[t] * ((pred - gt) ** 2).mean() + vq
        total = total + term
        records.append((lat, idx, pred, term))
        if halting == "threshold":
            done = (pred.detach() - gt).abs().mean(-1) < cfg.halting_threshold
            masked = P["encoder_positional_embedding"][1:] + P["encoder_mask_token"][0]
            x = torch.cat([x[:, :1], torch.where(done[..., None], masked, x[:, 1 : G2 + 1]), x[:, G2 + 1 :]], 1)
    return records, total


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def vae_model():
    torch.manual_seed(3)
    model = ALIT(tiny_vae_config())
    # the linear init's std 0.02 leaves the decoder's output near zero; bigger weights make the
    # comparison meaningful (and the halting rule bite at its threshold)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2 and not name.startswith("base_tokenizer"):
                p.normal_(0, 0.6 / p.shape[1] ** 0.5)
    return model


def test_posterior_sample_and_decode_match_float64(vae_model):
    images = random_images(2, 32, seed=1)
    noise = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(5))
    S = {k[len("base_tokenizer.vae."):]: v.double() for k, v in vae_model.state_dict().items() if k.startswith("base_tokenizer.vae.")}
    mean, std = ref_posterior(S, images.double())
    base = vae_model.encode_base(images, noise=noise)
    assert _rel(base.mean, mean) < 1e-5 and _rel(base.std, std) < 1e-5
    want = (mean + std * noise.double()) * 0.2325
    assert _rel(base.z, want) < 1e-5
    tokens = base.z.flatten(2).transpose(1, 2)
    # the official decode takes the scaled latents as they are; the corrected one divides first
    assert _rel(vae_model.reconstruct(tokens), ref_decode(S, want)) < 1e-5
    vae_model.base_tokenizer.unscale_decode = True
    try:
        assert _rel(vae_model.reconstruct(tokens), ref_decode(S, want / 0.2325)) < 1e-5
    finally:
        vae_model.base_tokenizer.unscale_decode = False


def test_sampling_follows_generator_noise_or_mean(vae_model):
    images = random_images(2, 32, seed=2)
    a = vae_model.encode_base(images, generator=torch.Generator().manual_seed(0))
    b = vae_model.encode_base(images, generator=torch.Generator().manual_seed(0))
    c = vae_model.encode_base(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.z, b.z) and not torch.equal(a.z, c.z)
    # no generator: the global CPU stream, drawn like the official sample()
    torch.manual_seed(9)
    d = vae_model.encode_base(images)
    torch.manual_seed(9)
    noise = torch.randn(a.mean.shape)
    torch.testing.assert_close(d.z, (a.mean + a.std * noise) * 0.2325, rtol=0, atol=0)
    vae_model.set_latent_sampling(False)
    try:
        e = vae_model.encode_base(images, generator=torch.Generator().manual_seed(0))
        assert torch.equal(e.z, a.mean * 0.2325)
    finally:
        vae_model.set_latent_sampling(True)
    with pytest.raises(ValueError, match="noise must have the posterior's shape"):
        vae_model.encode_base(images, noise=torch.zeros(1, 6, 8, 8))


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("halting", ["official", "threshold"])
def test_rollout_loss_and_gradients_match_float64(vae_model, quantize, halting):
    if quantize:
        model = vae_model
    else:
        model = ALIT(tiny_vae_config(quantize_latent=False))
        model.load_state_dict({k: v for k, v in vae_model.state_dict().items() if not k.startswith("quantize.")})
    images = random_images(2, 32, seed=4)
    base = model.encode_base(images, generator=torch.Generator().manual_seed(6))
    fixed = BaseOutput(z=base.z.clone())
    if halting == "threshold":
        # a threshold that some cells meet at the first iteration and others do not
        with torch.no_grad():
            first = model.rollout(images, iterations=1, base=fixed)[0]
        error = (first.logits - first.gt_indices).abs().mean(-1)
        tuned = ALIT(model.config.replace(halting_threshold=float(error.flatten().quantile(0.3))))
        tuned.load_state_dict(model.state_dict())
        model = tuned
    cfg = model.config
    with torch.no_grad():
        records = model.rollout(images, halting=halting, base=fixed)
    P = {k: v.detach().double().requires_grad_(True) for k, v in model.named_parameters() if not k.startswith("base_tokenizer")}
    ref, ref_loss = ref_rollout(P, cfg, images.double(), base.z.double(), halting)
    masked = 0
    for rec, (lat, idx, pred, term) in zip(records, ref):
        assert _rel(rec.latents, lat) < 1e-4
        assert _rel(rec.logits, pred) < 1e-4
        if quantize:
            assert torch.equal(rec.indices, idx)
        else:
            assert rec.indices is None and _rel(rec.z_q, _lin(P, _ln(P, lat, "encoder_ln_post"), "pre_quantizer_mlp")) < 1e-4
        masked += int(((pred - base.z.double().flatten(2).transpose(1, 2)).abs().mean(-1) < cfg.halting_threshold).sum())
    if halting == "threshold":
        assert masked > 0, "the threshold never bit: the test would not see the halting"
    model.zero_grad(set_to_none=True)
    out = model(images, base=fixed, halting=halting)
    out.loss.backward()
    ref_loss.backward()
    assert abs(float(out.loss.detach()) - float(ref_loss.detach())) < 1e-5 * float(ref_loss.detach())
    for t, (_, _, _, term) in enumerate(ref):
        assert abs(float(out.per_iteration[t]) - float(term.detach())) < 1e-5 * float(term.detach())
    grads = dict(model.named_parameters())
    for name, p in P.items():
        if p.grad is None:  # the mask token: used only when a cell halts
            assert halting == "official" and name == "encoder_mask_token"
            # the official no-op keeps it in the graph with weight 0: a zero gradient, not None
            assert grads[name].grad is not None and not grads[name].grad.any()
            continue
        assert _rel(grads[name].grad, p.grad) < 1e-4, name


def test_official_halting_is_a_no_op_and_threshold_masks(vae_model):
    # a threshold every cell meets: the working rule masks them all, the official one none
    model = ALIT(vae_model.config.replace(halting_threshold=1e9))
    model.load_state_dict(vae_model.state_dict())
    images = random_images(2, 32, seed=7)
    base = BaseOutput(z=model.encode_base(images, generator=torch.Generator().manual_seed(0)).z)
    with torch.no_grad():
        off = model.rollout(images, halting="off", base=base)
        official = model.rollout(images, halting="official", base=base)
        working = model.rollout(images, halting="threshold", base=base)
    for a, b in zip(off, official):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.logits, b.logits)
    assert torch.equal(off[0].logits, working[0].logits)  # the first iteration sees no halting
    assert not torch.equal(off[-1].latents, working[-1].latents)
    # the step's carry: every image token replaced by its position + the mask token
    with torch.no_grad():
        carry, b = model.start_carry(images, base)
        _, after = model.step(carry, 0, b.target, halting="threshold")
        _, kept = model.step(carry, 0, b.target, halting="official")
    masked = model.encoder_positional_embedding[1:] + model.encoder_mask_token[0]
    assert torch.equal(after[:, 1:65], masked.expand(2, -1, -1))
    assert not torch.allclose(kept[:, 1:65], masked.expand(2, -1, -1))
    with pytest.raises(ValueError, match="halts deterministically"):
        model.rollout(images, halting="stochastic")


def test_official_halting_never_masks_even_when_every_cell_qualifies(vae_model):
    pred = torch.randn(2, 64, 6)
    mask = vae_model.halting_mask(pred, pred + 1e-4, "official")
    assert mask.shape == (2, 64) and not mask.any()
    assert vae_model.halting_mask(pred, pred + 1e-4, "threshold").all()
    assert not vae_model.halting_mask(pred, pred + 1.0, "threshold").any()


def test_official_halting_of_the_vqgan_variant_is_its_stochastic_rule():
    from alit_fast.testing import tiny_config

    torch.manual_seed(0)
    model = ALIT(tiny_config(halting_threshold=0.01))
    images = random_images(2, 32, seed=8)
    losses = [model(images, halting=mode, generator=torch.Generator().manual_seed(2)).loss.detach()
              for mode in ("stochastic", "official", "off")]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
