"""Read parts of the orthophoto behind a gallery at native resolution (rasterio windows).

The gallery's metadata keeps, per tile, its source raster and its pixel window (``source,
col_off, row_off, width, height``, written by ``imlnet tile``). Verification reads that window
widened by a margin; the map figure reads a decimated overview of the whole raster. Open rasters
and recent windows are cached, so consecutive queries (a flight) that hit the same tiles read
them once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from imlnet.errors import GeoError
from imlnet.geo.coords import WGS84, as_crs, geodesic_m
from imlnet.geo.raster import open_raster, stretch_range, to_uint8

WINDOW_COLUMNS = ("source", "col_off", "row_off", "width", "height")


@dataclass
class MapWindow:
    """A window of a raster as a grey image, with its georeference.

    Attributes:
        grey: ``(H, W)`` uint8 image.
        mask: ``(H, W)`` uint8, 255 where the raster has valid data (eroded by 2 pixels).
        to_crs: ``(3, 3)`` window pixel (OpenCV convention: pixel centres at integers) -> map
            CRS coordinates.
        crs: the raster's pyproj CRS.
        gsd_m: ground metres per window pixel at the window centre.
        north_deg: angle of the window's x axis from the CRS's x axis (0 for north-up maps).
        features: whatever the caller attached (the verifier's keypoints), cached with it.
    """

    grey: np.ndarray
    mask: np.ndarray
    to_crs: np.ndarray
    crs: Any
    gsd_m: float
    north_deg: float
    features: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in window pixels."""
        return self.grey.shape[0], self.grey.shape[1]


def _int(row: Mapping[str, Any], name: str, tile: str) -> int:
    try:
        return int(float(row[name]))
    except (KeyError, TypeError, ValueError) as err:
        raise GeoError(
            f"gallery tile {tile}: no valid {name!r} ({row.get(name)!r}); verification needs "
            f"the columns {', '.join(WINDOW_COLUMNS)} of a table written by imlnet tile: rebuild "
            "the gallery from such a table, or run with --verify 0"
        ) from err


def to_grey(data: np.ndarray) -> np.ndarray:
    """``(bands, H, W)`` uint8 -> ``(H, W)`` grey (1 band as is, else the first 3 as RGB)."""
    if data.shape[0] == 1:
        return np.ascontiguousarray(data[0])
    return cv2.cvtColor(np.ascontiguousarray(data[:3].transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY)


class MapReader:
    """Cached windowed reads of the gallery's source rasters.

    Args:
        margin: a tile window is widened by this share of its size on every side.
        max_side_px: windows larger than this are decimated by an integer step.
        cache: how many windows to keep.
    """

    def __init__(self, margin: float = 0.5, max_side_px: int = 1600, cache: int = 64) -> None:
        self.margin, self.max_side_px, self.cache = margin, max_side_px, cache
        self._rasters: dict[str, Any] = {}
        self._stretch: dict[str, np.ndarray | None] = {}
        self._windows: OrderedDict[tuple, MapWindow] = OrderedDict()
        self._to_wgs: dict[str, Transformer] = {}

    def close(self) -> None:
        """Close the rasters opened so far."""
        for ds in self._rasters.values():
            ds.close()
        self._rasters.clear()

    def raster(self, source: str, tile: str = "") -> Any:
        """The open rasterio dataset of ``source`` (GeoError naming it when it cannot open)."""
        if source not in self._rasters:
            try:
                ds = open_raster(Path(source))
            except GeoError as err:
                raise GeoError(
                    f"{err}; it is the orthophoto of gallery tile {tile or '?'}: put it back at "
                    "that path, or run with --verify 0"
                ) from err
            self._rasters[source] = ds
            # One 8-bit mapping for the whole raster, as imlnet tile made its tiles.
            self._stretch[source] = stretch_range(ds, self.bands(ds), Path(source))
        return self._rasters[source]

    @staticmethod
    def bands(ds: Any) -> list[int]:
        """RGB (the first three bands) or grey."""
        return [1, 2, 3] if ds.count >= 3 else [1]

    def lonlat(self, crs: Any, xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` map CRS coordinates -> ``(N, 2)`` WGS84 ``(lon, lat)``."""
        key = crs.to_wkt()
        if key not in self._to_wgs:
            self._to_wgs[key] = Transformer.from_crs(crs, WGS84, always_xy=True)
        lon, lat = self._to_wgs[key].transform(xy[:, 0], xy[:, 1])
        return np.c_[lon, lat]

    def tile_window(self, hit: Mapping[str, Any]) -> MapWindow:
        """The hit's tile window plus the margin, clipped to the raster."""
        tile = str(hit.get("tile_id") or hit.get("path"))
        source = str(hit.get("source") or "")
        if not source:
            raise GeoError(
                f"gallery tile {tile}: no source raster recorded; verification needs the "
                f"columns {', '.join(WINDOW_COLUMNS)} of a table written by imlnet tile: "
                "rebuild the gallery from such a table, or run with --verify 0"
            )
        col, row, w, h = (_int(hit, c, tile) for c in WINDOW_COLUMNS[1:])
        ds = self.raster(source, tile)
        pad_c, pad_r = round(w * self.margin), round(h * self.margin)
        c0, r0 = max(col - pad_c, 0), max(row - pad_r, 0)
        c1, r1 = min(col + w + pad_c, ds.width), min(row + h + pad_r, ds.height)
        if c1 <= c0 or r1 <= r0:
            raise GeoError(f"gallery tile {tile}: its window lies outside {source}; rebuild it")
        step = max(1, math.ceil(max(c1 - c0, r1 - r0) / self.max_side_px))
        return self.read(source, c0, r0, c1, r1, step)

    def read(self, source: str, c0: int, r0: int, c1: int, r1: int, step: int = 1) -> MapWindow:
        """Pixels ``[c0, c1) x [r0, r1)`` of ``source``, every ``step``-th (averaged), cached."""
        key = (source, c0, r0, c1, r1, step)
        if key in self._windows:
            self._windows.move_to_end(key)
            return self._windows[key]
        ds = self.raster(source)
        window = Window(c0, r0, c1 - c0, r1 - r0)
        shape = (max((r1 - r0) // step, 1), max((c1 - c0) // step, 1))
        bands = self.bands(ds)
        try:
            data = ds.read(
                bands, window=window, out_shape=(len(bands), *shape), resampling=Resampling.average
            )
            valid = ds.read_masks(1, window=window, out_shape=shape) > 0
        except RasterioError as err:
            raise GeoError(
                f"{source}: cannot read columns {c0}-{c1}, rows {r0}-{r1} ({err}); the file is "
                "damaged: re-export it, or run with --verify 0"
            ) from err
        mask = cv2.erode(valid.astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
        t = ds.transform
        sx, sy = (c1 - c0) / shape[1], (r1 - r0) / shape[0]
        to_crs = np.array([[t.a, t.b, t.c], [t.d, t.e, t.f], [0.0, 0.0, 1.0]]) @ np.array(
            [[sx, 0.0, c0 + sx / 2.0], [0.0, sy, r0 + sy / 2.0], [0.0, 0.0, 1.0]]
        )
        crs = as_crs(ds.crs)
        mid = np.array([[shape[1] / 2, shape[0] / 2, 1.0], [shape[1] / 2 + 1, shape[0] / 2, 1.0]])
        ends = self.lonlat(crs, (to_crs @ mid.T).T[:, :2])
        gsd = geodesic_m(ends[0, 1], ends[0, 0], ends[1, 1], ends[1, 0])
        north = math.degrees(math.atan2(to_crs[1, 0], to_crs[0, 0]))
        grey = to_grey(to_uint8(data, self._stretch[source]))
        out = MapWindow(grey, mask, to_crs, crs, gsd, north)
        self._windows[key] = out
        while len(self._windows) > self.cache:
            self._windows.popitem(last=False)
        return out

    def overview(self, source: str, max_side_px: int = 1200) -> MapWindow:
        """The whole raster, decimated to at most ``max_side_px`` (for figures)."""
        ds = self.raster(source)
        step = max(1, math.ceil(max(ds.width, ds.height) / max_side_px))
        return self.read(source, 0, 0, ds.width, ds.height, step)
