"""Camera geometry for verified matches: intrinsics, attitude, nadir rectification, planar PnP.

Frames and conventions (the same as :class:`imlnet.data.synthetic.render.Camera`):

- Ground frame: metres east (x), north (y), up (z) in a local tangent plane; the ground is the
  plane z = 0 (flat terrain: buildings and trees are treated as ground, a known limit).
- Camera frame (OpenCV): x right, y down, z along the optical axis. Pixel coordinates are
  OpenCV's: the centre of pixel (i, j) is at (i, j), so the principal point of a W x H image is
  ((W - 1) / 2, (H - 1) / 2).
- Attitude of the optical axis: ``heading_deg`` (compass, 0 = north, 90 = east), ``pitch_deg``
  below the horizon (90 = straight down), ``roll_deg`` about the optical axis (positive: the
  image's right side goes down), ``altitude_m`` above the ground.

A verified match gives ground points (from the map) for image points; a plane with known
points and a calibrated camera fixes the pose: :func:`solve_pose` runs OpenCV's planar PnP
(IPPE, both solutions, then Levenberg-Marquardt refinement) and keeps the solution above the
ground (closest to the attitude prior when one is given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from imlnet.errors import GeoError
from imlnet.geo.coords import metres_per_degree
from imlnet.geo.tables import read_table

#: The field of view assumed when neither ``--fov-deg`` nor the attitude file gives one.
DEFAULT_FOV_DEG = 60.0
#: Height used to scale a rectified view when the attitude gives no altitude.
NOMINAL_ALTITUDE_M = 100.0
ATTITUDE_COLUMNS = ("image", "pitch_deg", "roll_deg", "heading_deg", "altitude_m", "fov_deg")


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole matrix ``K`` (3, 3) for square pixels and a horizontal field of view.

    Raises:
        GeoError: ``fov_deg`` is not in (0, 180).
    """
    if not 0.0 < fov_deg < 180.0:
        raise GeoError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def rotation(heading_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """World (east, north, up) -> OpenCV camera rotation ``R`` (3, 3), rows right/down/forward."""
    yaw, pitch, roll = (math.radians(v) for v in (heading_deg, pitch_deg, roll_deg))
    fwd = np.array(
        [math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), -math.sin(pitch)]
    )
    right0 = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
    up0 = np.cross(right0, fwd)
    right = math.cos(roll) * right0 - math.sin(roll) * up0
    up = math.sin(roll) * right0 + math.cos(roll) * up0
    return np.stack([right, -up, fwd])


def angles(R: np.ndarray) -> tuple[float, float, float]:
    """``(heading, pitch, roll)`` in degrees of a world->camera rotation (inverse of
    :func:`rotation`; at nadir the heading is that of the image's up direction)."""
    right, up, fwd = R[0], -R[1], R[2]
    pitch = math.degrees(math.asin(float(np.clip(-fwd[2], -1.0, 1.0))))
    horizontal = fwd if math.hypot(fwd[0], fwd[1]) > 1e-3 else up
    heading = math.degrees(math.atan2(horizontal[0], horizontal[1])) % 360.0
    roll = math.degrees(math.atan2(-right[2], up[2])) if abs(pitch) < 89.9 else 0.0
    return heading, pitch, roll


class Tangent:
    """A local east/north frame in metres around a WGS84 point: degrees times the geodesic
    metres per degree there (:func:`imlnet.geo.coords.metres_per_degree`). 500 m from its
    origin it differs from an azimuthal equidistant projection by 3 cm at 47 degrees latitude
    (9 cm at 70), and it costs two geodesics instead of building a pyproj CRS."""

    def __init__(self, lat: float, lon: float) -> None:
        self.lat, self.lon = float(lat), float(lon)
        self.mx, self.my = metres_per_degree(self.lat)

    def to_xy(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """WGS84 arrays -> ``(east_m, north_m)`` arrays."""
        return (np.asarray(lon) - self.lon) * self.mx, (np.asarray(lat) - self.lat) * self.my

    def to_latlon(self, x: float, y: float) -> tuple[float, float]:
        """``(east_m, north_m)`` -> WGS84 ``(lat, lon)``."""
        return self.lat + float(y) / self.my, self.lon + float(x) / self.mx


@dataclass(frozen=True)
class Attitude:
    """IMU attitude of one image (angles in degrees; None: unknown)."""

    pitch_deg: float
    roll_deg: float = 0.0
    heading_deg: float | None = None
    altitude_m: float | None = None
    fov_deg: float | None = None


def _cell(row: Mapping[str, str | None], name: str) -> str:
    return (row.get(name) or "").strip()


def read_attitude(path: str | Path) -> dict[str, Attitude]:
    """Read an attitude CSV: ``image,pitch_deg`` and optionally ``roll_deg, heading_deg,
    altitude_m, fov_deg`` (empty cells: unknown; roll defaults to 0). ``cam_height_m`` is read
    as ``altitude_m`` when that column is absent, so the ``truth.csv`` of ``imlnet synth
    --world`` serves as the attitude of a perfect IMU.

    Raises:
        GeoError: missing file or column, or a bad row; the message names the file and line.
    """
    path = Path(path)
    columns, rows = read_table(path, "attitude")
    missing = [c for c in ("image", "pitch_deg") if c not in columns]
    if missing:
        raise GeoError(
            f"{path}: missing column(s) {', '.join(missing)}; an attitude CSV has the header "
            f"{','.join(ATTITUDE_COLUMNS)} (only image and pitch_deg are required)"
        )
    out: dict[str, Attitude] = {}
    for line, row in enumerate(rows, start=2):
        if "altitude_m" not in columns and "cam_height_m" in columns:
            row["altitude_m"] = row["cam_height_m"]
        where = f"{path}, line {line}"
        if not _cell(row, "image"):
            raise GeoError(f"{where}: the image cell is empty")
        values: dict[str, float | None] = {}
        for name in ATTITUDE_COLUMNS[1:]:
            text = _cell(row, name)
            try:
                values[name] = float(text) if text else None
            except ValueError as err:
                raise GeoError(f"{where}: {name} {text!r} is not a number") from err
            if values[name] is not None and not math.isfinite(values[name]):
                raise GeoError(f"{where}: {name} {text!r} is not finite")
        pitch, roll, fov, alt = (
            values[k] for k in ("pitch_deg", "roll_deg", "fov_deg", "altitude_m")
        )
        if pitch is None or not 0.0 < pitch <= 90.0:
            raise GeoError(
                f"{where}: pitch_deg {_cell(row, 'pitch_deg')!r} must be in (0, 90] "
                "(degrees below the horizon; 90 looks straight down)"
            )
        if roll is not None and abs(roll) >= 90.0:
            raise GeoError(f"{where}: roll_deg {roll} must be within (-90, 90)")
        if alt is not None and alt <= 0.0:
            raise GeoError(f"{where}: altitude_m {alt} must be above the ground (> 0)")
        if fov is not None and not 0.0 < fov < 180.0:
            raise GeoError(f"{where}: fov_deg {fov} must be in (0, 180)")
        if row["image"] in out:
            raise GeoError(f"{where}: image {row['image']!r} appears twice")
        out[row["image"]] = Attitude(pitch, roll or 0.0, values["heading_deg"], alt, fov)
    return out


def ground_homography(K: np.ndarray, R: np.ndarray, height_m: float) -> np.ndarray:
    """Homography image pixel -> ground (east, north) metres relative to the camera's nadir."""
    flip = np.diag([height_m, height_m, -1.0])
    return flip @ R.T @ np.linalg.inv(K)


def rectifier(
    K: np.ndarray, size: tuple[int, int], att: Attitude, *, max_side: int = 768
) -> tuple[np.ndarray, tuple[int, int], float]:
    """Homography image -> a nadir view of the ground (heading-up when the heading is unknown).

    The output is sampled at the ground resolution of the image centre, so that it keeps the
    detail of the original there; the stretched far field is cut at ``max_side`` pixels.

    Returns:
        ``(H, (width, height), gsd_m)``: the warp for ``cv2.warpPerspective``, the output size
        and its ground metres per pixel (for the nominal altitude when none is given).
    """
    w, h = size
    heading = att.heading_deg if att.heading_deg is not None else 0.0
    alt = att.altitude_m or NOMINAL_ALTITUDE_M
    R = rotation(heading, att.pitch_deg, att.roll_deg)
    G = ground_homography(K, R, alt)
    slant = alt / max(math.sin(math.radians(att.pitch_deg)), 1e-3)
    gsd = slant / K[0, 0]
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], float).T
    ground = G @ corners
    ok = ground[2] > 1e-9
    centre = G @ np.array([K[0, 2], K[1, 2], 1.0])
    cx, cy = centre[:2] / centre[2]
    reach = max_side * gsd / 2.0
    pts = ground[:2, ok] / ground[2, ok]
    x0 = max(float(pts[0].min()) if ok.any() else cx - reach, cx - reach)
    x1 = min(float(pts[0].max()) if ok.any() else cx + reach, cx + reach)
    y0 = max(float(pts[1].min()) if ok.any() else cy - reach, cy - reach)
    y1 = min(float(pts[1].max()) if ok.any() else cy + reach, cy + reach)
    if not ok.all():  # a corner above the horizon: keep the full reach ahead of the centre
        x0, x1, y0, y1 = cx - reach, cx + reach, cy - reach, cy + reach
    A = np.array([[1 / gsd, 0.0, -x0 / gsd], [0.0, -1 / gsd, y1 / gsd], [0.0, 0.0, 1.0]])
    out = (max(int((x1 - x0) / gsd) + 1, 8), max(int((y1 - y0) / gsd) + 1, 8))
    return A @ G, out, gsd


@dataclass
class CameraPose:
    """A camera pose in a local ground frame.

    Attributes:
        east_m: camera position east of the frame origin, metres.
        north_m: north of the origin, metres.
        height_m: height above the ground plane, metres.
        heading_deg: compass heading of the optical axis.
        pitch_deg: angle of the optical axis below the horizon.
        roll_deg: roll about the optical axis.
        reproj_px: RMS reprojection error of the correspondences used, pixels.
        method: ``"pnp"`` (planar PnP) or ``"attitude"`` (position for the IMU attitude).
        attitude_dev_deg: angle between the PnP rotation and the IMU's, when one was given.
    """

    east_m: float
    north_m: float
    height_m: float
    heading_deg: float
    pitch_deg: float
    roll_deg: float
    reproj_px: float
    method: str = "pnp"
    attitude_dev_deg: float | None = None


def _rms(
    obj: np.ndarray, img: np.ndarray, K: np.ndarray, rvec: np.ndarray, tvec: np.ndarray
) -> float:
    proj, _ = cv2.projectPoints(obj, rvec, tvec, K, None)
    return float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - img) ** 2, axis=1))))


def _rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    cos = (np.trace(Ra @ Rb.T) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def position_for_attitude(
    image_pts: np.ndarray, ground_xy: np.ndarray, K: np.ndarray, R: np.ndarray
) -> np.ndarray:
    """Least-squares camera centre (3,) for a known rotation: every ground point must lie on
    its pixel's ray, ``(G_i - C) x d_i = 0``, which is linear in ``C``."""
    rays = (R.T @ np.linalg.inv(K) @ np.c_[image_pts, np.ones(len(image_pts))].T).T
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    ground = np.c_[ground_xy, np.zeros(len(ground_xy))]
    rows, rhs = [], []
    for g, d in zip(ground, rays, strict=True):
        cross = np.array([[0, -d[2], d[1]], [d[2], 0, -d[0]], [-d[1], d[0], 0]])
        rows.append(cross)  # cross @ C = cross @ G
        rhs.append(cross @ g)
    centre, *_ = np.linalg.lstsq(np.vstack(rows), np.concatenate(rhs), rcond=None)
    return centre


def solve_pose(
    image_pts: np.ndarray,
    ground_xy: np.ndarray,
    K: np.ndarray,
    *,
    prior: Attitude | None = None,
    max_attitude_dev_deg: float = 15.0,
) -> CameraPose | None:
    """Camera pose from image points and their ground positions (z = 0) by planar PnP.

    Args:
        image_pts: ``(N, 2)`` pixels, ``N >= 4``.
        ground_xy: ``(N, 2)`` east/north metres in a local frame.
        K: intrinsics.
        prior: IMU attitude; picks among the IPPE solutions, and when the PnP rotation strays
            more than ``max_attitude_dev_deg`` from it (or PnP fails) the position for the
            IMU's rotation is returned instead (``method="attitude"``; needs the heading).
        max_attitude_dev_deg: see ``prior``.

    Returns:
        The pose, or None when no solution puts the camera above the ground.
    """
    img = np.ascontiguousarray(image_pts, np.float64).reshape(-1, 2)
    obj = np.ascontiguousarray(np.c_[ground_xy, np.zeros(len(ground_xy))], np.float64)
    if len(img) < 4:
        return None
    R_prior = None
    if prior is not None and prior.heading_deg is not None:
        R_prior = rotation(prior.heading_deg, prior.pitch_deg, prior.roll_deg)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    try:
        n, rvecs, tvecs, _ = cv2.solvePnPGeneric(obj, img, K, None, flags=cv2.SOLVEPNP_IPPE)
    except cv2.error:
        n, rvecs, tvecs = 0, [], []
    for rvec, tvec in zip(rvecs[:n], tvecs[:n], strict=True):
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, None, rvec.copy(), tvec.copy())
        R, _ = cv2.Rodrigues(rvec)
        centre = -R.T @ tvec.reshape(3)
        if centre[2] <= 0:
            continue
        if R_prior is not None:
            key = _rotation_angle_deg(R, R_prior)
        elif prior is not None:
            key = abs(angles(R)[1] - prior.pitch_deg)
        else:
            key = _rms(obj, img, K, rvec, tvec)
        if best is None or key < best[0]:
            best = (key, rvec, tvec)
    pose = None
    if best is not None:
        _, rvec, tvec = best
        R, _ = cv2.Rodrigues(rvec)
        centre = -R.T @ tvec.reshape(3)
        heading, pitch, roll = angles(R)
        dev = _rotation_angle_deg(R, R_prior) if R_prior is not None else None
        pose = CameraPose(*centre, heading, pitch, roll, _rms(obj, img, K, rvec, tvec), "pnp", dev)
    if R_prior is not None and (
        pose is None or (pose.attitude_dev_deg or 0) > max_attitude_dev_deg
    ):
        centre = position_for_attitude(img, np.asarray(ground_xy, float), K, R_prior)
        if centre[2] <= 0:
            return pose
        rvec, _ = cv2.Rodrigues(R_prior)
        tvec = -R_prior @ centre
        heading, pitch, roll = angles(R_prior)
        rms = _rms(obj, img, K, rvec, tvec)
        dev = pose.attitude_dev_deg if pose is not None else None
        return CameraPose(*centre, heading, pitch, roll, rms, "attitude", dev)
    return pose
