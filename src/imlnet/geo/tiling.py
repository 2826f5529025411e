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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from imlnet.cliargs import add_common
from imlnet.errors import GeoError
from imlnet.geo.raster import open_raster
from imlnet.geo.tables import INFO_NAME, TABLE_NAME, TILE_COLUMNS, TileSet, write_csv
from imlnet.geo.windows import (  # the plan lives in windows.py (shared with one-pass indexing)
    DEFAULT_MAX_TILES,
    MIN_TILE_PX,
    TilePlan,
    check_plan_size,
    plan_raster,
    plan_tiles,
    read_tile,
    tile_image,
)
from imlnet.io import recover_staged_dir, staged_dir, write_json

__all__ = [
    "DEFAULT_MAX_TILES",
    "MIN_TILE_PX",
    "TilePlan",
    "check_plan_size",
    "main",
    "plan_tiles",
    "tile_geotiff",
]


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
    if image_format not in ("jpg", "png"):
        raise GeoError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    recover_staged_dir(out_dir)
    _check_out_dir(out_dir)
    plan = plan_raster(
        src,
        tile_size_m=tile_size_m,
        stride_m=stride_m,
        out_px=out_px,
        min_valid=min_valid,
        bands=bands,
        resampling=resampling,
        cover_edges=cover_edges,
        image_format=image_format,
        max_tiles=max_tiles,
    )
    kept: list[dict[str, Any]] = []
    skipped = 0
    with open_raster(src) as ds, staged_dir(out_dir) as stage:
        for row in tqdm(plan.rows, desc=f"tiling {src.name}", disable=not progress):
            pixels = read_tile(ds, plan, row)
            if pixels is None:
                skipped += 1
                continue
            name = f"{row['tile_id']}.{image_format}"
            image = tile_image(pixels)
            if image_format == "jpg":
                image.save(stage / name, format="JPEG", quality=jpeg_quality)
            else:
                image.save(stage / name, format="PNG")
            kept.append({"tile_id": row["tile_id"], "path": name, **row})
        params = {
            **plan.params,
            "image_format": image_format,
            "count": len(kept),
            "skipped": skipped,
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
