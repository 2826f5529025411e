"""Geometric verification of retrieved tiles: local features, a robust homography, the pose.

For each query the top-K retrieved tiles are re-read from the orthophoto *at its native
resolution* (the gallery's metadata keeps each tile's source raster and pixel window; the
window is widened by ``margin`` of its size on every side, since an oblique view sees far more
than one tile), and matched to the drone image:

1. SIFT keypoints and RootSIFT descriptors on both (after CLAHE, which evens out illumination
   between the photo and the map), Lowe's ratio test on the two nearest descriptors (0.8; 0.9
   for a rectified view, whose 4-parameter fit and scale/rotation checks reject what the looser
   test lets through: on a synthetic world with the right tile given, 10 instead of 7 of 30
   views verified, all within 10 m, while 0.9 without attitude verified 5 wrong places of 9).
2. A robust model: ``cv2.findHomography`` with USAC MAGSAC++ (or RANSAC) image -> map pixels.
   With the image's attitude known (IMU pitch/roll, optionally heading and altitude) the view is
   first warped to a nadir view (:func:`imlnet.geo.pose.rectifier`), where the map differs from
   it by a similarity only, so a 4-parameter model (``cv2.estimateAffinePartial2D``) is fitted:
   fewer parameters, fewer false matches that fit by chance. Without attitude, a view that does
   not verify as it is is tried again rectified for assumed pitches (``pitch_guesses``, 45 and
   60 degrees; heading and altitude unknown): with the right tile given, 10 instead of 3 of 30
   oblique synthetic views (pitch 40-55 degrees) verified that way, all within 10 m.
3. A candidate is *verified* when at least ``min_inliers`` correspondences agree (8: on the
   synthetic world a far tile's best fit holds at most 6; 12 lost 11 of 29 right tiles;
   ``bench/verify_inliers.py``), the image
   centre maps inside the map window, and planar PnP on the inliers puts the camera above the
   ground with an RMS reprojection error below ``max_reproj_px``
   (:func:`imlnet.geo.pose.solve_pose`).

Verified candidates are re-ranked by inlier count. The best gives the *aim point* (the image
centre through the homography, map pixels -> map CRS -> WGS84) and the *camera pose* (east,
north, height above ground, heading, pitch, roll). Its confidence is a heuristic in [0, 1],
``n / (n + min_inliers) * (1 - n_alt / n)``: ``n`` the best inlier count, ``n_alt`` the best
count of a verified candidate that places the aim point more than ``agree_m`` elsewhere (a
look-alike place). When nothing verifies, the retrieval estimate is kept and flagged
(``verified = False``, ``note`` says why).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from imlnet.geo.coords import geodesic_m
from imlnet.geo.mapwindow import MapReader, MapWindow
from imlnet.geo.pose import (
    DEFAULT_FOV_DEG,
    Attitude,
    CameraPose,
    Tangent,
    intrinsics,
    rectifier,
    solve_pose,
)
from imlnet.inference import read_image


@dataclass
class VerifyConfig:
    """Options of the verification (pixels are query-image pixels unless said otherwise)."""

    k: int = 5  # candidates verified per query (the top-k of the retrieval)
    margin: float = 0.5  # map window = tile window widened by this share of its size per side
    max_side_px: int = 1600  # map windows larger than this are decimated (speed)
    ratio: float = 0.8  # Lowe's ratio test
    ratio_rectified: float = 0.9  # with attitude: the similarity fit and its checks allow more
    threshold_px: float = 4.0  # inlier threshold of the robust fit
    method: Literal["magsac", "ransac"] = "magsac"
    min_inliers: int = 8  # far tiles' best fits hold at most 6 (docs/localization.md)
    max_rotation_deg: float = 30.0  # rectified with a heading: map rotation this close to 0
    max_scale_ratio: float = 2.0  # rectified with an altitude: scale this close to expected
    fov_deg: float = DEFAULT_FOV_DEG  # when the attitude file gives none
    agree_m: float = 30.0  # aim points closer than this count as the same place
    max_height_m: float = 3000.0  # a PnP pose above this is implausible
    max_reproj_px: float = 8.0  # PnP's RMS reprojection error over the inliers must stay below
    pitch_guesses: tuple[float, ...] = (45.0, 60.0)  # no attitude, no match: assumed pitches
    cache_windows: int = 64  # map windows whose features are kept between queries
    max_features: int = 3000  # SIFT keypoints kept per image (the strongest)
    max_query_px: int = 1024  # larger photos are shrunk first (same field of view)


@dataclass
class Candidate:
    """One retrieved tile after matching (``verified`` False: too few inliers or implausible)."""

    rank: int
    tile_id: str
    matches: int
    inliers: int
    verified: bool = False
    aim_lat: float | None = None
    aim_lon: float | None = None
    camera_lat: float | None = None
    camera_lon: float | None = None
    pose: CameraPose | None = None
    homography: np.ndarray | None = None  # query pixels -> map CRS coordinates
    crs: str = ""
    reason: str = ""  # why it did not verify
    # a verified match's inliers: query pixels (after the max_query_px resize) and map window
    # pixels, for figures of the match
    query_px: np.ndarray | None = None
    map_px: np.ndarray | None = None


@dataclass
class Verification:
    """The answer of the verification for one query.

    ``lat``/``lon`` are the aim point: the verified one, else the retrieval estimate
    (``verified`` False). The camera fields are None unless verified.
    """

    image: str
    verified: bool
    lat: float
    lon: float
    inliers: int = 0
    confidence: float = 0.0
    tile_rank: int | None = None
    tile_id: str = ""
    camera_lat: float | None = None
    camera_lon: float | None = None
    pose: CameraPose | None = None
    candidates: list[Candidate] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0


@dataclass
class _Features:
    pts: np.ndarray  # (N, 2) float32 pixels
    desc: np.ndarray | None  # (N, 128) float32


class Verifier:
    """Matches query images against map windows (the features of map windows are cached).

    Args:
        config: the options.
    """

    def __init__(self, config: VerifyConfig | None = None) -> None:
        self.cfg = config or VerifyConfig()
        self._sift = cv2.SIFT_create(nfeatures=self.cfg.max_features)
        self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        self._flann = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 64})
        self.maps = MapReader(self.cfg.margin, self.cfg.max_side_px, self.cfg.cache_windows)

    def close(self) -> None:
        """Close the rasters opened so far."""
        self.maps.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- features -----------------------------------------------------------------------------
    def features(self, grey: np.ndarray, mask: np.ndarray | None = None) -> _Features:
        """SIFT keypoints and RootSIFT descriptors of a uint8 grey image (after CLAHE).

        RootSIFT (Arandjelovic and Zisserman, 2012) compares descriptors by the Hellinger
        kernel; with the right tile given, 11 instead of 10 of 30 synthetic views verified with
        attitude and 4 instead of 3 without, none of them wrong.
        """
        kps, desc = self._sift.detectAndCompute(self._clahe.apply(grey), mask)
        if desc is not None:  # RootSIFT: L1-normalise, square root (Hellinger kernel)
            desc = np.sqrt(desc / (desc.sum(axis=1, keepdims=True) + 1e-7)).astype(np.float32)
        pts = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        return _Features(pts, desc)

    def match(
        self, query: _Features, ref: _Features, *, similarity: bool = False
    ) -> tuple[np.ndarray | None, np.ndarray, int]:
        """Ratio-test matches and a robust fit ``query -> ref`` pixels.

        Returns:
            ``(H, inliers, matches)``: the 3x3 model (None if none was found), the boolean
            inlier mask over the matches, and the number of matches that passed the ratio test;
            inlier rows are ``np.nonzero(inliers)`` into the matched point pairs kept in
            ``self.last_pairs``.
        """
        self.last_pairs = (np.empty((0, 2), np.float32), np.empty((0, 2), np.float32))
        if query.desc is None or ref.desc is None or len(query.pts) < 2 or len(ref.pts) < 2:
            return None, np.zeros(0, bool), 0
        # Exhaustive matching for small sets; FLANN kd-trees when it would be slow.
        small = len(query.pts) * len(ref.pts) <= 2_000_000
        pairs = (self._matcher if small else self._flann).knnMatch(query.desc, ref.desc, k=2)
        ratio = self.cfg.ratio_rectified if similarity else self.cfg.ratio
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
        # One query keypoint per map keypoint (the closest): many-to-one matches let a fit
        # collapse the view onto a single map point and count every one of them as an inlier.
        best: dict[int, cv2.DMatch] = {}
        for m in good:
            if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:
                best[m.trainIdx] = m
        good = sorted(best.values(), key=lambda m: m.queryIdx)
        src = query.pts[[m.queryIdx for m in good]].reshape(-1, 2)
        dst = ref.pts[[m.trainIdx for m in good]].reshape(-1, 2)
        self.last_pairs = (src, dst)
        if len(good) < 4:
            return None, np.zeros(len(good), bool), len(good)
        thr = self.cfg.threshold_px
        # OpenCV's RANSAC draws from the calling thread's generator: seeded per fit, a query's
        # result does not depend on what that thread fitted before (the web service's worker
        # thread and the command line give the same fixes)
        cv2.setRNGSeed(0)
        if similarity:
            A, mask = cv2.estimateAffinePartial2D(
                src,
                dst,
                method=cv2.RANSAC,
                ransacReprojThreshold=thr,
                maxIters=5000,
                confidence=0.999,
            )
            H = None if A is None else np.vstack([A, [0.0, 0.0, 1.0]])
        else:
            method = cv2.USAC_MAGSAC if self.cfg.method == "magsac" else cv2.RANSAC
            H, mask = cv2.findHomography(src, dst, method, thr, maxIters=5000, confidence=0.999)
        if H is None or mask is None:
            return None, np.zeros(len(good), bool), len(good)
        return H, mask.reshape(-1).astype(bool), len(good)

    def map_window(self, hit: Mapping[str, Any]) -> MapWindow:
        """The hit's map window (see :class:`MapReader`) with its features attached."""
        win = self.maps.tile_window(hit)
        if win.features is None:
            win.features = self.features(win.grey, win.mask)
        return win

    # -- one query ----------------------------------------------------------------------------
    def verify(
        self,
        image: str | Path,
        hits: Sequence[Mapping[str, Any]],
        fallback: tuple[float, float],
        *,
        attitude: Attitude | None = None,
        extra: Sequence[Mapping[str, Any]] = (),
    ) -> Verification:
        """Verify the first ``k`` hits for one query image (and ``extra`` tiles).

        Args:
            image: the drone image.
            hits: retrieved tiles, best first (gallery metadata rows with ``rank``).
            fallback: the retrieval estimate ``(lat, lon)``, kept when nothing verifies.
            attitude: the image's IMU attitude, if known (rectifies the view, prior on the pose).
            extra: more tiles to try after the hits (a flight's tiles near its last fix).

        Raises:
            ImageReadError: the image cannot be read; GeoError: a tile's raster or window
            cannot be read.
        """
        start = time.perf_counter()
        grey = np.asarray(read_image(image).convert("L"))  # the package's one decoder
        scale = self.cfg.max_query_px / max(grey.shape)
        if scale < 1.0:  # a 4000 px photo: the map windows hold no finer detail, SIFT is slower
            size = (max(round(grey.shape[1] * scale), 8), max(round(grey.shape[0] * scale), 8))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        tiles = [*list(hits)[: self.cfg.k], *extra]
        tries: list[Attitude | None] = [attitude]
        if attitude is None:  # unknown attitude: as it is, then nadir views at assumed pitches
            fov = self.cfg.fov_deg
            tries += [Attitude(p, fov_deg=fov) for p in self.cfg.pitch_guesses]
        result = self._verify_as(str(image), grey, tiles, fallback, tries[0])
        for att in tries[1:]:
            if result.verified or att is None:
                break
            again = self._verify_as(str(image), grey, tiles, fallback, att)
            if again.verified:
                again.note += f" (rectified for an assumed pitch of {att.pitch_deg:g} deg)"
            result = again if again.verified or again.inliers > result.inliers else result
        result.seconds = time.perf_counter() - start
        return result

    def _verify_as(
        self,
        image: str,
        grey: np.ndarray,
        tiles: Sequence[Mapping[str, Any]],
        fallback: tuple[float, float],
        attitude: Attitude | None,
    ) -> Verification:
        """One attempt of :meth:`verify`, with this attitude (None: the image as it is)."""
        h, w = grey.shape
        fov = (attitude.fov_deg if attitude else None) or self.cfg.fov_deg
        K = intrinsics(w, h, fov)
        rect, rect_gsd = np.eye(3), None
        if attitude is not None:
            rect, size, rect_gsd = rectifier(K, (w, h), attitude)
            valid = cv2.warpPerspective(
                np.full_like(grey, 255), rect, size, flags=cv2.INTER_NEAREST
            )
            warped = cv2.warpPerspective(grey, rect, size, flags=cv2.INTER_LINEAR)
            query = self.features(warped, cv2.erode(valid, np.ones((5, 5), np.uint8)))
        else:
            query = self.features(grey)
        cands = [self._candidate(query, hit, K, rect, rect_gsd, attitude) for hit in tiles]
        return _decide(image, cands, fallback, self.cfg)

    def _plausible_similarity(
        self, H: np.ndarray, win: MapWindow, rect_gsd: float, attitude: Attitude
    ) -> bool:
        """A fit between a rectified view and the map must be near the expected similarity:
        no rotation when the heading is known, the expected scale when the altitude is (a wide
        band otherwise), which rejects collapsed fits of many points onto a few."""
        scale = math.sqrt(max(float(np.linalg.det(H[:2, :2])), 0.0))
        expected = rect_gsd / win.gsd_m
        band = self.cfg.max_scale_ratio if attitude.altitude_m else 10.0
        if not expected / band <= scale <= expected * band:
            return False
        if attitude.heading_deg is None:
            return True
        angle = math.degrees(math.atan2(H[1, 0], H[0, 0])) + win.north_deg
        return abs((angle + 180.0) % 360.0 - 180.0) <= self.cfg.max_rotation_deg

    def _candidate(
        self,
        query: _Features,
        hit: Mapping[str, Any],
        K: np.ndarray,
        rect: np.ndarray,
        rect_gsd: float | None,
        attitude: Attitude | None,
    ) -> Candidate:
        win = self.map_window(hit)
        H, inl, matches = self.match(query, win.features, similarity=attitude is not None)
        rank, tile = int(hit.get("rank", 0)), str(hit.get("tile_id", ""))
        cand = Candidate(rank, tile, matches, int(inl.sum()))
        if H is None or cand.inliers < self.cfg.min_inliers:
            cand.reason = "too few inliers"
            return cand
        similar = attitude is None or rect_gsd is None
        if not similar and not self._plausible_similarity(H, win, rect_gsd, attitude):
            cand.reason = "scale or rotation far from the attitude's"
            return cand
        full = win.to_crs @ H @ rect  # original query pixels -> map CRS
        centre = full @ np.array([K[0, 2], K[1, 2], 1.0])
        local = np.linalg.inv(win.to_crs) @ centre
        u, v = local[:2] / local[2] if local[2] != 0 else (-1.0, -1.0)
        if centre[2] == 0 or not (0 <= u < win.shape[1] and 0 <= v < win.shape[0]):
            cand.reason = "image centre maps outside the map window"
            return cand
        aim = self.maps.lonlat(win.crs, (centre[:2] / centre[2])[None])[0]
        cand.aim_lon, cand.aim_lat = float(aim[0]), float(aim[1])
        src, dst = (p[inl] for p in self.last_pairs)
        img_pts = cv2.perspectiveTransform(
            src.reshape(-1, 1, 2).astype(np.float64), np.linalg.inv(rect)
        ).reshape(-1, 2)
        crs_pts = (win.to_crs @ np.c_[dst, np.ones(len(dst))].T).T
        lonlat = self.maps.lonlat(win.crs, crs_pts[:, :2] / crs_pts[:, 2:])
        frame = Tangent(cand.aim_lat, cand.aim_lon)
        gx, gy = frame.to_xy(lonlat[:, 1], lonlat[:, 0])
        pose = solve_pose(img_pts, np.c_[gx, gy], K, prior=attitude)
        if pose is None or not 0 < pose.height_m <= self.cfg.max_height_m:
            cand.reason = "no camera pose above the ground"
            return cand
        if pose.reproj_px > self.cfg.max_reproj_px:  # the points fit no camera: a false match
            cand.reason = f"no camera fits the matches ({pose.reproj_px:.0f} px reprojection error)"
            return cand
        cand.pose = pose
        cand.camera_lat, cand.camera_lon = frame.to_latlon(pose.east_m, pose.north_m)
        cand.homography, cand.crs = full, win.crs.to_string()
        cand.query_px, cand.map_px = img_pts.astype(np.float32), dst.astype(np.float32)
        cand.verified = True
        return cand


def _decide(
    image: str, cands: list[Candidate], fallback: tuple[float, float], cfg: VerifyConfig
) -> Verification:
    """Re-rank by inliers; the best verified candidate, or the flagged retrieval fallback."""
    verified = sorted((c for c in cands if c.verified), key=lambda c: (-c.inliers, c.rank))
    rest = sorted((c for c in cands if not c.verified), key=lambda c: c.rank)
    ranked = verified + rest
    if not verified:
        top = max(cands, key=lambda c: c.inliers, default=None)
        best = top.inliers if top is not None else 0
        why = top.reason if top is not None and best >= cfg.min_inliers else "too few inliers"
        note = (
            f"fallback to retrieval: no candidate verified (best {best} inliers, "
            f"{cfg.min_inliers} needed; {why})"
        )
        return Verification(image, False, *fallback, inliers=best, candidates=ranked, note=note)
    top = verified[0]
    alt = 0
    for c in verified[1:]:
        if geodesic_m(top.aim_lat, top.aim_lon, c.aim_lat, c.aim_lon) > cfg.agree_m:  # type: ignore[arg-type]
            alt = max(alt, c.inliers)
    confidence = top.inliers / (top.inliers + cfg.min_inliers) * (1.0 - alt / top.inliers)
    where = f"retrieval rank {top.rank}" if top.rank else "a tile near the flight's last fix"
    note = f"verified: {top.inliers} inliers on {where}"
    if alt:
        note += f"; another place has {alt}"
    return Verification(
        image,
        True,
        top.aim_lat,
        top.aim_lon,
        top.inliers,
        confidence,
        top.rank,
        top.tile_id,
        top.camera_lat,
        top.camera_lon,
        top.pose,
        ranked,
        note,
    )
