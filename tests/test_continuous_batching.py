"""Continuous batching (alit_fast.inference.stream): every image gets the tokens of the compacting
encoder whatever the batch size, slot order or item split; the packed layers match their padded
or per-sequence forms in float64; one host read per step."""
from __future__ import annotations

import pytest
import torch

import alit_fast
from alit_fast import ALIT, TokenBatch
from alit_fast.inference import FunctionCriterion, StreamStats, encode_stream
from alit_fast.ops import VarlenLayout, attention_varlen
from alit_fast.ops.attention import attention_varlen_naive
from alit_fast.testing import count_syncs, random_images, tiny_config, tiny_vae_config
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


def _streamed(model, images, batch_size, items=None, **kwargs) -> TokenBatch:
    chunks = items if items is not None else list(images)
    return TokenBatch.cat(list(model.encode_stream(chunks, batch_size=batch_size, **kwargs)))


def _same_tokens(a: TokenBatch, b: TokenBatch) -> bool:
    return torch.equal(a.lengths, b.lengths) and all(torch.equal(x, y) for x, y in zip(a.sequences(), b.sequences()))


@pytest.fixture(scope="module")
def demo():
    from alit_fast.cli.demo import HELD_OUT_SEED, demo_images

    model = alit_fast.load("demo", backend="torch")
    images = torch.stack([it.image for it in demo_images(32, per_level=2, photos=False, seed=HELD_OUT_SEED)])
    return model, images


# ---------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("criterion,fallback", [("pixel-l1:0.07", "max"), ("fast-pixel-l1:0.07", "best"), ("code-acc:0.8", "best")])
def test_demo_model_in_float64_gets_the_compacting_tokens_at_any_batch_size(demo, criterion, fallback):
    model, images = demo
    model, images = model.double(), images.double()
    try:
        reference = model.encode(images, criterion=criterion, fallback=fallback, batch_size=4)
        assert len(set(reference.lengths.tolist())) >= 3  # the mix really is mixed
        for batch_size in (1, 7):
            assert _same_tokens(_streamed(model, images, batch_size, criterion=criterion, fallback=fallback), reference)
    finally:
        model.float()


def test_demo_model_in_float32_agrees_on_at_least_999_of_1000_tokens(demo):
    model, images = demo
    reference = model.encode(images, batch_size=8)
    streamed = _streamed(model, images, 5)
    assert torch.equal(streamed.lengths, reference.lengths)
    same = sum(int((a == b).sum()) for a, b in zip(streamed.sequences(), reference.sequences()))
    assert same >= 0.999 * int(reference.lengths.sum())


def _mixed_counts(view):
    # a stop rule that depends on the image alone, so that the counts really differ
    bucket = view.images.double().mean((2, 3)).argmax(1)  # the brightest channel
    return view.num_tokens >= 4 * (1 + bucket)


@pytest.mark.parametrize("variant", ["vqgan", "vqgan-continuous", "vae", "vae-continuous"])
def test_seeded_models_in_float64_get_the_compacting_tokens(variant):
    torch.manual_seed(0)
    config = tiny_vae_config() if variant.startswith("vae") else tiny_config()
    if variant.endswith("continuous"):
        config = config.replace(quantize_latent=False)
    model = ALIT(config).eval().double()
    if variant.startswith("vae"):
        model.set_latent_sampling(False)
    images = random_images(7, 32, seed=3).double()
    scored = "code-mae:0.3" if variant.startswith("vae") else "code-nll:3.0"
    for criterion, fallback in ((FunctionCriterion(_mixed_counts, needs_logits=False), "max"), (scored, "best"), ("pixel-l1:0.2", "best")):
        reference = model.encode(images, criterion=criterion, fallback=fallback)
        for batch_size in (2, 5):
            streamed = _streamed(model, images, batch_size, criterion=criterion, fallback=fallback)
            # code ids, or continuous vectors (stored in float32): identical, not just close
            assert _same_tokens(streamed, reference), (criterion, batch_size)
    assert len(set(_streamed(model, images, 3, criterion=FunctionCriterion(_mixed_counts, needs_logits=False)).lengths.tolist())) == 3


def test_slot_order_and_item_split_do_not_change_any_image_tokens():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval().double()
    images = random_images(9, 32, seed=5).double()
    criterion = FunctionCriterion(_mixed_counts, needs_logits=False)
    reference = model.encode(images, criterion=criterion)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    shuffled = _streamed(model, images[order], 4, criterion=criterion)
    for k, i in enumerate(order.tolist()):
        assert torch.equal(shuffled[k], reference[i])
    items = [images[:4], images[4], images[5:]]  # a batch, one image [3, H, W], a batch
    batches = list(model.encode_stream(iter(items), criterion=criterion, batch_size=3))
    assert [len(b) for b in batches] == [4, 1, 4]
    assert _same_tokens(TokenBatch.cat(batches), reference)
    assert batches[0].extra == reference.extra


def test_fixed_count_streams_stop_every_image_at_that_count():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    tokens = _streamed(model, random_images(5, 32), 2, criterion="tokens:8")
    assert tokens.lengths.tolist() == [8] * 5


# ---------------------------------------------------------------------- what a run does
def test_a_stream_yields_items_while_its_input_is_still_coming():
    import itertools

    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    pulled = []

    def endless():
        for k in itertools.count():
            pulled.append(k)
            yield random_images(1, 32, seed=k)[0]

    first = list(itertools.islice(model.encode_stream(endless(), criterion="tokens:8", batch_size=2), 3))
    assert [len(b) for b in first] == [1, 1, 1] and all(b.lengths.tolist() == [8] for b in first)
    assert len(pulled) <= 3 + 2 * 2  # what ran, plus at most a base-tokenizer chunk ahead per slot batch


def test_slots_are_refilled_so_steps_follow_the_total_iterations():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    images = random_images(12, 32, seed=7)
    criterion = FunctionCriterion(_mixed_counts, needs_logits=False)
    stats = StreamStats()
    tokens = _streamed(model, images, 4, criterion=criterion, stats=stats)
    iterations = int(tokens.lengths.sum()) // model.config.tokens_per_iter
    assert stats.images == 12 and stats.slot_steps == iterations
    # full slots but for the tail: at most one step per 4 image-iterations plus the drain
    assert stats.steps <= -(-iterations // 4) + model.config.iterations - 1
    assert stats.mean_active > 3


def test_a_stream_makes_one_host_read_per_step_and_one_to_finish():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    images = random_images(7, 32, seed=2)
    list(encode_stream(model, list(images), criterion="code-nll:3.0", batch_size=3))  # warm-up
    stats = StreamStats()
    with count_syncs() as counts:
        list(encode_stream(model, list(images), criterion="code-nll:3.0", fallback="best", batch_size=3, stats=stats))
    assert counts.total == stats.reads <= stats.steps + 1, dict(counts)


def test_bad_stream_inputs_fail_with_one_line():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    images = random_images(4, 32)
    images[2, 0, 1, 1] = 1.5
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        list(model.encode_stream(list(images), criterion="code-acc:0.5", batch_size=2))
    with pytest.raises(ValueError, match=r"item 1 of the stream: images must have shape"):
        list(model.encode_stream([random_images(1, 32), torch.rand(2, 3, 16, 16)], criterion="tokens:4"))
    with pytest.raises(ValueError, match="batch_size"):
        list(model.encode_stream([random_images(1, 32)], batch_size=0))
    broken = ALIT(tiny_config()).eval()
    with torch.no_grad():
        broken.pre_quantizer_mlp.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        list(broken.encode_stream([random_images(2, 32)], criterion="tokens:8"))
    assert list(model.encode_stream([])) == []


# ---------------------------------------------------------------------- the packed layers
def _qkv(lengths, H=2, D=32, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), 3, H, D, generator=g, dtype=dtype)


@pytest.mark.parametrize("lengths", [[5], [3, 17, 1, 9], [7, 7]])
def test_varlen_attention_matches_the_per_sequence_oracle(lengths):
    qkv = _qkv(lengths)
    out = attention_varlen(qkv, VarlenLayout.from_lengths(lengths, "cpu"), backend="torch")
    torch.testing.assert_close(out, attention_varlen_naive(qkv, lengths), rtol=0, atol=1e-12)


@pytest.mark.parametrize("lengths", [[3, 17, 1, 9], [7, 7]])
def test_padded_varlen_attention_with_a_key_mask_matches_the_oracle(lengths):
    from alit_fast.ops.attention import _attention_padded  # what the torch backend runs on a GPU

    qkv = _qkv(lengths, seed=2)
    with torch.no_grad():  # twice: the second call reuses the layout's padded buffer
        layout = VarlenLayout.from_lengths(lengths, "cpu")
        for _ in range(2):
            out = _attention_padded(qkv, layout, "torch", on_torch=True)
            torch.testing.assert_close(out, attention_varlen_naive(qkv, lengths), rtol=0, atol=1e-12)


def test_varlen_attention_on_the_triton_backend_matches_the_oracle(monkeypatch):
    from alit_fast.kernels._utils import is_interpreting

    if not is_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (or a GPU)")
    lengths = [3, 20, 9]
    qkv = _qkv(lengths, dtype=torch.float32, seed=1)
    out = attention_varlen(qkv, VarlenLayout.from_lengths(lengths, "cpu"), backend="triton")
    torch.testing.assert_close(out.double(), attention_varlen_naive(qkv, lengths), rtol=0, atol=2e-5)


def test_varlen_layout_refuses_empty_sequences():
    with pytest.raises(ValueError, match="length >= 1"):
        VarlenLayout.from_lengths([3, 0], "cpu")
    with pytest.raises(ValueError, match="rows"):
        attention_varlen(_qkv([4]), VarlenLayout.from_lengths([5], "cpu"))


def test_packed_decoder_matches_the_padded_one_in_float64():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval().double()
    counts = [4, 12, 8, 4]
    z = torch.randn(sum(counts), model.config.latent_dim, dtype=torch.float64)
    packed = model.decode_logits_packed(z, counts)
    padded = torch.zeros(len(counts), max(counts), model.config.latent_dim, dtype=torch.float64)
    lo = 0
    for j, n in enumerate(counts):
        padded[j, :n] = z[lo : lo + n]
        lo += n
    with torch.no_grad():
        reference = model.decode_logits(padded, torch.tensor(counts))
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-10)


def test_packed_encoder_blocks_match_each_sequence_alone_in_float64():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval().double()
    lengths = [69, 73, 77]
    x = torch.randn(sum(lengths), model.config.width, dtype=torch.float64)
    with torch.no_grad():
        packed = model.encoder(x, VarlenLayout.from_lengths(lengths, "cpu"))
        alone = torch.cat([model.encoder(part[None])[0] for part in x.split(lengths)])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------- the commands
def test_encode_command_writes_the_same_token_file_with_either_batching(tmp_path):
    import numpy as np
    from PIL import Image

    from alit_fast.cli.demo import HELD_OUT_SEED, demo_images
    from alit_fast.cli.encode import main as encode_main

    folder = tmp_path / "images"
    folder.mkdir()
    for k, item in enumerate(demo_images(32, per_level=1, photos=False, seed=HELD_OUT_SEED)):
        pixels = (item.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
    outputs = {}
    for batching in ("continuous", "compacting"):
        out = tmp_path / f"{batching}.safetensors"
        assert encode_main([str(folder), "--out", str(out), "--batch-size", "2", "--batching", batching, "--quiet"]) == 0
        outputs[batching] = out.read_bytes()
    assert outputs["continuous"] == outputs["compacting"]
    assert len(set(TokenBatch.load(tmp_path / "continuous.safetensors").lengths.tolist())) >= 2


def test_the_packed_step_and_decode_trace_whole_under_torch_compile(monkeypatch):
    import alit_fast.inference.stream as stream

    torch.manual_seed(0)
    model = ALIT(tiny_config(), backend="torch").eval()
    images = random_images(3, 32, seed=4)
    options = dict(criterion="code-nll:0.01", fallback="best", max_tokens=4)  # one step, judged (decoded)
    reference = _streamed(model, images, 3, **options)
    compiled = torch.compile(stream.packed_step, fullgraph=True, backend="aot_eager")
    monkeypatch.setattr(stream, "packed_step", compiled)
    decode = model.decode_logits_packed
    traced_decode = torch.compile(lambda z, plan: decode(z, plan), fullgraph=True, backend="aot_eager")
    monkeypatch.setattr(model, "decode_logits_packed", lambda z, counts: traced_decode(z, model.decoder_plan(counts)))
    assert _same_tokens(_streamed(model, images, 3, **options), reference)


def test_one_compiled_packed_step_serves_every_layout(monkeypatch):
    """With dynamic shapes the step compiles once per structural case (the first step has no
    previous output; a step may have no entering image, or one, which dynamo specializes as it
    does every size 0 or 1; a step may have images at their last count, whose grid rows the last
    block skips), never once per layout."""
    import alit_fast.inference.stream as stream

    torch.manual_seed(0)
    model = ALIT(tiny_config(), backend="torch").eval()
    images = random_images(10, 32, seed=6)
    criterion = FunctionCriterion(_mixed_counts, needs_logits=False)
    reference = _streamed(model, images, 3, criterion=criterion)
    graphs, layouts, cases = [], set(), set()

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(stream.packed_step, fullgraph=True, backend=counting_backend, dynamic=True)

    def step(model, previous, entering, plan):
        layouts.add(plan.layout.lengths)
        entering_images = entering.shape[0] // (model.config.grid_size**2 + 1 + model.config.tokens_per_iter)
        cases.add((previous.shape[0] > 0, min(entering_images, 2), plan.keep is not None))
        return compiled(model, previous, entering, plan)

    monkeypatch.setattr(stream, "packed_step", step)
    assert _same_tokens(_streamed(model, images, 3, criterion=criterion), reference)
    assert len(layouts) >= 5 and len(cases) >= 3 and len(graphs) <= len(cases)


def test_the_padded_attention_path_gives_the_same_tokens_too():
    # the official backend runs attention_varlen padded with key lengths (as the Triton and GPU
    # torch backends do), not in runs of equal length
    torch.manual_seed(0)
    model = ALIT(tiny_config(), backend="official").eval().double()
    images = random_images(6, 32, seed=5).double()
    criterion = FunctionCriterion(_mixed_counts, needs_logits=False)
    stats = StreamStats()
    streamed = _streamed(model, images, 4, criterion=criterion, stats=stats)
    assert stats.attention_padded > 0
    assert _same_tokens(streamed, model.encode(images, criterion=criterion))


def test_the_last_block_computes_only_the_latents_of_images_at_their_last_count():
    # at most 2 iterations: an image's second step is its last, where the encoder's last block
    # needs its latent rows alone (no carry follows)
    torch.manual_seed(0)
    model = ALIT(tiny_config(), backend="torch").eval().double()
    images = random_images(5, 32, seed=8).double()
    G1, T = model.config.grid_size**2 + 1, model.config.tokens_per_iter
    rows_out = []
    hook = model.encoder.transformer[-1].register_forward_hook(lambda m, args, out: rows_out.append(out.shape[0]))
    try:
        streamed = _streamed(model, images, 3, max_tokens=2 * T)
    finally:
        hook.remove()
    assert _same_tokens(streamed, model.encode(images, max_tokens=2 * T, batch_size=3))
    assert torch.equal(streamed.lengths, torch.full((5,), 2 * T))
    # 3 images start, then stop at their last count; the other 2 enter and do the same
    assert rows_out == [3 * (G1 + T), 3 * 2 * T, 2 * (G1 + T), 2 * 2 * T]


def test_the_stream_computes_under_inference_mode_yet_returns_and_reads_ordinary_tensors():
    model = ALIT(tiny_config()).eval()
    made, modes = [], []

    def images():  # a caller's iterator: what it makes (and may keep) must stay ordinary tensors
        for k in range(3):
            modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            made.append(random_images(1, model.config.image_size, seed=k)[0])
            yield made[-1]

    computing = []
    hook = model.encoder.register_forward_hook(lambda m, a, out: computing.append(torch.is_inference_mode_enabled()))
    try:
        tokens = _streamed(model, None, 2, items=images(), criterion="tokens:4")
    finally:
        hook.remove()
    assert computing and all(computing)
    assert len(tokens) == 3 and modes == [(False, False)] * 3  # (inference mode, gradients) in the iterator
    assert not any(t.is_inference() for t in made)
    assert not tokens.codes.is_inference() and not tokens.lengths.is_inference()
    tokens.codes[0, 0] = 1  # editable in place, outside any inference mode
    modes.clear()
    with torch.inference_mode():  # a caller iterating in its own inference mode keeps it in its iterator
        _streamed(model, None, 2, items=images(), criterion="tokens:4")
    assert modes == [(True, False)] * 3
