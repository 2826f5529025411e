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
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from PIL import Image

from imlnet.errors import GeoError, ImageReadError
from imlnet.geo import index as gindex
from imlnet.geo.coords import LocalFrame, geodesic_m
from imlnet.geo.gallery import GalleryIndex
from imlnet.geo.index import checkpoint_hash, embed_images
from imlnet.geo.outputs import (
    HIT_COLUMNS,
    RESULT_COLUMNS,
    THRESHOLDS_M,
    QueryResult,
    format_table,
    summarize,
    to_geojson,
    write_outputs,
)
from imlnet.geo.tables import read_csv
from imlnet.inference import LoadedModel

__all__ = [
    "HIT_COLUMNS",
    "RESULT_COLUMNS",
    "THRESHOLDS_M",
    "QueryResult",
    "estimate_position",
    "expand_images",
    "format_table",
    "localize",
    "main",
    "read_truth",
    "summarize",
    "to_geojson",
    "write_outputs",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


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
        GeoError: the file is missing, lacks a column, has a bad or out-of-range value (the
            message gives the line), or lists one image twice (the message gives both lines:
            which one is right cannot be guessed).
    """
    path = Path(path)
    truth: dict[str, tuple[float, float]] = {}
    first_line: dict[str, int] = {}
    for line, row in enumerate(read_csv(path, ("image", "lat", "lon")), start=2):
        same = str((path.parent / row["image"]).resolve())
        if same in first_line:
            raise GeoError(
                f"{path}, lines {first_line[same]} and {line}: image {row['image']!r} is listed "
                "twice; keep the one true position and delete the other line"
            )
        first_line[same] = line
        try:
            lat, lon = float(row["lat"]), float(row["lon"])
        except ValueError as err:
            raise GeoError(f"{path}, line {line}: lat/lon are not numbers ({err})") from err
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise GeoError(f"{path}, line {line}: lat {lat}, lon {lon} out of range")
        truth[row["image"]] = (lat, lon)
    return truth


def truth_outside(
    index: GalleryIndex, truth: Mapping[str, tuple[float, float]]
) -> tuple[int, int] | None:
    """How many known positions lie outside every tile footprint of the gallery.

    Returns:
        ``(outside, total)``, or None when there is no truth or the gallery records no
        footprints (galleries built before they were recorded).
    """
    texts = np.array([row.get("footprint") or "" for row in index.metadata], dtype=object)
    shapes = shapely.from_wkt(texts[texts != ""], on_invalid="ignore")
    shapes = shapes[~shapely.is_missing(shapes)] if len(shapes) else shapes
    if not truth or not len(shapes):
        return None
    points = shapely.points([(lon, lat) for lat, lon in truth.values()])
    inside = np.unique(shapely.STRtree(shapes).query(points, predicate="intersects")[0])
    return len(truth) - inside.size, len(truth)


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
    model: LoadedModel | Callable[[torch.Tensor], torch.Tensor],
    index: GalleryIndex | str | Path,
    images: Sequence[str | Path],
    *,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    k: int = 5,
    truth: Mapping[str, tuple[float, float]] | None = None,
    truth_base: str | Path | None = None,
    temperature: float = 0.05,
    max_spread_m: float | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[QueryResult]:
    """Top-k tiles, a position estimate and (with ``truth``) the error, per query image.

    Example:
        >>> import imlnet
        >>> model = imlnet.load_model("runs/demo/model")  # doctest: +SKIP
        >>> fix = imlnet.localize(model, "runs/demo/index", ["drone.jpg"])[0]  # doctest: +SKIP
        >>> fix.lat, fix.lon, fix.hits[0]["tile_id"]  # doctest: +SKIP

    Args:
        model: what :func:`imlnet.load_model` returns (its drone encoder and transform are
            used), or a callable batch ``(B, 3, H, W)`` -> drone-view descriptors ``(B, D)``,
            which then needs ``transform``.
        index: the gallery, or its folder (loaded and checked against the model's weights).
        images: query image files.
        transform: PIL image -> ``(3, H, W)`` tensor (default: the loaded model's).
        k: tiles returned per query.
        truth: known positions ``{image: (lat, lon)}`` (from :func:`read_truth`).
        truth_base: folder relative truth paths are resolved against (the CSV's folder).
        temperature: see :func:`estimate_position`.
        max_spread_m: see :func:`estimate_position`.
        batch_size: images per encoder call.
        device: where batches go (default: the loaded model's device, else the CPU).
        progress: show a tqdm bar.

    Raises:
        GeoError: no images, an empty gallery, or a gallery built with other weights;
        ImageReadError: an unreadable image.
    """
    if not images:
        raise GeoError("no query images given")
    encode, transform, device, facts = gindex.model_parts(model, "drone", transform, device)
    if not isinstance(index, GalleryIndex):
        index = GalleryIndex.load(
            index,
            expect_checkpoint_hash=facts["checkpoint_hash"] or None,
            expect_dim=model.dim if isinstance(model, LoadedModel) else None,
            checkpoint_name=facts["checkpoint"],
        )
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
    from imlnet.geo import fixes_io  # verification, pose, flights, map (imports OpenCV)

    fixes_io.add_args(ap)
    args = ap.parse_args(list(argv))
    plan = fixes_io.prepare(args)
    if args.k < 1:
        raise GeoError(f"--k must be >= 1, got {args.k}")
    if args.checkpoint is not None:
        checkpoint_hash(args.checkpoint)  # the weights exist, before anything else is read
    truth = read_truth(args.truth) if args.truth else None
    images = expand_images(args.images)
    loaded = gindex.load_model_arg(args)
    index = GalleryIndex.load(
        args.index,
        expect_checkpoint_hash=loaded.weights_hash,
        expect_dim=loaded.dim,
        checkpoint_name=str(args.checkpoint or args.onnx),
    )
    index.set_search_params(nprobe=args.nprobe, efSearch=args.ef_search)
    outside = truth_outside(index, truth or {})
    if outside is not None and outside[0] > outside[1] / 2:
        print(
            f"warning: {outside[0]} of {outside[1]} positions in {args.truth} lie outside every "
            "tile of the gallery, so their errors will be large; check that the columns are "
            "lat,lon (not lon,lat) and that the gallery covers the flight",
            file=sys.stderr,
        )
    start = time.perf_counter()
    results = localize(
        loaded,
        index,
        [str(p) for p in images],
        k=args.k,
        truth=truth,
        truth_base=args.truth.parent if args.truth else None,
        temperature=args.temperature,
        max_spread_m=args.max_spread_m,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(format_table(results))
    if truth is not None:
        unmatched = sum(r.error_m is None for r in results)
        if unmatched:
            print(f"note: {unmatched} query image(s) have no row in {args.truth}")
    seconds = time.perf_counter() - start
    paths = write_outputs(results, args.out_dir)
    paths.update(
        fixes_io.after_localize(plan, args, results, paths, seconds=seconds, gallery=index.metadata)
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
