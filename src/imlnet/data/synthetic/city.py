"""Procedural cities: a periodic road grid, lots, buildings, parks, car parks and landmarks.

A city is a square torus (:mod:`imlnet.data.synthetic.scene`) whose blocks are laid out so that a
lattice of *target blocks* (about ``target_spacing_m`` apart) each hold a landmark building on a
lawn with a plaza: the targets of the benchmark. Many targets share one city, so the cost of a
city (its layout and its lighting) is paid once for all of them, and the buildings around each
target are other parts of the same city, as on a real campus.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imlnet.data.synthetic.scene import (
    CAR_PALETTE,
    GRASS,
    PARKING,
    PAVEMENT,
    ROAD,
    ROOF,
    ROOF_DETAIL,
    ROOF_PALETTE,
    STATIC_COLOURS,
    WALL_PALETTE,
    Painter,
    RandomSource,
    Scene,
    SceneConfig,
)

Box = tuple[float, float, float, float]
LAWN = (0.33, 0.52, 0.22)


def _footprint(box: Box, shape: str, rnd: RandomSource) -> tuple[list[Box], list[Box]]:
    """Rectangles whose union is a footprint, and rectangles cut out of it (courtyards)."""
    x0, x1, y0, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "L":
        fx, fy = rnd.uniform(0.35, 0.6), rnd.uniform(0.35, 0.6)
        corner = rnd.randint(0, 4)
        xa = (x0, x0 + fx * w) if corner in (0, 3) else (x1 - fx * w, x1)
        yb = (y0, y0 + fy * h) if corner in (0, 1) else (y1 - fy * h, y1)
        return [(*xa, y0, y1), (x0, x1, *yb)], []
    if shape == "courtyard" and min(w, h) > 22:
        t = rnd.uniform(0.25, 0.35) * min(w, h)
        return [box], [(x0 + t, x1 - t, y0 + t, y1 - t)]
    if shape == "U" and min(w, h) > 20:
        t = rnd.uniform(0.28, 0.38) * min(w, h)
        side = rnd.randint(0, 4)
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
        rnd = RandomSource(gen)
        size = round(cfg.extent_m / cfg.resolution_m)
        extent = size * cfg.resolution_m
        p = Painter(size, cfg.resolution_m, extent, self.device)
        half = extent / 2
        self._buildings: list[tuple] = [((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 3.0, 3.0)]
        xb, x_big = self._axis(extent, rnd)
        yb, y_big = self._axis(extent, rnd)
        p.rect((-half, half, -half, half), ROAD, STATIC_COLOURS[ROAD])
        for axis, bounds in (("x", xb), ("y", yb)):
            ends = [b for _, b in bounds]
            starts = [a for a, _ in bounds[1:]] + [bounds[0][0] + extent]
            for a, b in zip(ends, starts, strict=True):  # the road after each block
                p.marks.append((axis, (a + b) / 2))
                road = (a + 1, b - 1, -half, half) if axis == "x" else (-half, half, a + 1, b - 1)
                self._cars(p, road, along_x=axis == "y", density=0.6, rnd=rnd)
        targets = []
        for j, (by0, by1) in reversed(list(enumerate(yb))):  # north first
            for i, (bx0, bx1) in enumerate(xb):
                p.rect((bx0, bx1, by0, by1), PAVEMENT, STATIC_COLOURS[PAVEMENT])
                inner = (bx0 + 3, bx1 - 3, by0 + 3, by1 - 3)  # sidewalk ring
                if i in x_big and j in y_big:
                    targets.append(self._target_block(p, inner, rnd))
                    continue
                for lot in self._lots(inner, rnd):
                    self._fill_lot(p, lot, rnd)
        height, kind, building, rgb = p.rasterise()
        noise = self._noise(size, gen)
        base = rgb * (0.88 + 0.24 * noise[1])[None]  # material grain
        roofs, walls, floors, windows = zip(*self._buildings, strict=True)
        dev = self.device
        return Scene(
            height=height,
            kind=kind,
            building=building,
            base_rgb=base.clamp(0, 1),
            noise=noise,
            roof_rgb=torch.tensor(roofs, device=dev),
            wall_rgb=torch.tensor(walls, device=dev),
            floor_m=torch.tensor(floors, device=dev),
            window_m=torch.tensor(windows, device=dev),
            resolution_m=cfg.resolution_m,
            extent_m=extent,
            targets=targets,
        )

    def _axis(self, extent: float, rnd: RandomSource) -> tuple[list[tuple[float, float]], set]:
        """Blocks along one axis of the torus and the indices of the target (big) blocks.

        The axis is cut into ``targets_per_side`` equal cells; each starts with a road and a big
        block (a target block), then ordinary blocks and roads whose sizes are scaled to fill it.
        """
        cfg = self.cfg
        n = cfg.targets_per_side
        cell = extent / n
        blocks, big = [], set()
        pos = -extent / 2
        for _ in range(n):
            road0 = rnd.uniform(*cfg.road_m)
            width = min(rnd.uniform(cfg.block_m[1] * 0.85, cfg.block_m[1] * 1.1), cell - road0)
            rest = cell - road0 - width
            parts: list[float] = []  # road, block, road, block, ...
            mean = (sum(cfg.road_m) + sum(cfg.block_m)) / 2
            for _ in range(max(0, round(rest / mean))):
                parts += [rnd.uniform(*cfg.road_m), rnd.uniform(*cfg.block_m)]
            scale = rest / sum(parts) if parts else 0.0
            if not parts:
                width += rest  # no room for another block: the target block takes it
            big.add(len(blocks))
            blocks.append((pos + road0, pos + road0 + width))
            pos += road0 + width
            for k in range(0, len(parts), 2):
                road, block = parts[k] * scale, parts[k + 1] * scale
                blocks.append((pos + road, pos + road + block))
                pos += road + block
        return blocks, big

    def _building(self, p: Painter, box: Box, height: float, shape: str, rnd: RandomSource) -> int:
        """Paint a building (footprint, courtyards, roof furniture); returns its id."""
        roof = tuple(ROOF_PALETTE[rnd.randint(0, len(ROOF_PALETTE))].tolist())
        wall = tuple(WALL_PALETTE[rnd.randint(0, len(WALL_PALETTE))].tolist())
        self._buildings.append((roof, wall, rnd.uniform(2.9, 3.8), rnd.uniform(2.2, 4.2)))
        bid = len(self._buildings) - 1
        rects, cuts = _footprint(box, shape, rnd)
        for r in rects:
            p.rect(r, ROOF, roof, height, bid)
        for c in cuts:  # courtyards are paved
            p.rect(c, PAVEMENT, STATIC_COLOURS[PAVEMENT])
        # Roof furniture (plant rooms, vents): small raised boxes seen from every view.
        for _ in range(rnd.randint(0, 4)):
            bx0, bx1, by0, by1 = rects[0]
            sw, sh = rnd.uniform(2.0, 6.0), rnd.uniform(2.0, 6.0)
            if bx1 - bx0 < sw + 4 or by1 - by0 < sh + 4:
                continue
            ox = rnd.uniform(bx0 + 2, bx1 - 2 - sw)
            oy = rnd.uniform(by0 + 2, by1 - 2 - sh)
            top = height + rnd.uniform(1.2, 3.0)
            p.rect((ox, ox + sw, oy, oy + sh), ROOF_DETAIL, STATIC_COLOURS[ROOF_DETAIL], top, bid)
        return bid

    @staticmethod
    def _trees(p: Painter, box: Box, density: float, rnd: RandomSource) -> None:
        x0, x1, y0, y1 = box
        for _ in range(int(density * (x1 - x0) * (y1 - y0) / 100.0)):
            r = rnd.uniform(2.0, 4.5)
            cx, cy = rnd.uniform(x0 + r, x1 - r), rnd.uniform(y0 + r, y1 - r)
            p.trees.append((cx, cy, r, rnd.uniform(6.0, 13.0)))

    @staticmethod
    def _cars(p: Painter, box: Box, along_x: bool, density: float, rnd: RandomSource) -> None:
        x0, x1, y0, y1 = box
        length = (x1 - x0) if along_x else (y1 - y0)
        for _ in range(int(density * length / 10.0)):
            colour = rnd.randint(0, len(CAR_PALETTE))
            if along_x:
                cx, cy = rnd.uniform(x0 + 3, x1 - 3), rnd.uniform(y0 + 1.2, y1 - 1.2)
                p.cars.append((cx - 2.2, cx + 2.2, cy - 0.9, cy + 0.9, colour))
            else:
                cx, cy = rnd.uniform(x0 + 1.2, x1 - 1.2), rnd.uniform(y0 + 3, y1 - 3)
                p.cars.append((cx - 0.9, cx + 0.9, cy - 2.2, cy + 2.2, colour))

    def _target_block(self, p: Painter, inner: Box, rnd: RandomSource) -> dict:
        """Lawn and trees around a landmark building near the block's centre."""
        cfg = self.cfg
        x0, x1, y0, y1 = inner
        p.rect(inner, GRASS, LAWN)
        cx = (x0 + x1) / 2 + rnd.uniform(-0.1, 0.1) * (x1 - x0)
        cy = (y0 + y1) / 2 + rnd.uniform(-0.1, 0.1) * (y1 - y0)
        w = min(rnd.uniform(*cfg.target_size_m), 2 * min(cx - x0, x1 - cx) - 8)
        h = min(rnd.uniform(*cfg.target_size_m), 2 * min(cy - y0, y1 - cy) - 8)
        height = rnd.uniform(*cfg.target_height_m)
        shape = ("rect", "L", "courtyard", "U")[rnd.randint(0, 4)]
        box = (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2)
        self._trees(p, inner, 0.5, rnd)
        plaza = (box[0] - 4, box[1] + 4, box[2] - 4, box[3] + 4)
        p.rect(plaza, PAVEMENT, STATIC_COLOURS[PAVEMENT])
        p.bare.append(plaza)
        bid = self._building(p, box, height, shape, rnd)
        return {
            "centre_m": [round(cx, 3), round(cy, 3)],
            "building_id": bid,
            "footprint_m": [round(v, 3) for v in (-w / 2, w / 2, -h / 2, h / 2)],
            "height_m": round(height, 3),
            "shape": shape,
        }

    def _lots(self, box: Box, rnd: RandomSource) -> list[Box]:
        """Recursive splits of a block into lots no larger than ``lot_m``."""
        x0, x1, y0, y1 = box
        w, h = x1 - x0, y1 - y0
        if max(w, h) <= self.cfg.lot_m or min(w, h) < 16:
            return [box]
        f = rnd.uniform(0.35, 0.65)
        if w >= h:
            xm = x0 + f * w
            return self._lots((x0, xm, y0, y1), rnd) + self._lots((xm, x1, y0, y1), rnd)
        ym = y0 + f * h
        return self._lots((x0, x1, y0, ym), rnd) + self._lots((x0, x1, ym, y1), rnd)

    def _fill_lot(self, p: Painter, lot: Box, rnd: RandomSource) -> None:
        cfg = self.cfg
        x0, x1, y0, y1 = lot
        u = rnd.random()
        if u < cfg.p_park:
            p.rect(lot, GRASS, LAWN)
            if rnd.chance(0.35) and min(x1 - x0, y1 - y0) > 18:
                p.ponds.append(((x0 + x1) / 2, (y0 + y1) / 2, 0.3 * (x1 - x0), 0.3 * (y1 - y0)))
            self._trees(p, lot, 1.2, rnd)
            return
        if u < cfg.p_park + cfg.p_parking:
            p.rect(lot, PARKING, STATIC_COLOURS[PARKING])
            self._cars(p, lot, along_x=(x1 - x0) >= (y1 - y0), density=2.5, rnd=rnd)
            return
        sx, sy = rnd.uniform(1.5, 5.0), rnd.uniform(1.5, 5.0)
        box = (x0 + sx, x1 - sx, y0 + sy, y1 - sy)
        if box[1] - box[0] < 8 or box[3] - box[2] < 8:
            return
        lo, hi = cfg.height_m
        height = min(hi, lo * math.exp(rnd.uniform(0.0, math.log(hi / lo))))  # log-uniform
        shape = ("rect", "rect", "L", "courtyard", "U")[rnd.randint(0, 5)]
        self._building(p, box, height, shape, rnd)
        if rnd.chance(0.3):
            self._trees(p, lot, 0.3, rnd)

    def _noise(self, size: int, gen: torch.Generator) -> torch.Tensor:
        """Coarse (about 16 m) and per-cell noise, ``(2, size, size)`` in [0, 1]; periodic."""
        cells = max(1, math.ceil(size / 32))
        coarse = torch.rand(1, 1, cells, cells, generator=gen)
        pad = min(2, cells)
        padded = F.pad(coarse, (pad, pad, pad, pad), mode="circular")
        low = F.interpolate(padded, scale_factor=32, mode="bicubic", align_corners=False)
        low = low[0, 0, 32 * pad : 32 * pad + size, 32 * pad : 32 * pad + size]
        low = (low - low.min()) / (low.max() - low.min()).clamp_min(1e-6)
        high = torch.rand(size, size, generator=gen)
        return torch.stack([low, high]).to(self.device)
