"""Localise drone images against a gallery index: top-k tiles, a position estimate, the error.

For each query image the gallery is searched for the ``k`` most similar tiles (cosine score).
The position estimate is a score-weighted mean of tile centres, computed in a metric frame:

1. Take the top-1 tile as the anchor and put the top-k centres into an azimuthal equidistant
   frame centred on it (metres east/north).
2. Keep only tiles whose centre lies within ``max_spread_m`` of the anchor (default: the anchor
   tile's own ground size, i.e. the tiles that overlap it). Tiles elsewhere on the map are
   other hypotheses (look-alike places); averaging them in would put the estimate between two
   places, which is worse than either.
3. Weight the kept tiles by ``softmax(score / temperature)`` (default temperature 0.05 on the
   cosine scale: a tile 0.05 below the best weighs e^-1 as much) and average east/north;
   convert back to latitude/longitude. ``temperature <= 0`` gives the top-1 centre.

With overlapping tiles (stride < size) this refines the estimate below the stride when the
query lies between tile centres. Where the true position of a query is known (``--truth``, a
CSV ``image,lat,lon``), the geodesic error in metres (WGS84, pyproj.Geod) is reported for the
estimate and for the top-1 tile, with the share of queries within 25, 50 and 100 m.

Outputs (each written atomically): ``results.csv`` (one row per query), ``hits.csv`` (one row
per query and rank), ``results.geojson`` (RFC 7946, [lon, lat]; estimates and truths as Points,
top-k tiles as their footprint Polygons) and ``summary.json``.

    imlnet localize drone/*.jpg --index gallery/ --checkpoint ckpt/ --k 5 --truth truth.csv
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imlnet.errors import GeoError, ImageReadError
from imlnet.geo import index as gindex
from imlnet.geo.coords import LocalFrame, geodesic_m
from imlnet.geo.index import GalleryIndex, checkpoint_hash, embed_images
from imlnet.geo.tiling import parse_footprint, read_csv, write_csv
from imlnet.io import atomic_write, write_json

THRESHOLDS_M = (25.0, 50.0, 100.0)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
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


def estimate_position(
    hits: Sequence[Mapping[str, Any]],
    *,
    temperature: float = 0.05,
    max_spread_m: float | None = None,
) -> tuple[float, float, int]:
    """Position estimate from ranked hits (see the module docstring for the rule).

    Args:
        hits: dicts with ``score``, ``lat``, ``lon`` (and optionally ``size_m``), best first.
        temperature: softmax temperature on the scores; ``<= 0`` returns the top-1 centre.
        max_spread_m: keep hits within this distance of the top-1 centre; None: the top-1
            tile's ``size_m`` (100 m if the gallery has no such column).

    Returns:
        ``(lat, lon, used)``: the estimate and the number of hits averaged.

    Raises:
        GeoError: ``hits`` is empty.
    """
    if not hits:
        raise GeoError("no gallery tiles to estimate a position from (empty gallery?)")
    top = hits[0]
    if temperature <= 0 or len(hits) == 1:
        return float(top["lat"]), float(top["lon"]), 1
    if max_spread_m is None:
        try:
            max_spread_m = float(top.get("size_m") or 100.0)
        except ValueError:
            max_spread_m = 100.0
    frame = LocalFrame(float(top["lat"]), float(top["lon"]))
    x, y = frame.to_xy(
        np.array([float(h["lat"]) for h in hits]), np.array([float(h["lon"]) for h in hits])
    )
    keep = np.hypot(x, y) <= max_spread_m
    keep[0] = True
    scores = np.array([float(h["score"]) for h in hits])[keep]
    weights = np.exp((scores - scores.max()) / temperature)
    weights /= weights.sum()
    lat, lon = frame.to_latlon(float(weights @ x[keep]), float(weights @ y[keep]))
    return lat, lon, int(keep.sum())


def read_truth(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read known positions: a CSV with columns ``image,lat,lon`` (WGS84 degrees).

    ``image`` may be a path (relative to the CSV's folder or absolute) or a file name; see
    :func:`localize` for the matching.

    Raises:
        GeoError: the file is missing, lacks a column, or has a bad or out-of-range value
            (the message gives the line).
    """
    path = Path(path)
    truth: dict[str, tuple[float, float]] = {}
    for line, row in enumerate(read_csv(path, ("image", "lat", "lon")), start=2):
        try:
            lat, lon = float(row["lat"]), float(row["lon"])
        except ValueError as err:
            raise GeoError(f"{path}, line {line}: lat/lon are not numbers ({err})") from err
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise GeoError(f"{path}, line {line}: lat {lat}, lon {lon} out of range")
        truth[row["image"]] = (lat, lon)
    return truth


class _TruthMatcher:
    """Finds a query's known position: by the path as given, by the path resolved against the
    truth file's folder, or by a file name that occurs once in the truth file."""

    def __init__(self, truth: Mapping[str, tuple[float, float]], base: Path | None) -> None:
        self.exact = dict(truth)
        base = base or Path.cwd()
        self.resolved = {str((base / k).resolve()): v for k, v in truth.items()}
        names: dict[str, list[tuple[float, float]]] = {}
        for key, value in truth.items():
            names.setdefault(Path(key).name, []).append(value)
        self.names = {k: v[0] for k, v in names.items() if len(v) == 1}

    def __call__(self, image: str) -> tuple[float, float] | None:
        if image in self.exact:
            return self.exact[image]
        resolved = str(Path(image).resolve())
        if resolved in self.resolved:
            return self.resolved[resolved]
        return self.names.get(Path(image).name)


def localize(
    encode: Callable[[torch.Tensor], torch.Tensor],
    index: GalleryIndex,
    images: Sequence[str | Path],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    k: int = 5,
    truth: Mapping[str, tuple[float, float]] | None = None,
    truth_base: str | Path | None = None,
    temperature: float = 0.05,
    max_spread_m: float | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[QueryResult]:
    """Top-k tiles, a position estimate and (with ``truth``) the error, per query image.

    Args:
        encode: batch ``(B, 3, H, W)`` -> drone-view descriptors ``(B, D)``.
        index: the gallery.
        images: query image files.
        transform: PIL image -> ``(3, H, W)`` tensor (the model's drone eval transform).
        k: tiles returned per query.
        truth: known positions ``{image: (lat, lon)}`` (from :func:`read_truth`).
        truth_base: folder relative truth paths are resolved against (the CSV's folder).
        temperature: see :func:`estimate_position`.
        max_spread_m: see :func:`estimate_position`.
        batch_size: images per encoder call.
        device: where batches go.
        progress: show a tqdm bar.

    Raises:
        GeoError: no images or an empty gallery; ImageReadError: an unreadable image.
    """
    if not images:
        raise GeoError("no query images given")
    queries = embed_images(
        encode,
        list(images),
        transform=transform,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="localising",
    )
    match = _TruthMatcher(truth or {}, Path(truth_base) if truth_base else None)
    results = []
    for image, hits in zip(images, index.search_rows(queries, k), strict=True):
        lat, lon, used = estimate_position(hits, temperature=temperature, max_spread_m=max_spread_m)
        result = QueryResult(str(image), hits, lat, lon, used)
        known = match(str(image))
        if known is not None:
            result.true_lat, result.true_lon = known
            result.error_m = geodesic_m(lat, lon, *known)
            result.top1_error_m = geodesic_m(hits[0]["lat"], hits[0]["lon"], *known)
        results.append(result)
    return results


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
    """Write ``results.csv``, ``hits.csv``, ``results.geojson`` and ``summary.json``."""
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
    write_csv(paths["results"], rows, RESULT_COLUMNS)
    hit_rows = [{**h, "image": r.image} for r in results for h in r.hits]
    write_csv(paths["hits"], hit_rows, HIT_COLUMNS)
    with atomic_write(paths["geojson"], "w") as handle:
        json.dump(to_geojson(results), handle, ensure_ascii=False, allow_nan=False)
        handle.write("\n")
    write_json(paths["summary"], summarize(results))
    return paths


def expand_images(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the image files under them (sorted).

    Raises:
        ImageReadError: a path does not exist; GeoError: no image found.
    """
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            out.append(item)
        else:
            raise ImageReadError(f"{item}: query image not found")
    if not out:
        raise GeoError(f"no query images found in {', '.join(map(str, items))}")
    return out


def main(argv: Sequence[str]) -> int:
    """``imlnet localize IMAGES... --index DIR --checkpoint CKPT``: locate drone images."""
    ap = argparse.ArgumentParser(prog="imlnet localize", description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="+", help="drone images or folders of them")
    ap.add_argument("--index", type=Path, required=True, help="gallery from `imlnet index`")
    ap.add_argument("--k", type=int, default=5, help="tiles per query")
    ap.add_argument("--truth", type=Path, help="CSV image,lat,lon of known positions")
    ap.add_argument("--out-dir", type=Path, default=Path("localize-out"))
    ap.add_argument("--temperature", type=float, default=0.05, help="score softmax temperature")
    ap.add_argument("--max-spread-m", type=float, help="average tiles this close to the top-1")
    ap.add_argument("--nprobe", type=int, help="ivf gallery: lists searched (overrides)")
    ap.add_argument("--ef-search", type=int, help="hnsw gallery: search breadth (overrides)")
    gindex.add_model_args(ap)
    args = ap.parse_args(list(argv))
    if args.k < 1:
        raise GeoError(f"--k must be >= 1, got {args.k}")
    ckpt_hash = checkpoint_hash(args.checkpoint)
    index = GalleryIndex.load(
        args.index, expect_checkpoint_hash=ckpt_hash, checkpoint_name=str(args.checkpoint)
    )
    index.set_search_params(nprobe=args.nprobe, efSearch=args.ef_search)
    truth = read_truth(args.truth) if args.truth else None
    images = expand_images(args.images)
    model = gindex.load_model(args.checkpoint, args.device)
    dim = getattr(model, "descriptor_dim", None)
    if dim is not None and int(dim) != index.dim:
        raise GeoError(
            f"{args.index / gindex.MANIFEST_FILE}: the gallery holds {index.dim}-d descriptors "
            f"but {args.checkpoint} makes {dim}-d ones; use the checkpoint that built it"
        )
    results = localize(
        gindex.model_encoder(model, "drone"),
        index,
        [str(p) for p in images],
        transform=gindex.eval_transform("drone", args.size or model.input_size()),
        k=args.k,
        truth=truth,
        truth_base=args.truth.parent if args.truth else None,
        temperature=args.temperature,
        max_spread_m=args.max_spread_m,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    print(format_table(results))
    if truth is not None:
        unmatched = sum(r.error_m is None for r in results)
        if unmatched:
            print(f"note: {unmatched} query image(s) have no row in {args.truth}")
    paths = write_outputs(results, args.out_dir)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
