"""After retrieval: geometric verification, flights, and what they add to a localisation run.

:func:`refine` takes the retrieval results of :func:`imlnet.geo.localize.localize` and, per
query, verifies the top-K tiles (:mod:`imlnet.geo.verify`): the aim point and the camera pose
of the best verified tile, or the retrieval estimate flagged as a fallback. With ``sequence``
the queries are grouped into flights (the images of one folder, in name order) and fused into a
track (:mod:`imlnet.geo.track`) whose hypotheses per frame are each verified candidate's aim
point, cost ``-log(n / (n + min_inliers))`` (``n`` inliers). With verification off they are the
retrieved tiles' centres instead, cost ``RETRIEVAL_COST + 0.5 * (rank - 1)``. The two are not
mixed: a right tile's centre is still tens of metres off, and on the synthetic world an
untrained model's favourite tiles formed a chain consistent enough with the motion that the
track followed it past verified fixes 200 m away. A frame the track cannot place (no fix within
``max_gap`` frames) keeps its own estimate (``track_kind = "own"``).

In a flight, once a frame has verified, the next frames are also matched against the
``prior_tiles`` gallery tiles nearest to that fix (``rank`` 0 in ``candidates.csv``): a drone
that knows where it was looks there first, whatever the retrieval says; this is what lets a
weak retrieval model still track.

Truth: the truth CSV's ``lat, lon`` are the aim point (``imlnet synth --world``); optional
columns ``cam_lat, cam_lon, cam_height_m`` (or ``camera_lat, camera_lon, camera_alt_m``) give
the camera's position.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from imlnet.errors import GeoError
from imlnet.geo.coords import geodesic_m
from imlnet.geo.pose import Attitude, Tangent
from imlnet.geo.track import FrameFix, LatLonHypothesis, TrackConfig, track_latlon
from imlnet.geo.verify import Verification, Verifier, VerifyConfig

#: Cost (nats) of a retrieved tile centre as a track hypothesis (a verified match costs < 0.7).
RETRIEVAL_COST = 2.5
#: MA@K thresholds in metres (as DenseUAV reports them).
MA_THRESHOLDS_M = (1, 5, 10, 25, 50, 100)


@dataclass
class Fix:
    """Everything known about one query after refinement (None: not available).

    ``aim_*`` is the verified aim point or, unverified, the retrieval estimate; ``track_*`` the
    flight's fused position; ``*_error_m`` are geodesic errors against the truth.
    """

    image: str
    flight: str
    retrieval_lat: float
    retrieval_lon: float
    verification: Verification | None
    aim_lat: float
    aim_lon: float
    true_lat: float | None = None
    true_lon: float | None = None
    true_camera: tuple[float, float, float | None] | None = None
    track: FrameFix | None = None
    retrieval_error_m: float | None = None
    top1_error_m: float | None = None
    aim_error_m: float | None = None
    camera_error_m: float | None = None
    height_error_m: float | None = None
    track_error_m: float | None = None
    track_camera_error_m: float | None = None

    @property
    def verified(self) -> bool:
        """Whether verification found a geometric match."""
        return self.verification is not None and self.verification.verified

    @property
    def camera(self) -> tuple[float, float] | None:
        """The verified camera position ``(lat, lon)``."""
        v = self.verification
        if v is None or v.camera_lat is None or v.camera_lon is None:
            return None
        return v.camera_lat, v.camera_lon


class PathMatcher:
    """Finds a query's row in a CSV keyed by image: by the path as given, by the path resolved
    against the CSV's folder, or by a file name that occurs once in the CSV."""

    def __init__(self, table: Mapping[str, Any], base: Path | None) -> None:
        self.exact = dict(table)
        base = base or Path.cwd()
        self.resolved = {str((base / k).resolve()): v for k, v in table.items()}
        names: dict[str, list[Any]] = {}
        for key, value in table.items():
            names.setdefault(Path(key).name, []).append(value)
        self.names = {k: v[0] for k, v in names.items() if len(v) == 1}

    def __call__(self, image: str) -> Any:
        if image in self.exact:
            return self.exact[image]
        resolved = str(Path(image).resolve())
        if resolved in self.resolved:
            return self.resolved[resolved]
        return self.names.get(Path(image).name)


#: Camera truth columns ``(lat, lon, height)``: ``imlnet synth --world``'s, and a longer spelling.
CAMERA_COLUMNS = (
    ("cam_lat", "cam_lon", "cam_height_m"),
    ("camera_lat", "camera_lon", "camera_alt_m"),
)


def read_camera_truth(path: str | Path) -> dict[str, tuple[float, float, float | None]]:
    """``{image: (lat, lon, height above ground or None)}`` of the camera, from a truth CSV's
    optional camera columns (:data:`CAMERA_COLUMNS`; empty when it has none).

    Raises:
        GeoError: a camera cell is not a number or out of range (naming the line).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        names = next((c for c in CAMERA_COLUMNS if c[0] in (reader.fieldnames or [])), None)
        if names is None:
            return {}
        out = {}
        for line, row in enumerate(reader, start=2):
            if not (row.get(names[0]) or "").strip():
                continue
            try:
                lat, lon = float(row[names[0]]), float(row.get(names[1]) or "nan")
                alt_text = (row.get(names[2]) or "").strip()
                alt = float(alt_text) if alt_text else None
            except ValueError as err:
                raise GeoError(
                    f"{path}, line {line}: camera columns are not numbers ({err})"
                ) from err
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise GeoError(f"{path}, line {line}: camera lat {lat}, lon {lon} out of range")
            out[row["image"]] = (lat, lon, alt)
    return out


def flight_of(image: str) -> str:
    """The flight an image belongs to: its folder."""
    return str(Path(image).parent)


def refine(
    results: Sequence[Any],
    *,
    verifier: Verifier | None = None,
    attitude: Callable[[str], Attitude | None] | None = None,
    sequence: bool = False,
    track: TrackConfig | None = None,
    camera_truth: Callable[[str], tuple[float, float, float | None] | None] | None = None,
    gallery: Sequence[Mapping[str, Any]] | None = None,
    prior_tiles: int = 2,
    progress: bool = False,
) -> list[Fix]:
    """Verify, fuse flights and measure (see the module docstring).

    Args:
        results: :class:`imlnet.geo.localize.QueryResult` per query (``image``, ``hits``,
            ``lat``, ``lon``, and the truth fields).
        verifier: None: no verification (the aim point is the retrieval estimate).
        attitude: image -> its IMU attitude, or None.
        sequence: fuse each flight's frames into a track.
        track: the motion model.
        camera_truth: image -> the camera's true ``(lat, lon, alt)``, or None.
        gallery: all gallery rows (``GalleryIndex.metadata``), for the tiles near a flight's
            last fix; None: retrieval's tiles only.
        prior_tiles: how many of those tiles (0: none).
        progress: show a progress bar.
    """
    order = list(results)
    if sequence:  # each flight in frame order, so that a fix can guide the next frames
        order.sort(key=lambda r: (flight_of(r.image), r.image))
    near = _Nearby(gallery) if sequence and gallery and prior_tiles > 0 else None
    last: dict[str, tuple[float, float]] = {}
    by_image: dict[str, Fix] = {}
    for r in tqdm(order, desc="verifying", unit="query", disable=not progress or verifier is None):
        ver, flight = None, flight_of(r.image)
        if verifier is not None:
            att = attitude(r.image) if attitude is not None else None
            extra = []
            if near is not None and flight in last:
                seen = {str(h.get("id")) for h in r.hits[: verifier.cfg.k]}
                extra = [
                    h for h in near(*last[flight], prior_tiles + len(seen)) if h["id"] not in seen
                ]
            ver = verifier.verify(
                r.image, r.hits, (r.lat, r.lon), attitude=att, extra=extra[:prior_tiles]
            )
            if ver.verified:
                last[flight] = (ver.lat, ver.lon)
        aim = (ver.lat, ver.lon) if ver is not None else (r.lat, r.lon)
        fix = Fix(r.image, flight_of(r.image), r.lat, r.lon, ver, *aim)
        fix.true_lat, fix.true_lon = r.true_lat, r.true_lon
        fix.retrieval_error_m, fix.top1_error_m = r.error_m, r.top1_error_m
        fix.true_camera = camera_truth(r.image) if camera_truth is not None else None
        by_image[r.image] = fix
    fixes = [by_image[r.image] for r in results]
    if sequence:
        for flight in dict.fromkeys(f.flight for f in fixes):
            members = sorted((f for f in fixes if f.flight == flight), key=lambda f: f.image)
            need = (verifier.cfg if verifier is not None else VerifyConfig).min_inliers
            hyps = [
                _hypotheses(f, r, need)
                for f, r in zip(members, _results_of(members, results), strict=True)
            ]
            for f, point in zip(members, track_latlon(hyps, track), strict=True):
                if point.kind == "none":  # nothing near enough: the frame's own estimate
                    cam = f.camera or (None, None)
                    point = FrameFix(f.aim_lat, f.aim_lon, "own", None, *cam)
                f.track = point
    for f in fixes:
        _measure(f)
    return fixes


class _Nearby:
    """The gallery tiles nearest to a point (centres in a flat frame at the gallery's mean)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows = rows
        lat = np.array([float(r["lat"]) for r in rows])
        lon = np.array([float(r["lon"]) for r in rows])
        self.frame = Tangent(float(lat.mean()), float(lon.mean()))
        self.xy = np.c_[self.frame.to_xy(lat, lon)]

    def __call__(self, lat: float, lon: float, n: int) -> list[dict[str, Any]]:
        x, y = self.frame.to_xy(np.array(lat), np.array(lon))
        dist = np.hypot(self.xy[:, 0] - x, self.xy[:, 1] - y)
        idx = np.argsort(dist, kind="stable")[:n]
        return [{**self.rows[i], "rank": 0, "id": str(i), "score": ""} for i in idx]


def _results_of(members: Sequence[Fix], results: Sequence[Any]) -> list[Any]:
    by_image = {r.image: r for r in results}
    return [by_image[f.image] for f in members]


def _hypotheses(fix: Fix, result: Any, min_inliers: int) -> list[LatLonHypothesis]:
    """The track hypotheses of one frame (see the module docstring)."""
    hyps: list[LatLonHypothesis] = []
    if fix.verification is not None:
        for c in fix.verification.candidates:
            if c.verified and c.aim_lat is not None and c.aim_lon is not None:
                cost = -math.log(c.inliers / (c.inliers + min_inliers))
                hyps.append((c.aim_lat, c.aim_lon, cost, c.camera_lat, c.camera_lon))
        return hyps
    for hit in result.hits:
        cost = RETRIEVAL_COST + 0.5 * (int(hit.get("rank", 1)) - 1)
        hyps.append((float(hit["lat"]), float(hit["lon"]), cost, None, None))
    return hyps


def _dist(
    a: tuple[float, float] | None, b: tuple[float | None, float | None] | None
) -> float | None:
    if a is None or b is None or b[0] is None or b[1] is None:
        return None
    if not all(math.isfinite(v) for v in (*a, b[0], b[1])):
        return None
    return geodesic_m(a[0], a[1], b[0], b[1])


def _measure(f: Fix) -> None:
    truth = (f.true_lat, f.true_lon) if f.true_lat is not None else None
    f.aim_error_m = _dist((f.aim_lat, f.aim_lon), truth)
    cam_truth = f.true_camera[:2] if f.true_camera is not None else None
    f.camera_error_m = _dist(f.camera, cam_truth)
    v = f.verification
    if (
        v is not None
        and v.pose is not None
        and f.true_camera is not None
        and f.true_camera[2] is not None
    ):
        f.height_error_m = abs(v.pose.height_m - f.true_camera[2])
    if f.track is not None and f.track.kind != "none":
        f.track_error_m = _dist((f.track.lat, f.track.lon), truth)
        cam = (f.track.camera_lat, f.track.camera_lon) if f.track.camera_lat is not None else None
        f.track_camera_error_m = _dist(cam, cam_truth)  # type: ignore[arg-type]


def accuracy(errors: Sequence[float | None], total: int) -> dict[str, float | None] | None:
    """MA@K (share of *all* ``total`` queries within K metres; a query without an estimate
    counts as a miss), mean and median over the queries that have one."""
    vals = np.array([e for e in errors if e is not None], float)
    if total == 0:
        return None
    out: dict[str, float | None] = {"n": float(vals.size)}
    for k in MA_THRESHOLDS_M:
        out[f"MA@{k}m"] = float((vals <= k).sum() / total)
    out["mean_m"] = float(vals.mean()) if vals.size else None
    out["median_m"] = float(np.median(vals)) if vals.size else None
    return out
