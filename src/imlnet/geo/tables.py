"""The tables the localisation product reads and writes: CSV files and tile footprints.

``tiles.csv`` (from ``imlnet tile``), ``metadata.csv`` (a gallery) and the outputs of ``imlnet
localize`` are plain CSV with a header, read and written with the csv module. Floats keep their
full ``repr`` so that a table read back gives the same numbers. A tile's footprint (its four
corners in WGS84) is one WKT ``POLYGON`` cell, so that QGIS opens the tables as polygon layers;
shapely parses and orients them.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient

from imlnet.errors import GeoError
from imlnet.io import atomic_write, recover_staged_dir

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
#: Columns every row of a gallery's ``metadata.csv`` must have.
GALLERY_COLUMNS = ("path", "lat", "lon", "crs", "source")
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
        skipped: tiles left out (too few valid pixels, or corners the CRS cannot transform).
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


def cell_text(value: Any) -> str:
    """CSV text of a value: floats as their shortest exact ``repr``, numpy scalars as Python."""
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with a header (what :func:`write_csv` writes)."""

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell_text(row.get(k, "")) for k in columns})
    return out.getvalue()


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with a header, atomically; floats keep their full ``repr``."""
    text = csv_text(rows, columns)
    with atomic_write(path, "w") as handle:
        handle.write(text)


def read_table(path: str | Path, what: str = "") -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (dicts of strings) of a CSV file.

    Args:
        what: what the file is (``"attitude"``), for the messages.

    Raises:
        GeoError: the file is missing or unreadable, naming it.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError as err:
        raise GeoError(f"{path}: {what + ' ' if what else ''}file not found") from err
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        kind = f"the {what} CSV" if what else "CSV"
        raise GeoError(f"{path}: cannot read {kind} ({err})") from err
    return columns, rows


def read_csv(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Read a CSV with a header into dicts of strings.

    Raises:
        GeoError: the file is missing, unreadable, or lacks one of ``required`` columns.
    """
    columns, rows = read_table(path)
    missing = [c for c in required if c not in columns]
    if missing:
        raise GeoError(
            f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})"
        )
    return rows


def footprint_wkt(lons: Sequence[float], lats: Sequence[float]) -> str:
    """WKT ``POLYGON ((lon lat, ...))`` of a tile's corners, closed and counter-clockwise.

    Coordinates are written as Python's shortest exact ``repr`` (shapely's WKT writer rounds),
    so a table read back gives the same corners.
    """
    ring = orient(Polygon(zip(map(float, lons), map(float, lats), strict=True)), 1.0)
    return "POLYGON ((" + ", ".join(f"{x!r} {y!r}" for x, y in ring.exterior.coords) + "))"


def footprint_polygon(text: str, *, where: str = "footprint") -> Polygon | None:
    """The footprint cell as a counter-clockwise shapely Polygon in (lon, lat).

    Returns:
        None for an empty cell (a table written before footprints were recorded).

    Raises:
        GeoError: not a WKT polygon of at least 4 closed, finite ``lon lat`` positions in range;
            ``where`` names the tile in the message.
    """
    if not text or not text.strip():
        return None
    try:
        shape = shapely.from_wkt(text)
    except shapely.errors.ShapelyError:
        shape = None
    ok = isinstance(shape, Polygon) and not shape.is_empty
    if ok:
        xy = np.asarray(shape.exterior.coords)
        ok = bool(
            np.isfinite(xy).all()
            and (np.abs(xy[:, 0]) <= 180).all()
            and (np.abs(xy[:, 1]) <= 90).all()
        )
    if not ok:
        raise GeoError(
            f"{where}: footprint {text[:80]!r} is not a closed WKT POLYGON of lon/lat corners; "
            "rerun `imlnet tile` and `imlnet index`"
        )
    return orient(shape, 1.0)


def parse_footprint(text: str, *, where: str = "footprint") -> list[tuple[float, float]] | None:
    """The ``(lon, lat)`` ring of a footprint cell (closed, counter-clockwise); see
    :func:`footprint_polygon` for the checks. None for an empty cell."""
    shape = footprint_polygon(text, where=where)
    return None if shape is None else [(float(x), float(y)) for x, y in shape.exterior.coords]


def check_gallery_row(row: Mapping[str, Any], where: str) -> dict[str, str]:
    """One metadata row as text, checked: the required columns, lat/lon, the footprint.

    Raises:
        GeoError: the row is not fit for the gallery; ``where`` names it in the message.
    """
    missing = [c for c in GALLERY_COLUMNS if c not in row]
    if missing:
        raise GeoError(f"{where} lacks {', '.join(missing)}")
    try:
        lat, lon = float(row["lat"]), float(row["lon"])
    except (TypeError, ValueError) as err:
        raise GeoError(f"{where} ({row['path']}): lat/lon not numbers") from err
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise GeoError(
            f"{where} ({row['path']}): lat {lat}, lon {lon} out of range or not finite; "
            "rerun `imlnet tile`"
        )
    parse_footprint(str(row.get("footprint") or ""), where=f"{where} ({row['path']})")
    return {str(k): cell_text(v) for k, v in row.items()}


def read_tileset(folder: str | Path) -> TileSet:
    """Open a tile folder written by ``imlnet tile`` (its ``tiles.csv``, ``tileset.json``).

    Raises:
        GeoError: ``tiles.csv`` is missing, lacks columns, or has a non-numeric coordinate.
    """
    root = Path(folder)
    recover_staged_dir(root, clean=False)  # a tile run killed in the middle of its swap
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
