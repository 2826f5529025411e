"""Cut a georeferenced orthophoto (GeoTIFF, any CRS) into overlapping gallery tiles.

Each tile is a square of ``tile_size_m`` metres on the ground, taken every ``stride_m`` metres,
resampled to ``out_px`` x ``out_px`` pixels and saved as JPEG or PNG. A metadata table
(``tiles.csv``, see :mod:`imlnet.geo.tables`) records, per tile, its pixel window in the source
raster, its centre in the source CRS and in WGS84 latitude/longitude, its ground size, and its
footprint (the window's four corners in WGS84, as a WKT polygon); ``tileset.json`` records the
parameters.

Two steps: :func:`plan_tiles` turns the raster's size and ground pixel size into pixel windows
(pure, no I/O; it refuses tiles of a few pixels and strides under one pixel), and
:func:`tile_geotiff` checks the plan (its size, that every window has a latitude/longitude),
then reads and writes the windows. Everything is written into a staging folder that replaces
the output folder only when the whole tile set is on disk: a failure or a kill leaves the
folder as it was (rerun the command to finish the job).

Ground metres are converted to pixels at the raster's centre
(:func:`imlnet.geo.coords.ground_pixel_size`). Over one orthophoto the scale varies little; a map
spanning many degrees of latitude should be cut in parts.

    imlnet tile ortho.tif tiles/ --tile-size-m 120 --stride-m 60 --image-size 256
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from rasterio.enums import Resampling
from rasterio.windows import Window
from tqdm import tqdm

from imlnet.cliargs import add_common
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
from imlnet.geo.tables import (
    INFO_NAME,
    TABLE_NAME,
    TILE_COLUMNS,
    TileSet,
    footprint_wkt,
    write_csv,
)
from imlnet.io import recover_staged_dir, staged_dir, write_json

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


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem) or "tile"


def _check_out_dir(out_dir: Path) -> None:
    """The output folder must be new, empty, or a tile folder (its content is replaced)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise GeoError(f"{out_dir}: is a file; give a folder for the tiles")
    own = {TABLE_NAME, INFO_NAME}
    other = [
        p.name
        for p in out_dir.iterdir()
        if p.name not in own and not (p.is_file() and p.suffix.lower() in (".jpg", ".png"))
    ]
    if other:
        raise GeoError(
            f"{out_dir}: holds files that are not tiles (e.g. {sorted(other)[0]}) and would be "
            "replaced; give an empty or new folder for the tiles"
        )


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
    max_tiles: int | None = DEFAULT_MAX_TILES,
    progress: bool = True,
) -> TileSet:
    """Cut ``src`` into square tiles of ``tile_size_m`` metres every ``stride_m`` metres.

    Args:
        src: a georeferenced raster rasterio can open (GeoTIFF), any CRS, 1, 3 or 4 bands
            (grey, RGB, RGBA with alpha dropped); other band counts need ``bands``.
        out_dir: folder for the tile images, ``tiles.csv`` and ``tileset.json``: new, empty, or
            an earlier tile folder (replaced as a whole once the new tiles are all written).
        tile_size_m: ground size of a tile's side in metres.
        stride_m: ground distance between neighbouring tiles' origins (< size: overlap).
        out_px: side of each saved tile image in pixels (resampled with ``resampling``).
        min_valid: least share of valid (not nodata / not transparent) pixels a tile needs;
            tiles below it are skipped and counted in ``TileSet.skipped``.
        image_format: ``"jpg"`` or ``"png"``.
        bands: 1-based band numbers to use (1 for grey, 3 for RGB), e.g. ``(4, 3, 2)``.
        resampling: a ``rasterio.enums.Resampling`` name.
        jpeg_quality: JPEG quality (1-95).
        cover_edges: see :func:`plan_tiles`.
        max_tiles: refuse plans with more tiles (None: no limit).
        progress: show a tqdm bar.

    Returns:
        The :class:`TileSet` (also written to ``out_dir/tiles.csv``). Windows without a
        latitude/longitude are left out and counted in ``params["unprojectable"]``.

    Raises:
        GeoError: the raster cannot be opened or read (the message names the window), has no
            georeference, has an unsupported band count, no window with a latitude/longitude,
            or a plan out of range (see :func:`plan_tiles`); or a parameter is out of range.
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
    recover_staged_dir(out_dir)
    _check_out_dir(out_dir)
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
        (tw, th), stem, crs_text = plan.tile_px, _safe_stem(src), crs_label(crs)
        kept: list[dict[str, Any]] = []
        skipped = 0
        with staged_dir(out_dir) as stage:
            for i, (row_off, col_off) in enumerate(
                tqdm(plan.windows(), desc=f"tiling {src.name}", disable=not progress)
            ):
                if not places.ok[i]:
                    continue
                window = Window(col_off, row_off, tw, th)
                if valid_share(ds, band_ids, window, src) < min_valid:
                    skipped += 1
                    continue
                data = read_window(ds, band_ids, window, out_px, resample, src)
                pixels = to_uint8(data, stretch)
                image = (
                    Image.fromarray(pixels[0], "L")
                    if len(band_ids) == 1
                    else Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
                )
                tile_id = f"{stem}_r{row_off:06d}_c{col_off:06d}"
                name = f"{tile_id}.{image_format}"
                if image_format == "jpg":
                    image.save(stage / name, format="JPEG", quality=jpeg_quality)
                else:
                    image.save(stage / name, format="PNG")
                (lon, lat), corners = places.center_lonlat[i], places.corners_lonlat[i]
                kept.append(
                    {
                        "tile_id": tile_id,
                        "path": name,
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
                "image_format": image_format,
                "tile_px": [tw, th],
                "ground_pixel_m": [gx, gy],
                "raster_px": [ds.width, ds.height],
                "count": len(kept),
                "skipped": skipped,
                "unprojectable": int((~places.ok).sum()),
            }
            write_csv(stage / TABLE_NAME, kept, TILE_COLUMNS)
            write_json(stage / INFO_NAME, params)
    return TileSet(root=out_dir, rows=kept, skipped=skipped, params=params)


def main(argv: Sequence[str]) -> int:
    """``imlnet tile SRC OUT``: cut a GeoTIFF into gallery tiles (see :func:`tile_geotiff`)."""
    ap = argparse.ArgumentParser(prog="imlnet tile", description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="georeferenced raster (GeoTIFF)")
    ap.add_argument("out", type=Path, help="output folder for tiles and tiles.csv")
    ap.add_argument("--tile-size-m", type=float, default=120.0, help="tile side on the ground")
    ap.add_argument("--stride-m", type=float, default=60.0, help="distance between tiles")
    add_common(ap, image_size=256)
    ap.add_argument("--out-px", dest="image_size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--min-valid", type=float, default=0.9, help="least share of valid pixels")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--bands", type=int, nargs="+", help="band numbers: 1 (grey) or 3 (RGB)")
    ap.add_argument("--resampling", default="bilinear", help="rasterio resampling name")
    ap.add_argument("--no-cover-edges", action="store_true", help="no tiles flush with edges")
    ap.add_argument(
        "--allow-large",
        action="store_true",
        help=f"go on with plans of more than {DEFAULT_MAX_TILES:,} tiles",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(list(argv))
    tiles = tile_geotiff(
        args.src,
        args.out,
        tile_size_m=args.tile_size_m,
        stride_m=args.stride_m,
        out_px=args.image_size,
        min_valid=args.min_valid,
        image_format=args.format,
        bands=args.bands,
        resampling=args.resampling,
        cover_edges=not args.no_cover_edges,
        max_tiles=None if args.allow_large else DEFAULT_MAX_TILES,
        progress=not args.quiet,
    )
    tw, th = tiles.params["tile_px"]
    off = tiles.params["unprojectable"]
    print(
        f"{len(tiles)} tiles ({tw} x {th} px -> {args.image_size} px) written to {tiles.root}, "
        f"{tiles.skipped} skipped (valid pixels < {args.min_valid:g})"
        + (f", {off} without a latitude/longitude in the raster's CRS" if off else "")
        + f"; table: {tiles.table}"
    )
    return 0
