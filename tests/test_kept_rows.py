"""Rows that are never read are not computed: the decoder's last block keeps its grid cells, the
encoder's last block at a rollout's final iteration its latents, and a criterion that decides on
its score computes that score once per judged step. Each must leave every output unchanged."""
import pytest
import torch

from alit_fast import ALIT
from alit_fast.models import ResidualAttentionBlock, run_blocks
from alit_fast.ops import VarlenLayout
from alit_fast.inference.criteria import PixelL1
from alit_fast.testing import random_images, tiny_config, tiny_vae_config
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


def _blocks(backend: str = "torch") -> torch.nn.ModuleList:
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(ResidualAttentionBlock(64, 2) for _ in range(2)).double()
    for block in blocks:
        block.attn.backend = backend
    return blocks


@pytest.mark.parametrize("backend", ["torch", "official"])
def test_kept_rows_of_a_padded_batch_equal_the_full_blocks_rows(backend):
    blocks = _blocks(backend)
    x = torch.randn(3, 37, 64, dtype=torch.float64)
    with torch.no_grad():
        full = run_blocks(blocks, x)
        kept = run_blocks(blocks, x, keep=slice(1, 29))
    assert kept.shape == (3, 28, 64)
    torch.testing.assert_close(kept, full[:, 1:29], rtol=1e-12, atol=1e-12)


def test_kept_rows_of_packed_sequences_equal_the_full_blocks_rows():
    blocks = _blocks()
    lengths = [9, 17, 5]
    x = torch.randn(sum(lengths), 64, dtype=torch.float64)
    layout = VarlenLayout.from_lengths(lengths, "cpu")
    keep = torch.tensor([0, 3, 8, 9, 20, 25, 30])
    with torch.no_grad():
        full = run_blocks(blocks, x, layout)
        kept = run_blocks(blocks, x, layout, keep=keep)
    torch.testing.assert_close(kept, full[keep], rtol=1e-12, atol=1e-12)


def test_kept_rows_pass_gradients_as_the_full_block_does():
    blocks = _blocks()
    x = torch.randn(2, 11, 64, dtype=torch.float64, requires_grad=True)
    run_blocks(blocks, x, keep=slice(3, None)).square().sum().backward()
    kept_grad = x.grad.clone()
    x.grad = None
    run_blocks(blocks, x)[:, 3:].square().sum().backward()
    torch.testing.assert_close(kept_grad, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", ["vqgan", "vae"])
def test_a_final_step_gives_the_outputs_of_a_full_step_and_no_carry(base):
    model = ALIT(tiny_vae_config() if base == "vae" else tiny_config()).double().eval()
    images = random_images(2, model.config.image_size).double()
    with torch.no_grad():
        carry, data = model.start_carry(images)
        full, after = model.step(carry, 0, data.target)
        final, none = model.step(carry, 0, data.target, final=True)
    assert after is not None and none is None
    for name in ("latents", "z_q", "logits"):
        torch.testing.assert_close(getattr(final, name), getattr(full, name), rtol=1e-12, atol=1e-12)


class _Counting(PixelL1):
    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self.scored = 0

    def score(self, view):
        self.scored += 1
        return super().score(view)


def test_a_score_deciding_criterion_is_scored_once_per_judged_step():
    model = ALIT(tiny_config()).eval()
    images = random_images(4, model.config.image_size)
    criterion = _Counting(1e-9)  # never met: every image runs and is judged at every count
    model.encode(images, criterion=criterion, fallback="best")
    assert criterion.scored == model.config.iterations



def test_the_decoders_shared_query_projection_gives_every_images_own_rows():
    model = ALIT(tiny_config()).double().eval()
    dec = model.decoder
    z_q = torch.randn(3, 8, model.config.latent_dim, dtype=torch.float64)
    queries = model.decoder_queries()
    with torch.no_grad():
        got = dec(queries, z_q)
        latents = dec.decoder_embed(z_q) + dec.latent_token_positional_embedding[:8]
        x = dec.ln_pre(torch.cat([queries.expand(3, -1, -1), latents], dim=1))
        want = dec.ffn(dec.ln_post(run_blocks(dec.transformer, x)[:, 1 : queries.shape[1]]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_checkpointed_decoder_projects_its_queries_inside_the_checkpoint(monkeypatch):
    """Handed in from outside, the shared projection would stay alive until the backward pass."""
    import alit_fast.models.alit as alit_module

    model = ALIT(tiny_config()).train()
    seen = []
    real = alit_module.run_blocks
    monkeypatch.setattr(alit_module, "run_blocks", lambda *a, first_qkv=None, **k: seen.append(first_qkv) or real(*a, first_qkv=first_qkv, **k))
    z_q = torch.randn(2, 4, model.config.latent_dim, requires_grad=True)
    model.decode_logits(z_q).sum().backward()
    model.set_activation_checkpointing(True)
    model.decode_logits(z_q).sum().backward()
    with torch.no_grad():
        model.decode_logits(z_q)
    assert [q is not None for q in seen] == [True, False, True]


def test_encode_returns_ordinary_tensors():
    model = ALIT(tiny_config()).eval()
    tokens = model.encode(random_images(2, model.config.image_size), criterion="tokens:4")
    assert not tokens.codes.is_inference() and not tokens.lengths.is_inference()
    tokens.codes[0, 0] = 1  # editable in place, outside any inference mode


class _OwnCall(PixelL1):
    def __call__(self, view):
        return torch.ones(view.rows.numel(), dtype=torch.bool)  # stops everything, whatever the score


def test_a_subclass_that_overrides_call_is_asked_through_it():
    model = ALIT(tiny_config()).eval()
    tokens = model.encode(random_images(3, model.config.image_size), criterion=_OwnCall(1e-9), fallback="best")
    assert tokens.lengths.tolist() == [model.config.tokens_per_iter] * 3


def test_weights_caches_filled_by_encode_serve_a_later_training_step():
    """encode computes under inference_mode; what it caches from the weights must stay ordinary
    tensors, or a training step with those weights frozen would fail at its backward pass."""
    model = ALIT(tiny_config())
    for p in (model.decoder_class_embedding, model.decoder_mask_token, model.decoder_positional_embedding):
        p.requires_grad_(False)  # frozen: the decoder's queries now come from the cache
    images = random_images(2, model.config.image_size)
    model.eval().encode(images, criterion="code-nll:0.5")
    model.train()(images, halting="off").loss.backward()
