"""IRN reconstruction loss: the reconstructed image against its target (the satellite view)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels and channels, computed in float32.

    Args:
        pred: ``(B, 3, H, W)`` reconstruction (``IMLNetOutput.reconstruction``).
        target: ``(B, 3, H, W)`` target images in the same normalised space.

    Returns:
        A scalar float32 tensor.
    """
    return F.mse_loss(pred.float(), target.float())
