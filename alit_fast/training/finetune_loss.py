"""The stage-2 ("full fine-tuning") losses of ALIT, VQGAN or KL-VAE base.

At the loss iteration k the image is rebuilt from the decoder's output with gradients into ALIT
and the base tokenizer's encoder and decoder:
- VQGAN base: the soft code (softmax of the logits times the frozen VQGAN codebook) through the
  VQGAN decoder;
- VAE base: the regressed latents through the KL-VAE decode, without undoing the 0.2325 scale
  (as official); the encoder trains through its posterior sample, drawn from ``generator``.
Generator loss:

    L1(x, x_hat) + lpips_weight * LPIPS(x, x_hat)
      + adaptive_weight * gan_factor * (-mean D_k(x_hat)) + the 1D VQ loss at k

(no VQ loss for continuous tokens, no KL term for the VAE) with taming's adaptive weight
||grad_W rec|| / (||grad_W g|| + 1e-4), clamped to [0, 1e4] and detached, W the base decoder's
last conv (``last_layer``). Discriminator loss: hinge on D_k(x) and D_k(x_hat detached), real
and fake in two calls (BatchNorm statistics per call, as official).

Pure functions of modules and tensors; the loop, optimizers and schedule are in finetune.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models import ALITCore, BaseOutput
from ..models.discriminator import hinge_d_loss, hinge_g_loss
from ..models.lpips import LPIPS

# the official schedule (epochs of 200): GAN off for epochs 0..20, 0.2 for 21..100, then 0.8
OFFICIAL_GAN_SCHEDULE = ((21 / 200, 0.2), (101 / 200, 0.8))


def parse_gan_schedule(spec: str) -> tuple[tuple[float, float], ...]:
    """``"0.105:0.2,0.505:0.8"`` -> ((0.105, 0.2), (0.505, 0.8)): from each fraction of the run on,
    the GAN factor is the value (0 before the first). ``"off"``: no GAN at all."""
    if spec.strip().lower() == "off":
        return ()
    points = []
    for part in spec.split(","):
        try:
            start, value = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"--gan-schedule: {part!r} is not FRACTION:FACTOR (e.g. 0.105:0.2)") from None
        if not (0.0 <= start <= 1.0) or not (value >= 0.0) or value != value or value == float("inf"):
            raise ValueError(f"--gan-schedule: {part!r} needs a fraction in [0, 1] and a finite factor >= 0")
        points.append((start, value))
    if [p[0] for p in points] != sorted(p[0] for p in points):
        raise ValueError(f"--gan-schedule: the fractions must increase, got {spec!r}")
    return tuple(points)


def gan_factor(schedule: tuple[tuple[float, float], ...], progress: float) -> float:
    """The GAN factor at ``progress`` (a fraction of the run in [0, 1])."""
    value = 0.0
    for start, v in schedule:
        # a small tolerance: 21/200 computed as a float must switch at epoch 21 exactly
        if progress >= start - 1e-9:
            value = v
    return value


def reconstruct(
    model: ALITCore, images: torch.Tensor, iteration: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels rebuilt at ``iteration`` and that iteration's 1D VQ loss (0 for continuous tokens),
    with gradients into ALIT and the base tokenizer's encoder and decoder (the VQGAN codebook is
    detached in ``soft_code``). For the VAE the posterior sample is drawn with ``generator`` (on
    the images' device) and its gradient reaches the encoder through mean and std.

    Only iterations 0..k run and only k is decoded; halting is off: in the official stage 2 it
    is applied after the loss iteration's loss, so it never changes the loss. The VQGAN's own
    code lookup is skipped for the same reason (it only feeds halting)."""
    base = model.base_tokenizer
    if model.config.is_vae:
        mean, std = base.posterior(images)
        code = BaseOutput(z=base.latents(mean, std, generator), mean=mean, std=std)
    else:
        code = BaseOutput(z=base.vqgan.encoder(images), gt_indices=None)
    carry, _ = model.start_carry(images, code)
    for t in range(iteration + 1):
        out, carry = model.step(carry, t, None, decode=t == iteration, halting="off", final=t == iteration)
    return model.reconstruct(out.logits), out.vq_loss


def last_layer(model: ALITCore) -> torch.Tensor:
    """The weight the adaptive weight balances the gradients at: the base decoder's last conv
    (official ``vqgan.decoder.conv_out.weight`` / ``vae.decoder.conv_out.weight``)."""
    base = model.base_tokenizer
    decoder = base.vae.decoder if model.config.is_vae else base.vqgan.decoder
    return decoder.conv_out.weight


def adaptive_weight(rec: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight`` (without the discriminator weight): the GAN term's
    gradient at ``last_layer`` scaled to the reconstruction term's, on the unscaled losses."""
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    return (rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()


@dataclass
class LossOptions:
    lpips_weight: float = 1.0
    # the official quirk: LPIPS fed [0, 1] images (its scaling layer assumes [-1, 1])
    lpips_unit_range: bool = False
    # the official quirk: the GAN term and its adaptive weight are computed (at factor 0) even
    # while the GAN is off, so the discriminator's BatchNorm statistics move and it gets (zero) grads
    gan_term_when_off: bool = False


def generator_loss(
    model: ALITCore,
    discriminator: nn.Module,
    lpips: LPIPS | None,
    images: torch.Tensor,
    iteration: int,
    factor: float,
    options: LossOptions,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The generator loss at ``iteration`` and its terms (0-d tensors; ``loss`` has the graph).
    ``generator`` draws the VAE's posterior sample."""
    x_hat, vq_loss = reconstruct(model, images, iteration, generator)
    l1 = (images.float() - x_hat.float()).abs().mean()
    rec = l1
    terms: dict[str, torch.Tensor] = {"l1": l1.detach(), "vq": vq_loss.detach()}
    if lpips is not None:
        if options.lpips_unit_range:
            p = lpips(images, x_hat).mean()
        else:
            p = lpips(images * 2 - 1, x_hat * 2 - 1).mean()
        rec = rec + options.lpips_weight * p
        terms["lpips"] = p.detach()
    loss = rec + vq_loss
    if factor > 0 or options.gan_term_when_off:
        g = hinge_g_loss(discriminator(x_hat))
        # the official code resets the discriminator weight to 0.2 while the GAN is off; its
        # product with the zero factor is zero either way
        d_weight = adaptive_weight(rec, g, last_layer(model))
        loss = loss + d_weight * factor * g
        terms["g_loss"] = g.detach()
        terms["d_weight"] = d_weight
    terms["loss"] = loss.detach()
    terms["rec"] = rec.detach()
    return {"loss_graph": loss, **terms}


def discriminator_loss(
    model: ALITCore,
    discriminator: nn.Module,
    images: torch.Tensor,
    iteration: int,
    factor: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The hinge loss of the iteration's discriminator on real images and detached fakes.
    ``generator`` draws the VAE's posterior sample (the official step samples here too)."""
    with torch.no_grad():
        # the official step runs the generator with its graph and then discards every gradient
        # but the discriminator's; without one the result is the same
        x_hat, _ = reconstruct(model, images, iteration, generator)
    logits_real = discriminator(images)
    logits_fake = discriminator(x_hat.detach())
    d = factor_gate(factor) * hinge_d_loss(logits_real, logits_fake)
    return {
        "loss_graph": d,
        "d_loss": d.detach(),
        "logits_real": logits_real.detach().float().mean(),
        "logits_fake": logits_fake.detach().float().mean(),
    }


def factor_gate(factor: float) -> float:
    """taming's ``disc_factor``: 1 once the GAN is on (the official code sets the global step to
    +-inf, so ``disc_start`` never matters), else 0."""
    return 1.0 if factor > 0 else 0.0
