"""Cut a georeferenced orthophoto (GeoTIFF, any CRS) into overlapping gallery tiles.

Each tile is a square of ``tile_size_m`` metres on the ground, taken every ``stride_m`` metres,
resampled to ``out_px`` x ``out_px`` pixels and saved as JPEG or PNG. A metadata table
(``tiles.csv``) records, per tile, its pixel window in the source raster, its centre in the
source CRS and in WGS84 latitude/longitude, its ground size, and its footprint (the window's
four corners in WGS84, as a WKT polygon); ``tileset.json`` records the parameters. Both are
written atomically, as is every tile image.

Ground metres are converted to pixels at the raster's centre: for a projected CRS through the
CRS's linear unit and pyproj's scale factor of the projection there (so that Web Mercator tiles
are really ``tile_size_m`` wide on the ground, not in Mercator metres); for a geographic CRS
(degrees) through the local metres per degree of longitude and latitude. Over one orthophoto
the scale varies little; a map spanning many degrees of latitude should be cut in parts.

    imlnet tile ortho.tif tiles/ --tile-size-m 120 --stride-m 60 --out-px 256
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from PIL import Image
from pyproj import Proj
from pyproj.exceptions import ProjError
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window
from tqdm import tqdm

from imlnet.errors import GeoError
from imlnet.geo.coords import as_crs, crs_label, linear_unit_metres, metres_per_degree, to_wgs84
from imlnet.io import atomic_path, atomic_write, write_json

#: Columns of ``tiles.csv``, in order.
TILE_COLUMNS = (
    "tile_id",  # unique name: <source stem>_r<row_off>_c<col_off>
    "path",  # image file, relative to the tile folder
    "col_off",  # pixel window in the source raster (integers)
    "row_off",
    "width",
    "height",
    "center_x",  # centre of the window in the source CRS
    "center_y",
    "lat",  # centre in WGS84 degrees
    "lon",
    "crs",  # source CRS: "EPSG:<code>" or WKT
    "size_m",  # ground width of the tile in metres (window width x ground pixel size)
    "source",  # the GeoTIFF, as an absolute path
    "footprint",  # the window's corners in WGS84: WKT "POLYGON ((lon lat, ...))", closed, CCW
)
#: Columns a table may lack: tables written before footprints were recorded have none.
OPTIONAL_COLUMNS = ("footprint",)
TABLE_NAME = "tiles.csv"
INFO_NAME = "tileset.json"
_INT_COLUMNS = ("col_off", "row_off", "width", "height")
_FLOAT_COLUMNS = ("center_x", "center_y", "lat", "lon", "size_m")


@dataclass
class TileSet:
    """A folder of gallery tiles and their metadata table.

    Attributes:
        root: the tile folder; ``rows[i]["path"]`` is relative to it.
        rows: one dict per tile with the keys of :data:`TILE_COLUMNS` (numbers as numbers).
        skipped: tiles left out because less than ``min_valid`` of their pixels were valid.
        params: the tiling parameters (from ``tileset.json``; empty if it is missing).
    """

    root: Path
    rows: list[dict[str, Any]]
    skipped: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> Path:
        """Path of the metadata table ``tiles.csv``."""
        return self.root / TABLE_NAME

    def image_path(self, row: dict[str, Any]) -> Path:
        """Absolute path of the image of one row."""
        return (self.root / str(row["path"])).resolve()

    def __len__(self) -> int:
        return len(self.rows)


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with a header, atomically; floats keep their full ``repr``."""
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell_text(row.get(k, "")) for k in columns})


def read_csv(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Read a CSV with a header into dicts of strings.

    Raises:
        GeoError: the file is missing, unreadable, or lacks one of ``required`` columns.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError as err:
        raise GeoError(f"{path}: file not found") from err
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise GeoError(f"{path}: cannot read CSV ({err})") from err
    missing = [c for c in required if c not in columns]
    if missing:
        raise GeoError(
            f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})"
        )
    return rows


def cell_text(value: Any) -> str:
    """CSV text of a value: floats as their shortest exact ``repr``, numpy scalars as Python."""
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _counter_clockwise(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``ring`` (closed) in counter-clockwise order, as RFC 7946 wants exterior rings."""
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairwise(ring))
    return ring if area2 >= 0 else ring[::-1]


def footprint_wkt(lons: Sequence[float], lats: Sequence[float]) -> str:
    """WKT ``POLYGON ((lon lat, ...))`` of a tile's corners, closed and counter-clockwise.

    Why WKT: one CSV cell, and QGIS reads the tables as polygon layers as they are.
    """
    ring = [(float(x), float(y)) for x, y in zip(lons, lats, strict=True)]
    ring = _counter_clockwise([*ring, ring[0]])
    return "POLYGON ((" + ", ".join(f"{x!r} {y!r}" for x, y in ring) + "))"


_POLYGON = re.compile(r"^\s*POLYGON\s*\(\((.*)\)\)\s*$", re.IGNORECASE)


def parse_footprint(text: str, *, where: str = "footprint") -> list[tuple[float, float]] | None:
    """The ``(lon, lat)`` ring of a ``footprint`` cell (closed, counter-clockwise).

    Returns:
        None for an empty cell (a table written before footprints were recorded).

    Raises:
        GeoError: not a WKT polygon of at least 4 closed ``lon lat`` positions in range;
            ``where`` names the tile in the message.
    """
    if not text or not text.strip():
        return None
    match = _POLYGON.match(text)
    try:
        ring = [(float(x), float(y)) for x, y in (p.split() for p in match.group(1).split(","))]
    except (AttributeError, ValueError):
        ring = []
    ok = len(ring) >= 4 and ring[0] == ring[-1]
    if not ok or not all(-180 <= x <= 180 and -90 <= y <= 90 for x, y in ring):
        raise GeoError(
            f"{where}: footprint {text[:80]!r} is not a closed WKT POLYGON of lon/lat corners; "
            "rerun `imlnet tile` and `imlnet index`"
        )
    return _counter_clockwise(ring)


def read_tileset(folder: str | Path) -> TileSet:
    """Open a tile folder written by :func:`tile_geotiff` (its ``tiles.csv``, ``tileset.json``).

    Raises:
        GeoError: ``tiles.csv`` is missing, lacks columns, or has a non-numeric coordinate.
    """
    root = Path(folder)
    if root.is_file() and root.suffix.lower() == ".csv":
        root, table = root.parent, root
    else:
        table = root / TABLE_NAME
    if not table.is_file():
        raise GeoError(f"{table}: no tile table; run `imlnet tile SRC {root}` first")
    rows: list[dict[str, Any]] = []
    required = [c for c in TILE_COLUMNS if c not in OPTIONAL_COLUMNS]
    for line, raw in enumerate(read_csv(table, required), start=2):
        row: dict[str, Any] = dict(raw)
        try:
            for key in _INT_COLUMNS:
                row[key] = int(raw[key])
            for key in _FLOAT_COLUMNS:
                row[key] = float(raw[key])
        except ValueError as err:
            raise GeoError(f"{table}, line {line}: {err}; rerun `imlnet tile`") from err
        rows.append(row)
    params: dict[str, Any] = {}
    info = root / INFO_NAME
    if info.is_file():
        try:
            params = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise GeoError(f"{info}: cannot read ({err}); rerun `imlnet tile`") from err
    return TileSet(root=root, rows=rows, skipped=int(params.get("skipped", 0)), params=params)


def ground_pixel_size(ds: rasterio.io.DatasetReader) -> tuple[float, float]:
    """Ground metres covered by one pixel along x (columns) and y (rows) at the raster's centre.

    Projected CRS: CRS units -> metres via the axis unit, divided by the projection's scale
    factor at the centre (pyproj ``get_factors``). Geographic CRS: degrees -> metres via the
    local metres per degree (:func:`imlnet.geo.coords.metres_per_degree`).
    """
    t, crs = ds.transform, as_crs(ds.crs)
    step_x, step_y = math.hypot(t.a, t.d), math.hypot(t.b, t.e)  # CRS units per pixel
    cx, cy = t @ (ds.width / 2, ds.height / 2)
    lon, lat = (float(v[0]) for v in to_wgs84(crs, [cx], [cy]))
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


def _offsets(size: int, window: int, stride: float, cover_edges: bool) -> list[int]:
    """Window starts along one axis: every ``stride`` pixels, plus one flush with the far edge."""
    count = math.floor((size - window) / stride + 1e-9) + 1
    starts = [round(i * stride) for i in range(count)]
    if cover_edges and starts[-1] + window < size:
        starts.append(size - window)
    return starts


def _select_bands(
    ds: rasterio.io.DatasetReader, bands: Sequence[int] | None, src: Path
) -> list[int]:
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


def _stretch(ds: rasterio.io.DatasetReader, bands: list[int]) -> np.ndarray | None:
    """Per-band (low, high) for mapping a non-8-bit raster to 0..255 (2nd-98th percentile).

    Computed once over a decimated read of the whole raster so that all tiles share one
    mapping (a per-tile stretch would make the same ground look different in two tiles).
    """
    if ds.dtypes[bands[0] - 1] == "uint8":
        return None
    scale = max(1, math.ceil(max(ds.width, ds.height) / 1024))
    shape = (len(bands), max(1, ds.height // scale), max(1, ds.width // scale))
    data = ds.read(bands, out_shape=shape, masked=True).astype("float64")
    out = []
    for band in data:
        values = band.compressed()
        values = values[np.isfinite(values)]
        lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        out.append((lo, hi if hi > lo else lo + 1.0))
    return np.asarray(out)


def _to_uint8(data: np.ndarray, stretch: np.ndarray | None) -> np.ndarray:
    if stretch is None:
        return data.astype(np.uint8)
    lo, hi = stretch[:, 0, None, None], stretch[:, 1, None, None]
    scaled = (np.nan_to_num(data.astype("float64")) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem) or "tile"


def tile_geotiff(
    src: str | Path,
    out_dir: str | Path,
    *,
    tile_size_m: float,
    stride_m: float,
    out_px: int = 256,
    min_valid: float = 0.9,
    image_format: Literal["jpg", "png"] = "jpg",
    bands: Sequence[int] | None = None,
    resampling: str = "bilinear",
    jpeg_quality: int = 95,
    cover_edges: bool = True,
    progress: bool = True,
) -> TileSet:
    """Cut ``src`` into square tiles of ``tile_size_m`` metres every ``stride_m`` metres.

    Args:
        src: a georeferenced raster rasterio can open (GeoTIFF), any CRS, 1, 3 or 4 bands
            (grey, RGB, RGBA with alpha dropped); other band counts need ``bands``.
        out_dir: folder for the tile images, ``tiles.csv`` and ``tileset.json``.
        tile_size_m: ground size of a tile's side in metres.
        stride_m: ground distance between neighbouring tiles' origins (< size: overlap).
        out_px: side of each saved tile image in pixels (resampled with ``resampling``).
        min_valid: least share of valid (not nodata / not transparent) pixels a tile needs;
            tiles below it are skipped and counted in ``TileSet.skipped``.
        image_format: ``"jpg"`` or ``"png"``.
        bands: 1-based band numbers to use (1 for grey, 3 for RGB), e.g. ``(4, 3, 2)``.
        resampling: a ``rasterio.enums.Resampling`` name.
        jpeg_quality: JPEG quality (1-95).
        cover_edges: add one more column/row of tiles flush with the right/bottom edge when the
            stride grid leaves a strip uncovered (so the whole map is in the gallery).
        progress: show a tqdm bar.

    Returns:
        The :class:`TileSet` (also written to ``out_dir/tiles.csv``).

    Raises:
        GeoError: the raster cannot be opened, has no georeference, has an unsupported band
            count, or is smaller than one tile; or a parameter is out of range.
    """
    src, out_dir = Path(src).resolve(), Path(out_dir)
    if not (tile_size_m > 0 and stride_m > 0 and out_px >= 8 and 0.0 <= min_valid <= 1.0):
        raise GeoError(
            f"tile_size_m ({tile_size_m}) and stride_m ({stride_m}) must be > 0, out_px "
            f"({out_px}) >= 8 and min_valid ({min_valid}) within [0, 1]"
        )
    if image_format not in ("jpg", "png"):
        raise GeoError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    try:
        resample = Resampling[resampling]
    except KeyError as err:
        names = ", ".join(r.name for r in Resampling)
        raise GeoError(f"unknown resampling {resampling!r}; use one of {names}") from err
    try:
        with warnings.catch_warnings():  # reported below as a GeoError
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(src)
    except RasterioIOError as err:
        raise GeoError(f"{src}: cannot open as a raster ({err})") from err
    with ds:
        if ds.crs is None or ds.transform.is_identity:
            raise GeoError(
                f"{src}: has no georeference (no CRS or an identity geotransform); "
                "georeference it first, e.g. `gdal_translate -a_srs EPSG:<code> -a_ullr ...` "
                "or `gdalwarp` for ground control points"
            )
        band_ids = _select_bands(ds, bands, src)
        gx, gy = ground_pixel_size(ds)
        tw, th = round(tile_size_m / gx), round(tile_size_m / gy)
        if tw > ds.width or th > ds.height:
            raise GeoError(
                f"{src}: a tile of {tile_size_m:g} m ({tw} x {th} px) is larger than the map "
                f"({ds.width} x {ds.height} px = {ds.width * gx:.1f} x {ds.height * gy:.1f} m); "
                "use a smaller --tile-size-m"
            )
        if tw < 1 or th < 1:
            raise GeoError(
                f"{src}: a tile of {tile_size_m:g} m is smaller than one pixel "
                f"({gx:.3g} x {gy:.3g} m); use a larger --tile-size-m"
            )
        cols = _offsets(ds.width, tw, stride_m / gx, cover_edges)
        rows_ = _offsets(ds.height, th, stride_m / gy, cover_edges)
        stretch = _stretch(ds, band_ids)
        crs_text, stem = crs_label(as_crs(ds.crs)), _safe_stem(src)
        ext, fmt = ("jpg", "JPEG") if image_format == "jpg" else ("png", "PNG")
        out_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        corners: list[tuple[float, float]] = []  # 4 per kept tile, in the source CRS
        skipped = 0
        for row_off, col_off in tqdm(
            [(r, c) for r in rows_ for c in cols], desc=f"tiling {src.name}", disable=not progress
        ):
            window = Window(col_off, row_off, tw, th)
            valid = ds.read_masks(band_ids, window=window).max(axis=0) > 0
            if valid.mean() < min_valid:
                skipped += 1
                continue
            data = ds.read(
                band_ids,
                window=window,
                out_shape=(len(band_ids), out_px, out_px),
                resampling=resample,
            )
            pixels = _to_uint8(data, stretch)
            image = (
                Image.fromarray(pixels[0], "L")
                if len(band_ids) == 1
                else Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
            )
            tile_id = f"{stem}_r{row_off:06d}_c{col_off:06d}"
            name = f"{tile_id}.{ext}"
            with atomic_path(out_dir / name) as tmp:
                if fmt == "JPEG":
                    image.save(tmp, format=fmt, quality=jpeg_quality)
                else:
                    image.save(tmp, format=fmt)
            cx, cy = ds.transform @ (col_off + tw / 2, row_off + th / 2)
            corners += [
                ds.transform @ (col_off + dc, row_off + dr)
                for dc, dr in ((0, 0), (0, th), (tw, th), (tw, 0))
            ]
            kept.append(
                {
                    "tile_id": tile_id,
                    "path": name,
                    "col_off": col_off,
                    "row_off": row_off,
                    "width": tw,
                    "height": th,
                    "center_x": float(cx),
                    "center_y": float(cy),
                    "crs": crs_text,
                    "size_m": round(tw * gx, 3),
                    "source": str(src),
                }
            )
        if kept:
            xs, ys = [r["center_x"] for r in kept], [r["center_y"] for r in kept]
            lon, lat = to_wgs84(as_crs(ds.crs), xs, ys)
            for row, la, lo in zip(kept, lat, lon, strict=True):
                row["lat"], row["lon"] = float(la), float(lo)
            c_lon, c_lat = to_wgs84(as_crs(ds.crs), *zip(*corners, strict=True))
            for i, row in enumerate(kept):
                row["footprint"] = footprint_wkt(c_lon[4 * i : 4 * i + 4], c_lat[4 * i : 4 * i + 4])
        params = {
            "source": str(src),
            "crs": crs_text,
            "tile_size_m": tile_size_m,
            "stride_m": stride_m,
            "out_px": out_px,
            "min_valid": min_valid,
            "bands": band_ids,
            "resampling": resample.name,
            "image_format": image_format,
            "tile_px": [tw, th],
            "ground_pixel_m": [gx, gy],
            "raster_px": [ds.width, ds.height],
            "count": len(kept),
            "skipped": skipped,
        }
    write_csv(out_dir / TABLE_NAME, kept, TILE_COLUMNS)
    write_json(out_dir / INFO_NAME, params)
    return TileSet(root=out_dir, rows=kept, skipped=skipped, params=params)


def main(argv: Sequence[str]) -> int:
    """``imlnet tile SRC OUT``: cut a GeoTIFF into gallery tiles (see :func:`tile_geotiff`)."""
    ap = argparse.ArgumentParser(prog="imlnet tile", description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="georeferenced raster (GeoTIFF)")
    ap.add_argument("out", type=Path, help="output folder for tiles and tiles.csv")
    ap.add_argument("--tile-size-m", type=float, default=120.0, help="tile side on the ground")
    ap.add_argument("--stride-m", type=float, default=60.0, help="distance between tiles")
    ap.add_argument("--out-px", type=int, default=256, help="tile image side in pixels")
    ap.add_argument("--min-valid", type=float, default=0.9, help="least share of valid pixels")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--bands", type=int, nargs="+", help="band numbers: 1 (grey) or 3 (RGB)")
    ap.add_argument("--resampling", default="bilinear", help="rasterio resampling name")
    ap.add_argument("--no-cover-edges", action="store_true", help="no tiles flush with edges")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(list(argv))
    tiles = tile_geotiff(
        args.src,
        args.out,
        tile_size_m=args.tile_size_m,
        stride_m=args.stride_m,
        out_px=args.out_px,
        min_valid=args.min_valid,
        image_format=args.format,
        bands=args.bands,
        resampling=args.resampling,
        cover_edges=not args.no_cover_edges,
        progress=not args.quiet,
    )
    tw, th = tiles.params["tile_px"]
    print(
        f"{len(tiles)} tiles ({tw} x {th} px -> {args.out_px} px) written to {tiles.root}, "
        f"{tiles.skipped} skipped (valid pixels < {args.min_valid:g}); table: {tiles.table}"
    )
    return 0
