"""What verification and flights add to a localisation run: files, GeoJSON, metrics, flags.

Files (in the run's ``--out-dir``, written together after those of :mod:`imlnet.geo.outputs`):

- ``fixes.csv``: one row per query: retrieval estimate, verified aim point, camera position
  and pose, inliers, confidence, the fallback flag and note, track position, truths, errors.
- ``candidates.csv``: one row per query and verified candidate tile: rank, inliers, aim point.
- ``metrics.json``: MA@K / mean / median per estimate (see :func:`metrics`), latency.
- ``results.geojson`` gains Points ``kind: "aim"``, ``"camera"``, ``"camera_truth"`` and per
  flight LineStrings ``kind: "track"`` (aim points) and ``"camera_track"`` through the frames
  the track placed (not those that kept their own estimate).
- ``map.png``: :func:`imlnet.geo.mapping.draw_map`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imlnet.errors import GeoError
from imlnet.geo.pose import read_attitude
from imlnet.geo.refine import MA_THRESHOLDS_M, Fix, PathMatcher, accuracy, read_camera_truth, refine
from imlnet.geo.tables import csv_text
from imlnet.geo.track import PLACED, TrackConfig
from imlnet.geo.verify import Verifier, VerifyConfig
from imlnet.io import write_texts_atomically

FIX_COLUMNS = (
    "image", "flight", "verified", "note", "inliers", "confidence", "tile_rank", "tile_id",
    "aim_lat", "aim_lon", "retrieval_lat", "retrieval_lon",
    "camera_lat", "camera_lon", "height_m", "heading_deg", "pitch_deg", "roll_deg", "pose_method",
    "reproj_px", "track_lat", "track_lon", "track_kind", "track_camera_lat", "track_camera_lon",
    "true_lat", "true_lon", "true_camera_lat", "true_camera_lon", "true_camera_alt_m",
    "retrieval_error_m", "top1_error_m", "aim_error_m", "camera_error_m", "height_error_m",
    "track_error_m", "track_camera_error_m", "verify_s",
)  # fmt: skip
CANDIDATE_COLUMNS = (
    "image",
    "rank",
    "tile_id",
    "matches",
    "inliers",
    "verified",
    "aim_lat",
    "aim_lon",
)
#: Rows of the metrics table: (name, Fix attribute holding the error).
ESTIMATES = (
    ("retrieval", "retrieval_error_m"),
    ("top-1 tile", "top1_error_m"),
    ("+ verification: aim point", "aim_error_m"),
    ("+ verification: camera", "camera_error_m"),
    ("+ sequence: aim point", "track_error_m"),
    ("+ sequence: camera", "track_camera_error_m"),
)


def _blank(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def fix_row(f: Fix) -> dict[str, Any]:
    """The ``fixes.csv`` row of one query."""
    v, t, cam = f.verification, f.track, f.true_camera
    pose = v.pose if v is not None else None
    row: dict[str, Any] = {
        "image": f.image,
        "flight": f.flight,
        "verified": int(f.verified),
        "note": v.note if v is not None else "verification off",
        "aim_lat": f.aim_lat,
        "aim_lon": f.aim_lon,
        "retrieval_lat": f.retrieval_lat,
        "retrieval_lon": f.retrieval_lon,
        "true_lat": f.true_lat,
        "true_lon": f.true_lon,
    }
    if v is not None:
        row.update(inliers=v.inliers, confidence=v.confidence, tile_rank=v.tile_rank)
        row.update(tile_id=v.tile_id, camera_lat=v.camera_lat, camera_lon=v.camera_lon)
        row["verify_s"] = v.seconds
    if pose is not None:
        for name in ("height_m", "heading_deg", "pitch_deg", "roll_deg", "reproj_px"):
            row[name] = getattr(pose, name)
        row["pose_method"] = pose.method
    if t is not None:
        row.update(track_lat=t.lat, track_lon=t.lon, track_kind=t.kind)
        row.update(track_camera_lat=t.camera_lat, track_camera_lon=t.camera_lon)
    if cam is not None:
        row.update(true_camera_lat=cam[0], true_camera_lon=cam[1], true_camera_alt_m=cam[2])
    for _, attr in ESTIMATES:
        row[attr] = getattr(f, attr)
    row["height_error_m"] = f.height_error_m
    return {k: _blank(v) for k, v in row.items()}


def metrics(fixes: Sequence[Fix], *, seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """MA@K, mean and median error per estimate over the queries with a truth, the share
    verified, and latency per query (seconds)."""
    with_truth = [f for f in fixes if f.true_lat is not None]
    out: dict[str, Any] = {"queries": len(fixes), "with_truth": len(with_truth)}
    out["verified"] = sum(f.verified for f in fixes)
    for name, attr in ESTIMATES:
        errs = [getattr(f, attr) for f in with_truth]
        if any(e is not None for e in errs):
            out[name] = accuracy(errs, len(with_truth))
    heights = [f.height_error_m for f in fixes if f.height_error_m is not None]
    if heights:
        out["median_height_error_m"] = float(np.median(heights))
    verify_s = [f.verification.seconds for f in fixes if f.verification is not None]
    if verify_s:
        out["verify_s_per_query"] = sum(verify_s) / len(verify_s)
    if seconds:
        out.update(seconds)
    return out


def format_metrics(m: dict[str, Any]) -> str:
    """A Markdown table of :func:`metrics` (shares in %)."""
    head = "| estimate | n | " + " | ".join(f"MA@{k} m" for k in MA_THRESHOLDS_M)
    lines = [head + " | mean m | median m |", "|---|---:|" + "---:|" * (len(MA_THRESHOLDS_M) + 2)]
    for name, _ in ESTIMATES:
        row = m.get(name)
        if row is None:
            continue
        shares = " | ".join(f"{100 * row[f'MA@{k}m']:.0f} %" for k in MA_THRESHOLDS_M)
        mean, median = (
            f"{row[k]:.1f}" if row[k] is not None else "-" for k in ("mean_m", "median_m")
        )
        lines.append(f"| {name} | {int(row['n'])} | {shares} | {mean} | {median} |")
    lines.append(f"\n{m['verified']} of {m['queries']} queries verified.")
    return "\n".join(lines)


def geojson_features(fixes: Sequence[Fix]) -> list[dict[str, Any]]:
    """The GeoJSON features verification and flights add (see the module docstring)."""
    feats: list[dict[str, Any]] = []

    def point(lat: float, lon: float, props: dict[str, Any]) -> None:
        geom = {"type": "Point", "coordinates": [float(lon), float(lat)]}
        feats.append({"type": "Feature", "geometry": geom, "properties": props})

    for f in fixes:
        v = f.verification
        if v is not None:
            props = {"kind": "aim", "image": f.image, "verified": f.verified, "note": v.note}
            props.update(inliers=v.inliers, confidence=v.confidence, error_m=f.aim_error_m)
            point(f.aim_lat, f.aim_lon, props)
        if f.camera is not None and v is not None and v.pose is not None:
            p = v.pose
            props = {"kind": "camera", "image": f.image, "height_m": p.height_m}
            props.update(heading_deg=p.heading_deg, pitch_deg=p.pitch_deg, roll_deg=p.roll_deg)
            props["error_m"] = f.camera_error_m
            point(*f.camera, props)
        if f.true_camera is not None:
            point(f.true_camera[0], f.true_camera[1], {"kind": "camera_truth", "image": f.image})
    for flight in dict.fromkeys(f.flight for f in fixes if f.track is not None):
        members = sorted(
            (f for f in fixes if f.flight == flight and f.track and f.track.kind in PLACED),
            key=lambda f: f.image,
        )
        for kind, pts in (
            ("track", [(f.track.lon, f.track.lat) for f in members]),  # type: ignore[union-attr]
            ("camera_track", [(f.track.camera_lon, f.track.camera_lat) for f in members]),  # type: ignore[union-attr]
        ):
            line = [[float(x), float(y)] for x, y in pts if x is not None and math.isfinite(x)]
            if len(line) >= 2:
                geom = {"type": "LineString", "coordinates": line}
                props = {"kind": kind, "flight": flight, "frames": len(members)}
                feats.append({"type": "Feature", "geometry": geom, "properties": props})
    return feats


def write_refined(
    fixes: Sequence[Fix], out_dir: str | Path, *, geojson: Path | None = None, **extra: Any
) -> dict[str, Path]:
    """Write ``fixes.csv``, ``candidates.csv`` (when verification ran) and ``metrics.json``,
    and add the new features to the run's ``geojson``; all are prepared first and written
    together (:func:`imlnet.io.write_texts_atomically`). ``extra`` goes into the metrics.

    Raises:
        GeoError: a position is not finite (nothing is written then).
    """
    out_dir = Path(out_dir)
    paths = {"fixes": out_dir / "fixes.csv", "metrics": out_dir / "metrics.json"}
    texts = {paths["fixes"]: csv_text([fix_row(f) for f in fixes], FIX_COLUMNS)}
    if any(f.verification is not None for f in fixes):
        rows = [
            {"image": f.image, **{k: _blank(getattr(c, k)) for k in CANDIDATE_COLUMNS[1:]}}
            for f in fixes
            if f.verification is not None
            for c in f.verification.candidates
        ]
        paths["candidates"] = out_dir / "candidates.csv"
        texts[paths["candidates"]] = csv_text(rows, CANDIDATE_COLUMNS)
    summary = metrics(fixes, seconds=extra or None)
    texts[paths["metrics"]] = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    if geojson is not None and geojson.is_file():
        collection = json.loads(geojson.read_text(encoding="utf-8"))
        collection["features"].extend(geojson_features(fixes))
        try:
            texts[geojson] = json.dumps(collection, ensure_ascii=False, allow_nan=False) + "\n"
        except ValueError as err:
            raise GeoError(
                f"{geojson}: a position is not finite ({err}); nothing was written"
            ) from err
    write_texts_atomically(texts)
    return paths


def add_args(ap: argparse.ArgumentParser) -> None:
    """The ``imlnet localize`` options of verification, attitude, flights and the map."""
    g = ap.add_argument_group("verification, camera pose and flights")
    g.add_argument(
        "--verify", type=int, default=5, metavar="K",
        help="match the top K tiles geometrically (0: retrieval only; default 5)",
    )  # fmt: skip
    g.add_argument(
        "--min-inliers", type=int, default=VerifyConfig.min_inliers,
        help=f"matches that must agree for a tile to verify (default {VerifyConfig.min_inliers})",
    )  # fmt: skip
    g.add_argument("--fov-deg", type=float, help="camera's horizontal field of view (default 60)")
    g.add_argument(
        "--attitude",
        type=Path,
        help="CSV image,pitch_deg[,roll_deg,heading_deg,altitude_m,fov_deg]",
    )
    g.add_argument("--sequence", action="store_true", help="fuse each folder's frames into a track")
    g.add_argument("--step-m", type=float, default=TrackConfig.step_m, help="free motion per frame")
    g.add_argument(
        "--prior-tiles", type=int, default=2,
        help="with --sequence: also verify this many tiles nearest the flight's last fix",
    )  # fmt: skip
    g.add_argument("--no-map", action="store_true", help="do not draw map.png")


@dataclass
class Plan:
    """The refinement options of one ``imlnet localize`` run, checked before retrieval."""

    verifier: Verifier | None
    attitude: PathMatcher | None
    camera_truth: PathMatcher | None
    track: TrackConfig
    prior_tiles: int = 2


def make_plan(
    *,
    verify: int = 5,
    min_inliers: int = VerifyConfig.min_inliers,
    fov_deg: float | None = None,
    attitude: Path | None = None,
    truth: Path | None = None,
    step_m: float = TrackConfig.step_m,
    prior_tiles: int = 2,
) -> Plan:
    """A :class:`Plan` from plain options (what the ``imlnet localize`` flags of :func:`add_args`
    set; ``truth`` is the truth CSV, read for its camera columns).

    Raises:
        GeoError: a negative count, a bad motion option, or a bad attitude or truth row.
    """
    for name, value in (
        ("verify", verify),
        ("min-inliers", min_inliers),
        ("prior-tiles", prior_tiles),
    ):
        if value < 0:
            raise GeoError(f"--{name} must be >= 0, got {value}")
    track = TrackConfig(step_m=step_m)
    track.validate()
    verifier = None
    if verify > 0:
        cfg = VerifyConfig(k=verify, min_inliers=min_inliers)
        if fov_deg is not None:
            cfg.fov_deg = fov_deg
        verifier = Verifier(cfg)
    att = PathMatcher(read_attitude(attitude), attitude.parent) if attitude is not None else None
    camera = PathMatcher(read_camera_truth(truth), truth.parent) if truth is not None else None
    return Plan(verifier, att, camera, track, prior_tiles)


def prepare(args: argparse.Namespace) -> Plan:
    """:func:`make_plan` from the parsed ``imlnet localize`` command line, before retrieval, so
    that a bad option or file stops the run before any image is embedded or file written."""
    return make_plan(
        verify=args.verify,
        min_inliers=args.min_inliers,
        fov_deg=args.fov_deg,
        attitude=args.attitude,
        truth=args.truth,
        step_m=args.step_m,
        prior_tiles=args.prior_tiles,
    )


def finish(
    plan: Plan,
    results: Sequence[Any],
    out_dir: str | Path,
    *,
    sequence: bool = False,
    geojson: Path | None = None,
    gallery: Sequence[Mapping[str, Any]] | None = None,
    seconds: float | None = None,
    draw: bool = True,
    progress: bool = False,
) -> tuple[list[Fix], dict[str, Path]]:
    """Refine retrieval results and write what that adds (for ``localize`` and the demo).

    Args:
        plan: from :func:`make_plan` or :func:`prepare` (its verifier is closed at the end).
        results: :class:`imlnet.geo.localize.QueryResult` per query.
        out_dir: where ``fixes.csv``, ``candidates.csv``, ``metrics.json``, ``map.png`` go.
        sequence: fuse each folder's frames into a track.
        geojson: the run's ``results.geojson``, which gains the new features.
        gallery: the gallery's rows (``GalleryIndex.metadata``), for the flights' prior tiles.
        seconds: the retrieval's wall time, reported per query in the metrics.
        draw: write ``map.png``.
        progress: show a progress bar.

    Returns:
        The refined queries and the paths written.
    """
    try:
        fixes = refine(
            results,
            verifier=plan.verifier,
            attitude=plan.attitude,
            sequence=sequence,
            track=plan.track,
            camera_truth=plan.camera_truth,
            gallery=gallery,
            prior_tiles=plan.prior_tiles,
            progress=progress,
        )
    finally:
        if plan.verifier is not None:
            plan.verifier.close()
    extra = {} if seconds is None else {"retrieval_s_per_query": seconds / max(len(results), 1)}
    out = write_refined(fixes, out_dir, geojson=geojson, **extra)
    if draw:
        from imlnet.geo.mapping import draw_map

        out["map"] = draw_map(fixes, results, Path(out_dir) / "map.png")
    return fixes, out


def after_localize(
    plan: Plan,
    args: argparse.Namespace,
    results: Sequence[Any],
    paths: dict[str, Path],
    *,
    seconds: float,
    gallery: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """The ``imlnet localize`` step after retrieval: :func:`finish`, then print the fallbacks
    and the metrics table.

    Args:
        plan: from :func:`prepare`.
        args: the parsed command line (:func:`add_args` and localize's own options).
        results: the retrieval results.
        paths: the files localize wrote (its GeoJSON gains the new features).
        seconds: the retrieval's wall time (embedding and search), for the latency.
        gallery: the gallery's rows (``GalleryIndex.metadata``), for ``--prior-tiles``.
    """
    fixes, out = finish(
        plan,
        results,
        args.out_dir,
        sequence=args.sequence,
        geojson=paths.get("geojson"),
        gallery=gallery,
        seconds=seconds,
        draw=not args.no_map,
        progress=not args.quiet,
    )
    for f in fixes:
        if f.verification is not None and not f.verified:
            print(f"{Path(f.image).name}: {f.verification.note}")
    print(format_metrics(metrics(fixes)))
    return out
