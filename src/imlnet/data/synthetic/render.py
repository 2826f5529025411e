"""Vectorised renderers for :class:`~imlnet.data.synthetic.scene.Scene`.

* Satellite: nadir orthographic, north-up: the shaded top surface of the height field, resampled
  with an anti-aliasing filter (no walls are visible from straight above).
* Drone: a pinhole camera ray-cast into the height field. Every pixel's ray is clipped to the slab
  between the ground and the tallest structure, sampled at a fixed number of points, and the first
  sample below the surface is refined by bisection. A hit far below the surface of its cell means
  the ray came in through the side of that cell: a wall. Occlusion is therefore exact up to the
  sampling step, whatever is in front of what.

Both run on whatever device the scene lives on; nothing loops over pixels in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in scene metres.

    Attributes:
        position: ``(x, y, z)`` east, north, up, metres (z is the altitude above ground).
        yaw_deg: compass heading of the optical axis (0 = north, 90 = east).
        pitch_deg: angle of the optical axis below the horizon (90 = straight down).
        fov_deg: horizontal (= vertical, square images) field of view.
    """

    position: tuple[float, float, float]
    yaw_deg: float
    pitch_deg: float
    fov_deg: float = 60.0

    def basis(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(3, 3)`` rows: right, up and forward unit vectors in scene coordinates."""
        yaw, pitch = math.radians(self.yaw_deg), math.radians(self.pitch_deg)
        fwd = [math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), -math.sin(pitch)]
        right = [math.cos(yaw), -math.sin(yaw), 0.0]
        up = [
            right[1] * fwd[2] - right[2] * fwd[1],
            right[2] * fwd[0] - right[0] * fwd[2],
            right[0] * fwd[1] - right[1] * fwd[0],
        ]
        return torch.tensor([right, up, fwd], dtype=torch.float64, device=device).float()

    def focal_px(self, size: int) -> float:
        return (size / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)

    def project(self, points: torch.Tensor, size: int) -> torch.Tensor:
        """Scene points ``(N, 3)`` -> pixel ``(u, v)`` ``(N, 2)`` (u right, v down; centre-based).

        Points behind the camera get ``nan``.
        """
        rel = points.double() - torch.tensor(self.position, dtype=torch.float64)
        cam = rel @ self.basis().double().T  # (N, 3): right, up, forward components
        f = self.focal_px(size)
        u = size / 2.0 + f * cam[:, 0] / cam[:, 2]
        v = size / 2.0 - f * cam[:, 1] / cam[:, 2]
        uv = torch.stack([u, v], dim=1)
        uv[cam[:, 2] <= 0] = float("nan")
        return uv


def sun_vector(azimuth_deg: float, elevation_deg: float) -> torch.Tensor:
    """Unit vector towards the sun, ``(3,)`` east-north-up."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return torch.tensor([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])


def albedo(scene: Scene, season: str) -> torch.Tensor:
    """Top-surface colour ``(3, H, W)`` of the scene in a season (before lighting)."""
    if season not in SEASONS:
        raise ValueError(f"season must be one of {SEASONS}, got {season!r}")
    dev = scene.device
    low, high = scene.noise[0], scene.noise[1]
    rgb = scene.base_rgb.clone()
    kind = scene.kind

    def paint(mask: torch.Tensor, colour: torch.Tensor) -> None:
        rgb.copy_(torch.where(mask[None], colour, rgb))

    grass = torch.tensor(_GRASS[season], device=dev)[:, None, None]
    paint(kind == GRASS, grass * (0.8 + 0.35 * low[None]) * (0.92 + 0.16 * high[None]))
    t0, t1 = (torch.tensor(c, device=dev)[:, None, None] for c in _TREE[season])
    tree = torch.lerp(t0, t1, low[None]) * (0.85 + 0.3 * high[None])
    paint(kind == TREE, tree)
    water = torch.tensor(_WATER[season], device=dev)[:, None, None]
    paint(kind == WATER, water * (0.95 + 0.1 * low[None]))
    if season == "winter":  # snow lies on roofs, lawns, pavements and road verges
        snowy = (kind == GRASS) | (kind == ROOF) | (kind == PAVEMENT) | (kind == TREE)
        snowy = snowy | (kind == ROOF_DETAIL) | (((kind == ROAD) | (kind == PARKING)) & (low > 0.7))
        cover = torch.where(kind == TREE, 0.45, 0.85) * (0.75 + 0.25 * high)
        rgb = torch.where(
            snowy[None], torch.lerp(rgb, _SNOW.to(dev)[:, None, None], cover[None]), rgb
        )
    return rgb.clamp(0, 1)


def shadow_map(scene: Scene, sun: torch.Tensor, step_cells: int = 2) -> torch.Tensor:
    """``(H, W)`` float in {0, 1}: 1 where the top surface is in the shadow of something.

    A shadow ray from each cell towards the sun is walked by shifting the whole height field one
    step at a time (slicing, no gathers), on a grid ``step_cells`` times coarser, then upsampled.
    """
    h = scene.height
    coarse = F.max_pool2d(h[None, None], step_cells)[0, 0] if step_cells > 1 else h
    res = scene.resolution_m * step_cells
    horiz = float(torch.linalg.vector_norm(sun[:2]))
    if horiz < 1e-6:
        return torch.zeros_like(h)
    dx, dy = float(sun[0]) / horiz, float(sun[1]) / horiz
    rise = float(sun[2]) / horiz  # metres up per metre towards the sun
    top = float(coarse.max())
    n, m = coarse.shape
    shade = torch.zeros_like(coarse, dtype=torch.bool)
    k = 1
    while k * res * rise < top and k < max(n, m):
        ox, oy = round(k * dx), round(-k * dy)  # column and row offsets (rows grow southwards)
        if abs(ox) >= m or abs(oy) >= n:
            break
        src = coarse[max(0, oy) : n + min(0, oy), max(0, ox) : m + min(0, ox)]
        dst = (slice(max(0, -oy), n + min(0, -oy)), slice(max(0, -ox), m + min(0, -ox)))
        blocked = src > coarse[dst] + k * res * rise
        shade[dst] |= blocked
        k += 1
    if step_cells > 1:
        shade = F.interpolate(
            shade[None, None].float(), size=h.shape, mode="bilinear", align_corners=False
        )[0, 0]
    return shade.float()


def shaded_top(scene: Scene, season: str, sun: torch.Tensor) -> torch.Tensor:
    """Lit top-surface colour ``(3, H, W)``: albedo x (ambient + diffuse x sunlit)."""
    rgb = albedo(scene, season)
    sun = sun.to(scene.device)
    lit = 1.0 - 0.62 * shadow_map(scene, sun)
    # Tree crowns are rounded: light them by their height-field normal.
    gy, gx = torch.gradient(scene.height, spacing=scene.resolution_m)
    # cos(normal, sun) with normal = (-dh/dx, dh/dy, 1) / norm (rows grow southwards: flip d/dy).
    cos = ((-gx * sun[0] + gy * sun[1] + sun[2]) * torch.rsqrt(gx * gx + gy * gy + 1)).clamp_min(0)
    flat_cos = float(sun[2])
    diffuse = torch.where(scene.kind == TREE, cos, torch.full_like(cos, flat_cos))
    light = 0.38 + 0.72 * diffuse * lit
    return (rgb * light[None]).clamp(0, 1)


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


def render_satellite(scene: Scene, top: torch.Tensor, size: int, extent_m: float) -> torch.Tensor:
    """Nadir orthographic view ``(3, size, size)`` of the central ``extent_m`` square, north-up."""
    n = scene.shape[0]
    cells = round(extent_m / scene.resolution_m)
    start = (n - cells) // 2
    crop = top[:, start : start + cells, start : start + cells]
    return F.interpolate(
        crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(0, 1)


@dataclass
class RayHits:
    """Per-pixel results of :func:`cast_rays` (flattened ``(N,)`` tensors)."""

    t: torch.Tensor  # distance along the unit ray to the hit
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    wall: torch.Tensor  # bool: hit a vertical face
    normal_x: torch.Tensor  # wall normal (x, y) components, 0 for top surfaces
    normal_y: torch.Tensor
    inside: torch.Tensor  # bool: the hit lies in the scene grid (else far ground or sky)
    sky: torch.Tensor  # bool: the ray never reaches the ground


def _lookup(scene: Scene, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, m = scene.shape
    col = ((x + scene.half) / scene.resolution_m).long().clamp_(0, m - 1)
    row = ((scene.half - y) / scene.resolution_m).long().clamp_(0, n - 1)
    return flat[row * m + col]


def cast_rays(
    scene: Scene, origin: torch.Tensor, dirs: torch.Tensor, samples: int = 160, block: int = 16
) -> RayHits:
    """Intersect rays ``dirs`` ``(N, 3)`` (unit) from ``origin`` ``(3,)`` with the height field."""
    dev = scene.device
    dirs = dirs.to(dev)
    ox, oy, oz = (float(v) for v in origin)
    dx, dy, dz = dirs.unbind(1)
    n_rays = dirs.shape[0]
    hflat = scene.height.reshape(-1)
    top = float(scene.height.max()) + 0.05
    half = scene.half - 1e-3
    down = dz < -1e-6
    safe_dz = torch.where(down, dz, torch.full_like(dz, -1e-6))
    t_ground = oz / -safe_dz
    t0 = ((oz - top) / -safe_dz).clamp_min(0.0)
    # Clip to the scene's square (slab method on x and y).
    t_in = torch.zeros_like(dz)
    t_out = torch.full_like(dz, float("inf"))
    for o, d in ((ox, dx), (oy, dy)):
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        ta, tb = (-half - o) * inv, (half - o) * inv
        t_in = torch.maximum(t_in, torch.minimum(ta, tb))
        t_out = torch.minimum(t_out, torch.maximum(ta, tb))
    t_start = torch.maximum(t0, t_in)
    t_end = torch.minimum(t_ground, t_out)
    marching = down & (t_start < t_end)

    t_hit = torch.where(down, t_ground, torch.full_like(dz, float("inf")))
    t_lo = torch.zeros_like(dz)
    found = torch.zeros(n_rays, dtype=torch.bool, device=dev)
    idx = marching.nonzero().squeeze(1)
    step = (t_end - t_start) / samples
    prev = t_start.clone()
    for k0 in range(0, samples, block):
        if idx.numel() == 0:
            break
        ks = torch.arange(k0 + 1, min(k0 + block, samples) + 1, device=dev, dtype=dz.dtype)
        t = t_start[idx, None] + ks[None] * step[idx, None]  # (n, b)
        x = ox + t * dx[idx, None]
        y = oy + t * dy[idx, None]
        z = oz + t * dz[idx, None]
        below = z < _lookup(scene, hflat, x, y)
        hit = below.any(1)
        first = below.to(torch.uint8).argmax(1)
        hi = t.gather(1, first[:, None]).squeeze(1)
        lo = torch.where(
            first > 0, t.gather(1, (first - 1).clamp_min(0)[:, None]).squeeze(1), prev[idx]
        )
        hit_idx = idx[hit]
        t_hit[hit_idx] = hi[hit]
        t_lo[hit_idx] = lo[hit]
        found[hit_idx] = True
        prev[idx] = t[:, -1]
        idx = idx[~hit]

    # Refine the hits by bisection between the last point above and the first below.
    hi = t_hit.clone()
    lo = t_lo
    f = found
    for _ in range(7):
        mid = 0.5 * (lo + hi)
        x, y, z = ox + mid * dx, oy + mid * dy, oz + mid * dz
        below = z < _lookup(scene, hflat, x, y)
        hi = torch.where(f & below, mid, hi)
        lo = torch.where(f & ~below, mid, lo)
    t_hit = torch.where(found, hi, t_hit)
    x, y, z = ox + t_hit * dx, oy + t_hit * dy, oz + t_hit * dz
    z = torch.where(found | ~down, z, torch.zeros_like(z))
    surface = _lookup(scene, hflat, x, y)
    wall = found & (surface - z > 0.3)
    # Which face was crossed: compare the cells of the last point above and the hit.
    xl, yl = ox + lo * dx, oy + lo * dy
    res = scene.resolution_m
    cross_x = torch.floor((x + scene.half) / res) != torch.floor((xl + scene.half) / res)
    cross_y = torch.floor((scene.half - y) / res) != torch.floor((scene.half - yl) / res)
    use_x = cross_x & (~cross_y | (dx.abs() >= dy.abs()))
    use_y = cross_y & ~use_x
    nx = torch.where(wall & use_x, -torch.sign(dx), torch.zeros_like(dx))
    ny = torch.where(wall & use_y, -torch.sign(dy), torch.zeros_like(dy))
    inside = down & (x.abs() < scene.half) & (y.abs() < scene.half)
    return RayHits(t_hit, x, y, z, wall, nx, ny, inside, ~down)


def camera_rays(camera: Camera, size: int) -> torch.Tensor:
    """Unit ray directions ``(size * size, 3)`` through pixel centres, row-major."""
    basis = camera.basis()
    f = camera.focal_px(size)
    c = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2.0) / f
    v, u = torch.meshgrid(c, c, indexing="ij")
    d = u.reshape(-1, 1) * basis[0] - v.reshape(-1, 1) * basis[1] + basis[2]
    return d / torch.linalg.vector_norm(d, dim=1, keepdim=True)


def render_drone(
    scene: Scene,
    top: torch.Tensor,
    camera: Camera,
    size: int,
    sun: torch.Tensor,
    *,
    night: bool = False,
    gen: torch.Generator | None = None,
    samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective view of the scene.

    Args:
        top: ``(3, H, W)`` lit top-surface colours from :func:`shaded_top`.
        night: light windows (a random share per building) and darken the rest.
        samples: march samples per ray (default ``max(64, size // 2 + 32)``).

    Returns:
        ``(3, size, size)`` image in [0, 1] and ``(size, size)`` depth in metres (inf for sky).
    """
    dev = scene.device
    dirs = camera_rays(camera, size).to(dev)
    origin = torch.tensor(camera.position, device=dev)
    hits = cast_rays(scene, origin, dirs, samples=samples or max(64, size // 2 + 32))
    n, m = scene.shape
    topflat = top.reshape(3, -1)
    col = ((hits.x + scene.half) / scene.resolution_m).long().clamp(0, m - 1)
    row = ((scene.half - hits.y) / scene.resolution_m).long().clamp(0, n - 1)
    cell = row * m + col
    rgb = topflat[:, cell]  # (3, N)

    # Walls: building facades get storeys of windows; other sides (trees, cars) a darker top.
    bid = scene.building.reshape(-1)[cell]
    sunv = sun.to(dev)
    facing = (hits.normal_x * sunv[0] + hits.normal_y * sunv[1]).clamp_min(0)
    wall_light = 0.45 + 0.75 * facing
    along = torch.where(hits.normal_x != 0, hits.y, hits.x)
    floor_m = scene.floor_m[bid]
    win_m = scene.window_m[bid]
    fz = torch.remainder(hits.z, floor_m) / floor_m
    fs = torch.remainder(along, win_m) / win_m
    window = (fz > 0.3) & (fz < 0.78) & (fs > 0.22) & (fs < 0.72) & (hits.z > 1.0)
    facade = scene.wall_rgb[bid].T  # (3, N)
    glass = torch.tensor([0.16, 0.20, 0.26], device=dev)[:, None].expand_as(facade)
    if night:
        g = gen if gen is not None else torch.Generator().manual_seed(0)
        lit_share = torch.rand(int(scene.building.max()) + 1, generator=g).to(dev) * 0.7
        # Window cells hash to a stable pseudo-random value so lit windows stay put.
        cell_id = torch.floor(hits.z / floor_m) * 7919 + torch.floor(along / win_m) * 104729
        u = torch.frac(torch.sin(cell_id + bid * 13.0) * 43758.5453).abs()
        on = u < lit_share[bid]
        glass = torch.where(
            on[None], torch.tensor([1.0, 0.82, 0.45], device=dev)[:, None] * 2.2, glass
        )
    facade = torch.where(window[None], glass, facade * (0.92 + 0.08 * torch.cos(fz * 6.28)))
    is_building = (bid > 0) & hits.wall
    wall_rgb = torch.where(is_building[None], facade * wall_light, rgb * 0.7 * wall_light)
    if night:  # lit windows keep their brightness under the night grade
        wall_rgb = torch.where((is_building & window)[None], glass, wall_rgb)
    rgb = torch.where(hits.wall[None], wall_rgb, rgb)

    # Outside the grid: far ground (a dim average) or sky.
    ground = top.mean(dim=(1, 2))[:, None] * 0.9
    elev = (-dirs[:, 2]).clamp(-1, 1)
    sky = torch.lerp(
        torch.tensor(SKY_HORIZON, device=dev)[:, None],
        torch.tensor(SKY_TOP, device=dev)[:, None],
        (-elev).clamp(0, 1)[None] ** 0.5,
    )
    rgb = torch.where(hits.inside[None], rgb, torch.where(hits.sky[None], sky, ground))
    depth = torch.where(hits.sky, torch.full_like(hits.t, float("inf")), hits.t)
    return rgb.reshape(3, size, size), depth.reshape(size, size)
