"""IML-Net: the four-unit encoder, the descriptor on a radius-r hypersphere, IRN and MUML.

``forward`` returns an :class:`IMLNetOutput`; ``encode`` gives the retrieval descriptor alone;
``muml_crops`` the attention crops. With ``irn=False, muml=False, pool="avg"`` and a ResNet-50 the
network is exactly the University-1652 baseline (ResNet-50 + ClassBlock), so every ablation row
runs from this one class (docs/method.md).
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
from imlnet.models.muml import UnitHead, attention_maps, cam, combine_maps, crop_resize, mask_boxes

Domain = Literal["drone", "satellite"]
#: Written into config.json and the safetensors metadata; bumped on incompatible changes.
FORMAT = "imlnet-model/1"
#: Names of the crops :meth:`IMLNet.muml_crops` returns, in the order of its maps and boxes.
CROP_NAMES = ("unit1", "unit2", "unit3", "unit4", "combined")


class GeM(nn.Module):
    """Generalised-mean pooling ``(mean x^p)^(1/p)`` with one learnable ``p`` (Radenović et al.).

    ``(B, C, h, w)`` -> ``(B, C)``; p = 1 is average pooling, p -> inf max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, C)``, computed in float32 (pow overflows in half precision)."""
        p = self.p.float()
        return x.float().clamp_min(self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p).to(x.dtype)


class AvgPool(nn.Module):
    """Global average pooling ``(B, C, h, w)`` -> ``(B, C)`` (the baseline's pooling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, C)``."""
        return x.mean(dim=(2, 3))


@dataclass
class IMLNetOutput:
    """What one forward pass gives.

    Attributes:
        descriptor: ``(B, D)`` on the sphere of radius ``r``: what retrieval and DRCL use.
        embedding: ``(B, D)`` the bottleneck feature before normalisation (plain triplet, id).
        logits: ``(B, num_classes)`` of the descriptor classifier.
        unit_logits: four ``(B, num_classes)`` of the MUML unit classifiers (empty without MUML).
        unit_maps: the four head maps ``F_i`` ``(B, C', h_i, w_i)``, the CAMs' input (empty
            without MUML).
        reconstruction: ``(B, 3, H, W)`` from the IRN, or None (no IRN, or not asked for).
    """

    descriptor: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor
    unit_logits: tuple[torch.Tensor, ...] = ()
    unit_maps: tuple[torch.Tensor, ...] = ()
    reconstruction: torch.Tensor | None = None


def _init_like_baseline(bottleneck: nn.Sequential, classifier: nn.Linear) -> None:
    """Initialise as the University-1652 ClassBlock: kaiming fan-out, BN N(1, .02), N(0, .001)."""
    linear, bn = bottleneck
    nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out")
    nn.init.zeros_(linear.bias)
    nn.init.normal_(bn.weight, 1.0, 0.02)
    nn.init.zeros_(bn.bias)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)


class IMLNet(nn.Module):
    """IML-Net for drone <-> satellite retrieval (see DESIGN.md and docs/method.md).

    Args:
        num_classes: number of training buildings (classes of the id losses).
        backbone: torchvision architecture (:data:`imlnet.models.backbone.ARCHITECTURES`).
        pretrained: ImageNet weights: False, True (torchvision's cache, never downloaded) or the
            path of a weights file.
        share_weights: one encoder for both domains; False gives one per domain (the paper's
            per-domain mappings into a shared latent space; descriptor head, IRN and MUML heads
            stay shared).
        pool: ``"gem"`` (learnable p, initial 3) or ``"avg"`` pooling of U4.
        descriptor_dim: D of the bottleneck and the descriptor.
        radius: r of the DRCL hypersphere on which descriptors lie.
        irn: build the IRN decoder (reconstruction).
        muml: build the four unit heads (unit classifiers, CAMs, crops).
        muml_channels: C' of the unit heads.
        theta: threshold of the normalised CAMs, in [0, 1).
        crop_padding: padding of a crop box, as a fraction of its size per side.
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
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not radius > 0:
            raise ValueError(f"radius must be positive, got {radius}")
        if pool not in ("gem", "avg"):
            raise ValueError(f"pool must be 'gem' or 'avg', got {pool!r}")
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"theta must be in [0, 1), got {theta}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if descriptor_dim < 1 or muml_channels < 1:
            raise ValueError("descriptor_dim and muml_channels must be >= 1")
        self._config: dict[str, Any] = {
            "num_classes": int(num_classes),
            "backbone": backbone,
            "pretrained": pretrained,
            "share_weights": share_weights,
            "pool": pool,
            "descriptor_dim": int(descriptor_dim),
            "radius": float(radius),
            "irn": irn,
            "muml": muml,
            "muml_channels": int(muml_channels),
            "theta": float(theta),
            "crop_padding": float(crop_padding),
            "dropout": float(dropout),
        }
        #: how the model was trained (e.g. ``image_size``), saved with it; see save_pretrained
        self.meta: dict[str, Any] = {}
        self.num_classes = int(num_classes)
        self.radius = float(radius)
        self.descriptor_dim = int(descriptor_dim)
        self.theta, self.crop_padding = float(theta), float(crop_padding)
        if share_weights:
            self.encoder: UnitBackbone | None = UnitBackbone(backbone, pretrained)
            self.encoders: nn.ModuleDict | None = None
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
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(descriptor_dim, num_classes)
        _init_like_baseline(self.bottleneck, self.classifier)
        self.irn = IRNDecoder(channels) if irn else None
        self.heads = (
            nn.ModuleList(UnitHead(c, muml_channels, num_classes) for c in channels)
            if muml
            else None
        )

    # ----------------------------------------------------------------- structure
    @property
    def config(self) -> dict[str, Any]:
        """The constructor's arguments (a copy): ``IMLNet(**model.config)`` rebuilds the model."""
        return dict(self._config)

    @property
    def irn_enabled(self) -> bool:
        """Whether the IRN decoder exists."""
        return self.irn is not None

    @property
    def muml_enabled(self) -> bool:
        """Whether the MUML unit heads exist."""
        return self.heads is not None

    def _encoder(self, domain: Domain) -> UnitBackbone:
        if domain not in ("drone", "satellite"):
            raise ValueError(f"domain must be 'drone' or 'satellite', got {domain!r}")
        if self.encoder is not None:
            return self.encoder
        return self.encoders[domain]  # type: ignore[index]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (pretrained) encoder(s), which optimisers give a lower rate."""
        return list((self.encoder if self.encoder is not None else self.encoders).parameters())

    # ----------------------------------------------------------------- forward
    def _head(self, u4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U4 -> (descriptor on the radius-r sphere, embedding), both ``(B, D)``."""
        embedding = self.bottleneck(self.pool(u4))
        unit = F.normalize(embedding.float(), dim=1)
        return (self.radius * unit).to(embedding.dtype), embedding

    def forward(
        self, x: torch.Tensor, domain: Domain = "drone", reconstruct: bool | None = None
    ) -> IMLNetOutput:
        """``(B, 3, H, W)`` images of one domain (H, W divisible by 32) -> :class:`IMLNetOutput`.

        Args:
            x: normalised images.
            domain: which encoder (when ``share_weights=False``).
            reconstruct: run the IRN decoder; default: whenever it exists.
        """
        units = self._encoder(domain).forward_units(x)
        descriptor, embedding = self._head(units.maps[3])
        logits = self.classifier(self.dropout(embedding))
        unit_maps: tuple[torch.Tensor, ...] = ()
        unit_logits: tuple[torch.Tensor, ...] = ()
        if self.heads is not None:
            pairs = [head(m) for head, m in zip(self.heads, units.maps, strict=True)]
            unit_maps = tuple(p[0] for p in pairs)
            unit_logits = tuple(p[1] for p in pairs)
        rec = None
        if self.irn is not None and (reconstruct is None or reconstruct):
            rec = self.irn(units)
        return IMLNetOutput(descriptor, embedding, logits, unit_logits, unit_maps, rec)

    def encode(self, x: torch.Tensor, domain: Domain = "drone") -> torch.Tensor:
        """Retrieval descriptors ``(B, D)`` of radius r of ``(B, 3, H, W)`` images (no IRN/MUML)."""
        return self._head(self._encoder(domain).forward_features(x))[0]

    def forward_units(self, x: torch.Tensor, domain: Domain = "drone") -> UnitFeatures:
        """The encoder's four unit maps of ``(B, 3, H, W)`` images (for figures and analysis)."""
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
            images: ``(B, 3, H, W)``.
            labels: ``(B,)`` target class of each CAM (the true building while training).
            domain: which encoder.
            output: the forward pass of ``images`` if already computed: its head maps are
                reused, so no second pass runs (nor updates batch-norm statistics).

        Returns:
            maps ``(5, B, H, W)`` in [0, 1] and boxes ``(5, B, 4)`` ``(x1, y1, x2, y2)``; rows
            U1..U4, then the combined map (the normalised sum of the four normalised maps).
        """
        if self.heads is None:
            raise RuntimeError("attention maps need the MUML heads: build the model with muml=True")
        if output is None or not output.unit_maps:
            output = self.forward(images, domain, reconstruct=False)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        maps = torch.stack(
            [
                attention_maps(cam(f.float(), head.classifier.weight.float(), labels), size)
                for f, head in zip(output.unit_maps, self.heads, strict=True)
            ]
        )
        maps = torch.cat([maps, combine_maps(maps)[None]])
        boxes = torch.stack([mask_boxes(m, self.theta, self.crop_padding) for m in maps])
        return maps, boxes

    @torch.no_grad()
    def muml_crops(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        domain: Domain = "drone",
        output: IMLNetOutput | None = None,
    ) -> dict[str, torch.Tensor]:
        """MUML attention crops of ``(B, 3, H, W)`` images (no gradients).

        Returns:
            ``"unit1"`` .. ``"unit4"`` and ``"combined"``: crops ``(B, 3, H, W)`` resized to the
            input size; ``"boxes"`` ``(5, B, 4)`` and ``"maps"`` ``(5, B, H, W)`` in that order.
        """
        maps, boxes = self.attention(images, labels, domain, output)
        crops = {n: crop_resize(images, b) for n, b in zip(CROP_NAMES, boxes, strict=True)}
        return {**crops, "boxes": boxes, "maps": maps}

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically.

        The saved config has ``pretrained=False``: the weights are in the file, so loading needs
        no ImageNet file.

        Args:
            directory: the model folder (created if missing).
            meta: JSON-serialisable facts about how the model was trained, e.g.
                ``{"image_size": 256}``; stored under ``"meta"`` in config.json and given back
                as :attr:`meta` by :meth:`from_pretrained` (the commands take their default input
                size from it).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        meta = {**self.meta, **(meta or {})}
        write_json(
            directory / "config.json",
            {**self.config, "pretrained": False, "format": FORMAT, "meta": meta},
        )
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> IMLNet:
        """Load a model written by :meth:`save_pretrained`, in eval mode.

        Args:
            path: the folder, or its ``model.safetensors`` (``config.json`` must sit beside it).
            map_location: device of the loaded weights.

        Raises:
            CheckpointError: a file is missing or corrupt, or the weights do not match the config.
        """
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
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
        if not isinstance(config, dict) or config.pop("format", None) != FORMAT:
            raise CheckpointError(f"{config_file} is not an imlnet model config ({FORMAT})")
        meta = config.pop("meta", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f'{config_file}: "meta" must be an object, got {meta!r}')
        try:
            model = cls(**config)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{config_file} has unknown, missing or bad keys: {err}") from err
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {err}") from err
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{weights} does not match {config_file} (saved by another model?): {err}"
            ) from err
        model.meta = dict(meta)
        return model.to(map_location).eval()

    def input_size(self, default: int = 256) -> int:
        """The image side the model was trained at (``meta["image_size"]``), else ``default``."""
        return int(self.meta.get("image_size") or default)
