import pytest
import torch

from alit_fast import ALIT
from alit_fast.inference import RolloutState, decode_logits, official_encode
from alit_fast.testing import random_images, tiny_config
from alit_fast.inference import TokenBatch
from alit_fast.inference.criteria import Criterion
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a low halting threshold so that "threshold" halting really masks cells of a random model
    return ALIT(tiny_config(halting_threshold=0.02)).eval()


@pytest.fixture(scope="module")
def images():
    return random_images(4, 32, seed=3)


@pytest.mark.parametrize("halting", ["off", "threshold"])
def test_stepping_equals_the_one_shot_rollout(model, images, halting):
    with torch.no_grad():
        records = model.rollout(images, halting=halting)
    state = model.start(images, halting=halting)
    steps = []
    while not state.done:
        steps.append(state.step())
    assert len(steps) == len(records)
    for rec, out in zip(records, steps):
        assert out.iteration == rec.iteration
        assert torch.equal(out.rows, torch.arange(4))
        assert torch.equal(out.latents, rec.latents)
        assert torch.equal(out.indices, rec.indices)
        assert torch.equal(out.logits, rec.logits)
    assert torch.equal(state.lengths, torch.full((4,), model.config.max_tokens))


def test_threshold_halting_changes_the_rollout(model, images):
    with torch.no_grad():
        off = model.rollout(images, halting="off")
        thr = model.rollout(images, halting="threshold")
    assert not torch.allclose(off[-1].logits, thr[-1].logits)  # the halting test above is not vacuous


@pytest.mark.parametrize("halting", ["off", "threshold"])
def test_compacted_images_equal_running_each_alone(model, images, halting):
    state = model.start(images, halting=halting)
    state.step()
    state.finish(torch.tensor([False, True, False, False]))  # image 1 stops after one iteration
    out = state.step()
    assert out.rows.tolist() == [0, 2, 3] and out.latents.shape[0] == 3
    state.finish(torch.tensor([3]))  # by image id
    while not state.done:
        state.step()
    expected_iters = [3, 1, 3, 2]
    assert state.iterations.tolist() == expected_iters
    for i, iters in enumerate(expected_iters):
        alone = model.start(images[i : i + 1], halting=halting)
        for _ in range(iters):
            ref = alone.step()
        got = state.result(i)
        assert got.iterations == iters and got.num_tokens == iters * model.config.tokens_per_iter
        assert torch.equal(got.indices, ref.indices[0])
        assert torch.equal(state.sequences()[i], ref.indices[0])
        torch.testing.assert_close(got.logits, ref.logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.latents, ref.latents[0], rtol=1e-4, atol=1e-5)


def test_step_can_skip_the_decoder_without_changing_codes(model, images):
    full = model.start(images)
    lean = model.start(images)
    while not full.done:
        a, b = full.step(), lean.step(decode=False)
        assert b.logits is None
        assert torch.equal(a.indices, b.indices)
    # threshold halting needs the logits, so the decoder runs regardless
    assert model.start(images, halting="threshold").step(decode=False).logits is not None


def test_state_limits_and_errors(model, images):
    state = RolloutState(model, images, iterations=2)
    state.step()
    state.step()
    assert state.done and state.lengths.tolist() == [8] * 4
    with pytest.raises(RuntimeError, match="finished"):
        state.step()
    state.finish(torch.tensor([0]))  # a no-op once everything stopped
    with pytest.raises(ValueError, match="iterations"):
        RolloutState(model, images, iterations=9)
    with pytest.raises(ValueError, match="halting"):
        model.start(images, halting="sometimes")
    lean = RolloutState(model, images, keep_outputs=False)
    lean.step()
    with pytest.raises(RuntimeError, match="keep_outputs"):
        lean.result(0)


def _random_tokens(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, model.config.codebook_size, (n,), generator=g) for n in lengths]
    return TokenBatch.from_sequences(seqs, model.config.codebook_size)


def test_mixed_length_decode_equals_decoding_each_alone(model):
    tokens = _random_tokens(model, [4, 12, 8, 12])
    mixed_logits = decode_logits(model, tokens)
    mixed = model.decode(tokens)
    assert mixed.shape == (4, 3, 32, 32) and float(mixed.min()) >= 0 and float(mixed.max()) <= 1
    for i in range(4):
        single = TokenBatch.from_sequences([tokens[i]], tokens.codebook_size)
        torch.testing.assert_close(mixed_logits[i], decode_logits(model, single)[0], rtol=1e-4, atol=1e-5)
        # the random VQGAN decoder amplifies last-bit differences of the batched logits
        torch.testing.assert_close(mixed[i], model.decode(single)[0], rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(model.decode(tokens, batch_size=3), mixed, rtol=1e-3, atol=2e-4)


def test_decode_of_encoded_tokens_matches_the_rollout_logits(model, images):
    tokens = model.encode(images, "tokens:8")
    with torch.no_grad():
        rec = model.rollout(images, iterations=2)[-1]
    assert torch.equal(tokens.padded(), rec.indices)
    torch.testing.assert_close(decode_logits(model, tokens), rec.logits, rtol=1e-4, atol=1e-5)


def test_decode_rejects_tokens_of_another_model(model):
    tokens = _random_tokens(model, [4])
    with pytest.raises(ValueError, match="codebook"):
        model.decode(TokenBatch(tokens.codes, tokens.lengths, codebook_size=99))
    too_long = _random_tokens(model, [16])
    with pytest.raises(ValueError, match="at most"):
        model.decode(too_long)


def test_token_batch_round_trips_through_a_file(model, images, tmp_path):
    tokens = model.encode(images, "tokens:4", max_tokens=12)
    tokens = TokenBatch.cat([tokens, _random_tokens(model, [12, 8])])
    tokens.names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    tokens.checkpoint = "demo"
    path = tmp_path / "tokens.safetensors"
    tokens.save(path)
    back = TokenBatch.load(path)
    assert back.codes.dtype == torch.int16  # the 64-code codebook fits
    assert torch.equal(back.lengths, tokens.lengths) and back.lengths.tolist() == [4, 4, 4, 4, 12, 8]
    assert all(torch.equal(a, b) for a, b in zip(back.sequences(), tokens.sequences()))
    assert back.names == tokens.names and back.checkpoint == "demo"
    assert back.config_json == model.config.to_json() and back.codebook_size == model.config.codebook_size
    assert back.extra["criterion"] == "tokens:4"
    torch.testing.assert_close(model.decode(back), model.decode(tokens))


def test_token_batch_uses_int32_for_large_codebooks(tmp_path):
    big = TokenBatch.from_sequences([torch.tensor([40000, 1])], codebook_size=65536)
    assert big.codes.dtype == torch.int32
    big.save(tmp_path / "big.safetensors")
    assert TokenBatch.load(tmp_path / "big.safetensors")[0].tolist() == [40000, 1]


def _fake_pixel_decoder(model, images, deltas):
    """decode_latents that returns ``images + deltas[call]`` so the L1 errors are known exactly."""
    calls = []

    def fake(z_q):
        delta = deltas[len(calls)]
        calls.append(delta)
        return images + delta.view(-1, 1, 1, 1)

    return fake, calls


@pytest.mark.parametrize(
    "threshold, chosen",
    [(0.5, 0), (0.2, 1), (0.01, 2)],  # first below the threshold (not the lowest), else the lowest
)
def test_official_encode_picks_one_length_per_batch(model, images, monkeypatch, threshold, chosen):
    imgs = images[:2] * 0.5
    # batch-mean errors 0.3, 0.1, 0.05; image 0 alone would be below 0.2 already at iteration 0
    deltas = [torch.tensor([0.1, 0.5]), torch.tensor([0.05, 0.15]), torch.tensor([0.05, 0.05])]
    fake, calls = _fake_pixel_decoder(model, imgs, deltas)
    monkeypatch.setattr(model.base_tokenizer, "decode_latents", fake)
    result = official_encode(model, imgs, threshold=threshold, halting="off")
    assert len(calls) == model.config.iterations  # every iteration is decoded to pixels
    assert result.errors == pytest.approx([0.3, 0.1, 0.05], abs=1e-6)
    assert result.iteration == chosen
    assert result.num_tokens == (chosen + 1) * model.config.tokens_per_iter
    assert result.indices.shape == (2, result.num_tokens) and result.latents.shape[:2] == (2, result.num_tokens)
    torch.testing.assert_close(result.reconstructions, imgs + deltas[chosen].view(-1, 1, 1, 1))


def test_official_encode_with_the_real_decoder(model, images):
    result = official_encode(model, images, threshold=0.0, halting="off")
    assert result.iteration == min(range(3), key=result.errors.__getitem__)
    with torch.no_grad():
        rec = model.rollout(images)[result.iteration]
    assert torch.equal(result.indices, rec.indices)


@pytest.mark.host_triton
def test_the_triton_backend_gives_the_same_tokens_and_images(images):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    ref_model = ALIT(tiny_config()).eval()
    tri_model = ALIT(tiny_config()).eval()
    tri_model.load_state_dict(ref_model.state_dict())
    tri_model.set_backend("triton")  # under TRITON_INTERPRET=1 on a CPU
    stop_by_row = lambda view: view.rows == view.iteration  # noqa: E731 - image i stops after i+1 iterations
    ref = ref_model.encode(images[:3], stop_by_row)
    got = tri_model.encode(images[:3], stop_by_row)
    assert got.lengths.tolist() == [4, 8, 12]
    assert all(torch.equal(a, b) for a, b in zip(got.sequences(), ref.sequences()))
    # a mixed-length decode goes through the kernel's per-sample key lengths
    torch.testing.assert_close(tri_model.decode(got), ref_model.decode(ref), rtol=1e-3, atol=2e-4)


# ---------------------------------------------------------------------------- bad token batches
def test_ids_are_checked_before_they_are_narrowed():
    with pytest.raises(ValueError, match=r"code ids must lie in \[0, 4096\), got \[3, 40000\]"):
        TokenBatch.from_sequences([torch.tensor([3, 40000])], 4096)  # would wrap in int16
    with pytest.raises(ValueError, match="got \\[-2"):
        TokenBatch.from_sequences([torch.tensor([-2, 5])], 4096)
    with pytest.raises(ValueError, match="integers"):
        TokenBatch.from_sequences([torch.tensor([1.5])], 4096)


def _per_image_cat(batches):  # what TokenBatch.cat stores: every image's own sequence, rebuilt
    first = batches[0]
    return TokenBatch.from_sequences([q for b in batches for q in b.sequences()], first.codebook_size)


@pytest.mark.parametrize("continuous", [False, True])
def test_cat_stores_what_rebuilding_every_sequence_would(continuous):
    g = torch.Generator().manual_seed(0)

    def batch(lengths, width):  # values past each length are garbage, as a hand-made batch may have
        shape = (len(lengths), width, 3) if continuous else (len(lengths), width)
        codes = torch.randn(shape, generator=g).half() if continuous else torch.randint(0, 4096, shape, generator=g).short()
        return TokenBatch(codes, torch.tensor(lengths, dtype=torch.int64), 4096, names=[f"{width}-{i}" for i in range(len(lengths))])

    parts = [batch([3, 0, 5], 7), batch([], 2), batch([9, 1], 9), batch([2], 2)]
    got, want = TokenBatch.cat(parts), _per_image_cat(parts)
    assert torch.equal(got.lengths, want.lengths) and got.codes.dtype == want.codes.dtype
    assert torch.equal(got.codes, want.codes) and got.names == [n for b in parts for n in b.names]


def test_cat_lets_an_empty_batch_of_either_kind_join():
    vectors = TokenBatch(torch.randn(2, 3, 4), torch.tensor([3, 1]), 64)
    empty_ids = TokenBatch.from_sequences([], 64)
    got = TokenBatch.cat([empty_ids, vectors, TokenBatch(torch.zeros(0, 5, 2), torch.zeros(0, dtype=torch.int64), 64)])
    assert got.continuous and torch.equal(got.codes, TokenBatch.cat([vectors]).codes)


def test_cat_checks_ids_against_the_codebook():
    bad = TokenBatch(torch.tensor([[5, 70000]], dtype=torch.int32), torch.tensor([2]), 4096)
    with pytest.raises(ValueError, match=r"code ids must lie in \[0, 4096\), got \[5, 70000\]"):
        TokenBatch.cat([bad])
    past = TokenBatch(torch.tensor([[5, 70000]], dtype=torch.int32), torch.tensor([1]), 4096)
    assert TokenBatch.cat([past]).codes.tolist() == [[5]]  # past the length nothing is read


def test_lengths_that_do_not_fit_the_codes_are_refused_when_made():
    with pytest.raises(ValueError, match="lengths must lie in"):
        TokenBatch(torch.zeros(2, 4, dtype=torch.int16), torch.tensor([4, 5]), 64)
    with pytest.raises(ValueError, match="lengths must lie in"):
        TokenBatch(torch.zeros(2, 4, dtype=torch.int16), torch.tensor([-1, 2]), 64)


def test_a_damaged_token_file_is_refused(model, tmp_path):
    path = tmp_path / "t.safetensors"
    _random_tokens(model, [4, 8]).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a flipped bit in the code data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        TokenBatch.load(path)
    path.write_bytes(bytes(data[:20]))
    with pytest.raises(ValueError, match="cannot be read"):
        TokenBatch.load(path)
    with pytest.raises(IsADirectoryError):
        TokenBatch.load(tmp_path)


def test_decoding_with_a_model_of_another_config_needs_an_explicit_opt_out(model, images):
    tokens = model.encode(images, "tokens:4")
    other = ALIT(tiny_config(halting_threshold=0.5)).eval()  # same shapes, another config
    with pytest.raises(ValueError, match="another config"):
        other.decode(tokens)
    assert other.decode(tokens, check_config=False).shape == (4, 3, 32, 32)


def test_token_counts_off_the_iteration_grid_are_refused(model):
    with pytest.raises(ValueError, match="multiples of 4"):
        model.decode(_random_tokens(model, [4, 6]))


def test_the_same_tokens_save_to_the_same_bytes(tmp_path):
    # safetensors writes metadata in hash-map order; token files are rewritten with sorted keys so
    # that equal batches give equal files (what the pre-tokenizer's resume and torchrun rely on)
    from alit_fast.inference import TokenBatch

    batch = TokenBatch.from_sequences([torch.tensor([1, 2, 3]), torch.tensor([4])], 16, config_json="{}",
                                      checkpoint="demo", names=["a.png", "b.png"], extra={"x": "1", "y": "2"})
    files = []
    for i in range(4):
        batch.save(tmp_path / f"t{i}.safetensors")
        files.append((tmp_path / f"t{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    loaded = TokenBatch.load(tmp_path / "t0.safetensors")
    assert loaded.names == ["a.png", "b.png"] and loaded.extra == {"x": "1", "y": "2"}
    assert [s.tolist() for s in loaded.sequences()] == [[1, 2, 3], [4]]


class _ScoreBelow(Criterion):
    """A stand-in criterion: a view is one step's scores [n]; met below 0.15, lower is better."""

    higher_is_better = False

    def meets(self, scores: torch.Tensor) -> torch.Tensor:
        return scores < 0.15

    def score(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


@pytest.mark.parametrize("fallback,expected", [("max", [2, 1, 2, 2]), ("best", [2, 1, 1, 0])])
def test_count_choice_takes_the_first_met_step_else_the_fallback(fallback, expected):
    from alit_fast.inference.encode import CountChoice

    # per step, 4 images: never met (best at the end), met at step 1, never (best in the middle), a tie
    steps = torch.tensor([[0.5, 0.2, 0.4, 0.3], [0.3, 0.1, 0.2, 0.3], [0.2, 0.05, 0.4, 0.3]], dtype=torch.float64)
    choice = CountChoice(_ScoreBelow(), fallback, 4, torch.device("cpu"))
    last = 2
    for at in range(last + 1 if fallback == "best" else last):  # "max" needs no judgement at the last step
        choice.update(steps[at], at)
    assert choice.chosen(last).tolist() == expected
