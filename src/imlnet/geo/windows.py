"""A raster's gallery windows, planned once and read straight into a model (no tile files).

:func:`plan_raster` opens a georeferenced raster and lists its tile windows with everything the
tile table records (:data:`imlnet.geo.tables.TILE_COLUMNS` but the image path) and the reading
options; ``imlnet tile`` writes those windows as images (:func:`imlnet.geo.tiling.tile_geotiff`)
and ``imlnet index MAP.tif`` reads them straight into the model
(:mod:`imlnet.embedding`) through :class:`WindowChunks`, so both routes give the same rows.

A window is read with ``out_shape`` at the model's input size, so GDAL reads it from the
overview level that matches when the file has overviews (``gdaladdo``), rather than at full
resolution only to shrink it; a window holds one tile, so memory does not grow with the map.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rasterio.enums import Resampling
from rasterio.env import set_gdal_config
from rasterio.windows import Window

from imlnet.errors import GeoError
from imlnet.geo.coords import as_crs, crs_label, crs_short, ground_pixel_size, locate_windows
from imlnet.geo.raster import (
    open_raster,
    read_window,
    select_bands,
    stretch_range,
    to_uint8,
    valid_share,
)
from imlnet.geo.tables import footprint_wkt

__all__ = [
    "DEFAULT_MAX_TILES",
    "MIN_TILE_PX",
    "RasterPlan",
    "TilePlan",
    "WindowChunks",
    "check_plan_size",
    "plan_raster",
    "plan_tiles",
    "safe_stem",
    "window_path",
]


#: The smallest tile side, in source pixels, that is worth a gallery image.
MIN_TILE_PX = 8
#: Plans with more tiles than this are refused unless ``max_tiles=None`` (``--allow-large``).
DEFAULT_MAX_TILES = 100_000
#: Rough bytes per pixel and band of a saved tile (aerial imagery; for the disk estimate only).
_BYTES_PER_SAMPLE = {"jpg": 0.3, "png": 0.9}


@dataclass(frozen=True)
class TilePlan:
    """The pixel windows of a tiling, row-major.

    Attributes:
        tile_px: window ``(width, height)`` in source pixels.
        cols: column offsets of the windows.
        rows: row offsets of the windows.
    """

    tile_px: tuple[int, int]
    cols: tuple[int, ...]
    rows: tuple[int, ...]

    def windows(self) -> list[tuple[int, int]]:
        """``(row_off, col_off)`` of every window, row by row."""
        return [(r, c) for r in self.rows for c in self.cols]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)


def _offsets(size: int, window: int, stride: float, cover_edges: bool) -> tuple[int, ...]:
    """Window starts along one axis: every ``stride`` pixels, plus one flush with the far edge."""
    count = math.floor((size - window) / stride + 1e-9) + 1
    starts = sorted({round(i * stride) for i in range(count)})  # a window once, even at ~1 px
    if cover_edges and starts[-1] + window < size:
        starts.append(size - window)
    return tuple(starts)


def plan_tiles(
    raster_px: tuple[int, int],
    ground_pixel_m: tuple[float, float],
    *,
    tile_size_m: float,
    stride_m: float,
    cover_edges: bool = True,
    where: str = "raster",
) -> TilePlan:
    """The windows of tiles ``tile_size_m`` wide every ``stride_m`` metres (no I/O).

    Args:
        raster_px: the raster's ``(width, height)`` in pixels.
        ground_pixel_m: ground metres per pixel along x and y.
        tile_size_m: ground size of a tile's side in metres.
        stride_m: ground distance between neighbouring tiles' origins (< size: overlap).
        cover_edges: add one more column/row of tiles flush with the right/bottom edge when
            the stride grid leaves a strip uncovered (so the whole map is in the gallery).
        where: the raster's name, for messages.

    Raises:
        GeoError: a tile is larger than the raster or under :data:`MIN_TILE_PX` pixels, or the
            stride is under one pixel (which would write the same window under one tile_id
            many times); the message gives the pixel size and the sensible range.
    """
    (width, height), (gx, gy) = raster_px, ground_pixel_m
    tw, th = round(tile_size_m / gx), round(tile_size_m / gy)
    if tw > width or th > height:
        raise GeoError(
            f"{where}: a tile of {tile_size_m:g} m ({tw} x {th} px) is larger than the map "
            f"({width} x {height} px = {width * gx:.1f} x {height * gy:.1f} m); "
            "use a smaller --tile-size-m"
        )
    smallest, largest = MIN_TILE_PX * max(gx, gy), min(width * gx, height * gy)
    if min(tw, th) < MIN_TILE_PX:
        raise GeoError(
            f"{where}: a tile of {tile_size_m:g} m is {tw} x {th} px at this raster's pixel size "
            f"({gx:.3g} x {gy:.3g} m); a tile needs at least {MIN_TILE_PX} px a side: use "
            f"--tile-size-m between {smallest:.3g} and {largest:.3g}"
        )
    if stride_m < max(gx, gy) * (1 - 1e-3):  # (a stride of "0.5 m" on 0.5002 m pixels is fine)
        raise GeoError(
            f"{where}: a stride of {stride_m:g} m is under one pixel ({gx:.3g} x {gy:.3g} m); "
            f"it would cut the same window many times: use --stride-m between "
            f"{max(gx, gy):.3g} and {tile_size_m:g} (the tile size)"
        )
    cols = _offsets(width, tw, stride_m / gx, cover_edges)
    rows = _offsets(height, th, stride_m / gy, cover_edges)
    return TilePlan((tw, th), cols, rows)


def check_plan_size(
    plan: TilePlan, *, out_px: int, bands: int, image_format: str, max_tiles: int | None, where: str
) -> int:
    """The plan's rough size on disk in bytes; refuse plans over ``max_tiles`` tiles.

    Raises:
        GeoError: ``len(plan) > max_tiles``; the message gives the count, the disk estimate and
            the flag that goes on anyway.
    """
    estimate = round(len(plan) * out_px * out_px * bands * _BYTES_PER_SAMPLE[image_format])
    if max_tiles is not None and len(plan) > max_tiles:
        raise GeoError(
            f"{where}: the plan has {len(plan):,} tiles ({len(plan.cols)} x {len(plan.rows)}; "
            f"about {estimate / 1e9:.1f} GB of {image_format.upper()} at {out_px} px); pass "
            "--allow-large to go on, or use a larger --stride-m or --tile-size-m"
        )
    return estimate


def safe_stem(path: Path) -> str:
    """The raster's file stem as it starts every tile_id (``[A-Za-z0-9_-]``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem) or "tile"


def window_path(src: Path, tile_id: str) -> str:
    """The ``path`` of a tile read from its raster (no file): ``<raster>::<tile_id>``."""
    return f"{src}::{tile_id}"


@dataclass
class RasterPlan:
    """The tile windows of one raster and how to read them.

    Attributes:
        src: the raster (absolute path).
        rows: one dict per window with a latitude/longitude, in plan order (row by row): the
            tile table's columns but ``path``.
        band_ids: 1-based bands read (1 for grey, 3 for RGB).
        stretch: per-band value range for non-8-bit rasters (None for uint8).
        out_px: side of a tile image in pixels.
        resampling: how a window is resampled to ``out_px``.
        min_valid: least share of valid pixels a tile needs.
        params: the tiling parameters (as ``tileset.json`` records them, without the counts).
    """

    src: Path
    rows: list[dict[str, Any]]
    band_ids: list[int]
    stretch: np.ndarray | None
    out_px: int
    resampling: Resampling
    min_valid: float
    params: dict[str, Any] = field(default_factory=dict)


def plan_raster(
    src: str | Path,
    *,
    tile_size_m: float,
    stride_m: float,
    out_px: int,
    min_valid: float = 0.9,
    bands: Sequence[int] | None = None,
    resampling: str = "bilinear",
    cover_edges: bool = True,
    image_format: str = "jpg",
    max_tiles: int | None = None,
) -> RasterPlan:
    """Open ``src`` and plan its tiles (see :func:`imlnet.geo.tiling.tile_geotiff` for the
    arguments; ``image_format`` is only used for the disk estimate of the size check).

    Raises:
        GeoError: as :func:`~imlnet.geo.tiling.tile_geotiff` (no georeference, band count, a
            plan out of range or over ``max_tiles``, no window with a latitude/longitude).
    """
    src = Path(src).resolve()
    if not (tile_size_m > 0 and stride_m > 0 and out_px >= 8 and 0.0 <= min_valid <= 1.0):
        raise GeoError(
            f"tile_size_m ({tile_size_m}) and stride_m ({stride_m}) must be > 0, out_px "
            f"({out_px}) >= 8 and min_valid ({min_valid}) within [0, 1]"
        )
    try:
        resample = Resampling[resampling]
    except KeyError as err:
        names = ", ".join(r.name for r in Resampling)
        raise GeoError(f"unknown resampling {resampling!r}; use one of {names}") from err
    with open_raster(src) as ds:
        band_ids = select_bands(ds, bands, src)
        gx, gy = ground_pixel_size(ds)
        plan = plan_tiles(
            (ds.width, ds.height),
            (gx, gy),
            tile_size_m=tile_size_m,
            stride_m=stride_m,
            cover_edges=cover_edges,
            where=str(src),
        )
        check_plan_size(
            plan,
            out_px=out_px,
            bands=len(band_ids),
            image_format=image_format,
            max_tiles=max_tiles,
            where=str(src),
        )
        crs = as_crs(ds.crs)
        places = locate_windows(ds.transform, crs, plan.tile_px, plan.windows())
        if not places.ok.any():
            raise GeoError(
                f"{src}: no tile has a latitude/longitude in the raster's CRS "
                f"({crs_short(crs)}); reproject the raster (gdalwarp) first"
            )
        stretch = stretch_range(ds, band_ids, src)
        raster_px = [ds.width, ds.height]
    (tw, th), stem, crs_text = plan.tile_px, safe_stem(src), crs_label(crs)
    rows = []
    for i, (row_off, col_off) in enumerate(plan.windows()):
        if not places.ok[i]:
            continue
        (lon, lat), corners = places.center_lonlat[i], places.corners_lonlat[i]
        rows.append(
            {
                "tile_id": f"{stem}_r{row_off:06d}_c{col_off:06d}",
                "col_off": col_off,
                "row_off": row_off,
                "width": tw,
                "height": th,
                "center_x": float(places.center_xy[i, 0]),
                "center_y": float(places.center_xy[i, 1]),
                "lat": float(lat),
                "lon": float(lon),
                "crs": crs_text,
                "size_m": round(tw * gx, 3),
                "source": str(src),
                "footprint": footprint_wkt(corners[:, 0], corners[:, 1]),
            }
        )
    params = {
        "source": str(src),
        "crs": crs_text,
        "tile_size_m": tile_size_m,
        "stride_m": stride_m,
        "out_px": out_px,
        "min_valid": min_valid,
        "bands": band_ids,
        "resampling": resample.name,
        "tile_px": [tw, th],
        "ground_pixel_m": [gx, gy],
        "raster_px": raster_px,
        "unprojectable": int((~places.ok).sum()),
    }
    return RasterPlan(src, rows, band_ids, stretch, out_px, resample, min_valid, params)


def read_tile(ds: Any, plan: RasterPlan, row: dict[str, Any]) -> np.ndarray | None:
    """The tile's pixels ``(bands, out_px, out_px)`` uint8, or None when it has too few valid
    pixels (``imlnet tile`` skips it)."""
    window = Window(row["col_off"], row["row_off"], row["width"], row["height"])
    if valid_share(ds, plan.band_ids, window, plan.src) < plan.min_valid:
        return None
    data = read_window(ds, plan.band_ids, window, plan.out_px, plan.resampling, plan.src)
    return to_uint8(data, plan.stretch)


def tile_image(pixels: np.ndarray) -> Image.Image:
    """``(1 or 3, H, W)`` uint8 as the PIL image ``imlnet tile`` saves (grey or RGB)."""
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0], "L")
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")


class WindowChunks(torch.utils.data.Dataset):
    """Chunks of tile windows of one or more rasters, each read straight from its raster.

    Item ``i`` is chunk ``chunks[i]``: the windows ``[c * size, (c + 1) * size)`` of the
    concatenated plans, as ``{"chunk": c, "index": (n,), "valid": (n,) bool, "image": (n, 3, S,
    S)}`` (invalid windows: zeros). A chunk is the unit of a gallery shard and of resuming.
    Rasters are opened lazily in each process (DataLoader workers included).

    Args:
        plans: the rasters' plans, in gallery order.
        transform: PIL image -> ``(3, S, S)`` tensor (the model's eval transform: the same input
            as the tile image ``imlnet tile`` would write, read back).
        size: windows per chunk.
        chunks: the chunk numbers to read (default: all).
        cache_mb: GDAL's block cache in each reading process, in MB (GDAL's default, 5 % of
            the machine's RAM, would make every DataLoader worker grow by that much on a large
            map; the windows are read once, so a small cache loses nothing).
    """

    def __init__(
        self,
        plans: Sequence[RasterPlan],
        transform: Callable[[Image.Image], torch.Tensor],
        size: int,
        chunks: Sequence[int] | None = None,
        cache_mb: int = 256,
    ) -> None:
        if size < 1:
            raise GeoError(f"--shard-size must be >= 1, got {size}")
        self.plans, self.transform, self.size = list(plans), transform, int(size)
        self.where = [(p, r) for p, plan in enumerate(self.plans) for r in range(len(plan.rows))]
        self.count = -(-len(self.where) // self.size)
        self.chunks = list(range(self.count)) if chunks is None else list(chunks)
        self.cache_mb = int(cache_mb)
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.chunks)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # raster handles stay in their process

    def _ds(self, p: int) -> Any:
        if p not in self._open:
            if not self._open:  # GDAL's block cache, per process: 5 % of the RAM unless told
                set_gdal_config("GDAL_CACHEMAX", self.cache_mb)
            self._open[p] = open_raster(self.plans[p].src)
        return self._open[p]

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.chunks[i]
        ids = range(c * self.size, min((c + 1) * self.size, len(self.where)))
        images, valid = [], []
        for g in ids:
            p, r = self.where[g]
            plan = self.plans[p]
            pixels = read_tile(self._ds(p), plan, plan.rows[r])
            valid.append(pixels is not None)
            if pixels is None:
                images.append(None)
                continue
            images.append(self.transform(tile_image(pixels)))
        shape = next((x.shape for x in images if x is not None), (3, 1, 1))
        stack = torch.stack([x if x is not None else torch.zeros(shape) for x in images])
        return {
            "chunk": c,
            "index": torch.tensor(list(ids), dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.bool),
            "image": stack,
        }

    def row(self, g: int) -> dict[str, Any]:
        """The gallery row of window ``g`` (``path``: :func:`window_path`)."""
        p, r = self.where[g]
        plan = self.plans[p]
        row = dict(plan.rows[r])
        row["path"] = window_path(plan.src, row["tile_id"])
        return row
