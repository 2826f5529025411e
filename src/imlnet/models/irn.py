"""IRN: the image reconstruction network, a deconvolutional decoder after Zeiler & Fergus.

It walks the encoder's units backwards, U4 -> U3 -> U2 -> stem -> image, with transposed
convolutions and ReLU (the paper keeps ReLU so that every reconstructed map stays non-negative,
like the forward maps), and *max-unpooling* at the stem: each value goes back to the position of
the maximum that the encoder's maxpool recorded, zeros elsewhere. ResNet's residual blocks have no
exact inverse, so each stage mirrors the shape of its forward stage instead: a 1x1 transposed
convolution changes the channels (as a bottleneck's 1x1 convolutions do), then a 4x4 stride-2
transposed convolution doubles the resolution where the forward stage halved it, or a 3x3 stride-1
one where it kept it.

The output has no activation: it is compared with the satellite image in the same normalised
space as the network's input (ImageNet mean/std), which is what the data loaders deliver.
"""

from __future__ import annotations

import torch
from torch import nn

from imlnet.models.backbone import UnitFeatures


def _stage(c_in: int, c_out: int, upsample: bool) -> nn.Sequential:
    spatial = (
        nn.ConvTranspose2d(c_out, c_out, 4, stride=2, padding=1, bias=False)
        if upsample
        else nn.ConvTranspose2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
    )
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        spatial,
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class IRNDecoder(nn.Module):
    """Reconstruct a ``(B, 3, H, W)`` image from the unit features of a ``(B, 3, H, W)`` input.

    Args:
        channels: ``[C1, C2, C3, C4]`` of the encoder (``UnitBackbone.channels``).
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.up4 = _stage(c4, c3, upsample=True)  # U4 @ H/16 -> H/8 (layer3 halved it)
        self.up3 = _stage(c3, c2, upsample=True)  # U3 @ H/8 -> H/4 (layer2 halved it)
        self.up2 = _stage(c2, c1, upsample=False)  # U2 @ H/4, 64 channels (layer1 kept H/4)
        self.unpool = nn.MaxUnpool2d(kernel_size=3, stride=2, padding=1)  # H/4 -> H/2
        self.to_image = nn.ConvTranspose2d(c1, 3, 7, stride=2, padding=3, output_padding=1)

    def forward(self, features: UnitFeatures) -> torch.Tensor:
        """Unit features -> ``(B, 3, H, W)`` in the input's normalised space."""
        x = self.up2(self.up3(self.up4(features.maps[3])))
        x = self.unpool(x, features.pool_indices, output_size=features.pre_pool_size)
        return self.to_image(x)
