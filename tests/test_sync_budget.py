"""The host-device sync budget of the public entry points (counted on the CPU; see
alit_fast.testing.count_syncs): none in a rollout or the training loss, one per encode with a fixed
count, one per judged iteration plus one with a scored criterion, one per decode; none of them
grows with the batch size. Bad inputs are still caught, inside those reads."""
from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from alit_fast import ALIT
from alit_fast.testing import count_syncs, random_images, tiny_config
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ALIT(tiny_config()).eval()


def _syncs(fn) -> int:
    fn()  # warm-up: per-weights invariants are computed once
    with count_syncs() as counts:
        fn()
    return counts.total


@pytest.mark.parametrize("batch", [2, 5])
def test_rollout_makes_no_sync(model, batch):
    images = random_images(batch, 32)
    with torch.no_grad():
        assert _syncs(lambda: model.rollout(images)) == 0


@pytest.mark.parametrize("halting", ["off", "stochastic"])
def test_training_loss_forward_and_backward_make_no_sync(halting):
    torch.manual_seed(0)
    model = ALIT(tiny_config()).train()
    images = random_images(3, 32)
    g = torch.Generator().manual_seed(0)

    def step():
        out = model(images, halting=halting, sample_grad_iters=2, generator=g)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    with count_syncs() as counts:
        _host_sampling_uncounted(model, counts)
        step()
    assert counts.total == 0, dict(counts)


def _host_sampling_uncounted(model, counts) -> None:
    # which iterations take the loss is drawn by a CPU generator into a CPU tensor on every
    # device (sample_iterations refuses any other generator): reading it waits for no GPU
    sample = model.sample_iterations

    def paused(*args, **kwargs):
        with counts.paused():
            return sample(*args, **kwargs)

    model.sample_iterations = paused


def test_iteration_sampling_stays_on_the_host(model):
    with pytest.raises(ValueError, match="CPU generator"):
        model.sample_iterations(1, types.SimpleNamespace(device=torch.device("cuda")))
    assert model.sample_iterations(2, torch.Generator().manual_seed(0)) == sorted(
        torch.randperm(3, generator=torch.Generator().manual_seed(0))[:2].tolist()
    )


@pytest.mark.parametrize("batch", [2, 6])
def test_fixed_count_encode_makes_one_sync(model, batch):
    images = random_images(batch, 32)
    assert _syncs(lambda: model.encode(images, criterion="tokens:8")) == 1


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("batch", [2, 6])
def test_scored_encode_makes_one_sync_per_judged_iteration_plus_one(model, batch, static_shapes):
    images = random_images(batch, 32)
    iterations = model.config.iterations
    # judged at counts 1 .. iterations-1 (the last count stops every image without asking)
    budget = (iterations - 1) + 1
    for criterion in ("code-acc:0.99", "code-nll:0.01", "pixel-l1:0.001"):
        n = _syncs(lambda: model.encode(images, criterion=criterion, static_shapes=static_shapes))
        assert n <= budget, (criterion, n)
    n = _syncs(lambda: model.encode(images, criterion="code-acc:0.99", fallback="best", static_shapes=static_shapes))
    assert n <= budget


@pytest.mark.parametrize("lengths", [[8, 8], [4, 12, 8, 12, 4, 8]])
def test_decode_makes_one_sync(model, lengths):
    g = torch.Generator().manual_seed(1)
    from alit_fast import TokenBatch

    tokens = TokenBatch.from_sequences(
        [torch.randint(0, model.config.codebook_size, (n,), generator=g) for n in lengths], model.config.codebook_size
    )
    assert _syncs(lambda: model.decode(tokens)) == 1
    assert _syncs(lambda: model.decode(tokens, batch_size=2)) == 1


def test_out_of_range_images_are_still_caught_inside_the_budget(model):
    images = random_images(2, 32)
    images[1, 0, 3, 3] = 1.5
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*1\.5"):
        model.encode(images, criterion="tokens:8")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        model.encode(images, criterion="code-acc:0.5")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"), torch.no_grad():
        model.rollout(images)
    nan = random_images(2, 32)
    nan[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        model(nan)


def test_nan_weights_are_caught_by_encode_without_a_check_per_op():
    torch.manual_seed(0)
    broken = ALIT(tiny_config()).eval()
    with torch.no_grad():
        broken.pre_quantizer_mlp.weight[0, 0] = float("nan")
    images = random_images(2, 32)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        broken.encode(images, criterion="tokens:8")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        broken.encode(images, criterion="code-acc:0.5")


def _build_run(tmp_path, *extra: str):
    from alit_fast.training.train import Dist, build, parse_args

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dataclasses.asdict(tiny_config())))
    args = parse_args(["--config", str(config), "--data", "synthetic", "--data-length", "8", "--batch-size", "2",
                       "--out", str(tmp_path), "--no-progress", "--halting", "stochastic", "--sample-grad-iters", "2",
                       *extra])
    return build(args, Dist())


def test_training_step_syncs_only_when_it_logs(tmp_path):
    from alit_fast.training.train import Health, read_step, train_step

    run = _build_run(tmp_path, "--ema", "0.99")
    run.model.train()
    health = Health(run.d.device)
    batch = next(iter(run.batches.epoch(0)))
    train_step(run, batch)  # warm-up: optimizer state, lazy imports
    opt_step = run.opt.step

    with count_syncs() as counts:
        # torch's AdamW reads its step counters, which it keeps on the host on every device
        def paused_step(*a, **k):
            with counts.paused():
                return opt_step(*a, **k)

        run.opt.step = paused_step
        _host_sampling_uncounted(run.model, counts)
        result = train_step(run, batch)
        health.update(run.step, result)
    assert counts.total == 0, dict(counts)
    with count_syncs() as counts:
        host = read_step(run, result, health)
    assert counts.total == 1, dict(counts)
    assert not host["bad"] and set(host["per_iteration"]) == set(result.per_iteration)
