"""Procedural city scenes as height fields with materials.

A scene is a square grid of cells (default 0.5 m) centred on a target location: per cell a height
above ground, a material class and a building id, plus per-building colours and facade parameters.
A height field cannot express overhangs, but it renders roofs, walls, trees and cars with exact
occlusion from any view above the ground, which is all that nadir satellite images and oblique
drone views need, and it makes the renderer a few vectorised tensor operations.

Coordinates: local east-north-up metres with the target at the origin. Row 0 of every grid is the
northern edge (north-up images); column 0 the western edge.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Material classes (values of ``Scene.kind``).
GRASS, ROAD, PAVEMENT, WATER, TREE, ROOF, ROOF_DETAIL, CAR, MARKING, PARKING = range(10)

# Small shared palettes: many buildings look alike, as in real cities, so a match needs the
# layout and the details rather than a unique colour.
ROOF_PALETTE = torch.tensor(
    [
        [0.62, 0.30, 0.22],  # terracotta
        [0.30, 0.30, 0.32],  # dark grey
        [0.70, 0.70, 0.68],  # light grey
        [0.84, 0.83, 0.79],  # white membrane
        [0.36, 0.55, 0.48],  # copper green
        [0.35, 0.42, 0.52],  # blue slate
        [0.45, 0.35, 0.27],  # brown
        [0.76, 0.69, 0.55],  # beige gravel
        [0.19, 0.19, 0.20],  # tar
        [0.55, 0.18, 0.16],  # red tiles
    ]
)
WALL_PALETTE = torch.tensor(
    [
        [0.72, 0.71, 0.68],  # concrete
        [0.60, 0.33, 0.25],  # brick
        [0.86, 0.81, 0.70],  # cream render
        [0.55, 0.56, 0.58],  # grey panels
        [0.90, 0.90, 0.88],  # white
        [0.78, 0.68, 0.52],  # sandstone
        [0.32, 0.38, 0.44],  # glass curtain wall
    ]
)
CAR_PALETTE = torch.tensor(
    [
        [0.85, 0.85, 0.85],
        [0.10, 0.10, 0.11],
        [0.55, 0.56, 0.58],
        [0.60, 0.10, 0.10],
        [0.12, 0.22, 0.45],
        [0.80, 0.75, 0.60],
    ]
)
STATIC_COLOURS = {
    ROAD: (0.27, 0.27, 0.28),
    PAVEMENT: (0.66, 0.64, 0.60),
    MARKING: (0.92, 0.92, 0.88),
    PARKING: (0.36, 0.36, 0.37),
    ROOF_DETAIL: (0.62, 0.63, 0.64),
}


@dataclass
class SceneConfig:
    """Options of the city generator (all lengths in metres)."""

    extent_m: float = 640.0  # side of the square scene around the target
    resolution_m: float = 0.5  # cell size
    block_m: tuple[float, float] = (55.0, 110.0)  # city block side, min and max
    road_m: tuple[float, float] = (8.0, 14.0)  # road width, min and max
    lot_m: float = 38.0  # blocks are split until lots are at most this large
    height_m: tuple[float, float] = (6.0, 42.0)  # building height range
    target_height_m: tuple[float, float] = (14.0, 45.0)  # the target building is a landmark
    target_size_m: tuple[float, float] = (26.0, 50.0)
    p_park: float = 0.15  # share of lots that are parks (trees, grass, ponds)
    p_parking: float = 0.12  # share of lots that are car parks


@dataclass
class Scene:
    """A generated city around one target location.

    Attributes:
        height: ``(H, W)`` float32 height above ground in metres.
        kind: ``(H, W)`` uint8 material class (see the module constants).
        building: ``(H, W)`` int64 building id, 0 where there is no building.
        base_rgb: ``(3, H, W)`` float32 summer albedo in [0, 1] (seasonal materials are recoloured
            at render time from ``kind`` and ``noise``).
        noise: ``(2, H, W)`` float32 in [0, 1]: low- and high-frequency texture noise.
        roof_rgb, wall_rgb: ``(N + 1, 3)`` per-building colours (row 0 unused).
        floor_m, window_m: ``(N + 1,)`` facade storey height and window spacing.
        target: facts about the target building (footprint box in metres, height, colours).
    """

    height: torch.Tensor
    kind: torch.Tensor
    building: torch.Tensor
    base_rgb: torch.Tensor
    noise: torch.Tensor
    roof_rgb: torch.Tensor
    wall_rgb: torch.Tensor
    floor_m: torch.Tensor
    window_m: torch.Tensor
    resolution_m: float
    extent_m: float
    target: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.height.shape[0]), int(self.height.shape[1])

    @property
    def device(self) -> torch.device:
        return self.height.device

    @property
    def half(self) -> float:
        return self.extent_m / 2.0

    def to_pixel(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Metres east/north -> fractional (column, row) grid coordinates."""
        return (x + self.half) / self.resolution_m, (self.half - y) / self.resolution_m


class _Painter:
    """Writes rectangles, discs and masks in metres into the scene grids."""

    def __init__(self, size: int, res: float, extent: float, device: torch.device) -> None:
        self.size, self.res, self.half = size, res, extent / 2.0
        self.height = torch.zeros(size, size, device=device)
        self.kind = torch.full((size, size), GRASS, dtype=torch.uint8, device=device)
        self.building = torch.zeros(size, size, dtype=torch.int64, device=device)
        self.rgb = torch.zeros(3, size, size, device=device)

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Row and column slices of the cells whose centres lie in ``[x0,x1] x [y0,y1]``."""
        c0 = max(0, math.ceil((x0 + self.half) / self.res - 0.5))
        c1 = min(self.size, math.floor((x1 + self.half) / self.res - 0.5) + 1)
        r0 = max(0, math.ceil((self.half - y1) / self.res - 0.5))
        r1 = min(self.size, math.floor((self.half - y0) / self.res - 0.5) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def coords(self, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell-centre metres (x, y) of a window, as broadcastable ``(1, w)`` and ``(h, 1)``."""
        dev = self.height.device
        xs = (torch.arange(cols.start, cols.stop, device=dev) + 0.5) * self.res - self.half
        ys = self.half - (torch.arange(rows.start, rows.stop, device=dev) + 0.5) * self.res
        return xs[None, :], ys[:, None]

    def rect(
        self,
        box: tuple[float, float, float, float],
        kind: int,
        rgb: torch.Tensor | tuple[float, float, float],
        height: float | None = None,
        building: int | None = None,
        add_height: bool = False,
    ) -> None:
        rows, cols = self.window(*box)
        self.kind[rows, cols] = kind
        self.rgb[:, rows, cols] = torch.as_tensor(rgb, device=self.rgb.device)[:, None, None]
        if height is not None:
            if add_height:
                self.height[rows, cols] += height
            else:
                self.height[rows, cols] = height
        if building is not None:
            self.building[rows, cols] = building


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Integer in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, (), generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def _split_axis(
    centre_lo: float, centre_hi: float, extent: float, cfg: SceneConfig, gen: torch.Generator
) -> list[tuple[float, float]]:
    """Blocks along one axis: the central block ``[centre_lo, centre_hi]`` then outwards.

    Returns the ``(start, end)`` of each block; the gaps between consecutive blocks are roads.
    """
    blocks = [(centre_lo, centre_hi)]
    edge = centre_hi
    while edge < extent:
        start = edge + _uniform(gen, *cfg.road_m)
        end = start + _uniform(gen, *cfg.block_m)
        blocks.append((start, end))
        edge = end
    edge = centre_lo
    while edge > -extent:
        end = edge - _uniform(gen, *cfg.road_m)
        start = end - _uniform(gen, *cfg.block_m)
        blocks.insert(0, (start, end))
        edge = start
    return blocks


def _footprint(
    box: tuple[float, float, float, float], shape: str, gen: torch.Generator
) -> tuple[list[tuple[float, float, float, float]], list[tuple[float, float, float, float]]]:
    """Rectangles whose union is a footprint, and rectangles cut out of it (courtyards)."""
    x0, x1, y0, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "L":
        fx, fy = _uniform(gen, 0.35, 0.6), _uniform(gen, 0.35, 0.6)
        corner = _randint(gen, 0, 4)
        xa = (x0, x0 + fx * w) if corner in (0, 3) else (x1 - fx * w, x1)
        yb = (y0, y0 + fy * h) if corner in (0, 1) else (y1 - fy * h, y1)
        return [(*xa, y0, y1), (x0, x1, *yb)], []
    if shape == "courtyard" and min(w, h) > 22:
        t = _uniform(gen, 0.25, 0.35) * min(w, h)
        return [box], [(x0 + t, x1 - t, y0 + t, y1 - t)]
    if shape == "U" and min(w, h) > 20:
        t = _uniform(gen, 0.28, 0.38) * min(w, h)
        side = _randint(gen, 0, 4)
        cut = [
            (x0 + t, x1 - t, y0 + t, y1 + 1),
            (x0 + t, x1 - t, y0 - 1, y1 - t),
            (x0 + t, x1 + 1, y0 + t, y1 - t),
            (x0 - 1, x1 - t, y0 + t, y1 - t),
        ][side]
        return [box], [cut]
    return [box], []


class CityGenerator:
    """Generates :class:`Scene` objects; all randomness comes from the given generator."""

    def __init__(self, config: SceneConfig | None = None, device: str | torch.device = "cpu"):
        self.cfg = config or SceneConfig()
        self.device = torch.device(device)

    def __call__(self, gen: torch.Generator) -> Scene:
        cfg = self.cfg
        size = round(cfg.extent_m / cfg.resolution_m)
        p = _Painter(size, cfg.resolution_m, cfg.extent_m, self.device)
        half = cfg.extent_m / 2
        roofs, walls, floors, windows = [torch.zeros(3)], [torch.zeros(3)], [3.0], [3.0]

        def new_building(height: float) -> int:
            roofs.append(ROOF_PALETTE[_randint(gen, 0, len(ROOF_PALETTE))])
            walls.append(WALL_PALETTE[_randint(gen, 0, len(WALL_PALETTE))])
            floors.append(_uniform(gen, 2.9, 3.8))
            windows.append(_uniform(gen, 2.2, 4.2))
            return len(roofs) - 1

        def building(box, height: float, shape: str) -> int:
            bid = new_building(height)
            rects, cuts = _footprint(box, shape, gen)
            for r in rects:
                p.rect(r, ROOF, roofs[bid], height, bid)
            for c in cuts:  # courtyards are paved
                p.rect(c, PAVEMENT, STATIC_COLOURS[PAVEMENT], 0.0, 0)
            # Roof furniture (plant rooms, vents): small raised boxes seen from every view.
            for _ in range(_randint(gen, 0, 4)):
                bx0, bx1, by0, by1 = rects[0]
                sw, sh = _uniform(gen, 2.0, 6.0), _uniform(gen, 2.0, 6.0)
                if bx1 - bx0 < sw + 4 or by1 - by0 < sh + 4:
                    continue
                ox = _uniform(gen, bx0 + 2, bx1 - 2 - sw)
                oy = _uniform(gen, by0 + 2, by1 - 2 - sh)
                p.rect(
                    (ox, ox + sw, oy, oy + sh),
                    ROOF_DETAIL,
                    STATIC_COLOURS[ROOF_DETAIL],
                    height + _uniform(gen, 1.2, 3.0),
                    bid,
                )
            return bid

        def trees(box, density: float) -> None:
            x0, x1, y0, y1 = box
            n = int(density * (x1 - x0) * (y1 - y0) / 100.0)
            for _ in range(n):
                r = _uniform(gen, 2.0, 4.5)
                cx, cy = _uniform(gen, x0 + r, x1 - r), _uniform(gen, y0 + r, y1 - r)
                top = _uniform(gen, 6.0, 13.0)
                rows, cols = p.window(cx - r, cx + r, cy - r, cy + r)
                xs, ys = p.coords(rows, cols)
                d2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / r**2
                dome = (top - r * 0.6) + r * 0.6 * torch.sqrt((1 - d2).clamp_min(0))
                free = (p.building[rows, cols] == 0) & (d2 < 1)
                hv = p.height[rows, cols]
                p.height[rows, cols] = torch.where(free, torch.maximum(hv, dome), hv)
                p.kind[rows, cols] = torch.where(free, TREE, p.kind[rows, cols])

        def cars(box, along_x: bool, density: float) -> None:
            x0, x1, y0, y1 = box
            length = (x1 - x0) if along_x else (y1 - y0)
            for _ in range(int(density * length / 10.0)):
                colour = CAR_PALETTE[_randint(gen, 0, len(CAR_PALETTE))]
                if along_x:
                    cx, cy = _uniform(gen, x0 + 3, x1 - 3), _uniform(gen, y0 + 1.2, y1 - 1.2)
                    r = (cx - 2.2, cx + 2.2, cy - 0.9, cy + 0.9)
                else:
                    cx, cy = _uniform(gen, x0 + 1.2, x1 - 1.2), _uniform(gen, y0 + 3, y1 - 3)
                    r = (cx - 0.9, cx + 0.9, cy - 2.2, cy + 2.2)
                p.rect(r, CAR, colour, 1.5)

        # Road grid: the target sits inside the central block, a little off its centre.
        bw = _uniform(gen, cfg.block_m[1] * 0.85, cfg.block_m[1] * 1.1)
        bh = _uniform(gen, cfg.block_m[1] * 0.85, cfg.block_m[1] * 1.1)
        ox, oy = _uniform(gen, -0.1, 0.1) * bw, _uniform(gen, -0.1, 0.1) * bh
        xb = _split_axis(-bw / 2 + ox, bw / 2 + ox, half, cfg, gen)
        yb = _split_axis(-bh / 2 + oy, bh / 2 + oy, half, cfg, gen)
        p.rect((-half, half, -half, half), ROAD, STATIC_COLOURS[ROAD], 0.0)
        for axis, bounds in (("x", xb), ("y", yb)):
            for (_, a), (b, _) in itertools.pairwise(bounds):  # the road between two blocks
                self._road_marks(p, axis, (a + b) / 2)
                if axis == "x":
                    cars((a + 1, b - 1, -half, half), along_x=False, density=0.6)
                else:
                    cars((-half, half, a + 1, b - 1), along_x=True, density=0.6)

        target: dict = {}
        for bx0, bx1 in xb:
            for by0, by1 in yb:
                p.rect((bx0, bx1, by0, by1), PAVEMENT, STATIC_COLOURS[PAVEMENT], 0.0, 0)
                inner = (bx0 + 3, bx1 - 3, by0 + 3, by1 - 3)  # sidewalk ring
                central = bx0 < 0 < bx1 and by0 < 0 < by1
                if central:
                    target = self._target_block(p, inner, building, trees, gen)
                    continue
                for lot in self._lots(inner, gen):
                    self._fill_lot(p, lot, building, trees, cars, gen)

        noise = self._noise(size, gen)
        base = p.rgb * (0.88 + 0.24 * noise[1])[None]  # material grain
        return Scene(
            height=p.height,
            kind=p.kind,
            building=p.building,
            base_rgb=base.clamp(0, 1),
            noise=noise,
            roof_rgb=torch.stack(roofs).to(self.device),
            wall_rgb=torch.stack(walls).to(self.device),
            floor_m=torch.tensor(floors, device=self.device),
            window_m=torch.tensor(windows, device=self.device),
            resolution_m=cfg.resolution_m,
            extent_m=cfg.extent_m,
            target=target,
        )

    @staticmethod
    def _road_marks(p: _Painter, axis: str, mid: float) -> None:
        """Dashed centre line (3 m dashes every 6 m) of a road running along y (``axis="x"``,
        the road sits at x = ``mid``) or along x (``axis="y"``)."""
        half = p.half
        if axis == "x":
            rows, cols = p.window(mid - 0.25, mid + 0.25, -half, half)
            _, along = p.coords(rows, cols)
        else:
            rows, cols = p.window(-half, half, mid - 0.25, mid + 0.25)
            along, _ = p.coords(rows, cols)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        dash = ((along / 6.0) % 1.0 < 0.5).expand(shape)
        p.kind[rows, cols] = torch.where(dash, MARKING, p.kind[rows, cols])
        colour = torch.tensor(STATIC_COLOURS[MARKING], device=p.rgb.device)[:, None, None]
        p.rgb[:, rows, cols] = torch.where(dash, colour, p.rgb[:, rows, cols])

    def _target_block(self, p: _Painter, inner, building, trees, gen) -> dict:
        """Lawn and trees around a landmark building centred on the origin."""
        cfg = self.cfg
        x0, x1, y0, y1 = inner
        p.rect(inner, GRASS, (0.33, 0.52, 0.22), 0.0, 0)
        w = min(_uniform(gen, *cfg.target_size_m), 2 * min(-x0, x1) - 8)
        h = min(_uniform(gen, *cfg.target_size_m), 2 * min(-y0, y1) - 8)
        height = _uniform(gen, *cfg.target_height_m)
        shape = ("rect", "L", "courtyard", "U")[_randint(gen, 0, 4)]
        box = (-w / 2, w / 2, -h / 2, h / 2)
        trees(inner, density=0.5)
        # Plaza around the landmark, then the landmark itself over any tree.
        p.rect(
            (box[0] - 4, box[1] + 4, box[2] - 4, box[3] + 4),
            PAVEMENT,
            STATIC_COLOURS[PAVEMENT],
            0.0,
            0,
        )
        bid = building(box, height, shape)
        return {
            "building_id": bid,
            "footprint_m": [round(v, 3) for v in box],
            "height_m": round(height, 3),
            "shape": shape,
        }

    def _lots(self, box, gen) -> list[tuple[float, float, float, float]]:
        """Recursive splits of a block into lots no larger than ``lot_m``."""
        x0, x1, y0, y1 = box
        w, h = x1 - x0, y1 - y0
        if max(w, h) <= self.cfg.lot_m or min(w, h) < 16:
            return [box]
        f = _uniform(gen, 0.35, 0.65)
        if w >= h:
            xm = x0 + f * w
            return self._lots((x0, xm, y0, y1), gen) + self._lots((xm, x1, y0, y1), gen)
        ym = y0 + f * h
        return self._lots((x0, x1, y0, ym), gen) + self._lots((x0, x1, ym, y1), gen)

    def _fill_lot(self, p: _Painter, lot, building, trees, cars, gen) -> None:
        cfg = self.cfg
        x0, x1, y0, y1 = lot
        u = float(torch.rand((), generator=gen))
        if u < cfg.p_park:
            p.rect(lot, GRASS, (0.33, 0.52, 0.22), 0.0, 0)
            if _chance(gen, 0.35) and min(x1 - x0, y1 - y0) > 18:
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                rx, ry = 0.3 * (x1 - x0), 0.3 * (y1 - y0)
                rows, cols = p.window(cx - rx, cx + rx, cy - ry, cy + ry)
                xs, ys = p.coords(rows, cols)
                pond = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
                p.kind[rows, cols] = torch.where(pond, WATER, p.kind[rows, cols])
            trees(lot, density=1.2)
            return
        if u < cfg.p_park + cfg.p_parking:
            p.rect(lot, PARKING, STATIC_COLOURS[PARKING], 0.0, 0)
            along_x = (x1 - x0) >= (y1 - y0)
            cars(lot, along_x=along_x, density=2.5)
            return
        sx, sy = _uniform(gen, 1.5, 5.0), _uniform(gen, 1.5, 5.0)
        box = (x0 + sx, x1 - sx, y0 + sy, y1 - sy)
        if box[1] - box[0] < 8 or box[3] - box[2] < 8:
            return
        lo, hi = cfg.height_m
        height = min(hi, lo * math.exp(_uniform(gen, 0.0, math.log(hi / lo))))  # log-uniform
        shape = ("rect", "rect", "L", "courtyard", "U")[_randint(gen, 0, 5)]
        building(box, height, shape)
        if _chance(gen, 0.3):
            trees((x0, x1, y0, y1), density=0.3)

    def _noise(self, size: int, gen: torch.Generator) -> torch.Tensor:
        """Low-frequency (about 16 m) and per-cell noise, ``(2, size, size)`` in [0, 1]."""
        coarse = torch.rand(1, 1, size // 32 + 2, size // 32 + 2, generator=gen)
        low = F.interpolate(
            coarse.to(self.device), size=(size, size), mode="bicubic", align_corners=False
        )[0, 0]
        low = (low - low.min()) / (low.max() - low.min()).clamp_min(1e-6)
        high = torch.rand(size, size, generator=gen).to(self.device)
        return torch.stack([low, high])
