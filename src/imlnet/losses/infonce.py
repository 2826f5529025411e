"""Symmetric InfoNCE over the batch's drone/satellite pairs (Sample4Geo's loss, for comparison).

Not the paper's loss: it is there to compare DRCL with the field's strongest metric loss
(Deuser et al., Sample4Geo, ICCV 2023). Every drone descriptor is scored against every satellite
descriptor of the batch by cosine similarity times a scale ``1 / T``; the cross-entropy of each
row (drone -> satellite) and of each column (satellite -> drone) is averaged.

Duplicate buildings: Sample4Geo's sampler puts each building in a batch once, so its target is
the diagonal. Our batches may hold a building several times (``sample_num`` drone views), and a
second image of the same building is not a negative. So each anchor's loss is the mean, over
the references p of its building, of the cross-entropy of p against the *negatives* only
(``-log exp(s_p) / (exp(s_p) + sum_n exp(s_n))``, as SupCon's "L_out" with the other positives
left out of the denominator): a positive is always pulled closer, and positives never compete.
With unique labels this is Sample4Geo's loss exactly (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def infonce_loss(
    drone: torch.Tensor,
    satellite: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE with a multi-positive target, computed in float32.

    Args:
        drone: ``(B, D)`` descriptors (any norm; they are L2-normalised here).
        satellite: ``(B, D)`` descriptors of the satellite images of the same batch.
        labels: ``(B,)`` building of each pair; equal labels are positives of each other.
        scale: scalar ``1 / T`` (the logits are ``scale * cos``).
        label_smoothing: mixes the target with the uniform distribution over the batch
            (Sample4Geo trains with 0.1).

    Returns:
        ``0.5 * (CE(drone -> satellite) + CE(satellite -> drone))``, a scalar.
    """
    d = F.normalize(drone.float(), dim=1)
    s = F.normalize(satellite.float(), dim=1)
    logits = scale.float() * d @ s.T  # (B, B): drone i against satellite j
    same = labels[:, None] == labels[None, :]  # symmetric: rows and columns alike
    return 0.5 * (
        _multi_positive_ce(logits, same, label_smoothing)
        + _multi_positive_ce(logits.T, same, label_smoothing)
    )


def _multi_positive_ce(logits: torch.Tensor, same: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over rows i of the mean over positives p of CE(p against the negatives of row i).

    Args:
        logits: ``(N, M)`` scores; same: ``(N, M)`` bool, True where j is a positive of i.
        eps: label smoothing within each positive's set ``{p} + negatives`` (K entries).
    """
    neg = logits.masked_fill(same, -1e9)  # finite: a row without negatives has zero loss
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (N, 1)
    lse = torch.logaddexp(logits, neg_lse)  # (N, M): log(exp(s_p) + sum_n exp(s_n))
    loss = -(logits - lse)  # CE of each positive against the negatives
    if eps > 0:
        k = (~same).sum(dim=1, keepdim=True) + 1  # entries of each positive's set
        neg_sum = logits.masked_fill(same, 0.0).sum(dim=1, keepdim=True)
        uniform = -(logits + neg_sum - k * lse) / k  # CE against the uniform target on the set
        loss = (1 - eps) * loss + eps * uniform
    per_row = (loss * same).sum(dim=1) / same.sum(dim=1)
    return per_row.mean()


class InfoNCE(nn.Module):
    """:func:`infonce_loss` with its temperature, learned (as Sample4Geo and CLIP) or fixed.

    The scale is kept as ``log(1 / T)`` and exponentiated, so a learned T stays positive; it is
    clamped to at most 100 (T >= 0.01), as CLIP does.

    Args:
        temperature: initial (or fixed) T; Sample4Geo's ``logit_scale`` starts at
            ``log(1 / 0.07)``, i.e. T = 0.07.
        learn_temperature: make ``log(1 / T)`` a trainable parameter.
        label_smoothing: of the targets (Sample4Geo: 0.1).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        value = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    @property
    def scale(self) -> torch.Tensor:
        """``1 / T``, at most 100."""
        return self.log_scale.exp().clamp(max=100.0)

    def forward(
        self, drone: torch.Tensor, satellite: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``(B, D)``, ``(B, D)``, ``(B,)`` -> the symmetric InfoNCE loss (scalar float32)."""
        return infonce_loss(drone, satellite, labels, self.scale, self.label_smoothing)
