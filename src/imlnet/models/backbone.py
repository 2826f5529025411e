"""A torchvision ResNet split into the four *units* of the paper.

For a 256 px input the units have spatial sizes 128 / 64 / 32 / 16:

- U1 = conv1, bn1, relu                 -> C1 = 64        @ H/2
- U2 = maxpool (indices kept) + layer1  -> C2 (64 | 256)  @ H/4
- U3 = layer2                           -> C3 (128 | 512) @ H/8
- U4 = layer3 + layer4, last stride 1   -> C4 (512 | 2048) @ H/16

The maxpool indices and its input size are kept so that the IRN decoder can *unpool* (put each
value back at its arg-max). The last stride of layer4 is 1, as in the University-1652 baseline,
which doubles the resolution of the last map (better attention maps and retrieval).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from imlnet.errors import CheckpointError, WeightsNotFoundError

#: name -> (constructor, ImageNet weights enum member)
ARCHITECTURES = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    "resnext50_32x4d": (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
    "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
}


@dataclass
class UnitFeatures:
    """The four unit maps of a batch, plus what the decoder needs to unpool.

    Attributes:
        maps: ``(U1, U2, U3, U4)``, shapes ``(B, C_i, H / r_i, W / r_i)`` with r = 2, 4, 8, 16.
        pool_indices: ``(B, 64, H / 4, W / 4)`` arg-max positions of the stem's maxpool.
        pre_pool_size: spatial size ``(H / 2, W / 2)`` of the maxpool's input.
    """

    maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    pool_indices: torch.Tensor
    pre_pool_size: torch.Size


def cache_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights file of ``name`` (never downloaded here)."""
    weights = ARCHITECTURES[name][1]
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read weights file {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


class UnitBackbone(nn.Module):
    """A torchvision ResNet-family network as four units (see the module docstring).

    Args:
        name: one of :data:`ARCHITECTURES`.
        pretrained: ``False`` (random init), ``True`` (ImageNet weights from torchvision's cache,
            never downloaded) or a path to a weights file (``.pth``/``.pt``/``.safetensors``).
    """

    def __init__(self, name: str = "resnet50", pretrained: bool | str = False) -> None:
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"backbone must be one of {sorted(ARCHITECTURES)}, got {name!r}")
        net: tvm.ResNet = ARCHITECTURES[name][0](weights=None)
        if pretrained:
            self._load(net, name, pretrained)
        block = net.layer4[0]  # last stride 1: the stride sits in conv2 (bottleneck) or conv1
        for conv in (getattr(block, "conv2", None), block.conv1):
            if conv is not None and conv.stride == (2, 2):
                conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        self.name = name
        self.unit1 = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, return_indices=True)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        c2 = net.layer1[-1].conv3.out_channels if hasattr(net.layer1[-1], "conv3") else 64
        c3, c4 = c2 * 2, c2 * 8
        #: channels and reduction of each unit (timm's ``feature_info``)
        self.feature_info = [
            {"num_chs": 64, "reduction": 2, "module": "unit1"},
            {"num_chs": c2, "reduction": 4, "module": "unit2"},
            {"num_chs": c3, "reduction": 8, "module": "unit3"},
            {"num_chs": c4, "reduction": 16, "module": "unit4"},
        ]

    @property
    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    @staticmethod
    def _load(net: nn.Module, name: str, pretrained: bool | str) -> None:
        if pretrained is True:
            path = cache_path(name)
            if not path.is_file():
                url = ARCHITECTURES[name][1].url
                raise WeightsNotFoundError(
                    f"ImageNet weights for {name} are not on this machine: place {path.name}"
                    f" at {path} (download it from {url} on a machine with internet), or pass "
                    "pretrained=<path to a weights file>, or pretrained=false to start from "
                    "random weights"
                )
        else:
            path = Path(pretrained)
        state = load_weights_file(path)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch: weights of another architecture
            raise CheckpointError(f"{path} does not fit a {name}: {err}") from err
        # the ImageNet classifier (fc) may be absent; every other key must match, or
        # a deeper network's weights (resnet34 -> resnet18) would load silently in part
        missing = [k for k in missing if not k.startswith("fc.")]
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
        if missing or unexpected:
            raise CheckpointError(
                f"{path} is not a {name} state dict: {len(missing)} weights missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )

    def forward_units(self, x: torch.Tensor) -> UnitFeatures:
        """``(B, 3, H, W)`` -> the four unit maps and the maxpool indices."""
        u1 = self.unit1(x)
        pooled, indices = self.maxpool(u1)
        u2 = self.layer1(pooled)
        u3 = self.layer2(u2)
        u4 = self.layer4(self.layer3(u3))
        return UnitFeatures((u1, u2, u3, u4), indices, u1.shape[-2:])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> U4 ``(B, C4, H / 16, W / 16)``."""
        return self.forward_units(x).maps[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
