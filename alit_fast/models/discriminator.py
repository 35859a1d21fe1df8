"""The PatchGAN discriminator of ALIT's stage 2: pix2pix/taming's NLayerDiscriminator (ndf 64,
3 layers, BatchNorm, 4x4 kernels, padding 1), one per rollout iteration, and the hinge losses.

State-dict names follow the official ``gan_losses.{i}.discriminator.main.{0,2,3,5,6,8,9,11}.*``
so an official stage-2 checkpoint's discriminators load as they are. A 256x256 input gives a
30x30 map of logits (2,765,633 parameters at the defaults).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NLayerDiscriminator(nn.Module):
    """conv(s2)+LReLU, then ``n_layers - 1`` conv(s2, no bias)+BN+LReLU, one conv(s1)+BN+LReLU,
    and a 1-channel conv(s1): patch logits [B, 1, h, w]."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """taming's ``weights_init``: conv weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), BN
        biases 0; conv biases keep PyTorch's default init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.normal_(1.0, 0.02, generator=generator)
                    m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), as taming's ``hinge_d_loss``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side: -mean D(x_hat)."""
    return -logits_fake.float().mean()
