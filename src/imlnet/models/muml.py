"""MUML: multi-unit mutual learning with class activation maps and attention crops.

Each unit i gets a head f_i = (1x1 reduction) -> conv3x3 -> BN -> ELU and, after global average
pooling, a linear classifier over the training buildings. For an image of building c, the class
activation map of unit i is ``CAM_i(x, y) = sum_k w_k^c F_i,k(x, y)`` (F_i the head's map, w^c the
classifier's row of c; with average pooling the logit of c is the mean of this map plus a bias,
which is what makes it a CAM). The map is resized to the input with a bilinear kernel, min-max
normalised per image, thresholded at ``theta``; the bounding box of the mask, padded, is cropped
from the input and resized back to the input size. These crops are extra training samples with
the same label (the mutual-learning rule that trains on them is in :mod:`imlnet.losses.mutual`).

Everything here works on whole batches at once: no Python loop over images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

#: Names of the five attention maps / boxes / crops, in the order :func:`unit_attention` gives them.
CROP_NAMES = ("unit1", "unit2", "unit3", "unit4", "combined")


class UnitHead(nn.Module):
    """``f_i`` and its classifier: ``(B, C_i, h, w)`` -> map ``(B, C', h / p, w / p)``, logits.

    ``[avg-pool p x p] -> [linear 1x1: C_i -> W when C_i > W] -> conv3x3(-> C') -> BN -> ELU``,
    then global average pooling and a linear classifier (so the map is a class activation map).
    With ``pool=1, width=C'`` this is the paper's head at the unit's resolution (the 1x1 only
    where the unit is wider than C'). The pooled, narrower form (``IMLNet(muml_head="pooled")``)
    costs a fraction of it; see docs/method.md.

    Args:
        in_channels: C_i of the unit map.
        channels: C' of the head's map (the CAM's channels).
        num_classes: N training buildings.
        pool: average-pooling factor applied to the unit map first (1: none).
        width: input channels of the 3x3 convolution (default C'); a wider unit map is reduced
            to it by a linear 1x1 convolution.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        pool: int = 1,
        width: int | None = None,
    ) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        width = channels if width is None else int(width)
        self.pool = int(pool)
        reduce = in_channels > width
        self.reduce = nn.Conv2d(in_channels, width, 1, bias=False) if reduce else nn.Identity()
        self.conv = nn.Conv2d(width if reduce else in_channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ELU(inplace=True)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit map -> (head map ``F_i``, logits of its globally average-pooled vector)."""
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        fmap = self.act(self.bn(self.conv(self.reduce(x))))
        return fmap, self.classifier(fmap.mean(dim=(2, 3)))


def build_heads(
    feature_info: Sequence[dict], channels: int, num_classes: int, kind: str = "pooled"
) -> nn.ModuleList:
    """The four MUML heads for an encoder's units (``UnitBackbone.feature_info``).

    Args:
        feature_info: per unit, ``num_chs`` and ``reduction`` (2, 4, 8, 16).
        channels: C'; num_classes: N.
        kind: ``"paper"``: each head at its unit's resolution, 3x3 input width C';
            ``"pooled"``: each unit map average-pooled to the last unit's grid and reduced to
            C'/4 channels before the 3x3 convolution.
    """
    if kind == "paper":
        return nn.ModuleList(
            UnitHead(int(f["num_chs"]), channels, num_classes) for f in feature_info
        )
    last = int(feature_info[-1]["reduction"])
    width = max(1, channels // 4)
    return nn.ModuleList(
        UnitHead(int(f["num_chs"]), channels, num_classes, last // int(f["reduction"]), width)
        for f in feature_info
    )


def cam(unit_map: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class activation map ``CAM(x, y) = sum_k w_k^c F_k(x, y)`` for each image's class.

    Args:
        unit_map: ``(B, C, h, w)`` head maps F.
        weights: ``(num_classes, C)`` classifier weights.
        target: ``(B,)`` class index c of each image.

    Returns:
        ``(B, h, w)``.
    """
    return torch.einsum("bchw,bc->bhw", unit_map, weights[target].to(unit_map.dtype))


def attention_maps(cams: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize ``(B, h, w)`` -> ``(B, H, W)``, then per-image min-max to [0, 1].

    A flat map becomes all zeros: no region stands out, so no box is found (full image).
    """
    up = F.interpolate(
        cams[:, None].float(), size=tuple(image_size), mode="bilinear", align_corners=False
    )[:, 0]
    return _min_max(up)


#: Relative spread below which a map counts as flat: float32 rounding of the bilinear resize
#: (a constant 2.5 comes back as 2.5 +- 2.4e-7) must not be blown up into a region.
FLAT_TOLERANCE = 1e-5


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of ``(B, H, W)`` to [0, 1]; (nearly) flat maps -> 0."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    spread = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    flat = spread <= FLAT_TOLERANCE * scale + torch.finfo(maps.dtype).tiny
    return torch.where(flat, torch.zeros_like(maps), (maps - lo) / spread.clamp_min(1e-30))


def combine_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalised sum over units: ``(U, B, H, W)`` normalised maps -> ``(B, H, W)``."""
    return _min_max(maps.sum(dim=0))


def mask_boxes(maps: torch.Tensor, theta: float = 0.5, pad: float = 0.1) -> torch.Tensor:
    """Bounding boxes of ``maps > theta``, padded and clipped to the image.

    Args:
        maps: ``(B, H, W)`` normalised attention maps in [0, 1].
        theta: threshold of the mask.
        pad: each side moves out by ``pad`` x the box's width (x) or height (y).

    Returns:
        ``(B, 4)`` float boxes ``(x1, y1, x2, y2)`` in pixel-edge coordinates: a box over pixel
        columns a..b has ``x1 = a, x2 = b + 1``. An empty mask gives the whole image.
    """
    _, h, w = maps.shape
    mask = maps > theta
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (B, H), (B, W)
    # argmax returns the first maximal index: the first True row/column from either end.
    y1 = rows.byte().argmax(dim=1)
    y2 = h - rows.flip(1).byte().argmax(dim=1)
    x1 = cols.byte().argmax(dim=1)
    x2 = w - cols.flip(1).byte().argmax(dim=1)
    box = torch.stack([x1, y1, x2, y2], dim=1).float()
    full = torch.tensor([0.0, 0.0, float(w), float(h)], device=maps.device)
    box = torch.where(rows.any(dim=1)[:, None], box, full)
    px, py = (box[:, 2] - box[:, 0]) * pad, (box[:, 3] - box[:, 1]) * pad
    box = box + torch.stack([-px, -py, px, py], dim=1)
    limit = torch.tensor([float(w), float(h), float(w), float(h)], device=maps.device)
    return torch.minimum(box.clamp_min(0.0), limit)


def attention_boxes(
    cams: torch.Tensor, image_size: tuple[int, int], theta: float = 0.5, pad: float = 0.1
) -> torch.Tensor:
    """Crop boxes of CAMs: upsample, normalise, threshold, box, pad (see :func:`mask_boxes`).

    Args:
        cams: ``(B, h, w)`` class activation maps (any scale).
        image_size: ``(H, W)`` of the input images.
        theta: threshold on the normalised map; pad: padding ratio of the box.

    Returns:
        ``(B, 4)`` boxes ``(x1, y1, x2, y2)`` in input pixel-edge coordinates; a flat map (or one
        with nothing above ``theta``) gives the full image.
    """
    return mask_boxes(attention_maps(cams, image_size), theta, pad)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Crop one box per image and resize it (bilinear), all in one ``roi_align`` call.

    Args:
        images: ``(B, 3, H, W)``.
        boxes: ``(B, 4)`` ``(x1, y1, x2, y2)`` in pixel-edge coordinates.
        size: ``(H', W')`` of the crops; default the input size.

    Returns:
        ``(B, 3, H', W')`` in the dtype of ``images``. ``aligned=True`` with adaptive sampling
        makes a box as large as the output return its pixels exactly.
    """
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    idx = torch.arange(images.shape[0], device=images.device, dtype=torch.float32)[:, None]
    rois = torch.cat([idx, boxes.float()], dim=1)
    out = roi_align(
        images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
    return out.to(images.dtype)


@torch.no_grad()
def unit_attention(
    unit_maps: Sequence[torch.Tensor],
    heads: Sequence[UnitHead],
    labels: torch.Tensor,
    image_size: tuple[int, int],
    theta: float = 0.5,
    pad: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised attention maps and crop boxes of the four units and of their sum (no gradients).

    Args:
        unit_maps: the four head maps ``F_i`` ``(B, C', h_i, w_i)`` (``IMLNetOutput.unit_maps``).
        heads: the four :class:`UnitHead` (their classifiers weight the CAMs).
        labels: ``(B,)`` target class of each CAM (the true building while training).
        image_size: ``(H, W)`` of the input images.
        theta: threshold of the normalised maps; pad: padding ratio of the boxes.

    Returns:
        maps ``(5, B, H, W)`` in [0, 1] and boxes ``(5, B, 4)`` ``(x1, y1, x2, y2)``; rows
        U1..U4, then the combined map (the normalised sum of the four normalised maps).
    """
    maps = torch.stack(
        [
            attention_maps(cam(f.float(), head.classifier.weight.float(), labels), image_size)
            for f, head in zip(unit_maps, heads, strict=True)
        ]
    )
    maps = torch.cat([maps, combine_maps(maps)[None]])
    boxes = torch.stack([mask_boxes(m, theta, pad) for m in maps])
    return maps, boxes
