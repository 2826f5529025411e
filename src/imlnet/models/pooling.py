"""Global pooling of the last unit map into one vector per image (the descriptor's first step)."""

from __future__ import annotations

import torch
from torch import nn


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
