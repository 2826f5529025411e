"""MUML: multi-unit mutual learning with class activation maps and attention crops.

Each unit i gets a head f_i = (1x1 reduction) -> conv3x3 -> BN -> ELU and a classifier over the
training buildings. For an image and its building c, the class activation map of unit i is
``CAM_i(x, y) = sum_k w_k^c F_i,k(x, y)`` (F_i the head's map, w^c the classifier's row of c). It is
resized to the input with a bilinear kernel, min-max normalised, thresholded at ``theta``; the
bounding box of the mask, padded, is cropped from the input and resized back to the input size.
These crops are extra training samples with the same label (see ``IMLNetObjective`` for the
mutual-learning rule). Everything here is vectorised over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align


class UnitHead(nn.Module):
    """``f_i``: ``(B, C_i, h, w)`` -> map ``(B, C', h, w)`` and logits ``(B, num_classes)``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        reduce = in_channels > channels
        self.reduce = nn.Conv2d(in_channels, channels, 1, bias=False) if reduce else nn.Identity()
        width = channels if reduce else in_channels
        self.conv = nn.Conv2d(width, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ELU(inplace=True)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.act(self.bn(self.conv(self.reduce(x))))
        return fmap, self.classifier(fmap.mean(dim=(2, 3)))


def class_activation_map(
    fmap: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """``CAM(x, y) = sum_k w_k^c F_k(x, y)`` for each image's class ``c = target[b]``.

    Args:
        fmap: ``(B, C, h, w)``; weight: ``(num_classes, C)``; target: ``(B,)`` class indices.

    Returns:
        ``(B, h, w)``.
    """
    return torch.einsum("bchw,bc->bhw", fmap, weight[target])


def normalize_maps(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize ``(B, h, w)`` -> ``(B, H, W)``, then per-image min-max to [0, 1].

    A flat map becomes all zeros (no region stands out).
    """
    up = F.interpolate(cams[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    return (up - lo) / (hi - lo).clamp_min(1e-12) * (hi > lo)


def attention_boxes(maps: torch.Tensor, theta: float = 0.5, pad: float = 0.1) -> torch.Tensor:
    """Bounding boxes of ``maps > theta``, padded by ``pad`` x their size, clipped to the image.

    Args:
        maps: ``(B, H, W)`` normalised attention maps in [0, 1].

    Returns:
        ``(B, 4)`` float boxes ``(x1, y1, x2, y2)`` in pixel edge coordinates (a box covering
        pixel columns a..b has x1 = a, x2 = b + 1). An empty mask gives the whole image.
    """
    _, h, w = maps.shape
    mask = maps > theta
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (B, H), (B, W)
    y1 = rows.float().argmax(dim=1)
    y2 = h - rows.flip(1).float().argmax(dim=1)
    x1 = cols.float().argmax(dim=1)
    x2 = w - cols.flip(1).float().argmax(dim=1)
    box = torch.stack([x1, y1, x2, y2], dim=1).float()
    empty = ~rows.any(dim=1)
    box[empty] = torch.tensor([0.0, 0.0, float(w), float(h)], device=maps.device)
    bw, bh = (box[:, 2] - box[:, 0]) * pad, (box[:, 3] - box[:, 1]) * pad
    box = box + torch.stack([-bw, -bh, bw, bh], dim=1)
    limit = torch.tensor([w, h, w, h], device=maps.device, dtype=box.dtype)
    return torch.minimum(box.clamp_min(0), limit)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Crop ``boxes`` ``(B, 4)`` out of ``images`` ``(B, 3, H, W)`` and resize to ``size``.

    Bilinear ``roi_align`` (box edges in pixel coordinates, ``aligned=True``, adaptive samples per
    output pixel, so a crop the size of the output returns its pixels exactly), one
    box per image, all in one call.
    """
    size = size or tuple(images.shape[-2:])
    idx = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype)[:, None]
    rois = torch.cat([idx, boxes.to(images.dtype)], dim=1)
    return roi_align(
        images,
        rois.to(images.dtype),
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )
