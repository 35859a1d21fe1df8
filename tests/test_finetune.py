"""Stage-2 training (--stage finetune): the generator loss falls on both backends, which
discriminators train with and without --official-quirks, exact resume, official stage-2
checkpoints (gan_losses.*) for inference and continued fine-tuning, LPIPS wiring, usage errors;
the KL-VAE variant (loss falls, exact resume, adaptive weight at the VAE decoder's last layer)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alit_fast import ALIT
from alit_fast.io import load_official
from alit_fast.io.gan_checkpoint import discriminator_state, read_discriminators
from alit_fast.models.discriminator import hinge_g_loss
from alit_fast.testing import random_images, tiny_config, tiny_vae_config
from alit_fast.training.finetune import init_discriminators
from alit_fast.training.finetune_loss import LossOptions, gan_factor, generator_loss, last_layer, parse_gan_schedule
from alit_fast.training.stages import main as train_main
from tests._single_thread import one_thread  # noqa: F401
from tests.test_lpips import official_lpips_keys, random_heads, random_vgg16

NDF = 8  # a narrow PatchGAN keeps the tests fast; the official width (64) is tested on a checkpoint


def _stage1_files(root: Path, cfg, config_name: str) -> dict:
    """A seeded stage-1 model file and its config file, as stage 2 starts from them."""
    (root / config_name).write_text(json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(0)
    model = ALIT(cfg)
    model.save(str(root / "stage1.safetensors"))
    return {"root": root, "config": str(root / config_name), "init": str(root / "stage1.safetensors"), "model": model}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _stage1_files(tmp_path_factory.mktemp("finetune"), tiny_config(), "tiny.json")


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    return _stage1_files(tmp_path_factory.mktemp("finetune_vae"), tiny_vae_config(), "tiny_vae.json")


def _run(files, out: Path, *extra: str) -> int:
    argv = ["--stage", "finetune", "--init", files["init"], "--config", files["config"], "--data", "synthetic",
            "--data-length", "8", "--batch-size", "2", "--lr", "1e-3", "--warmup", "0", "--threads", "1",
            "--no-progress", "--lpips", "off", "--disc-ndf", str(NDF), "--gan-schedule", "0:0.2", "--out", str(out),
            *extra]
    return train_main(argv)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _discs(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    return read_discriminators(str(out / "discriminators.safetensors"))


def _changed(out: Path, ndf: int = NDF) -> list[bool]:
    """Per discriminator: whether any parameter moved from its seeded init."""
    init = init_discriminators(3, ndf, 3, seed=0)
    found = _discs(out)
    return [any(not torch.equal(found[i][k], v) for k, v in d.named_parameters()) for i, d in enumerate(init)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_few_finetune_steps_lower_the_generator_loss(files, tmp_path, backend):
    # one fixed batch (one step per epoch: the loss is always at iteration 0), GAN on, no
    # discriminator step: the generator loss on that batch must fall
    steps = "4" if backend == "torch" else "2"  # the triton kernels run in the interpreter on CPUs
    rc = _run(files, tmp_path, "--backend", backend, "--steps", steps, "--data-length", "1", "--batch-size", "1",
              "--lr", "2e-3")
    assert rc == 0
    log = _log(tmp_path)
    assert [r["kind"] for r in log] == ["generator"] * int(steps)
    assert all(r["gan_factor"] == 0.2 and {"l1", "vq", "g_loss", "d_weight", "loss"} <= set(r) for r in log)
    assert log[-1]["loss"] < log[0]["loss"] * 0.95 and log[-1]["l1"] < log[0]["l1"], [r["loss"] for r in log]
    # fixed: the generator's GAN term does not move the discriminator it fools
    assert _changed(tmp_path) == [False, False, False]


def test_each_discriminator_trains_by_default(files, tmp_path):
    # 4 steps per epoch, every 2nd a discriminator step: 4 of them over 8 steps, round-robin
    assert _run(files, tmp_path, "--steps", "8", "--disc-every", "2") == 0
    log = _log(tmp_path)
    assert [r["kind"][0] for r in log] == list("gdgdgdgd")
    assert [r["iteration"] for r in log if r["kind"] == "discriminator"] == [0, 1, 2, 0]
    assert [r["iteration"] for r in log if r["kind"] == "generator"] == [0, 1, 0, 1]  # reset at each epoch
    assert all({"d_loss", "logits_real", "logits_fake"} <= set(r) for r in log if r["kind"] == "discriminator")
    assert _changed(tmp_path) == [True, True, True]


def test_official_quirks_give_discriminator_steps_to_the_first_only(files, tmp_path):
    # 3 iterations and a discriminator step in 4 (the official 8 and 9): the generator's counter
    # is a multiple of 3 at every discriminator step
    assert _run(files, tmp_path, "--steps", "8", "--disc-every", "4", "--official-quirks") == 0
    log = _log(tmp_path)
    assert [r["iteration"] for r in log if r["kind"] == "discriminator"] == [0, 0]
    # D1 and D2 still move: the generator optimizer steps them on generator steps (the other quirk)
    assert [r["iteration"] for r in log if r["kind"] == "generator"] == [0, 1, 2, 0, 1, 2]
    assert _changed(tmp_path) == [True, True, True]


def test_resume_is_exact(files, tmp_path):
    # 4 steps per epoch, g d | g d: each half has both kinds of step
    common = ("--steps", "4", "--disc-every", "2", "--ema", "0.9", "--save-every", "100")
    assert _run(files, tmp_path / "full", *common) == 0
    assert _run(files, tmp_path / "split", *common, "--stop-at", "2") == 0
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert _run(files, tmp_path / "split", *common, "--resume") == 0
    drop = ("time", "images_per_s")
    full = [{k: v for k, v in r.items() if k not in drop} for r in _log(tmp_path / "full")]
    split = [{k: v for k, v in r.items() if k not in drop} for r in _log(tmp_path / "split")]
    assert full == split
    for name in ("model.safetensors", "ema.safetensors", "discriminators.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _official_stage2_checkpoint(files, path: Path) -> dict:
    """The official stage-2 layout: model/ema dicts with gan_losses.{i}.discriminator.* (the
    official width) and gan_losses.{i}.perceptual_loss.* (a frozen LPIPS copy per iteration)."""
    state = dict(files["model"].state_dict())
    g = torch.Generator().manual_seed(5)
    discs = init_discriminators(3, 64, 3, seed=11)
    for d in discs:
        for p in d.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.01)
    gan = discriminator_state(discs)
    lpips_keys = {f"gan_losses.{i}.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1) for i in range(3)}
    torch.save({"model": {**state, **gan, **lpips_keys}, "ema": {**state, **gan, **lpips_keys}, "epoch": 199}, path)
    return gan


def test_official_stage2_checkpoint_loads_for_inference_and_continued_finetuning(files, tmp_path):
    path = tmp_path / "official_stage2.pth"
    gan = _official_stage2_checkpoint(files, path)
    model = load_official(path)  # inference: the discriminators and LPIPS copies are ignored
    images = random_images(2, 32, seed=3)
    ref = files["model"].rollout(images)[-1].logits
    torch.testing.assert_close(model.rollout(images)[-1].logits, ref, rtol=0, atol=0)
    found = read_discriminators(path)
    assert sorted(found) == [0, 1, 2] and "main.3.running_var" in found[0]
    # continued fine-tuning starts from the checkpoint's discriminators (one generator step
    # leaves them as they were)
    rc = _run(files, tmp_path / "run", "--init", str(path), "--config", files["config"], "--disc-ndf", "64",
              "--steps", "1", "--data-length", "2")
    assert rc == 0
    saved = load_file(tmp_path / "run" / "discriminators.safetensors")
    assert saved.keys() == gan.keys()
    # parameters only: the generator step's forward through D (train mode) moves BN statistics
    params = [k for k in gan if not any(s in k for s in ("running_", "num_batches"))]
    assert len(params) == 3 * 13 and all(torch.equal(saved[k], gan[k]) for k in params)


def test_lpips_term_with_weights_from_an_official_checkpoint_or_files(files, tmp_path, capsys):
    # the LPIPS an official stage-2 checkpoint stores (gan_losses.*.perceptual_loss.*); the
    # file-based loading is tested in test_lpips.py, its options' wiring by the error below
    torch.save({"model": official_lpips_keys(random_vgg16(), random_heads(), copies=1)}, tmp_path / "official.pth")
    rc = _run(files, tmp_path / "run", "--lpips", "on", "--lpips-checkpoint", str(tmp_path / "official.pth"),
              "--steps", "1", "--data-length", "2")
    assert rc == 0
    log = _log(tmp_path / "run")
    assert all(r["lpips"] > 0 and abs(r["rec"] - (r["l1"] + r["lpips"])) < 1e-5 for r in log)
    rc = _run(files, tmp_path / "missing", "--lpips", "on", "--vgg-weights", str(tmp_path / "nowhere.pth"),
              "--steps", "1", "--data-length", "2")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("alit-fast train:") and "nowhere.pth" in err and "\n" not in err


@pytest.mark.parametrize("extra,message", [
    (("--base-cache", "x"), "--base-cache is a stage-1 option"),
    (("--disc-every", "1"), "--disc-every must be >= 2"),
    (("--gan-schedule", "0.5"), "is not FRACTION:FACTOR"),
])
def test_usage_errors_are_one_line(files, tmp_path, capsys, extra, message):
    assert _run(files, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_init_is_refused(capsys):
    assert train_main(["--stage", "finetune", "--data", "synthetic"]) == 2
    assert "--init is required" in capsys.readouterr().err


def test_gan_schedule_is_the_official_one_as_fractions():
    points = parse_gan_schedule("0.105:0.2,0.505:0.8")
    factors = [gan_factor(points, epoch / 200) for epoch in range(200)]
    assert factors[:21] == [0.0] * 21 and factors[21:101] == [0.2] * 80 and factors[101:] == [0.8] * 99
    assert parse_gan_schedule("off") == ()


def test_stage1_ema_epoch_reset_copies_the_live_weights_at_each_epoch(files, tmp_path):
    # 4 steps per epoch; an EMA that barely moves (decay ~1) holds the weights of the last epoch
    # start with the reset (step 4); without it, it would hold the initial ones
    from alit_fast.training.stages import main as stages_main

    def run(out, *extra):
        return stages_main(["--init", files["init"], "--config", files["config"], "--data", "synthetic",
                            "--data-length", "8", "--batch-size", "2", "--lr", "1e-2", "--threads", "1",
                            "--no-progress", "--halting", "off", "--ema", "0.99999999", "--steps", "5", "--out",
                            str(out), *extra])

    assert run(tmp_path / "reset", "--ema-epoch-reset", "--stop-at", "4") == 0
    at_4 = torch.load(tmp_path / "reset" / "checkpoint.pt", weights_only=True)["model"]
    assert run(tmp_path / "reset", "--ema-epoch-reset", "--resume") == 0
    key = "encoder.transformer.0.mlp.c_fc.weight"
    init = files["model"].state_dict()[key]
    torch.testing.assert_close(load_file(tmp_path / "reset" / "ema.safetensors")[key], at_4[key], rtol=0, atol=1e-6)
    assert (at_4[key] - init).abs().max() > 1e-3


@pytest.mark.parametrize("switch", ["--ema-epoch-reset", "--official-quirks"])
def test_stage2_resets_the_ema_each_epoch_when_asked_or_as_an_official_quirk(files, tmp_path, switch):
    # as in stage 1: 4 steps per epoch, an EMA that barely moves holds the weights of step 4
    out = tmp_path / "reset"
    common = ("--ema", "0.99999999", switch, "--lr", "1e-2", "--steps", "5")
    assert _run(files, out, *common, "--stop-at", "4") == 0
    at_4 = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert _run(files, out, *common, "--resume") == 0
    key = "encoder.transformer.0.mlp.c_fc.weight"
    torch.testing.assert_close(load_file(out / "ema.safetensors")[key], at_4[key], rtol=0, atol=1e-6)
    assert (at_4[key] - files["model"].state_dict()[key]).abs().max() > 1e-3


def test_torchrun_two_processes_end_with_the_same_weights(files, tmp_path):
    # each rank sees other images: the same weights at the end need the gradient average (a
    # generator step and a discriminator step) and rank 0's BatchNorm statistics
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alit_fast.train",
           "--stage", "finetune", "--init", files["init"], "--config", files["config"], "--data", "synthetic",
           "--data-length", "8", "--batch-size", "2", "--steps", "2", "--lr", "1e-3", "--lpips", "off",
           "--disc-ndf", str(NDF), "--gan-schedule", "0:0.2", "--disc-every", "2", "--no-progress",
           "--weights-digest", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.findall(r"rank (\d) weights sha256 (\w+) discriminators (\w+)", proc.stdout)
    digests = {rank: (model, discs) for rank, model, discs in found}
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], proc.stdout
    assert [r["kind"] for r in _log(tmp_path)] == ["generator", "discriminator"]


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(files, tmp_path, monkeypatch, capsys):
    import alit_fast.training.finetune as finetune

    real = finetune.generator_loss
    calls = []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second generator step goes bad
            terms["loss_graph"] = terms["loss_graph"] * float("nan")
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(finetune, "generator_loss", poisoned)
    assert _run(files, tmp_path, "--steps", "4", "--save-every", "1", "--data-length", "2") == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 2" in err and "step 1" in err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "model.safetensors").exists()


def test_fp16_steps_the_grad_scaler_skips_do_not_stop_the_run(files, tmp_path):
    # the first steps overflow at the GradScaler's initial scale (65536): skipped, not fatal
    assert _run(files, tmp_path, "--amp", "fp16", "--steps", "2", "--data-length", "2") == 0
    log = _log(tmp_path)
    assert len(log) == 2 and not all(r["grad_norm"] < float("inf") for r in log), [r["grad_norm"] for r in log]
    assert all(r["loss"] < float("inf") for r in log)


# ---------------------------------------------------------------------------- the KL-VAE variant
def test_few_vae_finetune_steps_lower_the_generator_loss(vae_files, tmp_path):
    # as the VQGAN test: one fixed batch, GAN on, loss at iteration 0; a fresh posterior sample
    # each step, so the fall is on the loss, not on one draw's noise
    rc = _run(vae_files, tmp_path, "--steps", "4", "--data-length", "1", "--batch-size", "1", "--lr", "2e-3")
    assert rc == 0
    log = _log(tmp_path)
    assert [r["kind"] for r in log] == ["generator"] * 4
    assert all({"l1", "vq", "g_loss", "d_weight", "loss"} <= set(r) and r["vq"] > 0 for r in log)
    assert log[-1]["loss"] < log[0]["loss"] * 0.95 and log[-1]["l1"] < log[0]["l1"], [r["loss"] for r in log]
    # the whole KL-VAE trained (nothing of it is frozen, as official), the encoder included
    final = load_file(tmp_path / "model.safetensors")
    init = vae_files["model"].state_dict()
    for key in ("base_tokenizer.vae.encoder.conv_in.weight", "base_tokenizer.vae.quant_conv.weight",
                "base_tokenizer.vae.post_quant_conv.weight", "base_tokenizer.vae.decoder.conv_out.weight"):
        assert not torch.equal(final[key], init[key]), key


def test_vae_finetune_resume_is_exact(vae_files, tmp_path):
    # g d | g d: the posterior samples of both kinds of step come from the checkpointed stream
    common = ("--steps", "4", "--disc-every", "2", "--ema", "0.9", "--save-every", "100")
    assert _run(vae_files, tmp_path / "full", *common) == 0
    assert _run(vae_files, tmp_path / "split", *common, "--stop-at", "2") == 0
    assert _run(vae_files, tmp_path / "split", *common, "--resume") == 0
    drop = ("time", "images_per_s")
    full = [{k: v for k, v in r.items() if k not in drop} for r in _log(tmp_path / "full")]
    split = [{k: v for k, v in r.items() if k not in drop} for r in _log(tmp_path / "split")]
    assert full == split and [r["kind"][0] for r in full] == list("gdgd")
    for name in ("model.safetensors", "ema.safetensors", "discriminators.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_vae_adaptive_weight_is_taken_at_the_vae_decoders_last_layer(vae_files):
    model = copy.deepcopy(vae_files["model"]).requires_grad_(True).double()
    assert last_layer(model) is model.base_tokenizer.vae.decoder.conv_out.weight
    disc = init_discriminators(1, NDF, 3, seed=0)[0].double()
    images = random_images(2, 32, seed=4).double()
    terms = generator_loss(model, disc, None, images, 1, 0.2, LossOptions(), torch.Generator().manual_seed(7))
    # the reference: the same posterior sample, decoded, the gradient norms at the VAE's conv_out
    vae = model.base_tokenizer.vae
    mean, std = vae.posterior(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7)).double()
    records = model.rollout(images, iterations=2, base=model.resolve_base(_vae_base(mean, std, noise, model)))
    x_hat = vae.decode(records[1].logits.transpose(1, 2).reshape(2, -1, 8, 8))
    rec = (images - x_hat).abs().mean()
    g = hinge_g_loss(disc(x_hat))
    w = vae.decoder.conv_out.weight
    ref = torch.autograd.grad(rec, w, retain_graph=True)[0].norm() / (torch.autograd.grad(g, w)[0].norm() + 1e-4)
    # the loss takes its L1 in float32
    torch.testing.assert_close(terms["l1"].double(), rec.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["d_weight"].double(), ref, rtol=1e-5, atol=0)
    # the encoder is trained through the posterior sample
    terms["loss_graph"].backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.quant_conv.weight.grad.abs().sum() > 0


def _vae_base(mean, std, noise, model):
    from alit_fast.models import BaseOutput

    return BaseOutput(z=model.base_tokenizer.latents(mean, std, noise=noise), mean=mean, std=std)


def test_vae_continuous_tokens_have_no_vq_term():
    torch.manual_seed(1)
    model = ALIT(tiny_vae_config(quantize_latent=False)).requires_grad_(True)
    disc = init_discriminators(1, NDF, 3, seed=0)[0]
    terms = generator_loss(model, disc, None, random_images(2, 32, seed=5), 0, 0.0, LossOptions(),
                           torch.Generator().manual_seed(3))
    assert terms["vq"] == 0 and torch.equal(terms["loss"], terms["rec"]) and terms["rec"] > 0
