"""City scenes as height fields with materials: the data, its options, and the painter.

A scene is a square grid of cells (default 0.5 m): per cell a height above ground, a material
class and a building id, plus per-building colours and facade parameters. A height field cannot
express overhangs, but it renders roofs, walls, trees and cars with exact occlusion from any view
above the ground, which is all that nadir satellite images and oblique drone views need, and it
makes the renderer a few vectorised tensor operations. The grid is periodic (a torus): a ray or a
crop that leaves one edge comes back at the other, so a target anywhere in the city is seen with
city all around it. :mod:`imlnet.data.synthetic.city` generates scenes.

Coordinates: east-north-up metres with the origin at the centre of the grid. Row 0 of every grid
is the northern edge (north-up images); column 0 the western edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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

    extent_m: float = 800.0  # side of the square (periodic) city
    resolution_m: float = 0.5  # cell size
    target_spacing_m: float = 200.0  # targets (landmarks) lie on a lattice about this far apart
    block_m: tuple[float, float] = (55.0, 110.0)  # city block side, min and max
    road_m: tuple[float, float] = (8.0, 14.0)  # road width, min and max
    lot_m: float = 38.0  # blocks are split until lots are at most this large
    height_m: tuple[float, float] = (6.0, 42.0)  # building height range
    target_height_m: tuple[float, float] = (14.0, 45.0)  # the target building is a landmark
    target_size_m: tuple[float, float] = (26.0, 50.0)
    p_park: float = 0.15  # share of lots that are parks (trees, grass, ponds)
    p_parking: float = 0.12  # share of lots that are car parks

    @property
    def targets_per_side(self) -> int:
        """Targets along each axis of the city's lattice."""
        return max(1, round(self.extent_m / self.target_spacing_m))


@dataclass
class Scene:
    """A generated city.

    Attributes:
        height: ``(H, W)`` float32 height above ground in metres.
        kind: ``(H, W)`` uint8 material class (see the module constants).
        building: ``(H, W)`` int64 building id, 0 where there is no building.
        base_rgb: ``(3, H, W)`` float32 summer albedo in [0, 1] (seasonal materials are recoloured
            at render time from ``kind`` and ``noise``).
        noise: ``(2, H, W)`` float32 in [0, 1]: low- and high-frequency texture noise.
        roof_rgb, wall_rgb: ``(N + 1, 3)`` per-building colours (row 0 unused).
        floor_m, window_m: ``(N + 1,)`` facade storey height and window spacing.
        targets: the landmark buildings, row by row from the north-west: their centre
            ``centre_m`` (x, y), ``building_id``, ``footprint_m`` (x0, x1, y0, y1 relative to
            the centre), ``height_m`` and ``shape``.
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
    targets: list[dict] = field(default_factory=list)

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
        """Metres east/north -> fractional (column, row) grid coordinates (not wrapped)."""
        return (x + self.half) / self.resolution_m, (self.half - y) / self.resolution_m


class RandomSource:
    """Scalar random numbers from a ``torch.Generator``, drawn in blocks.

    Why: the generator draws tens of thousands of scalars per city; one ``torch.rand`` call per
    scalar costs more than the painting. Blocks keep the stream deterministic for a seed.
    """

    def __init__(self, gen: torch.Generator, block: int = 4096) -> None:
        self.gen, self.block = gen, block
        self._buf: list[float] = []
        self._pos = 0

    def random(self) -> float:
        """Uniform in [0, 1)."""
        if self._pos >= len(self._buf):
            self._buf = torch.rand(self.block, generator=self.gen, dtype=torch.float64).tolist()
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def randint(self, lo: int, hi: int) -> int:
        """Integer in ``[lo, hi)``."""
        return min(hi - 1, lo + int(self.random() * (hi - lo)))

    def chance(self, p: float) -> bool:
        return self.random() < p


class Painter:
    """Collects the paint of a city (rectangles, discs, lines) and rasterises it at the end.

    Rectangles are drawn in order, later over earlier, by writing only their sequence number into
    one grid; their material, colour, height and building id are gathered from tables at the end.
    Trees (rounded crowns: the highest wins) and cars are stamped all at once.
    """

    def __init__(self, size: int, res: float, extent: float, device: torch.device) -> None:
        self.size, self.res, self.half, self.device = size, res, extent / 2.0, device
        self.seq = torch.zeros(size, size, dtype=torch.int32)
        self.rects: list[tuple[int, tuple[float, float, float], float, int]] = []
        self.trees: list[tuple[float, float, float, float]] = []  # cx, cy, radius, top
        self.cars: list[tuple[float, float, float, float, int]] = []  # box and colour index
        self.ponds: list[tuple[float, float, float, float]] = []  # cx, cy, rx, ry
        self.marks: list[tuple[str, float]] = []  # road centre lines (axis, position)
        self.bare: list[tuple[float, float, float, float]] = []  # boxes where no tree grows

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Row and column slices of the cells whose centres lie in ``[x0,x1] x [y0,y1]``."""
        c0 = max(0, math.ceil((x0 + self.half) / self.res - 0.5))
        c1 = min(self.size, math.floor((x1 + self.half) / self.res - 0.5) + 1)
        r0 = max(0, math.ceil((self.half - y1) / self.res - 0.5))
        r1 = min(self.size, math.floor((self.half - y0) / self.res - 0.5) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def rect(
        self,
        box: tuple[float, float, float, float],
        kind: int,
        rgb: tuple[float, float, float],
        height: float = 0.0,
        building: int = 0,
    ) -> None:
        """Paint ``box`` (x0, x1, y0, y1 metres) over whatever is there."""
        self.rects.append((kind, rgb, height, building))
        rows, cols = self.window(*box)
        self.seq[rows, cols] = len(self.rects)

    def rasterise(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(height, kind, building, rgb)`` grids of everything painted."""
        if not self.rects:
            self.rect((-self.half, self.half, -self.half, self.half), 0, (0.0, 0.0, 0.0))
        kinds = torch.tensor([0] + [r[0] for r in self.rects], dtype=torch.uint8)
        rgbs = torch.tensor([(0.0, 0.0, 0.0)] + [r[1] for r in self.rects])
        heights = torch.tensor([0.0] + [r[2] for r in self.rects])
        bids = torch.tensor([0] + [r[3] for r in self.rects], dtype=torch.int64)
        seq = self.seq.long()
        kind, height, building = kinds[seq], heights[seq], bids[seq]
        rgb = rgbs[seq].permute(2, 0, 1).contiguous()
        self._marks(kind, rgb)
        self._cars(kind, rgb, height)
        self._ponds(kind)
        self._trees(kind, height, building)
        dev = self.device
        return height.to(dev), kind.to(dev), building.to(dev), rgb.to(dev)

    def _centres(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx.double() + 0.5) * self.res - self.half

    def _marks(self, kind: torch.Tensor, rgb: torch.Tensor) -> None:
        """Dashed centre lines (3 m dashes every 6 m) on the roads."""
        colour = torch.tensor(STATIC_COLOURS[MARKING])[:, None]
        for axis, mid in self.marks:
            if axis == "x":  # a road running north-south at x = mid
                rows, cols = self.window(mid - 0.25, mid + 0.25, -self.half, self.half)
                along = -self._centres(torch.arange(rows.start, rows.stop))[:, None]
            else:
                rows, cols = self.window(-self.half, self.half, mid - 0.25, mid + 0.25)
                along = self._centres(torch.arange(cols.start, cols.stop))[None, :]
            k = kind[rows, cols]
            dash = (((along / 6.0) % 1.0) < 0.5) & (k == ROAD)
            kind[rows, cols] = torch.where(dash, MARKING, k)
            sub = rgb[:, rows, cols]
            rgb[:, rows, cols] = torch.where(dash[None], colour[:, :, None], sub)

    def _stamp(self, cx: torch.Tensor, cy: torch.Tensor, reach: float):
        """Cells around centres ``(T,)``: rows, cols ``(T, S, S)`` (wrapped) and their offsets."""
        s = 2 * math.ceil(reach / self.res) + 1
        ci = torch.floor((cx + self.half) / self.res).long()
        ri = torch.floor((self.half - cy) / self.res).long()
        off = torch.arange(s) - s // 2
        rows = ri[:, None, None] + off[None, :, None]
        cols = ci[:, None, None] + off[None, None, :]
        dx = self._centres(cols) - cx[:, None, None]
        dy = (self.half - (rows.double() + 0.5) * self.res) - cy[:, None, None]
        rows, cols, dx, dy = torch.broadcast_tensors(rows, cols, dx, dy)
        return rows % self.size, cols % self.size, dx, dy

    def _cars(self, kind: torch.Tensor, rgb: torch.Tensor, height: torch.Tensor) -> None:
        if not self.cars:
            return
        car = torch.tensor(self.cars, dtype=torch.float64)
        x0, x1, y0, y1, colour = car.unbind(1)
        rows, cols, dx, dy = self._stamp((x0 + x1) / 2, (y0 + y1) / 2, 2.5)
        inside = (dx.abs() <= ((x1 - x0) / 2)[:, None, None]) & (
            dy.abs() <= ((y1 - y0) / 2)[:, None, None]
        )
        flat = (rows * self.size + cols)[inside]
        number = torch.arange(1, len(self.cars) + 1)[:, None, None].expand_as(rows)[inside]
        top = torch.zeros(self.size * self.size, dtype=torch.int64)
        top.scatter_reduce_(0, flat, number, reduce="amax")  # the later car wins, as in order
        hit = top > 0
        which = top[hit] - 1
        kind.view(-1)[hit] = CAR
        height.view(-1)[hit] = 1.5
        rgb.view(3, -1)[:, hit] = CAR_PALETTE[colour.long()[which]].T

    def _ponds(self, kind: torch.Tensor) -> None:
        for cx, cy, rx, ry in self.ponds:
            rows, cols = self.window(cx - rx, cx + rx, cy - ry, cy + ry)
            xs = self._centres(torch.arange(cols.start, cols.stop))[None, :]
            ys = -self._centres(torch.arange(rows.start, rows.stop))[:, None]
            pond = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
            kind[rows, cols] = torch.where(pond, WATER, kind[rows, cols])

    def _trees(self, kind: torch.Tensor, height: torch.Tensor, building: torch.Tensor) -> None:
        if not self.trees:
            return
        tree = torch.tensor(self.trees, dtype=torch.float64)
        cx, cy, r, top = tree.unbind(1)
        rows, cols, dx, dy = self._stamp(cx, cy, 4.6)
        r, top = r[:, None, None], top[:, None, None]
        d2 = (dx**2 + dy**2) / r**2
        dome = ((top - r * 0.6) + r * 0.6 * torch.sqrt((1 - d2).clamp_min(0))).float()
        free = building == 0
        for box in self.bare:  # plazas: no tree grows there
            rs, cs = self.window(*box)
            free[rs, cs] = False
        flat = rows * self.size + cols
        keep = (d2 < 1) & free.view(-1)[flat]
        flat, dome = flat[keep], dome[keep]
        crown = torch.full((self.size * self.size,), -1.0)
        crown.scatter_reduce_(0, flat, dome, reduce="amax")
        grown = crown >= 0
        h = height.view(-1)
        h[grown] = torch.maximum(h[grown], crown[grown])
        kind.view(-1)[grown] = TREE
