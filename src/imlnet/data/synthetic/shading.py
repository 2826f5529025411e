"""Light and seasons on a :class:`~imlnet.data.synthetic.scene.Scene`'s top surface.

The seasonal colours of grass, trees and water, snow in winter, the sun of each season, and the
shaded top view (albedo x (ambient + diffuse x sunlit)) that both the satellite image and the drone
views sample. The top view of a season is computed once per city and reused by every view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imlnet.data.synthetic.scene import (
    GRASS,
    PARKING,
    PAVEMENT,
    ROAD,
    ROOF,
    ROOF_DETAIL,
    TREE,
    WATER,
    Scene,
)

SEASONS = ("spring", "summer", "autumn", "winter")

# Seasonal colours of the living and wet materials, and the sun height (degrees) of each season.
_GRASS = {
    "spring": (0.42, 0.60, 0.28),
    "summer": (0.33, 0.50, 0.22),
    "autumn": (0.55, 0.50, 0.28),
    "winter": (0.45, 0.43, 0.33),
}
_TREE = {
    "spring": ((0.38, 0.60, 0.28), (0.55, 0.66, 0.35)),
    "summer": ((0.17, 0.36, 0.14), (0.25, 0.44, 0.18)),
    "autumn": ((0.75, 0.40, 0.13), (0.62, 0.55, 0.18)),
    "winter": ((0.40, 0.34, 0.28), (0.48, 0.42, 0.36)),
}
_WATER = {
    "spring": (0.20, 0.33, 0.40),
    "summer": (0.16, 0.30, 0.40),
    "autumn": (0.20, 0.30, 0.34),
    "winter": (0.72, 0.78, 0.82),
}
SUN_ELEVATION = {"spring": 48.0, "summer": 62.0, "autumn": 38.0, "winter": 24.0}
_SNOW = torch.tensor([0.93, 0.94, 0.96])
SKY_TOP, SKY_HORIZON = (0.42, 0.60, 0.85), (0.80, 0.86, 0.92)


def sun_vector(azimuth_deg: float, elevation_deg: float) -> torch.Tensor:
    """Unit vector towards the sun, ``(3,)`` east-north-up."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return torch.tensor([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])


def albedo(scene: Scene, season: str) -> torch.Tensor:
    """Top-surface colour ``(3, H, W)`` of the scene in a season (before lighting)."""
    if season not in SEASONS:
        raise ValueError(f"season must be one of {SEASONS}, got {season!r}")
    dev = scene.device
    low, high = scene.noise[0].reshape(-1), scene.noise[1].reshape(-1)
    rgb = scene.base_rgb.reshape(3, -1).clone()
    kind = scene.kind.reshape(-1)

    def where(mask: torch.Tensor) -> torch.Tensor:
        return mask.nonzero().squeeze(1)

    def colour(rgb3: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(rgb3, device=dev)[:, None]

    i = where(kind == GRASS)
    rgb[:, i] = colour(_GRASS[season]) * (0.8 + 0.35 * low[i]) * (0.92 + 0.16 * high[i])
    i = where(kind == TREE)
    t0, t1 = (colour(c) for c in _TREE[season])
    rgb[:, i] = torch.lerp(t0, t1, low[i][None]) * (0.85 + 0.3 * high[i])
    i = where(kind == WATER)
    rgb[:, i] = colour(_WATER[season]) * (0.95 + 0.1 * low[i])
    if season == "winter":  # snow lies on roofs, lawns, pavements and road verges
        snowy = (kind == GRASS) | (kind == ROOF) | (kind == PAVEMENT) | (kind == TREE)
        snowy = snowy | (kind == ROOF_DETAIL) | (((kind == ROAD) | (kind == PARKING)) & (low > 0.7))
        i = where(snowy)
        cover = torch.where(kind[i] == TREE, 0.45, 0.85) * (0.75 + 0.25 * high[i])
        rgb[:, i] = torch.lerp(rgb[:, i], _SNOW.to(dev)[:, None], cover[None])
    return rgb.clamp_(0, 1).reshape(scene.base_rgb.shape)


def shadow_map(scene: Scene, sun: torch.Tensor, step_cells: int = 2) -> torch.Tensor:
    """``(H, W)`` float in [0, 1]: 1 where the top surface is in the shadow of something.

    A cell is shaded when some cell k steps towards the sun stands higher than the sun ray
    through it: ``max_k h(p + k s) - k c > h(p)`` (``s`` one step towards the sun, ``c`` the
    ray's rise per step). The maximum over k = 1..K is built by doubling, ``M_2m(p) =
    max(M_m(p), M_m(p + m s) - m c)``, in log2(K) whole-grid shifts instead of K (offsets are
    rounded to cells, so a shadow edge may move by one cell of the grid ``step_cells`` times
    coarser than the scene, which is then upsampled). The scene is periodic, so are the shifts.
    """
    h = scene.height
    coarse = F.max_pool2d(h[None, None], step_cells)[0, 0] if step_cells > 1 else h
    res = scene.resolution_m * step_cells
    horiz = float(torch.linalg.vector_norm(sun[:2]))
    if horiz < 1e-6:
        return torch.zeros_like(h)
    dx, dy = float(sun[0]) / horiz, float(sun[1]) / horiz
    drop = res * float(sun[2]) / horiz  # metres the sun ray rises per step towards the sun
    steps = min(max(coarse.shape), math.ceil(float(coarse.max()) / max(drop, 1e-6)))

    def shifted(grid: torch.Tensor, k: int) -> torch.Tensor:
        """``grid`` at ``p + k s`` (columns east, rows south)."""
        return torch.roll(grid, shifts=(-round(-k * dy), -round(k * dx)), dims=(0, 1))

    best = shifted(coarse, 1) - drop  # M_1
    m = 1
    while m < steps:
        best = torch.maximum(best, shifted(best, m) - m * drop)
        m *= 2
    shade = (best > coarse).float()
    if step_cells > 1:
        shade = F.interpolate(
            shade[None, None], size=h.shape, mode="bilinear", align_corners=False
        )[0, 0]
    return shade


def shaded_top(scene: Scene, season: str, sun: torch.Tensor) -> torch.Tensor:
    """Lit top-surface colour ``(3, H, W)``: albedo x (ambient + diffuse x sunlit)."""
    rgb = albedo(scene, season)
    sun = sun.to(scene.device)
    lit = (1.0 - 0.62 * shadow_map(scene, sun)).reshape(-1)
    light = 0.38 + (0.72 * float(sun[2])) * lit  # flat surfaces
    # Tree crowns are rounded: light them by their height-field normal (central differences
    # on the periodic grid, at tree cells only).
    n, m = scene.shape
    h = scene.height.reshape(-1)
    i = (scene.kind.reshape(-1) == TREE).nonzero().squeeze(1)
    r, c = i // m, i % m
    two_res = 2.0 * scene.resolution_m
    gx = (h[r * m + (c + 1) % m] - h[r * m + (c - 1) % m]) / two_res
    gy = (h[((r + 1) % n) * m + c] - h[((r - 1) % n) * m + c]) / two_res  # d/d(row): southwards
    # cos(normal, sun) with normal = (-dh/dx, dh/dy, 1) / norm (rows grow southwards: flip d/dy).
    cos = ((-gx * sun[0] + gy * sun[1] + sun[2]) * torch.rsqrt(gx * gx + gy * gy + 1)).clamp_min(0)
    light[i] = 0.38 + 0.72 * cos * lit[i]
    return (rgb * light.reshape(1, n, m)).clamp_(0, 1)


class SeasonLight:
    """The sun of each season at one azimuth, and the shaded top view of a scene under it
    (:func:`shaded_top`), computed once per season and then reused."""

    def __init__(self, scene: Scene, sun_azimuth_deg: float) -> None:
        self.scene, self.azimuth = scene, float(sun_azimuth_deg)
        self._tops: dict[str, torch.Tensor] = {}

    def sun(self, season: str) -> torch.Tensor:
        """Unit vector towards the sun in ``season``."""
        return sun_vector(self.azimuth, SUN_ELEVATION[season])

    def top(self, season: str) -> torch.Tensor:
        """``shaded_top(scene, season, sun(season))``, cached."""
        if season not in self._tops:
            self._tops[season] = shaded_top(self.scene, season, self.sun(season))
        return self._tops[season]

    def ground(self, season: str) -> torch.Tensor:
        """``(3,)`` dim average colour of the top view: the ground beyond the rendered range."""
        key = f"ground-{season}"
        if key not in self._tops:
            self._tops[key] = self.top(season).mean(dim=(1, 2)) * 0.9
        return self._tops[key]
