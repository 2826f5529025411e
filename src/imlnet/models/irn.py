"""IRN: the image reconstruction network, a deconvolutional decoder after Zeiler & Fergus (2014).

It walks the encoder's units backwards, U4 -> U3 -> U2 -> U1 -> image, with transposed
convolutions and ReLU (the paper keeps ReLU so that every reconstructed map stays non-negative,
like the forward maps), and *max-unpooling* at the stem: each value goes back to the position of
the maximum that the encoder's maxpool recorded, zeros elsewhere.

ResNet's residual blocks have no exact inverse (the paper says so), so each decoder stage mirrors
the *shape change* of its forward unit rather than each layer: a 1x1 transposed convolution changes
the channels (as a bottleneck's 1x1 convolutions do), then a transposed convolution undoes the
unit's stride (4x4, stride 2 where the unit halved the resolution; 3x3, stride 1 where it kept
it). The stem is mirrored exactly: unpooling undoes the maxpool, and a 7x7 stride-2 transposed
convolution undoes conv1. Batch norm after each transposed convolution lets the decoder train
from scratch next to a pretrained encoder (Zeiler & Fergus's deconvnet had no learned weights of
its own; ours are learned, not tied to the encoder's).

The output has no activation: the target is the satellite image in the same ImageNet-normalised
space as the network's input, which is unbounded (about [-2.1, 2.6]); see docs/method.md.
"""

from __future__ import annotations

import torch
from torch import nn

from imlnet.models.backbone import UnitFeatures


def _stage(c_in: int, c_out: int, upsample: bool) -> nn.Sequential:
    """1x1 transposed conv (channels), then a 4x4/2 (upsample) or 3x3/1 transposed conv."""
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

    Only U4 (the map the descriptor is pooled from) and the maxpool's indices are used, so the
    reconstruction loss shapes the features that retrieval uses.

    For an encoder that downsamples by strided convolutions only (EfficientNet-Lite, MobileNetV3,
    RegNet from timm: ``maxpool_indices=False``), the step U2 -> U1 is a learned 4x4 stride-2
    transposed convolution instead of the unpooling, and the last step mirrors a 3x3 stride-2
    stem with a 4x4 stride-2 transposed convolution (the ResNet's 7x7 conv1 keeps its 7x7).

    Args:
        channels: ``[C1, C2, C3, C4]`` of the encoder (``UnitBackbone.channels``).
        maxpool_indices: whether the encoder's U2 max-pools and records the arg-max
            (``has_maxpool_indices`` of the backbone).
    """

    def __init__(self, channels: list[int], maxpool_indices: bool = True) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.up4 = _stage(c4, c3, upsample=True)  # U4 @ H/16 -> H/8 (layer3 halved, layer4 kept)
        self.up3 = _stage(c3, c2, upsample=True)  # U3 @ H/8 -> H/4 (layer2 halved)
        # U2 @ H/4, to the stem's channels; without unpooling this stage also doubles the size
        self.up2 = _stage(c2, c1, upsample=not maxpool_indices)
        self.unpool = (
            nn.MaxUnpool2d(kernel_size=3, stride=2, padding=1) if maxpool_indices else None
        )  # H/4 -> H/2 (maxpool)
        self.to_image = (
            nn.ConvTranspose2d(c1, 3, 7, stride=2, padding=3, output_padding=1)
            if maxpool_indices
            else nn.ConvTranspose2d(c1, 3, 4, stride=2, padding=1)
        )

    def forward(self, features: UnitFeatures) -> torch.Tensor:
        """Unit features of a ``(B, 3, H, W)`` batch -> ``(B, 3, H, W)`` (normalised space)."""
        x = self.up2(self.up3(self.up4(features.maps[3])))
        if self.unpool is not None:
            if features.pool_indices is None:
                raise ValueError("this IRN decoder unpools: it needs the encoder's maxpool indices")
            x = self.unpool(x, features.pool_indices, output_size=features.pre_pool_size)
        return self.to_image(x)
