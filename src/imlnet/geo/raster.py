"""Reading georeferenced rasters for the gallery: band choice, 8-bit mapping, windowed reads.

Every read goes through :func:`read_window` or :func:`stretch_range`, which turn GDAL's read
errors (a damaged block, a truncated file) into one :class:`~imlnet.errors.GeoError` naming the
file and the window.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from imlnet.errors import GeoError


def select_bands(
    ds: rasterio.io.DatasetReader, bands: Sequence[int] | None, src: Path
) -> list[int]:
    """The 1-based bands to read: ``bands`` checked, or grey / RGB (alpha dropped) by count.

    Raises:
        GeoError: the raster has another band count and ``bands`` is None, or ``bands`` is not
            1 or 3 numbers between 1 and the band count.
    """
    if bands is None:
        if ds.count == 1:
            return [1]
        if ds.count in (3, 4):
            return [1, 2, 3]  # RGB; a fourth band (alpha) is dropped
        raise GeoError(
            f"{src}: has {ds.count} bands; choose 1 (grey) or 3 (RGB) of them with "
            f"bands=(r, g, b) (command line: --bands 3 2 1)"
        )
    bands = [int(b) for b in bands]
    if len(bands) not in (1, 3) or not all(1 <= b <= ds.count for b in bands):
        raise GeoError(
            f"{src}: bands {bands} invalid; give 1 or 3 band numbers between 1 and {ds.count}"
        )
    return bands


def open_raster(src: Path) -> rasterio.io.DatasetReader:
    """Open a georeferenced raster.

    Raises:
        GeoError: it cannot be opened, or has no CRS or an identity geotransform.
    """
    try:
        with warnings.catch_warnings():  # reported below as a GeoError
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(src)
    except RasterioError as err:
        raise GeoError(f"{src}: cannot open as a raster ({err})") from err
    if ds.crs is None or ds.transform.is_identity:
        ds.close()
        raise GeoError(
            f"{src}: has no georeference (no CRS or an identity geotransform); "
            "georeference it first, e.g. `gdal_translate -a_srs EPSG:<code> -a_ullr ...` "
            "or `gdalwarp` for ground control points"
        )
    return ds


@contextlib.contextmanager
def _read_errors(src: Path, what: str) -> Iterator[None]:
    """Turn a GDAL read failure into one GeoError naming ``src`` and ``what`` was read."""
    try:
        yield
    except RasterioError as err:
        cause = str(err.__cause__ or err).strip().splitlines()
        detail = cause[0][:200] if cause else type(err).__name__
        raise GeoError(
            f"{src}: cannot read {what} ({detail}); the file is damaged: re-export or "
            "re-download it (`gdalinfo -checksum` shows the broken blocks)"
        ) from err


def stretch_range(ds: rasterio.io.DatasetReader, bands: list[int], src: Path) -> np.ndarray | None:
    """Per-band (low, high) for mapping a non-8-bit raster to 0..255 (2nd-98th percentile).

    Computed once over a decimated read of the whole raster so that all tiles share one
    mapping (a per-tile stretch would make the same ground look different in two tiles).
    None for 8-bit rasters.
    """
    if ds.dtypes[bands[0] - 1] == "uint8":
        return None
    scale = max(1, math.ceil(max(ds.width, ds.height) / 1024))
    shape = (len(bands), max(1, ds.height // scale), max(1, ds.width // scale))
    with _read_errors(src, f"an overview of the whole raster ({shape[2]} x {shape[1]} px)"):
        data = ds.read(bands, out_shape=shape, masked=True).astype("float64")
    out = []
    for band in data:
        values = band.compressed()
        values = values[np.isfinite(values)]
        lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        out.append((lo, hi if hi > lo else lo + 1.0))
    return np.asarray(out)


def to_uint8(data: np.ndarray, stretch: np.ndarray | None) -> np.ndarray:
    """``data (B, H, W)`` as uint8: as is for 8-bit rasters, else through ``stretch``."""
    if stretch is None:
        return data.astype(np.uint8)
    lo, hi = stretch[:, 0, None, None], stretch[:, 1, None, None]
    scaled = (np.nan_to_num(data.astype("float64")) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _describe(window: Window) -> str:
    return (
        f"the window at column {int(window.col_off)}, row {int(window.row_off)} "
        f"({int(window.width)} x {int(window.height)} px)"
    )


def valid_share(
    ds: rasterio.io.DatasetReader, bands: list[int], window: Window, src: Path
) -> float:
    """Share of the window's pixels that are valid (not nodata, not transparent) in some band."""
    with _read_errors(src, _describe(window)):
        return float((ds.read_masks(bands, window=window).max(axis=0) > 0).mean())


def read_window(
    ds: rasterio.io.DatasetReader,
    bands: list[int],
    window: Window,
    out_px: int,
    resampling: Resampling,
    src: Path,
) -> np.ndarray:
    """The window resampled to ``(len(bands), out_px, out_px)``, in the raster's dtype."""
    with _read_errors(src, _describe(window)):
        return ds.read(
            bands, window=window, out_shape=(len(bands), out_px, out_px), resampling=resampling
        )
