"""IML-Net: the four-unit encoder, the descriptor on a radius-r hypersphere, IRN and MUML.

``forward`` returns an :class:`IMLNetOutput` (inference); ``encode`` gives the retrieval
descriptor alone; ``forward_train`` runs everything one training step needs (originals, MUML
attention crops and the crops' pass) and returns a :class:`TrainOutput` for the losses
(:mod:`imlnet.losses`). With ``irn=False, muml=False, pool="avg"`` and a ResNet-50 the
network is exactly the University-1652 baseline (ResNet-50 + ClassBlock), so every ablation row
runs from this one class (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from imlnet.losses.drcl import to_sphere
from imlnet.models.backbone import UnitBackbone, UnitFeatures, build_backbone
from imlnet.models.irn import IRNDecoder
from imlnet.models.muml import CROP_NAMES, build_heads, crop_resize, unit_attention
from imlnet.models.outputs import IMLNetOutput, TrainOutput
from imlnet.models.persistence import load_model, save_model
from imlnet.models.pooling import AvgPool, GeM

Domain = Literal["drone", "satellite"]


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16, or a CPU with AMX
    tiles (Sapphire Rapids and later), where oneDNN's bf16 convolutions beat fp32. Elsewhere
    bf16 is emulated and much slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(check and check())
    return False


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
        muml_head: ``"pooled"``: each unit map is average-pooled to the last unit's grid
            (H/16) and reduced to C'/4 channels before the head's 3x3 convolution (a small
            fraction of the cost; docs/method.md); ``"paper"``: the 3x3 convolution at the
            unit's own resolution (H/2 .. H/16), the paper's formula read literally.
        theta: threshold of the normalised CAMs, in [0, 1).
        crop_padding: padding of a crop box, as a fraction of its size per side.
        dropout: before the descriptor classifier (the baseline's 0.5).
        last_stages: ``"dilated"`` (the stages a classifier runs at stride 32 kept at stride 16:
            ResNet's layer4 with stride 1, the paper's) or ``"dropped"`` (U4 ends at the last
            stride-16 stage; :func:`imlnet.models.backbone.build_backbone`).
        freeze_units: the first k encoder units (0..4) keep their (pretrained) weights: no
            gradients, and batch norm in eval mode (ImageNet statistics) even in training. MUML
            heads on frozen units still train; the frozen prefix runs without autograd.
        satellite_rotations: 1, 2 or 4: a satellite image's retrieval descriptor
            (:meth:`encode`) is the normalised sum of the descriptors of the image turned by
            0, 90, 180, 270 degrees (the first ``satellite_rotations``). A drone photo's
            heading is arbitrary while a map is north-up, so pooling over the square's turns
            makes the gallery descriptor invariant to them; it costs one pass per rotation over
            the gallery (built once), nothing per query, and does not change training. 1: the
            paper's single pass.
        frozen_precision: what the frozen units compute in. ``"fp32"``; ``"bf16"`` (bfloat16
            autocast, the maps handed on in float32); ``"auto"``: bf16 where the device has it
            natively (a CPU with AMX tiles, a CUDA GPU with bf16), else fp32 (a CPU without
            native bf16 emulates it, tens of times slower). Frozen units take no gradients, so
            their rounding never reaches an update; on the demo's AMX CPU the frozen prefix
            runs 3x faster, 5x with channels-last (docs/benchmarks.md, "CPU precision and
            memory format"). Export to ONNX always traces fp32.
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
        muml_head: Literal["pooled", "paper"] = "pooled",
        theta: float = 0.5,
        crop_padding: float = 0.1,
        dropout: float = 0.5,
        last_stages: Literal["dilated", "dropped"] = "dilated",
        freeze_units: int = 0,
        satellite_rotations: int = 1,
        frozen_precision: Literal["fp32", "bf16", "auto"] = "fp32",
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
        if muml_head not in ("pooled", "paper"):
            raise ValueError(f"muml_head must be 'pooled' or 'paper', got {muml_head!r}")
        if descriptor_dim < 1 or muml_channels < 1:
            raise ValueError("descriptor_dim and muml_channels must be >= 1")
        if not 0 <= int(freeze_units) <= 4:
            raise ValueError(f"freeze_units must be in 0..4, got {freeze_units}")
        if int(satellite_rotations) not in (1, 2, 4):
            raise ValueError(f"satellite_rotations must be 1, 2 or 4, got {satellite_rotations}")
        if frozen_precision not in ("fp32", "bf16", "auto"):
            raise ValueError(
                f"frozen_precision must be 'fp32', 'bf16' or 'auto', got {frozen_precision!r}"
            )
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
            "muml_head": muml_head,
            "theta": float(theta),
            "crop_padding": float(crop_padding),
            "dropout": float(dropout),
            "last_stages": last_stages,
            "freeze_units": int(freeze_units),
            "satellite_rotations": int(satellite_rotations),
            "frozen_precision": frozen_precision,
        }
        #: how the model was trained (e.g. ``image_size``), saved with it; see save_pretrained
        self.meta: dict[str, Any] = {}
        self.num_classes = int(num_classes)
        self.radius = float(radius)
        self.descriptor_dim = int(descriptor_dim)
        self.theta, self.crop_padding = float(theta), float(crop_padding)
        if share_weights:
            self.encoder: UnitBackbone | None = build_backbone(backbone, pretrained, last_stages)
            self.encoders: nn.ModuleDict | None = None
        else:
            self.encoder = None
            self.encoders = nn.ModuleDict(
                {
                    d: build_backbone(backbone, pretrained, last_stages)
                    for d in ("drone", "satellite")
                }
            )
        channels = self._encoder("drone").channels
        self.pool = GeM() if pool == "gem" else AvgPool()
        self.bottleneck = nn.Sequential(
            nn.Linear(channels[3], descriptor_dim), nn.BatchNorm1d(descriptor_dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(descriptor_dim, num_classes)
        _init_like_baseline(self.bottleneck, self.classifier)
        maxpool = bool(self._encoder("drone").has_maxpool_indices)
        self.irn = IRNDecoder(channels, maxpool_indices=maxpool) if irn else None
        info = self._encoder("drone").feature_info
        self.heads = build_heads(info, muml_channels, num_classes, muml_head) if muml else None
        self.freeze_units = int(freeze_units)
        self.satellite_rotations = int(satellite_rotations)
        #: ``frozen_precision`` (may be changed on a built model, e.g. to trace fp32)
        self.frozen_precision = frozen_precision
        for module in self._frozen_modules():
            module.requires_grad_(False)

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

    def _encoders(self) -> list[nn.Module]:
        return [self.encoder] if self.encoder is not None else list(self.encoders.values())

    def _frozen_modules(self) -> list[nn.Module]:
        return [u for enc in self._encoders() for u in enc.unit_modules()[: self.freeze_units]]

    def train(self, mode: bool = True) -> IMLNet:
        """As ``nn.Module.train``, but frozen units stay in eval mode (fixed batch-norm stats)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def unit_parameters(self) -> list[list[nn.Parameter]]:
        """The encoder parameters of each unit, U1 first (both encoders without sharing)."""
        per_unit: list[list[nn.Parameter]] = [[], [], [], []]
        for enc in self._encoders():
            for i, unit in enumerate(enc.unit_modules()):
                per_unit[i].extend(unit.parameters())
        return per_unit

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (pretrained) encoder(s), which optimisers give a lower rate."""
        return list((self.encoder if self.encoder is not None else self.encoders).parameters())

    # ----------------------------------------------------------------- forward
    def descriptor_head(self, u4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U4 -> (descriptor, embedding), both ``(B, D)``.

        The embedding is the bottleneck of the pooled map; the descriptor is the embedding put on
        the radius-r hypersphere (:func:`imlnet.losses.drcl.to_sphere`): the model's part of DRCL.
        """
        embedding = self.bottleneck(self.pool(u4))
        return to_sphere(embedding, self.radius), embedding

    def forward(
        self,
        x: torch.Tensor | None,
        domain: Domain = "drone",
        reconstruct: bool | slice | None = None,
        prefix: UnitFeatures | None = None,
    ) -> IMLNetOutput:
        """``(B, 3, H, W)`` images of one domain (H, W divisible by 32) -> :class:`IMLNetOutput`.

        Args:
            x: normalised images (unused when ``prefix`` is given).
            domain: which encoder (when ``share_weights=False``).
            reconstruct: run the IRN decoder; default: whenever it exists. A slice decodes only
                those rows (the reconstruction then has only them).
            prefix: the frozen units' features of these images, computed earlier
                (:meth:`frozen_prefix`, e.g. cached once for a whole training set): the encoder
                resumes after them. The same output as from the images.
        """
        start = self.freeze_units if prefix is not None else 0
        units = self._units(x, domain, start=start, cached=prefix)
        descriptor, embedding = self.descriptor_head(units.maps[3])
        logits = self.classifier(self.dropout(embedding))
        unit_maps: tuple[torch.Tensor, ...] = ()
        unit_logits: tuple[torch.Tensor, ...] = ()
        if self.heads is not None:
            pairs = [head(m) for head, m in zip(self.heads, units.maps, strict=True)]
            unit_maps = tuple(p[0] for p in pairs)
            unit_logits = tuple(p[1] for p in pairs)
        rec = None
        if self.irn is not None and reconstruct is not False:
            if isinstance(reconstruct, slice):
                units = units.rows(reconstruct)
            rec = self.irn(units)
        return IMLNetOutput(descriptor, embedding, logits, unit_logits, unit_maps, rec)

    def encode(self, x: torch.Tensor, domain: Domain = "drone") -> torch.Tensor:
        """Retrieval descriptors ``(B, D)`` of radius r of ``(B, 3, H, W)`` images (no IRN/MUML).

        Satellite images with ``satellite_rotations > 1``: the sum of the descriptors of the
        image at each turn, back on the sphere of radius r (square images only).
        """
        turns = self.satellite_rotations if domain == "satellite" else 1
        if turns == 1:
            return self.descriptor_head(self._features(x, domain))[0]
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"satellite_rotations {turns} needs square satellite images, got "
                f"{tuple(x.shape[-2:])}"
            )
        step = 4 // turns
        total = sum(
            self.descriptor_head(self._features(torch.rot90(x, k * step, (-2, -1)), domain))[0]
            for k in range(turns)
        )
        return to_sphere(total, self.radius)

    @torch.no_grad()
    def frozen_prefix(self, x: torch.Tensor, domain: Domain = "drone") -> UnitFeatures:
        """The frozen units' features of ``(B, 3, H, W)`` images (``freeze_units`` maps).

        They do not change in training (no gradients, batch norm in eval mode), so a trainer
        may compute them once per image and pass them to :meth:`forward` / :meth:`forward_train`.
        """
        if not self.freeze_units:
            raise RuntimeError("frozen_prefix needs frozen units: build with freeze_units >= 1")
        return self._units(x, domain, stop=self.freeze_units)

    def forward_units(self, x: torch.Tensor, domain: Domain = "drone") -> UnitFeatures:
        """The encoder's four unit maps of ``(B, 3, H, W)`` images (for figures and analysis)."""
        return self._units(x, domain)

    def frozen_bf16(self, device: torch.device | str) -> bool:
        """Whether the frozen units compute in bfloat16 on ``device`` (``frozen_precision``)."""
        if not self.freeze_units or self.frozen_precision == "fp32":
            return False
        return self.frozen_precision == "bf16" or native_bf16(device)

    def _features(self, x: torch.Tensor, domain: Domain) -> torch.Tensor:
        """U4 of ``(B, 3, H, W)`` images. In fp32 the encoder's own ``forward_features``, which
        frees each unit's map once the next is computed (a gallery batch's U1 is the largest);
        with bf16 frozen units through :meth:`_units`."""
        if not self.frozen_bf16(x.device):
            return self._encoder(domain).forward_features(x)
        return self._units(x, domain).maps[3]

    def _units(
        self,
        x: torch.Tensor | None,
        domain: Domain,
        start: int = 0,
        cached: UnitFeatures | None = None,
        stop: int = 4,
    ) -> UnitFeatures:
        """The encoder's units ``start`` .. ``stop`` (see ``forward_units`` of the backbones), the
        frozen ones under bfloat16 autocast where :meth:`frozen_bf16` says so."""
        encoder = self._encoder(domain)
        k = min(self.freeze_units, stop)
        device = (x if x is not None else cached.maps[0]).device  # type: ignore[union-attr]
        if start >= k or not self.frozen_bf16(device):
            return encoder.forward_units(x, start=start, cached=cached, stop=stop)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prefix = encoder.forward_units(x, start=start, cached=cached, stop=k)
        prefix = prefix.to(torch.float32)
        if stop <= k:
            return prefix
        return encoder.forward_units(None, start=k, cached=prefix, stop=stop)

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
        return unit_attention(
            output.unit_maps, self.heads, labels, size, self.theta, self.crop_padding
        )

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

    # ----------------------------------------------------------------- training
    def forward_train(
        self,
        drone: torch.Tensor,
        satellite: torch.Tensor,
        labels: torch.Tensor,
        crop_units: Sequence[int] = (0, 1, 2, 3),
        reconstruct_satellite: bool = False,
        prefixes: tuple[UnitFeatures, UnitFeatures] | None = None,
        crop_rows: int | None = None,
    ) -> TrainOutput:
        """Everything one training step needs: the originals' outputs and the MUML crops' outputs.

        Two passes through the network: the drone and satellite originals, then (MUML) their
        attention crops; the crops are cut without gradients from the first pass's head maps
        (:func:`imlnet.models.muml.unit_attention`). With one shared encoder each pass takes both
        domains as ONE batch (see :meth:`_forward_pair` for why).

        Args:
            drone: ``(B, 3, H, W)`` drone images; satellite: ``(B, 3, H, W)`` satellite images of
                the same buildings; labels: ``(B,)`` building indices (the CAMs' classes).
            crop_units: 0-based units whose crops to take (each once); the combined map's crop
                is always taken. ``(0, 1, 2, 3)`` is the paper.
            reconstruct_satellite: also reconstruct the satellite images (autoencoding target).
            prefixes: the frozen units' features of ``drone`` and ``satellite``
                (:meth:`frozen_prefix`, cached): the originals' pass resumes after them. The
                crops are new images and always pass the whole encoder.
            crop_rows: take the MUML crops of the first ``crop_rows`` pairs only (None: all):
                the crops' pass costs (len(crop_units) + 1) x the originals' per pair.

        Returns:
            A :class:`TrainOutput`.
        """
        units = tuple(int(u) for u in crop_units)
        if len(set(units)) != len(units) or not all(0 <= u < 4 for u in units):
            raise ValueError(f"crop_units must be distinct units in 0..3, got {crop_units!r}")
        rec = self.irn is not None
        out_d, out_s = self._forward_pair(
            drone, satellite, rec, rec and reconstruct_satellite, prefixes
        )
        if self.heads is None:
            return TrainOutput(out_d, out_s)
        n = drone.shape[0] if crop_rows is None else max(1, min(int(crop_rows), drone.shape[0]))
        batches = []
        for images, out, domain in ((drone, out_d, "drone"), (satellite, out_s, "satellite")):
            if n < images.shape[0]:
                images, out = images[:n], out.split(n)[0]
            _, boxes = self.attention(images, labels[:n], domain, output=out)
            with torch.no_grad():
                picked = [crop_resize(images, boxes[i]) for i in (*units, len(CROP_NAMES) - 1)]
            batches.append(torch.cat(picked))
        crops_d, crops_s = self._forward_pair(batches[0], batches[1], False, False)
        return TrainOutput(out_d, out_s, units, crops_d, crops_s)

    def _forward_pair(
        self,
        drone: torch.Tensor,
        satellite: torch.Tensor,
        rec_drone: bool,
        rec_satellite: bool,
        prefixes: tuple[UnitFeatures, UnitFeatures] | None = None,
    ) -> tuple[IMLNetOutput, IMLNetOutput]:
        """Forward passes of a drone batch and a satellite batch.

        With one encoder for both domains (``share_weights``), the two batches go through
        together, so that every batch norm layer normalises them with joint statistics: its
        running averages, used at evaluation, then estimate the same joint statistics. Two
        separate passes would normalise each domain with its own batch statistics in training
        but with the running mixture of both at evaluation, a train/test mismatch that costs
        retrieval accuracy (a tiny model overfitting three buildings stalls at 89 % R@1 with it,
        100 % without: tests/test_training.py). The IRN decodes only the rows whose
        reconstruction is asked for (the drone images, unless the satellite autoencoding target
        is on), and its batch norm sees only them.
        """
        pd, ps = prefixes if prefixes is not None else (None, None)
        if self.encoder is None:  # one encoder per domain
            return (
                self(drone, "drone", reconstruct=rec_drone, prefix=pd),
                self(satellite, "satellite", reconstruct=rec_satellite, prefix=ps),
            )
        n = drone.shape[0]
        rows: slice | bool = (rec_drone or rec_satellite) and slice(
            0 if rec_drone else n, None if rec_satellite else n
        )
        joint = UnitFeatures.cat([pd, ps]) if prefixes is not None else None
        out = self(torch.cat([drone, satellite]), "drone", reconstruct=rows, prefix=joint)
        rec = out.reconstruction
        out_d, out_s = replace(out, reconstruction=None).split(n)
        if rec_drone:
            out_d = replace(out_d, reconstruction=rec[:n])
        if rec_satellite:
            out_s = replace(out_s, reconstruction=rec[-n:])
        return out_d, out_s

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (see :func:`persistence.save_model`)."""
        return save_model(self, directory, meta)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> IMLNet:
        """Load a model written by :meth:`save_pretrained`, in eval mode.

        See :func:`imlnet.models.persistence.load_model`; raises
        :class:`~imlnet.errors.CheckpointError` for a missing, corrupt or mismatched file.
        """
        return load_model(cls, path, map_location)

    def input_size(self, default: int = 256) -> int:
        """The image side the model was trained at (``meta["image_size"]``), else ``default``."""
        return int(self.meta.get("image_size") or default)
