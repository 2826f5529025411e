"""The id losses of MUML: each classifier on the originals, and the mutual-learning rule on crops.

The rule follows CMAL-Net (Liu et al., Pattern Recognition 2023), which the paper's MUML follows:
the crop found by unit i trains the classifiers of the *other* units, and the crop of the
combined map trains the descriptor classifier and all four unit classifiers (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def id_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a building classifier: ``(B, C)`` logits, ``(B,)`` labels (float32)."""
    return F.cross_entropy(logits.float(), labels)


def classifier_loss(
    logits: torch.Tensor, unit_logits: Sequence[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """CE of the descriptor classifier plus the mean CE of the unit classifiers (if any).

    Args:
        logits: ``(B, C)`` of the descriptor classifier.
        unit_logits: four ``(B, C)`` of the MUML unit classifiers, or none (no MUML: this is
            then the University-1652 baseline's loss).
        labels: ``(B,)`` building indices.
    """
    loss = id_loss(logits, labels)
    if unit_logits:
        loss = loss + torch.stack([id_loss(u, labels) for u in unit_logits]).mean()
    return loss


def mutual_crop_loss(
    logits: torch.Tensor,
    unit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    units: Sequence[int],
) -> torch.Tensor:
    """One domain's mutual-learning id loss on its MUML crops.

    The crop batch holds, in order, the crops of each unit in ``units`` and then the crop of the
    combined map, ``B`` images each. Terms: for the crop of unit i, the mean CE of the unit
    classifiers j != i; for the combined crop, CE of the descriptor classifier + mean CE of all
    four unit classifiers. The result is the mean of these terms.

    Args:
        logits: ``((len(units) + 1) * B, C)`` of the descriptor classifier on the crops.
        unit_logits: four ``((len(units) + 1) * B, C)`` of the unit classifiers on the crops.
        labels: ``(B,)`` building of each original image (the crops keep it).
        units: 0-based indices of the units whose crops were taken.
    """
    b = labels.shape[0]
    terms = []
    for s, i in enumerate(units):  # the crop found by unit i teaches the other units
        part = slice(s * b, (s + 1) * b)
        others = [id_loss(unit_logits[j][part], labels) for j in range(4) if j != i]
        terms.append(torch.stack(others).mean())
    part = slice(len(units) * b, (len(units) + 1) * b)  # the combined crop teaches all
    everyone = torch.stack([id_loss(u[part], labels) for u in unit_logits]).mean()
    terms.append(id_loss(logits[part], labels) + everyone)
    return torch.stack(terms).mean()
