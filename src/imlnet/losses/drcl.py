"""DRCL, the distance regularisation constraint loss: descriptors on a radius-r hypersphere and a
batch-hard triplet loss between the views on them.

The constraint is in two parts that live together here: :func:`to_sphere` puts each descriptor
on the sphere of radius r (the model calls it in
:meth:`~imlnet.models.imlnet.IMLNet.descriptor_head`, so retrieval uses the same vectors), and
:func:`drcl_loss` is the cross-view batch-hard triplet loss on them. On the sphere every distance
lies in [0, 2r]: positives are not pulled to a point and negatives not pushed to infinity.
Mining (:func:`batch_hard_mine`) is separate from the loss, as in pytorch-metric-learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_sphere(embedding: torch.Tensor, radius: float) -> torch.Tensor:
    """``radius * e / |e|`` per row, computed in float32, returned in the input's dtype.

    Args:
        embedding: ``(B, D)`` bottleneck features.
        radius: r of the hypersphere.

    Returns:
        ``(B, D)`` descriptors of norm r.
    """
    unit = F.normalize(embedding.float(), dim=1)
    return (radius * unit).to(embedding.dtype)


@dataclass
class HardTriplets:
    """The batch-hard triplet of every anchor.

    Attributes:
        d_ap: ``(N,)`` distance to the hardest (farthest) positive reference.
        d_an: ``(N,)`` distance to the hardest (nearest) negative reference.
        positive: ``(N,)`` index of that positive in the references.
        negative: ``(N,)`` index of that negative in the references.
        valid: ``(N,)`` the anchor has at least one positive and one negative reference.
    """

    d_ap: torch.Tensor
    d_an: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    valid: torch.Tensor


def batch_hard_mine(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    refs: torch.Tensor,
    ref_labels: torch.Tensor,
) -> HardTriplets:
    """For each anchor, the farthest reference of its class and the nearest of another class.

    Euclidean distances, computed exactly (no matrix-product shortcut) in float32.

    Args:
        anchors: ``(N, D)`` embeddings of one view (e.g. drone).
        anchor_labels: ``(N,)`` class of each anchor.
        refs: ``(M, D)`` embeddings of the other view (e.g. satellite).
        ref_labels: ``(M,)`` class of each reference.
    """
    dist = torch.cdist(
        anchors.float()[None], refs.float()[None], compute_mode="donot_use_mm_for_euclid_dist"
    )[0]  # (N, M)
    same = anchor_labels[:, None] == ref_labels[None, :]
    big = torch.finfo(dist.dtype).max
    d_ap, positive = torch.where(same, dist, -big).max(dim=1)
    d_an, negative = torch.where(same, big, dist).min(dim=1)
    valid = same.any(dim=1) & (~same).any(dim=1)
    return HardTriplets(d_ap, d_an, positive, negative, valid)


def batch_hard_triplet(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    refs: torch.Tensor,
    ref_labels: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Batch-hard triplet loss, anchors from one view against references from the other.

    ``mean over anchors of relu(d(a, hardest p) - d(a, hardest n) + margin)``, counting only
    anchors that have a positive and a negative reference (0 with a graph when none has).

    Args:
        anchors: ``(N, D)``; anchor_labels: ``(N,)``; refs: ``(M, D)``; ref_labels: ``(M,)``.
        margin: the triplet margin, in the units of the embedding distances.
    """
    mined = batch_hard_mine(anchors, anchor_labels, refs, ref_labels)
    if not bool(mined.valid.any()):
        return (anchors.float().sum() + refs.float().sum()) * 0.0  # nothing to learn here
    return F.relu(mined.d_ap - mined.d_an + margin)[mined.valid].mean()


def cross_view_triplet(
    drone: torch.Tensor, satellite: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """Batch-hard triplet drone -> satellite and satellite -> drone, averaged.

    Args:
        drone: ``(B, D)``; satellite: ``(B, D)``; labels: ``(B,)`` building of each pair.
    """
    return 0.5 * (
        batch_hard_triplet(drone, labels, satellite, labels, margin)
        + batch_hard_triplet(satellite, labels, drone, labels, margin)
    )


def drcl_loss(
    drone_desc: torch.Tensor, sat_desc: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """DRCL: the cross-view batch-hard triplet loss on descriptors of fixed radius r.

    The descriptors (``IMLNetOutput.descriptor``, ``(B, D)``) lie on a sphere of radius r, so every
    distance is in [0, 2r]: positives are not pulled to a point and negatives not pushed to
    infinity, which is the paper's distance regularisation constraint.
    """
    return cross_view_triplet(drone_desc, sat_desc, labels, margin)


def plain_triplet_loss(
    drone_emb: torch.Tensor, sat_emb: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """The same loss on the unnormalised embeddings (the ablation without the constraint)."""
    return cross_view_triplet(drone_emb, sat_emb, labels, margin)
