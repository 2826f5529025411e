"""Coordinate helpers shared by tiling, indexing and localisation (all through pyproj).

Every conversion goes through pyproj with ``always_xy=True``, so that coordinates are always
``(x, y)`` = ``(easting, northing)`` or ``(lon, lat)``, whatever axis order the CRS declares.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from pyproj import CRS, Geod, Proj, Transformer
from pyproj.exceptions import CRSError, ProjError

from imlnet.errors import GeoError

WGS84 = CRS.from_epsg(4326)
_CORNERS = ((0, 0), (0, 1), (1, 1), (1, 0))  # (col, row) fractions of a window, CCW on the map
#: The ellipsoid used for every distance the package reports (metres on WGS84).
GEOD = Geod(ellps="WGS84")


def as_crs(crs: Any) -> CRS:
    """A pyproj CRS from anything pyproj accepts (rasterio CRS, EPSG code, WKT, ``"EPSG:n"``)."""
    if isinstance(crs, CRS):
        return crs
    try:
        return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except CRSError as err:
        raise GeoError(f"cannot interpret CRS {str(crs)[:80]!r}: {err}") from err


def crs_label(crs: CRS) -> str:
    """A short, reversible text for ``crs``: ``"EPSG:32632"`` when it has a code, else WKT.

    Why: the metadata table stores the CRS as text; an EPSG code is readable, and WKT keeps
    custom projections (no code) exact.
    """
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


def crs_short(crs: CRS) -> str:
    """A short text of ``crs`` for messages: its EPSG code, else its PROJ string (not WKT)."""
    epsg = crs.to_epsg()
    if epsg is not None:
        return f"EPSG:{epsg}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyproj warns that PROJ strings may lose information
        text = crs.to_proj4() or crs.name
    return text.replace(" +type=crs", "")[:120]


def metres_per_degree(lat: float, crs: CRS | None = None) -> tuple[float, float]:
    """Ground metres per degree of longitude and of latitude at latitude ``lat``.

    Measured as the geodesic length of a 0.01 degree step on the CRS's ellipsoid (WGS84 when
    ``crs`` is None). Used to give tiles of a geographic raster a size in metres: over a tile a
    few hundred metres wide the scale changes by far less than a pixel.

    Returns:
        ``(m_per_deg_lon, m_per_deg_lat)``.
    """
    geod = crs.get_geod() if crs is not None and crs.get_geod() is not None else GEOD
    step = 0.01
    lat = float(np.clip(lat, -89.0, 89.0))
    _, _, dx = geod.inv(-step / 2, lat, step / 2, lat)
    _, _, dy = geod.inv(0.0, lat - step / 2, 0.0, lat + step / 2)
    return dx / step, dy / step


def linear_unit_metres(crs: CRS) -> float:
    """Metres per unit of a projected CRS's axes (1 for metres, 0.3048 for feet, ...).

    Raises:
        GeoError: the CRS has no linear unit (should not happen for a projected CRS).
    """
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else None
    if not factor or not math.isfinite(factor):
        raise GeoError(f"CRS {crs_short(crs)} has no linear unit; reproject it to metres")
    return float(factor)


def to_wgs84(
    crs: CRS, xs: Sequence[float] | np.ndarray, ys: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Convert points from ``crs`` to WGS84; returns ``(lon, lat)`` arrays in degrees."""
    transformer = Transformer.from_crs(crs, WGS84, always_xy=True)
    lon, lat = transformer.transform(np.asarray(xs, float), np.asarray(ys, float))
    return np.atleast_1d(np.asarray(lon, float)), np.atleast_1d(np.asarray(lat, float))


def ground_pixel_size(ds: Any) -> tuple[float, float]:
    """Ground metres covered by one pixel along x (columns) and y (rows) at a raster's centre.

    Projected CRS: CRS units -> metres via the axis unit, divided by the projection's scale
    factor at the centre (pyproj ``get_factors``; so that Web Mercator tiles are really as wide
    on the ground as asked). Geographic CRS: degrees -> metres via :func:`metres_per_degree`.

    Args:
        ds: an open rasterio dataset (its ``crs``, ``transform``, ``width``, ``height``).

    Raises:
        GeoError: the raster's centre has no latitude/longitude in its CRS (e.g. a
            geostationary view centred off the Earth's disk).
    """
    t, crs = ds.transform, as_crs(ds.crs)
    step_x, step_y = math.hypot(t.a, t.d), math.hypot(t.b, t.e)  # CRS units per pixel
    cx, cy = t @ (ds.width / 2, ds.height / 2)
    lon, lat = (float(v[0]) for v in to_wgs84(crs, [cx], [cy]))
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise GeoError(
            f"{ds.name}: the raster's centre ({cx:.6g}, {cy:.6g}) has no latitude/longitude in "
            f"its CRS ({crs_short(crs)}); cut the part of the raster that shows the Earth "
            "(gdal_translate -projwin) or reproject it (gdalwarp)"
        )
    if crs.is_geographic:
        m_lon, m_lat = metres_per_degree(lat, crs)
        return step_x * m_lon, step_y * m_lat
    unit = linear_unit_metres(crs)
    try:
        factors = Proj(crs).get_factors(lon, lat)
        kx, ky = float(factors.parallel_scale), float(factors.meridional_scale)
    except (ProjError, RuntimeError, ValueError):
        kx = ky = 1.0
    if not (math.isfinite(kx) and math.isfinite(ky) and kx > 0 and ky > 0):
        kx = ky = 1.0
    return step_x * unit / kx, step_y * unit / ky


def geodesic_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Geodesic distance in metres between two WGS84 points (pyproj.Geod, WGS84 ellipsoid)."""
    _, _, dist = GEOD.inv(lon1, lat1, lon2, lat2)
    return float(dist)


@dataclass
class WindowPlaces:
    """Where a plan's windows lie: centres in the source CRS, centres and corners in WGS84.

    Attributes:
        center_xy: ``(N, 2)`` window centres in the source CRS.
        center_lonlat: ``(N, 2)`` the same in WGS84 degrees.
        corners_lonlat: ``(N, 4, 2)`` the windows' corners in WGS84 (top-left, bottom-left,
            bottom-right, top-right).
        ok: ``(N,)`` True where the centre and all four corners have a finite lat/lon.
    """

    center_xy: np.ndarray
    center_lonlat: np.ndarray
    corners_lonlat: np.ndarray
    ok: np.ndarray


def locate_windows(
    transform: Affine,
    crs: CRS,
    tile_px: tuple[int, int],
    windows: Sequence[tuple[int, int]],
) -> WindowPlaces:
    """Project pixel windows of a raster to WGS84 (no raster read).

    Args:
        transform: the raster's geotransform (pixel -> CRS).
        crs: the raster's CRS.
        tile_px: the windows' ``(width, height)`` in pixels.
        windows: ``(row_off, col_off)`` per window.

    Windows whose centre or a corner does not transform (outside a projection's valid area,
    e.g. off the Earth's disk in a geostationary view) are marked ``ok=False``.
    """
    (tw, th), windows = tile_px, np.asarray(windows, float).reshape(-1, 2)
    rows, cols = windows[:, 0], windows[:, 1]
    cx, cy = transform @ (cols + tw / 2, rows + th / 2)
    corner_cols = np.stack([cols + dc * tw for dc, _ in _CORNERS], axis=1)
    corner_rows = np.stack([rows + dr * th for _, dr in _CORNERS], axis=1)
    kx, ky = transform @ (corner_cols.ravel(), corner_rows.ravel())
    lon, lat = to_wgs84(crs, np.concatenate([cx, kx]), np.concatenate([cy, ky]))
    n = len(windows)
    center = np.stack([lon[:n], lat[:n]], axis=1)
    corners = np.stack([lon[n:], lat[n:]], axis=1).reshape(n, 4, 2)
    ok = np.isfinite(center).all(axis=1) & np.isfinite(corners).all(axis=(1, 2))
    return WindowPlaces(np.stack([cx, cy], axis=1), center, corners, ok)


class LocalFrame:
    """A metric plane tangent at one WGS84 point: azimuthal equidistant (AEQD) projection.

    Why: averaging positions in degrees is wrong away from the equator (a degree of longitude
    shrinks with latitude); in an AEQD frame centred on the tiles being averaged, distances
    from the centre are exact and the distortion over a few hundred metres is negligible.

    Args:
        lat: latitude of the frame's origin in degrees.
        lon: longitude of the frame's origin in degrees.
    """

    def __init__(self, lat: float, lon: float) -> None:
        self.lat, self.lon = float(lat), float(lon)
        local = CRS.from_proj4(
            f"+proj=aeqd +lat_0={self.lat!r} +lon_0={self.lon!r} +datum=WGS84 +units=m"
        )
        self._fwd = Transformer.from_crs(WGS84, local, always_xy=True)
        self._inv = Transformer.from_crs(local, WGS84, always_xy=True)

    def to_xy(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """WGS84 ``(lat, lon)`` arrays -> local ``(east_m, north_m)`` arrays."""
        x, y = self._fwd.transform(np.asarray(lon, float), np.asarray(lat, float))
        return np.asarray(x, float), np.asarray(y, float)

    def to_latlon(self, x: float, y: float) -> tuple[float, float]:
        """Local ``(east_m, north_m)`` -> WGS84 ``(lat, lon)``."""
        lon, lat = self._inv.transform(float(x), float(y))
        return float(lat), float(lon)
