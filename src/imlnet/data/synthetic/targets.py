"""Rendering the benchmark's locations: several targets of one city per scene.

A city (:mod:`imlnet.data.synthetic.city`) is generated and lit once; each of its targets then
gets a nadir satellite crop centred on it and a descending drone orbit around it, all views of a
target cast as one batch of rays. Every city and every target draws from its own random stream,
so the result does not depend on which process renders it or in what order.

A target is a landmark (University-1652's kind: a building in its own block, the crop centred on
it, the views aimed at half its height) or, for a share ``SynthConfig.anywhere`` of locations, an
arbitrary ground point of the city between the landmarks (the views aimed at the ground there),
which is what a drone photo of a map taken anywhere looks like (:func:`point_target`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.city import CityGenerator
from imlnet.data.synthetic.common import draw_conditions, encode_jpeg, random_stream
from imlnet.data.synthetic.config import SynthConfig
from imlnet.data.synthetic.scene import Scene
from imlnet.data.synthetic.weather import apply_weather
from imlnet.geo.coords import LocalFrame

#: stream numbers of :func:`~imlnet.data.synthetic.common.random_stream`
CITY_STREAM, VIEW_STREAM, POINT_STREAM = 0, 1, 7
MAX_TARGETS_PER_CITY = 1024
#: a point target lies this share range of the landmark spacing east and north of its landmark
POINT_OFFSET = (0.25, 0.75)


def view_stream(seed: int, city: int, slot: int) -> torch.Generator:
    """The random stream of one target's views (orbit jitter, conditions, weather)."""
    return random_stream(seed, city * MAX_TARGETS_PER_CITY + slot, VIEW_STREAM)


def point_target(cfg: SynthConfig, scene: Scene, city: int, slot: int) -> dict | None:
    """The arbitrary ground point that replaces landmark ``slot``, or ``None`` to keep it.

    With probability ``cfg.anywhere`` (drawn from the slot's own stream, so landmark locations
    render exactly as without the option) the target becomes the point a uniform share
    :data:`POINT_OFFSET` of the landmark spacing east and north of the slot's landmark, wrapped
    into the periodic city: between landmarks, at least a quarter spacing from each, among
    ordinary blocks, roads and parks. Its aim is on the ground (height 0).
    """
    if cfg.anywhere <= 0:
        return None
    gen = random_stream(cfg.seed, city * MAX_TARGETS_PER_CITY + slot, POINT_STREAM)
    u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
    if u[0] >= cfg.anywhere:
        return None
    landmark = scene.targets[slot]
    spacing = scene.extent_m / cfg.scene.targets_per_side
    lo, hi = POINT_OFFSET
    centre = []
    for c, v in zip(landmark["centre_m"], u[1:], strict=True):
        x = c + spacing * (lo + (hi - lo) * v) + scene.half
        centre.append(round(x % scene.extent_m - scene.half, 3))
    return {"kind": "point", "centre_m": centre, "height_m": 0.0}


def orbit(cfg: SynthConfig, target: dict, gen: torch.Generator) -> list[R.Camera]:
    """Cameras of a descending orbit looking at ``target`` (aim: half its height).

    Positions are east/north/up metres from the target's footprint centre.
    """
    aim_z = 0.5 * target["height_m"]
    start_az = 360.0 * float(torch.rand((), generator=gen))
    cams = []
    for i in range(cfg.views):
        f = i / max(1, cfg.views - 1)
        alt = cfg.altitude_m[0] + f * (cfg.altitude_m[1] - cfg.altitude_m[0])
        pitch = cfg.pitch_deg[0] + f * (cfg.pitch_deg[1] - cfg.pitch_deg[0])
        bearing = (start_az + 360.0 * cfg.turns * i / cfg.views) % 360.0  # target -> camera
        d_yaw = d_pitch = d_alt = 0.0
        if cfg.jitter:
            d_yaw, d_pitch, d_alt = (
                (torch.rand(3, generator=gen) * 2 - 1) * torch.tensor([4.0, 3.0, 6.0])
            ).tolist()
        alt += d_alt
        dist = (alt - aim_z) / math.tan(math.radians(pitch))
        b = math.radians(bearing)
        pos = (dist * math.sin(b), dist * math.cos(b), alt)
        yaw = (bearing + 180.0) % 360.0  # looking back at the target
        cams.append(R.Camera(pos, (yaw + d_yaw) % 360.0, pitch + d_pitch, cfg.fov_deg))
    return cams


def _shifted(cam: R.Camera, dx: float, dy: float) -> R.Camera:
    x, y, z = cam.position
    return R.Camera((x + dx, y + dy, z), cam.yaw_deg, cam.pitch_deg, cam.fov_deg, cam.roll_deg)


@dataclass
class City:
    """A generated, lit city and where it lies on Earth."""

    index: int
    scene: Scene
    light: R.SeasonLight
    lat: float
    lon: float

    def __post_init__(self) -> None:
        #: east/north metres of the scene <-> WGS84, through pyproj (AEQD at the city centre)
        self.frame = LocalFrame(self.lat, self.lon)


def make_city(cfg: SynthConfig, index: int, device: str | torch.device = "cpu") -> City:
    """Generate city ``index`` of the benchmark and its sun."""
    gen = random_stream(cfg.seed, index, CITY_STREAM)
    scene = CityGenerator(cfg.scene, device)(gen)
    u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
    lat, lon = round(-55.0 + 120.0 * u[1], 6), round(-180.0 + 360.0 * u[2], 6)
    return City(index, scene, R.SeasonLight(scene, 100.0 + 160.0 * u[0]), lat, lon)


@dataclass
class RenderedTarget:
    """One location: satellite JPEG, drone view JPEGs, and its metadata."""

    satellite: bytes
    views: list[bytes]
    meta: dict


def satellite_image(cfg: SynthConfig, city: City, target: dict) -> torch.Tensor:
    """The clear summer nadir image ``(3, size, size)`` centred on ``target``."""
    top = city.light.top("summer")
    centre = tuple(target["centre_m"])
    return R.render_satellite(city.scene, top, cfg.size, cfg.satellite_extent_m, centre)


def render_target(cfg: SynthConfig, city: City, slot: int) -> RenderedTarget:
    """Render target ``slot`` of ``city``: its satellite image and its orbit of drone views."""
    target = point_target(cfg, city.scene, city.index, slot) or city.scene.targets[slot]
    cx, cy = target["centre_m"]
    gen = view_stream(cfg.seed, city.index, slot)
    cams = orbit(cfg, target, gen)
    conditions = [draw_conditions(cfg.seasons, cfg.weather, gen) for _ in cams]
    light = city.light
    views = [
        R.View(_shifted(cam, cx, cy), light.top(s), light.sun(s), light.ground(s), w == "night")
        for cam, (s, w) in zip(cams, conditions, strict=True)
    ]
    images = R.render_views(city.scene, views, cfg.size, gen=gen)
    jpegs = [
        encode_jpeg(apply_weather(img, w, generator=gen, depth=depth), cfg.jpeg_quality)
        for (img, depth), (_, w) in zip(images, conditions, strict=True)
    ]
    frame = city.frame
    lat0, lon0 = frame.to_latlon(cx, cy)
    gsd = cfg.satellite_extent_m / cfg.size
    if target.get("kind") == "point":
        described = {"kind": "point", "height_m": 0.0, "aim_enu_m": [0.0, 0.0, 0.0]}
    else:
        x0, x1, y0, y1 = target["footprint_m"]
        c = cfg.size / 2.0
        bbox_px = [round(c + x0 / gsd, 2), round(c - y1 / gsd, 2), round(c + x1 / gsd, 2)]
        bbox_px.append(round(c - y0 / gsd, 2))  # left, top, right, bottom
        bid = target["building_id"]
        described = {
            "kind": "landmark",
            **{k: v for k, v in target.items() if k != "centre_m"},
            "aim_enu_m": [0.0, 0.0, round(0.5 * target["height_m"], 3)],
            "roof_rgb": [round(v, 4) for v in city.scene.roof_rgb[bid].tolist()],
            "satellite_bbox_px": bbox_px,
        }
    meta = {
        "lat": round(lat0, 7),
        "lon": round(lon0, 7),
        "frame": "local east-north-up metres; origin: the target's centre, on the ground",
        "city": {
            "index": city.index,
            "slot": slot,
            "lat": city.lat,
            "lon": city.lon,
            "target_centre_m": target["centre_m"],
        },
        "scene": {"extent_m": city.scene.extent_m, "resolution_m": city.scene.resolution_m},
        "target": described,
        "satellite": {
            "extent_m": cfg.satellite_extent_m,
            "gsd_m": gsd,
            "season": "summer",
            "weather": "clear",
            "north_up": True,
            "sun_azimuth_deg": round(light.azimuth, 3),
            "sun_elevation_deg": R.SUN_ELEVATION["summer"],
        },
        "views": [],
    }
    for i, (cam, (season, weather)) in enumerate(zip(cams, conditions, strict=True)):
        x, y, z = cam.position
        lat, lon = frame.to_latlon(cx + x, cy + y)
        meta["views"].append(
            {
                "file": f"image-{i + 1:02d}.jpeg",
                "altitude_m": round(z, 3),
                "pitch_deg": round(cam.pitch_deg, 4),
                "yaw_deg": round(cam.yaw_deg, 4),
                "roll_deg": cam.roll_deg,
                "fov_deg": cam.fov_deg,
                "camera_enu_m": [round(x, 3), round(y, 3), round(z, 3)],
                "camera_lat": round(lat, 7),
                "camera_lon": round(lon, 7),
                "distance_m": round(math.hypot(x, y), 3),
                "azimuth_deg": round(math.degrees(math.atan2(x, y)) % 360.0, 4),
                "season": season,
                "weather": weather,
            }
        )
    sat = encode_jpeg(satellite_image(cfg, city, target), cfg.jpeg_quality)
    return RenderedTarget(sat, jpegs, meta)


def render_city(
    cfg: SynthConfig, index: int, slots: list[int], device: str = "cpu"
) -> list[RenderedTarget]:
    """Generate city ``index`` and render its targets ``slots`` (one job of a worker)."""
    city = make_city(cfg, index, device)
    return [render_target(cfg, city, slot) for slot in slots]
