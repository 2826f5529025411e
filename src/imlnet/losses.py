"""IML-Net losses: reconstruction, DRCL (batch-hard triplet on a fixed-radius hypersphere), id.

Each loss is a small function; :class:`IMLNetObjective` runs the whole training objective of one
batch and returns its parts by name (unweighted) plus ``"total"`` (weighted), so that the trainer
logs every part.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Triplet = Literal["drcl", "plain", "none"]


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the IRN's reconstruction and the satellite image."""
    return F.mse_loss(pred.float(), target.float())


def batch_hard_triplet(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    refs: torch.Tensor,
    ref_labels: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Batch-hard triplet loss with anchors from one view and references from the other.

    For every anchor: the farthest reference of its class (hardest positive) and the nearest
    reference of another class (hardest negative), Euclidean distances;
    ``loss = mean(relu(d_ap - d_an + margin))`` over anchors that have both.

    Args:
        anchors: ``(N, D)``; anchor_labels: ``(N,)``; refs: ``(M, D)``; ref_labels: ``(M,)``.
    """
    dist = torch.cdist(anchors.float(), refs.float())  # (N, M)
    same = anchor_labels[:, None] == ref_labels[None, :]
    inf = torch.finfo(dist.dtype).max
    d_ap = torch.where(same, dist, torch.full_like(dist, -inf)).amax(dim=1)
    d_an = torch.where(same, torch.full_like(dist, inf), dist).amin(dim=1)
    valid = same.any(dim=1) & (~same).any(dim=1)
    if not bool(valid.any()):
        return dist.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    return F.relu(d_ap - d_an + margin)[valid].mean()


def drcl_loss(
    drone: torch.Tensor, satellite: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """DRCL: batch-hard triplet on radius-r descriptors, drone->satellite and satellite->drone.

    The descriptors lie on a sphere of fixed radius r, so every distance is in [0, 2r]: positives
    are not pulled to zero, negatives not pushed to infinity (what the paper's distance
    regularisation constraint asks).
    """
    return 0.5 * (
        batch_hard_triplet(drone, labels, satellite, labels, margin)
        + batch_hard_triplet(satellite, labels, drone, labels, margin)
    )


def id_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a building classifier."""
    return F.cross_entropy(logits.float(), labels)


class IMLNetObjective(nn.Module):
    """The IML-Net training objective of one batch.

    ``total = w_rec * rec + w_drcl * triplet + w_id * id + w_crop * id_crops``

    - ``rec``: MSE between the IRN's reconstruction from the *drone* image and the satellite
      image of the same building (plus ``w_rec_satellite`` x satellite autoencoding).
    - ``triplet``: DRCL (``"drcl"``), the same on the unnormalised embeddings (``"plain"``), or
      absent (``"none"``).
    - ``id``: cross-entropy of the descriptor classifier and of the four unit classifiers, drone
      and satellite originals.
    - ``id_crops`` (MUML): the mutual-learning rule of CMAL-Net. The crop found by unit i trains
      the classifiers of the *other* units j != i; the crop of the combined map trains all four
      unit classifiers and the descriptor classifier. ``crop_units="random"`` uses one random
      unit's crop per batch (plus the combined one), a cheaper approximation for CPU runs.

    Args:
        triplet: ``"drcl"``, ``"plain"`` or ``"none"``.
        margin: triplet margin (on distances in [0, 2r] for DRCL).
        w_rec, w_drcl, w_id, w_crop, w_rec_satellite: loss weights.
        crop_units: ``"all"`` (the paper) or ``"random"``.
        seed: of the random unit choice (``crop_units="random"``).
    """

    def __init__(
        self,
        triplet: Triplet = "drcl",
        margin: float = 0.3,
        w_rec: float = 1.0,
        w_drcl: float = 1.0,
        w_id: float = 1.0,
        w_crop: float = 0.5,
        w_rec_satellite: float = 0.0,
        crop_units: Literal["all", "random"] = "all",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if triplet not in ("drcl", "plain", "none"):
            raise ValueError(f"triplet must be drcl, plain or none, got {triplet!r}")
        self.triplet, self.margin = triplet, margin
        self.w_rec, self.w_drcl, self.w_id, self.w_crop = w_rec, w_drcl, w_id, w_crop
        self.w_rec_satellite, self.crop_units = w_rec_satellite, crop_units
        self.generator = torch.Generator().manual_seed(seed)  # saved in checkpoints

    def _unit_ce(self, unit_logits, labels, units) -> torch.Tensor:
        return torch.stack([id_loss(unit_logits[j], labels) for j in units]).mean()

    def forward(
        self, model: nn.Module, drone: torch.Tensor, satellite: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named loss parts of one batch of paired ``(B, 3, H, W)`` drone/satellite images."""
        auto = model.irn_enabled and self.w_rec_satellite > 0
        out_d = model(drone, "drone", reconstruct=model.irn_enabled)
        out_s = model(satellite, "satellite", reconstruct=auto)
        parts: dict[str, torch.Tensor] = {}
        ids = [id_loss(out_d.logits, labels), id_loss(out_s.logits, labels)]
        if model.muml_enabled:
            ids += [self._unit_ce(o.unit_logits, labels, range(4)) for o in (out_d, out_s)]
        parts["id"] = torch.stack(ids).mean()
        if self.triplet == "drcl":
            parts["triplet"] = drcl_loss(out_d.descriptor, out_s.descriptor, labels, self.margin)
        elif self.triplet == "plain":
            parts["triplet"] = drcl_loss(out_d.embedding, out_s.embedding, labels, self.margin)
        if model.irn_enabled:
            rec = reconstruction_loss(out_d.reconstruction, satellite)
            if auto:
                rec = rec + self.w_rec_satellite * reconstruction_loss(
                    out_s.reconstruction, satellite
                )
            parts["rec"] = rec
        if model.muml_enabled:
            parts["id_crops"] = self._crop_losses(model, drone, satellite, labels, out_d, out_s)
        weights = {
            "id": self.w_id,
            "triplet": self.w_drcl,
            "rec": self.w_rec,
            "id_crops": self.w_crop,
        }
        parts["total"] = sum(weights[k] * v for k, v in parts.items())
        return parts

    def _crop_losses(self, model, drone, satellite, labels, out_d, out_s) -> torch.Tensor:
        if self.crop_units == "all":
            units = [0, 1, 2, 3]
        else:
            units = [int(torch.randint(4, (), generator=self.generator))]
        losses = []
        for images, out, domain in ((drone, out_d, "drone"), (satellite, out_s, "satellite")):
            crops = model.muml_crops(images, labels, domain, output=out)
            for i in units:  # the crop of unit i teaches the other units
                o = model(crops[f"unit{i + 1}"], domain, reconstruct=False)
                losses.append(self._unit_ce(o.unit_logits, labels, [j for j in range(4) if j != i]))
            o = model(crops["combined"], domain, reconstruct=False)  # the sum teaches all
            losses.append(
                0.5 * (self._unit_ce(o.unit_logits, labels, range(4)) + id_loss(o.logits, labels))
            )
        return torch.stack(losses).mean()
