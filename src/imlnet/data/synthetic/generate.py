"""``imlnet synth``: write the synthetic multi-domain cross-view benchmark to disk.

The output has the University-1652 layout, so the loaders, trainer and evaluator of the real
dataset run on it unchanged::

    OUT/
      train/drone/<id>/image-01.jpeg ... image-VV.jpeg
      train/satellite/<id>/<id>.jpg
      test/query_drone/<id>/...      test/gallery_satellite/<id>/<id>.jpg  (+ distractors)
      test/query_satellite/<id>/...  test/gallery_drone/<id>/...           (+ distractors)
      metadata.json

Each location is a procedural city around a target building (its own seed, so the output does not
depend on the order or the device of rendering). Its satellite image is a clear summer nadir view;
its drone views fly a descending orbit looking at the target (University-1652 flies 54 per
building), each in a season and a weather drawn from configurable probabilities.
Determinism: the same options and seed give byte-identical files (no timestamps anywhere).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.common import (
    DEFAULT_SEASONS,
    DEFAULT_WEATHER,
    drone_view,
    encode_jpeg,
    random_stream,
    staging_dir,
)
from imlnet.data.synthetic.scene import CityGenerator, Scene, SceneConfig
from imlnet.data.synthetic.weather import WEATHERS
from imlnet.errors import ImlnetError
from imlnet.geo.coords import LocalFrame
from imlnet.io import write_json

FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    """Options of the benchmark (see ``imlnet synth --help``)."""

    locations: int = 40  # locations with queries, split between train and test
    views: int = 54  # drone views per location (University-1652: 54)
    size: int = 256  # image side in pixels
    seed: int = 0
    train_fraction: float = 0.5
    distractors: int | None = None  # gallery-only test locations; None = 250/701 of the test set
    satellite_extent_m: float = 180.0  # ground side of the satellite image
    altitude_m: tuple[float, float] = (150.0, 60.0)  # the orbit descends from first to second
    pitch_deg: tuple[float, float] = (52.0, 40.0)  # optical axis below the horizon, high -> low
    turns: float = 2.0  # orbits around the target over all views
    fov_deg: float = 50.0
    jitter: bool = True  # small random yaw/pitch/altitude offsets per view
    seasons: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SEASONS))
    weather: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEATHER))
    jpeg_quality: int = 92
    scene: SceneConfig = field(default_factory=SceneConfig)

    def validate(self) -> None:
        if self.locations < 2:
            raise ImlnetError(
                "--locations must be at least 2 (train and test), got " + str(self.locations)
            )
        if self.views < 1 or self.size < 32 or self.size % 2:
            raise ImlnetError(
                f"--views must be >= 1 and --size an even number >= 32, got "
                f"{self.views} and {self.size}"
            )
        for name, table, allowed in (
            ("seasons", self.seasons, R.SEASONS),
            ("weather", self.weather, WEATHERS),
        ):
            bad = set(table) - set(allowed)
            if bad or not table or min(table.values()) < 0 or sum(table.values()) <= 0:
                raise ImlnetError(
                    f"{name} probabilities {table} must use names from {allowed} "
                    "with non-negative weights that do not all vanish"
                )

    @property
    def n_train(self) -> int:
        return max(1, min(self.locations - 1, round(self.locations * self.train_fraction)))

    @property
    def n_test(self) -> int:
        return self.locations - self.n_train

    @property
    def n_distractors(self) -> int:
        if self.distractors is not None:
            return self.distractors
        return round(self.n_test * 250 / 701)


def orbit(cfg: SynthConfig, scene: Scene, gen: torch.Generator) -> list[R.Camera]:
    """Cameras of a descending orbit looking at the target (aim: half the target's height)."""
    aim_z = 0.5 * scene.target["height_m"]
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


@dataclass
class RenderedLocation:
    satellite: bytes
    views: list[bytes]
    meta: dict


def render_location(
    cfg: SynthConfig, index: int, device: str | torch.device = "cpu"
) -> RenderedLocation:
    """Generate one location's scene, satellite image and drone views (JPEG bytes) + metadata."""
    gen = random_stream(cfg.seed, index, 0)
    scene = CityGenerator(cfg.scene, device)(gen)
    sun_az = 100.0 + 160.0 * float(torch.rand((), generator=gen))
    lat0 = round(-55.0 + 120.0 * float(torch.rand((), generator=gen)), 6)
    lon0 = round(-180.0 + 360.0 * float(torch.rand((), generator=gen)), 6)
    frame = LocalFrame(lat0, lon0)  # east/north metres <-> WGS84 through pyproj
    light = R.SeasonLight(scene, sun_az)
    sat = R.render_satellite(scene, light.top("summer"), cfg.size, cfg.satellite_extent_m)
    gsd = cfg.satellite_extent_m / cfg.size
    x0, x1, y0, y1 = scene.target["footprint_m"]
    c = cfg.size / 2.0
    bbox_px = [
        round(c + x0 / gsd, 2),
        round(c - y1 / gsd, 2),
        round(c + x1 / gsd, 2),
        round(c - y0 / gsd, 2),
    ]  # left, top, right, bottom
    bid = scene.target["building_id"]
    meta = {
        "lat": lat0,
        "lon": lon0,
        "frame": "local east-north-up metres; origin: the target's footprint centre, on the ground",
        "scene": {"extent_m": cfg.scene.extent_m, "resolution_m": cfg.scene.resolution_m},
        "target": {
            **scene.target,
            "aim_enu_m": [0.0, 0.0, round(0.5 * scene.target["height_m"], 3)],
            "roof_rgb": [round(v, 4) for v in scene.roof_rgb[bid].tolist()],
            "satellite_bbox_px": bbox_px,
        },
        "satellite": {
            "extent_m": cfg.satellite_extent_m,
            "gsd_m": gsd,
            "season": "summer",
            "weather": "clear",
            "north_up": True,
            "sun_azimuth_deg": round(sun_az, 3),
            "sun_elevation_deg": R.SUN_ELEVATION["summer"],
        },
        "views": [],
    }
    view_gen = random_stream(cfg.seed, index, 1)
    views = []
    for i, cam in enumerate(orbit(cfg, scene, view_gen)):
        jpeg, season, weather = drone_view(
            scene, light, cam, cfg.size, cfg.seasons, cfg.weather, cfg.jpeg_quality, view_gen
        )
        views.append(jpeg)
        x, y, z = cam.position
        lat, lon = (round(v, 7) for v in frame.to_latlon(x, y))
        meta["views"].append(
            {
                "file": f"image-{i + 1:02d}.jpeg",
                "altitude_m": round(z, 3),
                "pitch_deg": round(cam.pitch_deg, 4),
                "yaw_deg": round(cam.yaw_deg, 4),
                "fov_deg": cam.fov_deg,
                "camera_enu_m": [round(x, 3), round(y, 3), round(z, 3)],
                "camera_lat": lat,
                "camera_lon": lon,
                "distance_m": round(math.hypot(x, y), 3),
                "season": season,
                "weather": weather,
            }
        )
    return RenderedLocation(encode_jpeg(sat, cfg.jpeg_quality), views, meta)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def generate(
    cfg: SynthConfig,
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the benchmark to ``out`` and return its path.

    Everything is written into a temporary sibling folder that is renamed to ``out`` at the end,
    so an interrupted run leaves no half dataset behind (and an existing ``out`` untouched unless
    ``overwrite``).
    """
    cfg.validate()
    out = Path(out)
    total = cfg.locations + cfg.n_distractors
    ids = _location_ids(cfg.seed, total)
    order = torch.randperm(cfg.locations, generator=random_stream(cfg.seed, -1, 2)).tolist()
    split = {i: "train" for i in order[: cfg.n_train]}
    split.update({i: "test" for i in order[cfg.n_train :]})
    split.update({i: "distractor" for i in range(cfg.locations, total)})
    with staging_dir(out, overwrite) as tmp:
        locations = {}
        for index in tqdm(range(total), desc="imlnet synth", unit="location", disable=not progress):
            loc = render_location(cfg, index, device)
            bid, role = ids[index], split[index]
            sat_name = f"{bid}.jpg"
            if role == "train":
                sat_dirs, drone_dirs = ["train/satellite"], ["train/drone"]
            elif role == "test":
                sat_dirs = ["test/gallery_satellite", "test/query_satellite"]
                drone_dirs = ["test/query_drone", "test/gallery_drone"]
            else:
                sat_dirs, drone_dirs = ["test/gallery_satellite"], ["test/gallery_drone"]
            for d in sat_dirs:
                _write(tmp / d / bid / sat_name, loc.satellite)
            for d in drone_dirs:
                for view, data in zip(loc.meta["views"], loc.views, strict=True):
                    _write(tmp / d / bid / view["file"], data)
            loc.meta["satellite"]["file"] = sat_name
            locations[bid] = {"split": role, "index": index, **loc.meta}
        meta = {
            "format_version": FORMAT_VERSION,
            "generator": "imlnet synth",
            "config": _config_dict(cfg),
            "counts": {
                "train": cfg.n_train,
                "test": cfg.n_test,
                "distractors": cfg.n_distractors,
                "views": cfg.views,
            },
            "locations": dict(sorted(locations.items())),
        }
        write_json(tmp / "metadata.json", meta)
    return out


def _location_ids(seed: int, total: int) -> list[str]:
    """Folder names like the real dataset's (``0839``): distinct, shuffled, zero-padded."""
    width = max(4, len(str(total * 4)))
    space = max(10_000, total * 4)
    gen = random_stream(seed, -1, 3)
    picks = torch.randperm(space, generator=gen)[:total].tolist()
    return [f"{p:0{width}d}" for p in picks]


def _config_dict(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["n_train"], d["n_test"], d["n_distractors"] = cfg.n_train, cfg.n_test, cfg.n_distractors
    return d
