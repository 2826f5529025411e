"""A torchvision ResNet-family CNN split into the four *units* of the paper.

For a 256 px input the units have spatial sizes 128 / 64 / 32 / 16:

- U1 = conv1, bn1, relu                 -> 64 ch              @ H/2
- U2 = maxpool (indices kept) + layer1  -> C2 (64 | 256)      @ H/4
- U3 = layer2                           -> C3 (128 | 512)     @ H/8
- U4 = layer3 + layer4, last stride 1   -> C4 (512 | 2048)    @ H/16

The maxpool's arg-max indices and its input size are kept so that the IRN decoder can *unpool*
(put each value back where the maximum was). The last stride of layer4 is 1, as in the
University-1652 baseline run with ``--stride 1``: the last map keeps twice the resolution, which
gives finer attention maps and better retrieval at the same parameter count.

ImageNet weights are never downloaded: ``pretrained=True`` reads torchvision's cache file and a
missing file raises :class:`~imlnet.errors.WeightsNotFoundError` naming where to put it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from imlnet.errors import CheckpointError, WeightsNotFoundError
from imlnet.models.units import UnitFeatures, load_weights_file

#: Supported architectures: name -> (torchvision constructor, ImageNet weights enum member).
ARCHITECTURES: dict[str, tuple[Callable[..., tvm.ResNet], tvm.WeightsEnum]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    "resnext50_32x4d": (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
    "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
}


def cache_path(name: str) -> Path:
    """Where torchvision's downloader would keep the ImageNet weights file of ``name``.

    ``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``; honours ``TORCH_HOME``.
    """
    weights = ARCHITECTURES[name][1]
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a ResNet stage: the width of its last batch norm."""
    return [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class UnitBackbone(nn.Module):
    """A torchvision ResNet-family network as four units (see the module docstring).

    The interface follows timm: :meth:`forward_features` gives the last map, :meth:`forward_units`
    all four, and :attr:`feature_info` their channels and reductions. Other families
    (EfficientNet-Lite, MobileNetV3, RegNet ... from timm) plug in through
    :class:`~imlnet.models.timm_backbone.TimmUnitBackbone` with the same interface;
    :func:`build_backbone` picks one by name.

    Args:
        name: one of :data:`ARCHITECTURES`.
        pretrained: ``False`` (random init), ``True`` (ImageNet weights from torchvision's cache,
            never downloaded) or the path of a weights file (``.pth``/``.pt``/``.safetensors``)
            holding a torchvision state dict of the same architecture (``fc.*`` may be absent).
        last_stages: ``"dilated"`` (layer4 with stride 1, the default) or ``"dropped"``
            (U4 = layer3; layer4's weights are not kept).
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool | str | Path = False,
        last_stages: str = "dilated",
    ) -> None:
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"backbone must be one of {sorted(ARCHITECTURES)}, got {name!r}")
        if last_stages not in ("dilated", "dropped"):
            raise ValueError(f"last_stages must be 'dilated' or 'dropped', got {last_stages!r}")
        net = ARCHITECTURES[name][0](weights=None)
        if pretrained is not False:
            _load_into(net, name, pretrained)
        # Last stride 1: the stride of layer4's first block sits in conv2 (bottleneck) or conv1
        # (basic block), and in its downsample shortcut.
        block = net.layer4[0]
        for conv in (getattr(block, "conv2", None), block.conv1):
            if conv is not None and conv.stride == (2, 2):
                conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        self.name = name
        self.unit1 = nn.Sequential(net.conv1, net.bn1, net.relu)
        # Same geometry as torchvision's maxpool (no weights), but it also returns the arg-max.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, return_indices=True)
        self.layer1, self.layer2 = net.layer1, net.layer2
        # "dropped": U4 = layer3 alone (layer4 is the stage the classifier runs at stride 32)
        self.layer3 = net.layer3
        self.layer4 = net.layer4 if last_stages == "dilated" else nn.Identity()
        chs = [net.bn1.num_features, *(_out_channels(m) for m in (net.layer1, net.layer2))]
        chs.append(_out_channels(net.layer4 if last_stages == "dilated" else net.layer3))
        #: channels and reduction of each unit, as timm's ``feature_info``
        self.feature_info: list[dict[str, int | str]] = [
            {"num_chs": c, "reduction": r, "module": f"unit{i + 1}"}
            for i, (c, r) in enumerate(zip(chs, (2, 4, 8, 16), strict=True))
        ]

    @property
    def channels(self) -> list[int]:
        """``[C1, C2, C3, C4]``, the channels of the four units."""
        return [int(f["num_chs"]) for f in self.feature_info]

    has_maxpool_indices = True

    def unit_modules(self) -> list[nn.Module]:
        """The four units' modules, U1 first (for freezing and per-unit learning rates)."""
        return [
            self.unit1,
            nn.ModuleList([self.maxpool, self.layer1]),
            self.layer2,
            nn.ModuleList([self.layer3, self.layer4]),
        ]

    def forward_units(
        self,
        x: torch.Tensor | None,
        start: int = 0,
        cached: UnitFeatures | None = None,
        stop: int = 4,
    ) -> UnitFeatures:
        """``(B, 3, H, W)`` -> the four unit maps, the maxpool indices and its input size.

        ``start`` > 0 resumes after unit ``start`` from ``cached`` (the features of a frozen
        prefix computed earlier; its maps after ``start`` are ignored), and ``x`` is unused.
        ``stop`` < 4 ends after unit ``stop`` (a prefix, e.g. for caching frozen units).
        """
        if start:
            if cached is None:
                raise ValueError("forward_units(start > 0) needs the cached prefix features")
            maps, indices, size = (
                list(cached.maps[:start]),
                cached.pool_indices,
                cached.pre_pool_size,
            )
        else:
            maps, indices, size = [self.unit1(x)], None, None
        if len(maps) == 1 and stop > 1:
            pooled, indices = self.maxpool(maps[0])
            size = maps[0].shape[-2:]
            maps.append(self.layer1(pooled))
        if len(maps) == 2 and stop > 2:
            maps.append(self.layer2(maps[1]))
        if len(maps) == 3 and stop > 3:
            maps.append(self.layer4(self.layer3(maps[2])))
        return UnitFeatures(tuple(maps), indices, size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> U4 ``(B, C4, H / 16, W / 16)``, the map the descriptor pools."""
        x = self.maxpool(self.unit1(x))[0]
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)


def _load_into(net: nn.Module, name: str, pretrained: bool | str | Path) -> None:
    """Load ImageNet (or user) weights into a freshly built torchvision ``net``."""
    if pretrained is True:
        path = cache_path(name)
        if not path.is_file():
            url = ARCHITECTURES[name][1].url
            raise WeightsNotFoundError(
                f"ImageNet weights for {name} are not on this machine and are never downloaded: "
                f"fetch {url} on a machine with internet and place it at {path} (or set "
                "TORCH_HOME), or pass pretrained=<path to a weights file>, or pretrained=false "
                "to start from random weights"
            )
    else:
        path = Path(pretrained)
    state = {k.removeprefix("module."): v for k, v in load_weights_file(path).items()}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch: weights of another architecture
        raise CheckpointError(f"{path} does not fit a {name}: {err}") from err
    # The ImageNet classifier (fc) is not used and may be absent; anything else must match.
    missing = [k for k in missing if not k.startswith("fc.")]
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a torchvision {name} state dict: {len(missing)} weights missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def build_backbone(
    name: str, pretrained: bool | str | Path = False, last_stages: str = "dilated"
) -> nn.Module:
    """The four-unit encoder of ``name``: a torchvision ResNet of :data:`ARCHITECTURES` (with
    max-unpooling indices), else any timm CNN (:class:`.timm_backbone.TimmUnitBackbone`).

    ``pretrained``: ``False``, ``True``/``"imagenet"`` (never downloaded: torchvision's cache for
    the ResNets, the installed weights package for EfficientNet-Lite0/1/2, torch.hub's cache for
    other timm models) or the path of a weights file. ``last_stages``: ``"dilated"`` keeps the
    stride-32 stages at stride 16 (ResNet: layer4 with stride 1), ``"dropped"`` ends U4 at the
    last stride-16 stage (ResNet: layer3).
    """
    if pretrained == "imagenet":
        pretrained = True
    if name in ARCHITECTURES:
        return UnitBackbone(name, pretrained, last_stages)
    from imlnet.models.timm_backbone import TimmUnitBackbone, is_timm_backbone

    if not is_timm_backbone(name):
        raise ValueError(
            f"backbone must be one of {sorted(ARCHITECTURES)} (torchvision) or a timm CNN such "
            f"as tf_efficientnet_lite0, mobilenetv3_large_100, regnety_008; got {name!r}"
        )
    return TimmUnitBackbone(name, pretrained, last_stages)
