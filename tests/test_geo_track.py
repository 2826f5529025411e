"""Flights: the Viterbi track keeps its line through a wrong frame, interpolates, holds ends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imlnet.errors import GeoError
from imlnet.geo.coords import LocalFrame, geodesic_m
from imlnet.geo.track import Hypothesis, TrackConfig, fuse, motion_cost, track_latlon, viterbi


def scripted(n: int = 12, step: float = 40.0) -> np.ndarray:
    """A flight east at ``step`` metres per frame with a gentle turn north."""
    t = np.arange(n, dtype=float)
    return np.c_[step * t, 0.4 * (step * t) ** 1.2 / 10]


def test_motion_cost_is_free_up_to_the_step_then_gaussian() -> None:
    cfg = TrackConfig(step_m=50.0, sigma_m=10.0)
    assert motion_cost(50.0, 1, cfg) == 0.0
    assert motion_cost(70.0, 1, cfg) == pytest.approx(2.0)  # 0.5 * (20 / 10) ** 2
    assert motion_cost(120.0, 2, cfg) == pytest.approx(0.5 * (20 / (10 * math.sqrt(2))) ** 2)


def test_one_wrong_frame_does_not_pull_the_track_away() -> None:
    truth = scripted()
    rng = np.random.default_rng(0)
    frames = []
    for t, (x, y) in enumerate(truth):
        hyps = [Hypothesis(x + rng.normal(0, 2), y + rng.normal(0, 2), 0.5)]
        hyps.append(Hypothesis(x + 700.0, y - 400.0, 2.5))  # a look-alike place every frame
        if t == 6:  # frame 6: only the look-alike, and it looks better than anything
            hyps = [Hypothesis(x - 900.0, y + 650.0, 0.1)]
        frames.append(hyps)
    track = fuse(frames)
    assert [p.kind for p in track][5:8] == ["fix", "interpolated", "fix"]
    errors = [
        math.hypot(p.east_m - x, p.north_m - y) for p, (x, y) in zip(track, truth, strict=True)
    ]
    assert max(errors) < 10.0
    assert all(p.pick == 0 for i, p in enumerate(track) if i != 6)


def test_a_lone_wrong_frame_is_no_track_but_the_picks_around_it() -> None:
    # Without the motion model, per-frame best picks would jump to the 0.1-cost frame.
    frames = [
        [Hypothesis(0.0, 0.0, 1.0)],
        [Hypothesis(5000.0, 0.0, 0.1)],
        [Hypothesis(60.0, 0.0, 1.0)],
    ]
    assert viterbi(frames) == [0, None, 0]


def test_ends_are_held_and_empty_flights_give_none() -> None:
    frames = [[], [Hypothesis(10.0, 0.0, 0.5)], [Hypothesis(50.0, 0.0, 0.5)], []]
    kinds = [(p.kind, p.east_m) for p in fuse(frames)]
    assert kinds == [("held", 10.0), ("fix", 10.0), ("fix", 50.0), ("held", 50.0)]
    assert [p.kind for p in fuse([[], []])] == ["none", "none"]
    far = [[Hypothesis(0.0, 0.0, 0.5)], [], [], []]
    assert [p.kind for p in fuse(far, TrackConfig(max_gap=2))] == ["fix", "held", "held", "none"]
    assert fuse([]) == []


def test_camera_positions_ride_along_and_interpolate() -> None:
    frames = [
        [Hypothesis(0.0, 0.0, 0.5, camera=(0.0, -80.0))],
        [Hypothesis(9000.0, 0.0, 0.1)],
        [Hypothesis(40.0, 0.0, 0.5, camera=(40.0, -80.0))],
    ]
    track = fuse(frames)
    assert track[1].kind == "interpolated" and track[1].camera == pytest.approx((20.0, -80.0))


def test_track_latlon_round_trip() -> None:
    frame = LocalFrame(47.0, 8.0)
    truth = scripted(8)
    hyps = []
    for t, (x, y) in enumerate(truth):
        lat, lon = frame.to_latlon(x, y)
        bad = frame.to_latlon(x + 3000.0 * (-1) ** t, y)  # cheaper, but jumps 6 km per frame
        hyps.append([(lat, lon, 0.5, lat - 1e-3, lon), (*bad, 0.2, None, None)])
    fixes = track_latlon(hyps)
    for fix, (x, y) in zip(fixes, truth, strict=True):
        assert fix.kind == "fix" and geodesic_m(fix.lat, fix.lon, *frame.to_latlon(x, y)) < 0.01
        assert fix.camera_lat is not None
    assert [f.kind for f in track_latlon([[], []])] == ["none", "none"]


def test_bad_options_are_refused() -> None:
    with pytest.raises(GeoError, match="track options"):
        viterbi([[Hypothesis(0.0, 0.0, 0.0)]], TrackConfig(sigma_m=0.0))
