"""Drone poses over the synthetic world: single views and flights along smooth trajectories.

A pose is the camera's position (east, north, height above ground, metres in the world's frame)
and attitude (heading of the optical axis, pitch below the horizon, roll), plus the *aim point*:
where the optical axis meets the ground plane (z = 0), the ground point at the image centre.

Flights: a multirotor flying at a steady speed whose turn rate, height (+-15 m around its own
mean) and camera pitch (+-4 degrees) drift smoothly (sums of slow sinusoids with random
phases), with the camera looking ahead along the track and a small roll from banking in turns
(most of it taken out by the gimbal). The track steers back towards the map centre when it
nears the edge, so every aim point stays inside the orthophoto's margin. All randomness comes
from the given generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imlnet.data.synthetic.render import Camera

GRAVITY = 9.81


@dataclass(frozen=True)
class Pose:
    """One drone view's camera and its aim point (metres in the world's local frame)."""

    camera: Camera
    aim: tuple[float, float]  # east, north of the optical axis' ground intersection (z = 0)
    t_s: float = 0.0  # seconds since the start of its flight (0 for single views)


def aim_point(x: float, y: float, z: float, heading_deg: float, pitch_deg: float) -> tuple:
    """Ground-plane (z = 0) point on the optical axis of a camera at ``(x, y, z)``."""
    dist = z / math.tan(math.radians(pitch_deg))
    h = math.radians(heading_deg)
    return x + dist * math.sin(h), y + dist * math.cos(h)


def random_view(
    gen: torch.Generator,
    half: float,
    margin: float,
    altitude_m: tuple[float, float],
    pitch_deg: tuple[float, float],
    fov_deg: float,
) -> Pose:
    """A single view: an aim point anywhere inside the margin, any heading, seen from a random
    height and pitch in the given ranges."""
    u = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
    lo, hi = -half + margin, half - margin
    ax, ay = lo + (hi - lo) * u[0], lo + (hi - lo) * u[1]
    alt = altitude_m[0] + (altitude_m[1] - altitude_m[0]) * u[2]
    pitch = pitch_deg[0] + (pitch_deg[1] - pitch_deg[0]) * u[3]
    heading = 360.0 * u[4]
    dist = alt / math.tan(math.radians(pitch))
    cx = ax - dist * math.sin(math.radians(heading))
    cy = ay - dist * math.cos(math.radians(heading))
    return Pose(Camera((cx, cy, alt), heading, pitch, fov_deg), (ax, ay))


@dataclass
class FlightConfig:
    """How flights are flown (lengths in metres, angles in degrees, times in seconds)."""

    length_m: tuple[float, float] = (300.0, 600.0)  # ground track length of a flight
    speed_mps: tuple[float, float] = (6.0, 12.0)
    frame_interval_s: float = 3.0
    max_turn_deg_s: float = 8.0  # largest turn rate of the drifting turn
    altitude_m: tuple[float, float] = (70.0, 140.0)  # height range the flight drifts within
    altitude_drift_m: float = 15.0  # +- around the flight's own mean height
    pitch_deg: tuple[float, float] = (40.0, 55.0)
    pitch_drift_deg: float = 4.0  # +- around the flight's own mean pitch
    gimbal_roll_share: float = 0.25  # share of the bank angle the gimbal leaves in the image
    fov_deg: float = 50.0


def _drift(gen: torch.Generator, period_s: tuple[float, float]) -> callable:
    """A smooth random function of time in [-1, 1]: two sinusoids of random period and phase."""
    u = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
    p1 = period_s[0] + (period_s[1] - period_s[0]) * u[0]
    p2 = period_s[0] + (period_s[1] - period_s[0]) * u[1]
    w = 0.35 + 0.3 * u[4]

    def f(t: float) -> float:
        a = math.sin(2 * math.pi * (t / p1 + u[2]))
        b = math.sin(2 * math.pi * (t / p2 + u[3]))
        return (1 - w) * a + w * b

    return f


def fly(gen: torch.Generator, half: float, margin: float, cfg: FlightConfig) -> list[Pose]:
    """Poses of one flight, one per frame, over a square map of side ``2 * half``."""
    u = torch.rand(7, generator=gen, dtype=torch.float64).tolist()
    lo, hi = -half + margin, half - margin
    speed = cfg.speed_mps[0] + (cfg.speed_mps[1] - cfg.speed_mps[0]) * u[0]
    length = cfg.length_m[0] + (cfg.length_m[1] - cfg.length_m[0]) * u[1]
    heading = 360.0 * u[2]
    x, y = lo + (hi - lo) * u[3], lo + (hi - lo) * u[4]
    turn, height, tilt = (_drift(gen, p) for p in ((25.0, 70.0), (40.0, 120.0), (20.0, 60.0)))
    a_amp = min(cfg.altitude_drift_m, (cfg.altitude_m[1] - cfg.altitude_m[0]) / 2)
    a_mid = cfg.altitude_m[0] + a_amp + (cfg.altitude_m[1] - cfg.altitude_m[0] - 2 * a_amp) * u[5]
    p_amp = min(cfg.pitch_drift_deg, (cfg.pitch_deg[1] - cfg.pitch_deg[0]) / 2)
    p_mid = cfg.pitch_deg[0] + p_amp + (cfg.pitch_deg[1] - cfg.pitch_deg[0] - 2 * p_amp) * u[6]
    duration = length / speed
    frames = max(2, int(duration // cfg.frame_interval_s) + 1)
    dt = 0.25
    poses, t, next_frame = [], 0.0, 0.0
    while len(poses) < frames:
        alt = a_mid + a_amp * height(t)
        pitch = p_mid + p_amp * tilt(t)
        rate = cfg.max_turn_deg_s * turn(t)
        ax, ay = aim_point(x, y, alt, heading, pitch)
        if not (lo < ax < hi and lo < ay < hi and lo < x < hi and lo < y < hi):
            # near the edge: turn towards the centre at the largest rate
            to_centre = math.degrees(math.atan2(-x, -y))
            off = (to_centre - heading + 180.0) % 360.0 - 180.0
            rate = math.copysign(cfg.max_turn_deg_s, off) if abs(off) > 5 else 0.0
        if t >= next_frame - 1e-9:
            bank = math.degrees(math.atan(speed * math.radians(rate) / GRAVITY))
            roll = cfg.gimbal_roll_share * bank
            cam = Camera((x, y, alt), heading % 360.0, pitch, cfg.fov_deg, roll)
            poses.append(Pose(cam, (ax, ay), round(t, 3)))
            next_frame += cfg.frame_interval_s
        heading += rate * dt
        x += speed * dt * math.sin(math.radians(heading))
        y += speed * dt * math.cos(math.radians(heading))
        t += dt
    return poses
