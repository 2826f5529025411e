"""IML-Net: the four-unit encoder, the descriptor on a radius-r hypersphere, IRN and MUML.

``forward`` returns an :class:`IMLNetOutput`; ``encode`` gives the retrieval descriptor alone;
``muml_crops`` the attention crops. With ``irn=False, muml=False`` and ``pool="avg"`` the model is
exactly the University-1652 baseline (ResNet + ClassBlock), so every ablation row runs from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from imlnet.errors import CheckpointError
from imlnet.io import atomic_path, write_json
from imlnet.models.backbone import UnitBackbone, UnitFeatures
from imlnet.models.irn import IRNDecoder
from imlnet.models.muml import (
    UnitHead,
    attention_boxes,
    class_activation_map,
    crop_resize,
    normalize_maps,
)

Domain = Literal["drone", "satellite"]
FORMAT = "imlnet-model/1"


class GeM(nn.Module):
    """Generalised mean pooling ``(mean x^p)^(1/p)`` with a learnable ``p`` (Radenovic et al.)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@dataclass
class IMLNetOutput:
    """What one forward pass gives.

    Attributes:
        descriptor: ``(B, D)`` on the sphere of radius ``r``: what retrieval and DRCL use.
        embedding: ``(B, D)`` the bottleneck feature before normalisation (plain triplet).
        logits: ``(B, num_classes)`` of the descriptor classifier.
        unit_logits: four ``(B, num_classes)`` of the MUML unit classifiers (empty without MUML).
        unit_maps: four head maps ``f_i`` ``(B, C', h_i, w_i)`` (empty without MUML).
        reconstruction: ``(B, 3, H, W)`` from the IRN, or None.
    """

    descriptor: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor
    unit_logits: tuple[torch.Tensor, ...] = ()
    unit_maps: tuple[torch.Tensor, ...] = ()
    reconstruction: torch.Tensor | None = None


class IMLNet(nn.Module):
    """IML-Net (see DESIGN.md and docs/method.md).

    Args:
        num_classes: training buildings.
        backbone: torchvision architecture (:data:`imlnet.models.backbone.ARCHITECTURES`).
        pretrained: ImageNet weights: False, True (torchvision cache) or a file path.
        share_weights: one encoder for both domains; False gives one per domain (the paper's
            per-domain mappings f_i into a shared latent space; the heads stay shared).
        pool: ``"gem"`` or ``"avg"`` pooling of U4.
        descriptor_dim: D of the bottleneck and descriptor.
        radius: r, the fixed radius of the DRCL hypersphere.
        irn: build the IRN decoder.
        muml: build the four unit heads (CAMs, crops, unit classifiers).
        muml_channels: C' of the unit heads.
        theta: CAM threshold; crop_padding: box padding ratio.
        dropout: before the descriptor classifier (the baseline's 0.5).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: bool | str = False,
        share_weights: bool = True,
        pool: Literal["gem", "avg"] = "gem",
        descriptor_dim: int = 512,
        radius: float = 1.0,
        irn: bool = True,
        muml: bool = True,
        muml_channels: int = 512,
        theta: float = 0.5,
        crop_padding: float = 0.1,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if radius <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        self.config: dict[str, Any] = {
            "num_classes": num_classes,
            "backbone": backbone,
            "pretrained": pretrained,
            "share_weights": share_weights,
            "pool": pool,
            "descriptor_dim": descriptor_dim,
            "radius": radius,
            "irn": irn,
            "muml": muml,
            "muml_channels": muml_channels,
            "theta": theta,
            "crop_padding": crop_padding,
            "dropout": dropout,
        }
        self.radius, self.descriptor_dim = float(radius), descriptor_dim
        self.theta, self.crop_padding = theta, crop_padding
        if share_weights:
            self.encoder = UnitBackbone(backbone, pretrained)
            self.encoders = None
        else:
            self.encoder = None
            self.encoders = nn.ModuleDict(
                {d: UnitBackbone(backbone, pretrained) for d in ("drone", "satellite")}
            )
        channels = self._encoder("drone").channels
        self.pool = GeM() if pool == "gem" else AvgPool()
        self.bottleneck = nn.Sequential(
            nn.Linear(channels[3], descriptor_dim), nn.BatchNorm1d(descriptor_dim)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(descriptor_dim, num_classes))
        self.irn = IRNDecoder(channels) if irn else None
        self.heads = (
            nn.ModuleList(UnitHead(c, muml_channels, num_classes) for c in channels)
            if muml
            else None
        )

    # ----------------------------------------------------------------- structure
    def _encoder(self, domain: Domain) -> UnitBackbone:
        if domain not in ("drone", "satellite"):
            raise ValueError(f"domain must be 'drone' or 'satellite', got {domain!r}")
        return self.encoder if self.encoder is not None else self.encoders[domain]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (pretrained) encoder(s): the optimiser gives them a lower rate."""
        return list((self.encoder or self.encoders).parameters())

    @property
    def irn_enabled(self) -> bool:
        return self.irn is not None

    @property
    def muml_enabled(self) -> bool:
        return self.heads is not None

    # ----------------------------------------------------------------- forward
    def _head(self, u4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.bottleneck(self.pool(u4))
        descriptor = self.radius * F.normalize(embedding.float(), dim=1).to(embedding.dtype)
        return descriptor, embedding, self.classifier(embedding)

    def forward(
        self, x: torch.Tensor, domain: Domain = "drone", reconstruct: bool | None = None
    ) -> IMLNetOutput:
        """``(B, 3, H, W)`` images of one domain -> :class:`IMLNetOutput`.

        ``reconstruct`` (default: whenever the IRN exists) runs the decoder.
        """
        units = self._encoder(domain).forward_units(x)
        descriptor, embedding, logits = self._head(units.maps[3])
        unit_maps, unit_logits = (), ()
        if self.heads is not None:
            pairs = [head(m) for head, m in zip(self.heads, units.maps, strict=True)]
            unit_maps = tuple(p[0] for p in pairs)
            unit_logits = tuple(p[1] for p in pairs)
        rec = None
        if self.irn is not None and (reconstruct is None or reconstruct):
            rec = self.irn(units)
        return IMLNetOutput(descriptor, embedding, logits, unit_logits, unit_maps, rec)

    def encode(self, x: torch.Tensor, domain: Domain = "drone") -> torch.Tensor:
        """Retrieval descriptor ``(B, D)`` (radius r), without the IRN or MUML work."""
        return self._head(self._encoder(domain).forward_features(x))[0]

    def forward_units(self, x: torch.Tensor, domain: Domain = "drone") -> UnitFeatures:
        return self._encoder(domain).forward_units(x)

    # ----------------------------------------------------------------- MUML
    @torch.no_grad()
    def attention(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        domain: Domain = "drone",
        output: IMLNetOutput | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised attention maps and crop boxes of the four units and of their sum.

        Args:
            images: ``(B, 3, H, W)``; labels: ``(B,)`` target classes of the CAMs.
            output: the forward pass of ``images`` if already computed (its head maps are used,
                so no second pass updates batch-norm statistics).

        Returns:
            maps ``(5, B, H, W)`` in [0, 1] and boxes ``(5, B, 4)`` (x1, y1, x2, y2), rows
            U1..U4 then the combined map (the normalised sum of the four).
        """
        if self.heads is None:
            raise RuntimeError("attention maps need the MUML heads (muml=True)")
        if output is None or not output.unit_maps:
            output = self.forward(images, domain, reconstruct=False)
        size = tuple(images.shape[-2:])
        maps = [
            normalize_maps(
                class_activation_map(f.float(), head.classifier.weight.float(), labels), size
            )
            for f, head in zip(output.unit_maps, self.heads, strict=True)
        ]
        total = torch.stack(maps).sum(0)
        lo, hi = total.amin(dim=(1, 2), keepdim=True), total.amax(dim=(1, 2), keepdim=True)
        maps.append((total - lo) / (hi - lo).clamp_min(1e-12))
        maps_t = torch.stack(maps)
        boxes = torch.stack([attention_boxes(m, self.theta, self.crop_padding) for m in maps_t])
        return maps_t, boxes

    @torch.no_grad()
    def muml_crops(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        domain: Domain = "drone",
        output: IMLNetOutput | None = None,
    ) -> dict[str, torch.Tensor]:
        """Attention crops ``(B, 3, H, W)`` per unit (``"unit1"``..``"unit4"``) and ``"combined"``,
        plus ``"boxes"`` ``(5, B, 4)`` and ``"maps"`` ``(5, B, H, W)``."""
        maps, boxes = self.attention(images, labels, domain, output)
        names = ("unit1", "unit2", "unit3", "unit4", "combined")
        crops = {n: crop_resize(images, b) for n, b in zip(names, boxes, strict=True)}
        return {**crops, "boxes": boxes, "maps": maps}

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        config = {**self.config, "pretrained": False, "format": FORMAT}
        write_json(directory / "config.json", config)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> IMLNet:
        """Load a model written by :meth:`save_pretrained` (the folder or its safetensors file)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        weights = path / "model.safetensors" if path.is_dir() else path
        config_file = weights.with_name("config.json")
        for f in (weights, config_file):
            if not f.is_file():
                raise CheckpointError(
                    f"{f} is missing: a model folder holds model.safetensors and config.json as "
                    "written by IMLNet.save_pretrained (training exports one to <log dir>/export)"
                )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
        if config.pop("format", None) != FORMAT:
            raise CheckpointError(f"{config_file} is not an imlnet model config ({FORMAT})")
        try:
            model = cls(**config)
        except TypeError as err:
            raise CheckpointError(f"{config_file} has unknown or missing keys: {err}") from err
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {err}") from err
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{weights} does not match {config_file}: {err}") from err
        return model
