"""What ``imlnet localize`` writes: per-query results, their summary, CSV and GeoJSON.

:func:`write_outputs` prepares every file in memory first and then writes them all through
:func:`imlnet.io.write_texts_atomically`, so a failure leaves none of them changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imlnet.errors import GeoError
from imlnet.geo.tables import csv_text, parse_footprint
from imlnet.io import write_texts_atomically

THRESHOLDS_M = (25.0, 50.0, 100.0)
RESULT_COLUMNS = (
    "image",
    "lat",
    "lon",
    "used_tiles",
    "top1_score",
    "top1_lat",
    "top1_lon",
    "top1_path",
    "true_lat",
    "true_lon",
    "error_m",
    "top1_error_m",
)
HIT_COLUMNS = ("image", "rank", "score", "lat", "lon", "path", "tile_id", "id")


@dataclass
class QueryResult:
    """The answer for one query image.

    Attributes:
        image: the query image path as given.
        hits: the top-k tiles, best first: metadata dicts with ``rank``, ``id``, ``score``,
            ``lat``, ``lon``, ``path`` and the other gallery columns.
        lat: estimated latitude (WGS84 degrees).
        lon: estimated longitude.
        used_tiles: how many of the hits went into the estimate.
        true_lat: the known latitude, if given.
        true_lon: the known longitude, if given.
        error_m: geodesic distance estimate -> truth in metres, if the truth is known.
        top1_error_m: the same for the top-1 tile's centre.
    """

    image: str
    hits: list[dict[str, Any]]
    lat: float
    lon: float
    used_tiles: int
    true_lat: float | None = None
    true_lon: float | None = None
    error_m: float | None = None
    top1_error_m: float | None = field(default=None)


def summarize(results: Sequence[QueryResult]) -> dict[str, Any]:
    """Counts and, over queries with a known position, mean/median error and the share of
    queries within 25/50/100 m, for the estimate and for the top-1 tile."""
    out: dict[str, Any] = {"queries": len(results)}
    known = [r for r in results if r.error_m is not None]
    out["with_truth"] = len(known)
    for name, attr in (("estimate", "error_m"), ("top1", "top1_error_m")):
        errors = np.array([getattr(r, attr) for r in known], float)
        if errors.size == 0:
            continue
        out[name] = {
            "mean_error_m": float(errors.mean()),
            "median_error_m": float(np.median(errors)),
            **{f"within_{t:g}m": float((errors <= t).mean()) for t in THRESHOLDS_M},
        }
    return out


def format_table(results: Sequence[QueryResult]) -> str:
    """A plain-text table, one line per query: estimate, top-1 score and tile, error."""
    header = f"{'image':<32} {'lat':>11} {'lon':>12} {'score':>6} {'n':>2} {'error m':>9}  top-1"
    lines = [header, "-" * len(header)]
    for r in results:
        err = f"{r.error_m:9.1f}" if r.error_m is not None else f"{'-':>9}"
        top = r.hits[0]
        lines.append(
            f"{Path(r.image).name[-32:]:<32} {r.lat:11.6f} {r.lon:12.6f} {top['score']:6.3f} "
            f"{r.used_tiles:2d} {err}  {Path(str(top['path'])).name}"
        )
    summary = summarize(results)
    if "estimate" in summary:
        est, top1 = summary["estimate"], summary["top1"]
        shares = ", ".join(f"{est[f'within_{t:g}m']:.0%} <= {t:g} m" for t in THRESHOLDS_M)
        lines.append(
            f"{summary['with_truth']} queries with truth: median error {est['median_error_m']:.1f}"
            f" m (top-1 tile {top1['median_error_m']:.1f} m); {shares}"
        )
    return "\n".join(lines)


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _tile_geometry(hit: Mapping[str, Any]) -> dict[str, Any]:
    """The tile's footprint as a Polygon; its centre as a Point when the gallery has no
    footprint (built before they were recorded) or the tile crosses the antimeridian (which
    RFC 7946 would want split in two)."""
    ring = parse_footprint(str(hit.get("footprint") or ""), where=f"tile {hit['path']}")
    if ring is None or max(x for x, _ in ring) - min(x for x, _ in ring) > 180:
        return {"type": "Point", "coordinates": [float(hit["lon"]), float(hit["lat"])]}
    return {"type": "Polygon", "coordinates": [[[x, y] for x, y in ring]]}


def to_geojson(results: Sequence[QueryResult]) -> dict[str, Any]:
    """An RFC 7946 FeatureCollection (coordinates ``[lon, lat]`` in WGS84): per query a Point
    ``kind="estimate"``, a Point ``kind="truth"`` when known, and per top-k tile a Polygon
    ``kind="tile"``: its footprint (closed, counter-clockwise), or a Point at its centre when
    the gallery records no footprint."""
    features: list[dict[str, Any]] = []

    def feature(geometry: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        return {"type": "Feature", "geometry": geometry, "properties": props}

    def point(lon: float, lat: float, props: dict[str, Any]) -> dict[str, Any]:
        return feature({"type": "Point", "coordinates": [float(lon), float(lat)]}, props)

    for r in results:
        features.append(
            point(
                r.lon,
                r.lat,
                {
                    "kind": "estimate",
                    "image": r.image,
                    "used_tiles": r.used_tiles,
                    "top1_score": float(r.hits[0]["score"]),
                    "top1_path": str(r.hits[0]["path"]),
                    "error_m": _num(r.error_m),
                    "top1_error_m": _num(r.top1_error_m),
                },
            )
        )
        if r.true_lat is not None and r.true_lon is not None:
            features.append(point(r.true_lon, r.true_lat, {"kind": "truth", "image": r.image}))
        for hit in r.hits:
            props = {
                "kind": "tile",
                "image": r.image,
                "rank": int(hit["rank"]),
                "score": float(hit["score"]),
                "path": str(hit["path"]),
                "tile_id": str(hit.get("tile_id", "")),
                "id": int(hit["id"]),
                "lat": float(hit["lat"]),
                "lon": float(hit["lon"]),
            }
            features.append(feature(_tile_geometry(hit), props))
    return {"type": "FeatureCollection", "features": features}


def write_outputs(results: Sequence[QueryResult], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.csv``, ``hits.csv``, ``results.geojson`` and ``summary.json``.

    All four are prepared before the first is written, so a failure leaves none changed.

    Raises:
        GeoError: a position or a footprint cannot be written (not finite, not a polygon).
    """
    out_dir = Path(out_dir)
    paths = {
        "results": out_dir / "results.csv",
        "hits": out_dir / "hits.csv",
        "geojson": out_dir / "results.geojson",
        "summary": out_dir / "summary.json",
    }
    rows = []
    for r in results:
        top = r.hits[0]
        rows.append(
            {
                "image": r.image,
                "lat": r.lat,
                "lon": r.lon,
                "used_tiles": r.used_tiles,
                "top1_score": float(top["score"]),
                "top1_lat": top["lat"],
                "top1_lon": top["lon"],
                "top1_path": top["path"],
                "true_lat": "" if r.true_lat is None else r.true_lat,
                "true_lon": "" if r.true_lon is None else r.true_lon,
                "error_m": "" if r.error_m is None else r.error_m,
                "top1_error_m": "" if r.top1_error_m is None else r.top1_error_m,
            }
        )
    hit_rows = [{**h, "image": r.image} for r in results for h in r.hits]
    try:
        geojson = json.dumps(to_geojson(results), ensure_ascii=False, allow_nan=False)
    except ValueError as err:  # a non-finite coordinate: RFC 7946 has no NaN or infinity
        raise GeoError(
            f"{paths['geojson']}: a position is not finite ({err}); nothing was written: "
            "rebuild the gallery with `imlnet tile` and `imlnet index`"
        ) from err
    summary = json.dumps(summarize(results), indent=2, sort_keys=True, ensure_ascii=False)
    write_texts_atomically(
        {
            paths["results"]: csv_text(rows, RESULT_COLUMNS),
            paths["hits"]: csv_text(hit_rows, HIT_COLUMNS),
            paths["geojson"]: geojson + "\n",
            paths["summary"]: summary + "\n",
        }
    )
    return paths
