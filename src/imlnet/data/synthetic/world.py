"""World mode of ``imlnet synth``: one large georeferenced orthophoto and drone views over it.

This is the localisation product's test bed: the orthophoto is a GeoTIFF in the UTM zone of a
(seeded) place on Earth, north-up, with a geotransform, exactly what an engineer would get from a
mapping agency; the drone views are taken at known positions, so the error of a localisation can
be measured in metres. The scene's local frame *is* the UTM grid shifted to the map centre
(x = easting - E0, y = northing - N0), so every position converts to latitude/longitude exactly
with pyproj, consistently with the GeoTIFF.

Output::

    OUT/world.tif      RGB orthophoto, EPSG:326xx/327xx, ``gsd_m`` metres per pixel
    OUT/drone/view-0001.jpeg ...
    OUT/truth.csv      image,lat,lon of the ground point each view looks at (its centre)
    OUT/metadata.json  CRS, transform, and per view: camera position (UTM, lat/lon), altitude,
                       pitch, yaw, field of view, aim point, season and weather
"""

from __future__ import annotations

import csv
import io
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
    random_stream,
    staging_dir,
)
from imlnet.data.synthetic.scene import CityGenerator, SceneConfig
from imlnet.errors import ImlnetError
from imlnet.io import write_json


@dataclass
class WorldConfig:
    """Options of the synthetic world (lengths in metres)."""

    extent_m: float = 2000.0  # side of the square map
    gsd_m: float = 0.5  # ground sampling distance of the orthophoto (= scene resolution)
    views: int = 60  # drone views at random positions over the map
    size: int = 256
    seed: int = 0
    altitude_m: tuple[float, float] = (60.0, 150.0)
    pitch_deg: tuple[float, float] = (40.0, 55.0)
    fov_deg: float = 50.0
    margin_m: float = 250.0  # aim points stay this far from the map edge
    seasons: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SEASONS))
    weather: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEATHER))
    jpeg_quality: int = 92

    def validate(self) -> None:
        if self.extent_m <= 2 * self.margin_m + 50:
            raise ImlnetError(
                f"--world-size-m {self.extent_m} is too small: it must exceed "
                f"twice the {self.margin_m} m margin by at least 50 m"
            )
        if self.gsd_m <= 0 or self.views < 1:
            raise ImlnetError("--gsd must be positive and --views at least 1")


def _utm_epsg(lat: float, lon: float) -> int:
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def generate_world(
    cfg: WorldConfig,
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the world to ``out`` (through a temporary folder renamed at the end)."""
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import Affine

    cfg.validate()
    out = Path(out)
    gen = random_stream(cfg.seed, 0, 4)
    lat0 = -50.0 + 110.0 * float(torch.rand((), generator=gen))
    lon0 = -180.0 + 360.0 * float(torch.rand((), generator=gen))
    epsg = _utm_epsg(lat0, lon0)
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    to_wgs = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    e0, n0 = to_utm.transform(lon0, lat0)
    e0, n0 = round(e0 / cfg.gsd_m) * cfg.gsd_m, round(n0 / cfg.gsd_m) * cfg.gsd_m

    scene_cfg = SceneConfig(extent_m=cfg.extent_m, resolution_m=cfg.gsd_m)
    scene = CityGenerator(scene_cfg, device)(gen)
    sun_az = 100.0 + 160.0 * float(torch.rand((), generator=gen))
    light = R.SeasonLight(scene, sun_az)

    half = cfg.extent_m / 2
    transform = Affine(cfg.gsd_m, 0.0, e0 - half, 0.0, -cfg.gsd_m, n0 + half)  # north-up
    with staging_dir(out, overwrite) as tmp:
        ortho = (light.top("summer").clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        with rasterio.open(
            tmp / "world.tif",
            "w",
            driver="GTiff",
            width=ortho.shape[2],
            height=ortho.shape[1],
            count=3,
            dtype="uint8",
            crs=f"EPSG:{epsg}",
            transform=transform,
            compress="deflate",
            tiled=True,
            photometric="RGB",
        ) as dst:
            dst.write(ortho)
        (tmp / "drone").mkdir()
        views, truth = [], []
        view_gen = random_stream(cfg.seed, 0, 5)
        lo, hi = -half + cfg.margin_m, half - cfg.margin_m
        for i in tqdm(
            range(cfg.views), desc="imlnet synth --world", unit="view", disable=not progress
        ):
            u = torch.rand(5, generator=view_gen).tolist()
            ax, ay = lo + (hi - lo) * u[0], lo + (hi - lo) * u[1]
            alt = cfg.altitude_m[0] + (cfg.altitude_m[1] - cfg.altitude_m[0]) * u[2]
            pitch = cfg.pitch_deg[0] + (cfg.pitch_deg[1] - cfg.pitch_deg[0]) * u[3]
            yaw = 360.0 * u[4]
            dist = alt / math.tan(math.radians(pitch))
            cx = ax - dist * math.sin(math.radians(yaw))
            cy = ay - dist * math.cos(math.radians(yaw))
            cam = R.Camera((cx, cy, alt), yaw, pitch, cfg.fov_deg)
            jpeg, season, weather = drone_view(
                scene, light, cam, cfg.size, cfg.seasons, cfg.weather, cfg.jpeg_quality, view_gen
            )
            name = f"view-{i + 1:04d}.jpeg"
            (tmp / "drone" / name).write_bytes(jpeg)
            alon, alat = to_wgs.transform(e0 + ax, n0 + ay)
            clon, clat = to_wgs.transform(e0 + cx, n0 + cy)
            truth.append((f"drone/{name}", round(alat, 8), round(alon, 8)))
            views.append(
                {
                    "file": f"drone/{name}",
                    "aim_utm": [round(e0 + ax, 3), round(n0 + ay, 3)],
                    "aim_lat": round(alat, 8),
                    "aim_lon": round(alon, 8),
                    "camera_utm": [round(e0 + cx, 3), round(n0 + cy, 3)],
                    "camera_lat": round(clat, 8),
                    "camera_lon": round(clon, 8),
                    "altitude_m": round(alt, 3),
                    "pitch_deg": round(pitch, 4),
                    "yaw_deg": round(yaw, 4),
                    "fov_deg": cfg.fov_deg,
                    "season": season,
                    "weather": weather,
                }
            )
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "lat", "lon"])
        writer.writerows(truth)
        (tmp / "truth.csv").write_text(buf.getvalue())
        write_json(
            tmp / "metadata.json",
            {
                "generator": "imlnet synth --world",
                "config": asdict(cfg),
                "crs": f"EPSG:{epsg}",
                "transform": list(transform)[:6],
                "centre_utm": [e0, n0],
                "centre_lat_lon": list(reversed(to_wgs.transform(e0, n0))),
                "orthophoto": "world.tif",
                "truth": "truth.csv (aim point = the ground point at the centre of each view)",
                "views": views,
            },
        )
    return out
