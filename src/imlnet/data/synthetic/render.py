"""Vectorised renderers for :class:`~imlnet.data.synthetic.scene.Scene`.

* Satellite: nadir orthographic, north-up: the shaded top surface of the height field around a
  point, resampled with an anti-aliasing filter (no walls are visible from straight above).
* Drone: a pinhole camera ray-cast into the height field. Every pixel's ray is clipped to the slab
  between the ground and the tallest structure, sampled at a fixed number of points, and the first
  sample below the surface is refined by bisection. A hit far below the surface of its cell means
  the ray came in through the side of that cell: a wall. Occlusion is therefore exact up to the
  sampling step, whatever is in front of what. The scene is periodic, so is every look-up; rays
  are followed for ``0.75 x`` the city's side, beyond which the ground is a dim average colour.
  Several views are cast as one batch of rays (:func:`render_views`).

Both run on whatever device the scene lives on; nothing loops over pixels in Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imlnet.data.synthetic.scene import Scene
from imlnet.data.synthetic.shading import (  # noqa: F401  (re-exported: the renderer's API)
    SEASONS,
    SKY_HORIZON,
    SKY_TOP,
    SUN_ELEVATION,
    SeasonLight,
    albedo,
    shaded_top,
    shadow_map,
    sun_vector,
)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in scene metres.

    Attributes:
        position: ``(x, y, z)`` east, north, up, metres (z is the height above ground).
        yaw_deg: compass heading of the optical axis (0 = north, 90 = east).
        pitch_deg: angle of the optical axis below the horizon (90 = straight down).
        fov_deg: horizontal (= vertical, square images) field of view.
        roll_deg: rotation about the optical axis; positive tilts the image's right side down.
    """

    position: tuple[float, float, float]
    yaw_deg: float
    pitch_deg: float
    fov_deg: float = 60.0
    roll_deg: float = 0.0

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
        if self.roll_deg:
            c, s = math.cos(math.radians(self.roll_deg)), math.sin(math.radians(self.roll_deg))
            right, up = (
                [c * r - s * u for r, u in zip(right, up, strict=True)],
                [s * r + c * u for r, u in zip(right, up, strict=True)],
            )
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


def render_satellite(
    scene: Scene,
    top: torch.Tensor,
    size: int,
    extent_m: float,
    centre: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Nadir orthographic view ``(3, size, size)`` of the ``extent_m`` square around ``centre``.

    North-up; the crop wraps around the periodic scene.
    """
    n, m = scene.shape
    cells = round(extent_m / scene.resolution_m)
    c0 = round((centre[0] + scene.half) / scene.resolution_m - cells / 2)
    r0 = round((scene.half - centre[1]) / scene.resolution_m - cells / 2)
    rows = (torch.arange(cells, device=top.device) + r0) % n
    cols = (torch.arange(cells, device=top.device) + c0) % m
    crop = top[:, rows][:, :, cols]
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
    inside: torch.Tensor  # bool: the hit lies within the rendered range (else far ground or sky)
    sky: torch.Tensor  # bool: the ray never reaches the ground


def _cell(scene: Scene, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat index (int32) of the (periodic) cell holding each point.

    Points lie within two city sides of the grid (rays stop at 0.75 of a side), so an offset of
    two sides keeps the coordinates positive and truncation is the floor.
    """
    n, m = scene.shape
    inv, shift = 1.0 / scene.resolution_m, scene.half + 2.0 * scene.extent_m
    col = ((x + shift) * inv).int().remainder_(m)
    row = ((shift - y) * inv).int().remainder_(n)
    return row.mul_(m).add_(col)


def cast_rays(
    scene: Scene, origin: torch.Tensor, dirs: torch.Tensor, samples: int = 160, block: int = 16
) -> RayHits:
    """Intersect rays ``dirs`` ``(N, 3)`` (unit) from ``origin`` ``(3,)`` or ``(N, 3)``."""
    dev = scene.device
    dirs = dirs.to(dev)
    origin = origin.to(dev, torch.float32).expand_as(dirs)
    ox, oy, oz = origin.unbind(1)
    dx, dy, dz = dirs.unbind(1)
    n_rays = dirs.shape[0]
    hflat = scene.height.reshape(-1)
    top = float(scene.height.max()) + 0.05
    down = dz < -1e-6
    safe_dz = torch.where(down, dz, torch.full_like(dz, -1e-6))
    t_ground = oz / -safe_dz
    t_start = ((oz - top) / -safe_dz).clamp_min(0.0)
    horiz = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-9)
    t_range = 0.75 * scene.extent_m / horiz
    t_end = torch.minimum(t_ground, t_range)
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
        x = ox[idx, None] + t * dx[idx, None]
        y = oy[idx, None] + t * dy[idx, None]
        z = oz[idx, None] + t * dz[idx, None]
        below = z < hflat[_cell(scene, x, y)]
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
    f = found.nonzero().squeeze(1)
    lo, hi = t_lo[f], t_hit[f]
    fx, fy, fz, fdx, fdy, fdz = ox[f], oy[f], oz[f], dx[f], dy[f], dz[f]
    for _ in range(7):
        mid = 0.5 * (lo + hi)
        below = fz + mid * fdz < hflat[_cell(scene, fx + mid * fdx, fy + mid * fdy)]
        hi = torch.where(below, mid, hi)
        lo = torch.where(below, lo, mid)
    t_hit[f] = hi
    t_lo[f] = lo
    x, y, z = ox + t_hit * dx, oy + t_hit * dy, oz + t_hit * dz
    z = torch.where(found | ~down, z, torch.zeros_like(z))
    surface = hflat[_cell(scene, x, y)]
    wall = found & (surface - z > 0.3)
    # Which face was crossed: compare the cells of the last point above and the hit.
    xl, yl = ox + t_lo * dx, oy + t_lo * dy
    res = scene.resolution_m
    cross_x = torch.floor((x + scene.half) / res) != torch.floor((xl + scene.half) / res)
    cross_y = torch.floor((scene.half - y) / res) != torch.floor((scene.half - yl) / res)
    use_x = cross_x & (~cross_y | (dx.abs() >= dy.abs()))
    use_y = cross_y & ~use_x
    nx = torch.where(wall & use_x, -torch.sign(dx), torch.zeros_like(dx))
    ny = torch.where(wall & use_y, -torch.sign(dy), torch.zeros_like(dy))
    inside = down & (t_hit <= t_range)
    return RayHits(t_hit, x, y, z, wall, nx, ny, inside, ~down)


def camera_rays(camera: Camera, size: int) -> torch.Tensor:
    """Unit ray directions ``(size * size, 3)`` through pixel centres, row-major."""
    basis = camera.basis()
    f = camera.focal_px(size)
    c = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2.0) / f
    v, u = torch.meshgrid(c, c, indexing="ij")
    d = u.reshape(-1, 1) * basis[0] - v.reshape(-1, 1) * basis[1] + basis[2]
    return d / torch.linalg.vector_norm(d, dim=1, keepdim=True)


def _shade(
    scene: Scene,
    hits: RayHits,
    dirs: torch.Tensor,
    top: torch.Tensor,
    ground: torch.Tensor,
    sun: torch.Tensor,
    night: bool,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """Colours ``(3, N)`` of one view's ray hits (top surfaces, facades, far ground, sky)."""
    dev = scene.device
    cell = _cell(scene, hits.x, hits.y)
    rgb = top.reshape(3, -1)[:, cell]  # (3, N)

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
        lit_share = torch.rand(scene.roof_rgb.shape[0], generator=g).to(dev) * 0.7
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

    # Beyond the rendered range: far ground (a dim average) or sky.
    elev = (-dirs[:, 2]).clamp(-1, 1)
    sky = torch.lerp(
        torch.tensor(SKY_HORIZON, device=dev)[:, None],
        torch.tensor(SKY_TOP, device=dev)[:, None],
        (-elev).clamp(0, 1)[None] ** 0.5,
    )
    far = torch.where(hits.sky[None], sky, ground.to(dev)[:, None])
    return torch.where(hits.inside[None], rgb, far)


MAX_RAYS = 1 << 18  # rays cast at once by render_views (about 100 MB of temporaries per block)


@dataclass
class View:
    """What one drone view needs besides the scene: its camera, lighting and night flag."""

    camera: Camera
    top: torch.Tensor  # (3, H, W) lit top surface of the view's season
    sun: torch.Tensor  # (3,) towards the sun
    ground: torch.Tensor | None = None  # (3,) far-ground colour; default: mean of ``top``
    night: bool = False


def render_views(
    scene: Scene,
    views: Sequence[View],
    size: int,
    *,
    gen: torch.Generator | None = None,
    samples: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Render several views with one batch of rays; per view ``(image, depth)`` as
    :func:`render_drone` returns them (night views draw their lit windows from ``gen``).

    Batches hold at most :data:`MAX_RAYS` rays (memory), so many large views go in several.
    """
    per = max(1, MAX_RAYS // (size * size))
    if len(views) > per:
        return [
            out
            for start in range(0, len(views), per)
            for out in render_views(
                scene, views[start : start + per], size, gen=gen, samples=samples
            )
        ]
    dev = scene.device
    dirs = [camera_rays(v.camera, size) for v in views]
    origins = [torch.tensor(v.camera.position).expand(size * size, 3) for v in views]
    all_dirs = torch.cat(dirs).to(dev)
    hits = cast_rays(
        scene, torch.cat(origins), all_dirs, samples=samples or max(64, size // 2 + 32)
    )
    out = []
    n = size * size
    for i, v in enumerate(views):
        part = RayHits(*(getattr(hits, k)[i * n : (i + 1) * n] for k in RayHits.__annotations__))
        ground = v.ground if v.ground is not None else v.top.mean(dim=(1, 2)) * 0.9
        d = all_dirs[i * n : (i + 1) * n]
        rgb = _shade(scene, part, d, v.top, ground, v.sun, v.night, gen)
        depth = torch.where(part.sky, torch.full_like(part.t, float("inf")), part.t)
        out.append((rgb.reshape(3, size, size), depth.reshape(size, size)))
    return out


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
    view = View(camera, top, sun, night=night)
    return render_views(scene, [view], size, gen=gen, samples=samples)[0]
