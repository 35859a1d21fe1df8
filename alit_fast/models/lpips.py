"""LPIPS (v0.1, VGG16 backbone): the perceptual distance of Zhang et al., 2018, as the ``lpips``
package computes it, carried in-project because neither ``lpips`` nor ``torchvision`` imports
with the CPU torch wheel used here.

Layout: ``features`` is torchvision's ``vgg16().features`` up to relu5_3 (indices 0..29, the
same indices), so the ``features.*`` entries of torchvision's ``vgg16-397923af.pth`` load
unchanged; ``lins.k`` is ``[Dropout, 1x1 conv without bias]`` per tap, the lpips heads
(``lin{k}.model.1.weight`` in lpips's ``weights/v0.1/vgg.pth``; alit_fast.io maps the names).

Distance per image: scale both inputs (``(x - shift) / scale``, lpips's constants, which
assume [-1, 1] inputs), take the five taps relu1_2, 2_2, 3_3, 4_3, 5_3, unit-normalize each over
channels, square the difference, weight channels by the head, average over space, sum the taps.

nn code only: files are read by ``alit_fast.io.lpips_weights.load_lpips``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# torchvision's VGG16 "D" configuration, convolutions only; "M" is a 2x2 max pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# indices in ``features`` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# lpips's ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips's normalize_tensor adds this to the channel norm
NORM_EPS = 1e-10


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features[:30]``: same modules at the same indices."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


def unit_normalize(features: torch.Tensor) -> torch.Tensor:
    """Divide by the channel-wise L2 norm (plus lpips's epsilon), in fp32 at least: under fp16
    autocast the sum of squares of 512 channels overflows and 1e-10 underflows."""
    f = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


class LPIPS(nn.Module):
    """``LPIPS()(x, y)`` -> the distance per image, [B], for images in [-1, 1] of any size the
    four max pools accept (16x16 and up). Random weights until loaded (see alit_fast.io)."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        # the dropout is lpips's (use_dropout=True); it acts only in train mode, which a frozen
        # loss network is kept out of unless a caller asks for the official stage-2 quirk
        self.lins = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Conv2d(c, 1, kernel_size=1, bias=False)) for c in TAP_CHANNELS
        )

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five VGG16 activations LPIPS compares, for scaled inputs."""
        out = []
        h = x
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two [B, 3, H, W] batches of the same shape, got {list(x.shape)} and {list(y.shape)}"
            )
        # one pass over both batches: half the kernel launches of two
        both = torch.cat([x, y]).to(self.shift.dtype)
        feats = self.taps((both - self.shift) / self.scale)
        B = x.shape[0]
        total = None
        for f, lin in zip(feats, self.lins):
            a, b = unit_normalize(f[:B]), unit_normalize(f[B:])
            diff = (a - b).pow(2)
            d = lin(diff.to(lin[1].weight.dtype)).float().mean(dim=(1, 2, 3))
            total = d if total is None else total + d
        return total
