"""IRN reconstruction loss: the reconstructed image against its target (the satellite view)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, turns: int = 1) -> torch.Tensor:
    """Mean squared error over all pixels and channels, computed in float32.

    With ``turns=4`` each image's error is the least over the target turned by 0, 90, 180 and
    270 degrees: a drone photo's heading is arbitrary and a satellite image is north-up, so
    which way up the target lies is not in the drone image; with the plain error the decoder's
    best answer is the average over every heading (a featureless mean image). With the least
    over the turns it may draw the ground in the photo's own frame, to within 45 degrees.

    Args:
        pred: ``(B, 3, H, W)`` reconstruction (``IMLNetOutput.reconstruction``).
        target: ``(B, 3, H, W)`` target images in the same normalised space (square for
            ``turns=4``).
        turns: 1 (the paper's loss) or 4.

    Returns:
        A scalar float32 tensor.
    """
    pred, target = pred.float(), target.float()
    if turns == 1:
        return F.mse_loss(pred, target)
    if turns != 4:
        raise ValueError(f"turns must be 1 or 4, got {turns}")
    return turn_errors(pred, target).min(0).values.mean()


def turn_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(4, B)``: each image's mean squared error against its target turned by k x 90 degrees
    (``torch.rot90`` over H, W), k = 0..3, computed in float32."""
    pred, target = pred.float(), target.float()
    return torch.stack(
        [(pred - torch.rot90(target, k, (-2, -1))).pow(2).flatten(1).mean(1) for k in range(4)]
    )
