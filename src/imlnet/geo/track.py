"""Fuse consecutive frames of a flight into a track: Viterbi over per-frame hypotheses.

Each frame offers a few *hypotheses* of where it looks (the verified aim point of each verified
candidate, the retrieval's tile centres), each with a cost (negative log-likelihood, nats). The
track picks at most one hypothesis per frame so that the sum of

- the hypotheses' costs,
- a motion cost between consecutive picks ``s < t``: free up to ``step_m * (t - s)`` metres,
  then Gaussian, ``0.5 * (excess / (sigma_m * sqrt(t - s)))**2``,
- ``miss_cost`` for every frame left without a pick (at most ``max_gap`` in a row),

is smallest. This is the Viterbi algorithm on a chain whose states are "the last pick", so a
frame whose hypotheses are all wrong is *skipped* (its position interpolated between the picks
around it) instead of dragging the track away; with ``max_gap`` frames the search costs
``O(T * max_gap * H^2)`` for ``H`` hypotheses per frame: nothing for flights of thousands of
frames. A library HMM (hmmlearn, filterpy) would need a fixed state space (a grid over the map)
and would not model "this frame saw nothing right"; 60 lines of numpy do.

Positions are in a local metric frame (:class:`imlnet.geo.coords.LocalFrame`), metres east and
north. The track runs on aim points, which every hypothesis has; the camera positions of the
picked hypotheses ride along (and are interpolated likewise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imlnet.errors import GeoError
from imlnet.geo.coords import LocalFrame

#: Track kinds the track itself placed (``"own"`` frames keep their own estimate).
PLACED = ("fix", "interpolated", "held")


@dataclass(frozen=True)
class TrackConfig:
    """Motion model of the track (metres, nats)."""

    step_m: float = 60.0  # movement between frames that costs nothing
    sigma_m: float = 30.0  # scale of the Gaussian cost beyond it
    miss_cost: float = 4.0  # cost of leaving a frame without a pick
    max_gap: int = 8  # frames that may be skipped in a row

    def validate(self) -> None:
        """Raise GeoError on a non-positive option."""
        if self.step_m < 0 or self.sigma_m <= 0 or self.miss_cost < 0 or self.max_gap < 0:
            raise GeoError(
                f"track options must be positive (step {self.step_m} m, sigma {self.sigma_m} m, "
                f"miss cost {self.miss_cost}, max gap {self.max_gap})"
            )


@dataclass(frozen=True)
class Hypothesis:
    """One candidate position of one frame.

    Attributes:
        east_m: metres east in the track's local frame.
        north_m: metres north.
        cost: negative log-likelihood in nats (lower: more believable).
        camera: the camera's ``(east_m, north_m)`` under this hypothesis, if known.
    """

    east_m: float
    north_m: float
    cost: float
    camera: tuple[float, float] | None = None


@dataclass
class TrackPoint:
    """The track at one frame.

    Attributes:
        east_m: track position (aim point) east, metres.
        north_m: north, metres.
        pick: index of the picked hypothesis, None when interpolated or held.
        kind: ``"fix"`` (picked), ``"interpolated"`` (between picks), ``"held"`` (before the
            first or after the last pick, at most ``max_gap`` frames away), ``"none"`` (no pick
            near enough).
        camera: camera position, picked or interpolated, if known.
    """

    east_m: float
    north_m: float
    pick: int | None
    kind: str
    camera: tuple[float, float] | None = None


def motion_cost(distance_m: float | np.ndarray, gap: int, cfg: TrackConfig) -> np.ndarray:
    """Cost of moving ``distance_m`` over ``gap`` frames (see the module docstring)."""
    excess = np.maximum(np.asarray(distance_m, float) - cfg.step_m * gap, 0.0)
    return 0.5 * (excess / (cfg.sigma_m * math.sqrt(gap))) ** 2


def viterbi(
    frames: Sequence[Sequence[Hypothesis]], cfg: TrackConfig | None = None
) -> list[int | None]:
    """The cheapest pick per frame (None: skipped); see the module docstring.

    Args:
        frames: per frame, its hypotheses (possibly none).
        cfg: the motion model.

    Returns:
        Per frame, the index of the picked hypothesis or None.
    """
    cfg = cfg or TrackConfig()
    cfg.validate()
    n = len(frames)
    pos = [np.array([[h.east_m, h.north_m] for h in f], float).reshape(-1, 2) for f in frames]
    own = [np.array([h.cost for h in f], float) for f in frames]
    best: list[np.ndarray] = []  # cheapest path ending with a pick of each hypothesis
    back: list[list[tuple[int, int] | None]] = []  # (previous frame, hypothesis) or None: start
    for t in range(n):
        cost = own[t] + t * cfg.miss_cost  # start here, every earlier frame skipped
        prev: list[tuple[int, int] | None] = [None] * len(own[t])
        for s in range(max(0, t - cfg.max_gap - 1), t):
            if not len(pos[s]) or not len(pos[t]):
                continue
            dist = np.linalg.norm(pos[t][:, None, :] - pos[s][None, :, :], axis=2)  # (Ht, Hs)
            total = best[s][None, :] + motion_cost(dist, t - s, cfg) + (t - s - 1) * cfg.miss_cost
            j = total.argmin(axis=1)
            via = total[np.arange(len(j)), j] + own[t]
            for i in np.nonzero(via < cost)[0]:
                cost[i], prev[i] = via[i], (s, int(j[i]))
        best.append(cost)
        back.append(prev)
    end_cost, end = n * cfg.miss_cost, None  # no pick at all
    for t in range(n):
        if len(best[t]):
            i = int(best[t].argmin())
            total = float(best[t][i]) + (n - 1 - t) * cfg.miss_cost
            if total < end_cost:
                end_cost, end = total, (t, i)
    picks: list[int | None] = [None] * n
    while end is not None:
        t, i = end
        picks[t] = i
        end = back[t][i]
    return picks


def fuse(
    frames: Sequence[Sequence[Hypothesis]], cfg: TrackConfig | None = None
) -> list[TrackPoint]:
    """Run :func:`viterbi` and fill the skipped frames by linear interpolation (in frame
    index) between the picks around them, or by holding the first/last pick at the ends for
    at most ``max_gap`` frames (further out: ``"none"``)."""
    cfg = cfg or TrackConfig()
    picks = viterbi(frames, cfg)
    fixed = [t for t, p in enumerate(picks) if p is not None]
    if not fixed:
        return [TrackPoint(math.nan, math.nan, None, "none") for _ in frames]
    out: list[TrackPoint] = []
    for t, p in enumerate(picks):
        if p is not None:
            h = frames[t][p]
            out.append(TrackPoint(h.east_m, h.north_m, p, "fix", h.camera))
            continue
        after = next((s for s in fixed if s > t), None)
        before = next((s for s in reversed(fixed) if s < t), None)
        if before is None or after is None:
            s = after if before is None else before
            if abs(s - t) > cfg.max_gap:  # too far from any pick to say where the drone is
                out.append(TrackPoint(math.nan, math.nan, None, "none"))
                continue
            h = frames[s][picks[s]]  # type: ignore[index]
            out.append(TrackPoint(h.east_m, h.north_m, None, "held", h.camera))
            continue
        a, b = frames[before][picks[before]], frames[after][picks[after]]  # type: ignore[index]
        w = (t - before) / (after - before)
        cam = None
        if a.camera is not None and b.camera is not None:
            cam = (
                a.camera[0] + w * (b.camera[0] - a.camera[0]),
                a.camera[1] + w * (b.camera[1] - a.camera[1]),
            )
        out.append(
            TrackPoint(
                a.east_m + w * (b.east_m - a.east_m),
                a.north_m + w * (b.north_m - a.north_m),
                None,
                "interpolated",
                cam,
            )
        )
    return out


@dataclass
class FrameFix:
    """The track at one frame in WGS84 (``kind`` as in :class:`TrackPoint`)."""

    lat: float
    lon: float
    kind: str
    pick: int | None = None
    camera_lat: float | None = None
    camera_lon: float | None = None


#: A hypothesis in WGS84: ``(lat, lon, cost, camera_lat, camera_lon)`` (camera may be None).
LatLonHypothesis = tuple[float, float, float, float | None, float | None]


def track_latlon(
    frames: Sequence[Sequence[LatLonHypothesis]], cfg: TrackConfig | None = None
) -> list[FrameFix]:
    """:func:`fuse` for hypotheses in latitude/longitude, in a local frame at their mean."""
    every = [(h[0], h[1]) for f in frames for h in f]
    if not every:
        return [FrameFix(math.nan, math.nan, "none") for _ in frames]
    lat0, lon0 = np.mean(every, axis=0)
    frame = LocalFrame(float(lat0), float(lon0))

    def xy(lat: float, lon: float) -> tuple[float, float]:
        x, y = frame.to_xy(np.array([lat]), np.array([lon]))
        return float(x[0]), float(y[0])

    local = []
    for f in frames:
        hyps = []
        for lat, lon, cost, clat, clon in f:
            cam = xy(clat, clon) if clat is not None and clon is not None else None
            hyps.append(Hypothesis(*xy(lat, lon), cost, cam))
        local.append(hyps)
    out = []
    for point in fuse(local, cfg):
        if point.kind == "none":
            out.append(FrameFix(math.nan, math.nan, "none"))
            continue
        lat, lon = frame.to_latlon(point.east_m, point.north_m)
        cam = frame.to_latlon(*point.camera) if point.camera is not None else (None, None)
        out.append(FrameFix(lat, lon, point.kind, point.pick, *cam))
    return out
