"""World mode of ``imlnet synth``: one large georeferenced orthophoto and drone views over it.

This is the localisation product's test bed: the orthophoto is a GeoTIFF in the UTM zone of a
(seeded) place on Earth, north-up, with a geotransform, exactly what an engineer would get from a
mapping agency; the drone views are taken at known poses, so the error of a localisation can be
measured in metres, for the aim point and for the camera itself. The scene's local frame *is*
the UTM grid shifted to the map centre (x = easting - E0, y = northing - N0), so every position
converts to latitude/longitude exactly with pyproj, consistently with the GeoTIFF.

Output::

    OUT/world.tif      RGB orthophoto, EPSG:326xx/327xx, ``gsd_m`` metres per pixel
    OUT/drone/view-0001.jpeg ...            single views at random poses
    OUT/flights/f01/frame-0001.jpeg ...     flights: frames along smooth trajectories
    OUT/truth.csv      one row per image: both truths (aim point and camera pose), TRUTH_COLUMNS
    OUT/metadata.json  CRS, transform, and per view and flight the same numbers, with season
                       and weather
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.city import CityGenerator
from imlnet.data.synthetic.common import (
    DEFAULT_SEASONS,
    DEFAULT_WEATHER,
    draw_conditions,
    encode_jpeg,
    random_stream,
    staging_dir,
)
from imlnet.data.synthetic.flights import FlightConfig, Pose, fly, random_view
from imlnet.data.synthetic.scene import Scene, SceneConfig
from imlnet.data.synthetic.weather import apply_weather
from imlnet.errors import ImlnetError
from imlnet.io import write_json

#: columns of truth.csv, in order. ``lat``/``lon`` repeat the aim point (what ``imlnet localize
#: --truth`` reads); ``flight``/``frame``/``t_s`` are empty for single views.
TRUTH_COLUMNS = (
    "image",
    "flight",
    "frame",
    "t_s",
    "lat",
    "lon",
    "aim_lat",
    "aim_lon",
    "aim_easting",
    "aim_northing",
    "cam_lat",
    "cam_lon",
    "cam_easting",
    "cam_northing",
    "cam_height_m",
    "heading_deg",
    "pitch_deg",
    "roll_deg",
    "fov_deg",
)
RENDER_BATCH = 8  # views cast as one batch of rays


@dataclass
class WorldConfig:
    """Options of the synthetic world (lengths in metres)."""

    extent_m: float = 2000.0  # side of the square map
    gsd_m: float = 0.5  # ground sampling distance of the orthophoto (= scene resolution)
    views: int = 60  # single drone views at random poses over the map
    flights: int = 0  # flights along smooth trajectories
    size: int = 256
    seed: int = 0
    altitude_m: tuple[float, float] = (60.0, 150.0)
    pitch_deg: tuple[float, float] = (40.0, 55.0)
    fov_deg: float = 50.0
    margin_m: float = 250.0  # aim points stay this far from the map edge
    flight: FlightConfig = field(default_factory=FlightConfig)
    seasons: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SEASONS))
    weather: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEATHER))
    jpeg_quality: int = 92

    def validate(self) -> None:
        """Raise :class:`ImlnetError` naming the option that is out of range."""
        if self.extent_m <= 2 * self.margin_m + 50:
            raise ImlnetError(
                f"--world-size-m {self.extent_m} is too small: it must exceed "
                f"twice the {self.margin_m} m margin by at least 50 m"
            )
        if self.gsd_m <= 0 or self.views < 0 or self.flights < 0 or self.views + self.flights < 1:
            raise ImlnetError(
                "--gsd must be positive, --views and --flights not negative, "
                "and at least one view or flight asked for"
            )


def _utm_epsg(lat: float, lon: float) -> int:
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def _render(
    scene: Scene,
    light: R.SeasonLight,
    poses: list[Pose],
    conditions: list[tuple[str, str]],
    cfg: WorldConfig,
    gen: torch.Generator,
) -> list[bytes]:
    """JPEGs of ``poses`` in their conditions, cast in batches of :data:`RENDER_BATCH` views."""
    out = []
    for start in range(0, len(poses), RENDER_BATCH):
        batch = list(zip(poses, conditions, strict=True))[start : start + RENDER_BATCH]
        views = [
            R.View(p.camera, light.top(s), light.sun(s), light.ground(s), w == "night")
            for p, (s, w) in batch
        ]
        images = R.render_views(scene, views, cfg.size, gen=gen)
        for (img, depth), (_, (_, w)) in zip(images, batch, strict=True):
            img = apply_weather(img, w, generator=gen, depth=depth)
            out.append(encode_jpeg(img, cfg.jpeg_quality))
    return out


class _Geo:
    """World frame (metres from the map centre) -> UTM and WGS84."""

    def __init__(self, epsg: int, e0: float, n0: float) -> None:
        from pyproj import Transformer

        self.e0, self.n0 = e0, n0
        self.to_wgs = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)

    def row(self, image: str, pose: Pose, flight: str, frame: str, t_s: str) -> dict:
        """The truth row of one image (both truths), see :data:`TRUTH_COLUMNS`."""
        cam = pose.camera
        ae, an = self.e0 + pose.aim[0], self.n0 + pose.aim[1]
        ce, cn = self.e0 + cam.position[0], self.n0 + cam.position[1]
        alon, alat = self.to_wgs.transform(ae, an)
        clon, clat = self.to_wgs.transform(ce, cn)
        return {
            "image": image,
            "flight": flight,
            "frame": frame,
            "t_s": t_s,
            "lat": round(alat, 8),
            "lon": round(alon, 8),
            "aim_lat": round(alat, 8),
            "aim_lon": round(alon, 8),
            "aim_easting": round(ae, 3),
            "aim_northing": round(an, 3),
            "cam_lat": round(clat, 8),
            "cam_lon": round(clon, 8),
            "cam_easting": round(ce, 3),
            "cam_northing": round(cn, 3),
            "cam_height_m": round(cam.position[2], 3),
            "heading_deg": round(cam.yaw_deg, 4),
            "pitch_deg": round(cam.pitch_deg, 4),
            "roll_deg": round(cam.roll_deg, 4),
            "fov_deg": cam.fov_deg,
        }


def _write_orthophoto(path: Path, top: torch.Tensor, epsg: int, transform) -> None:
    import rasterio

    ortho = (top.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    with rasterio.open(
        path,
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


def generate_world(
    cfg: WorldConfig,
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the world to ``out`` (through a temporary folder renamed at the end)."""
    from pyproj import Transformer
    from rasterio.transform import Affine

    cfg.validate()
    out = Path(out)
    gen = random_stream(cfg.seed, 0, 4)
    lat0 = -50.0 + 110.0 * float(torch.rand((), generator=gen))
    lon0 = -180.0 + 360.0 * float(torch.rand((), generator=gen))
    epsg = _utm_epsg(lat0, lon0)
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    e0, n0 = to_utm.transform(lon0, lat0)
    e0, n0 = round(e0 / cfg.gsd_m) * cfg.gsd_m, round(n0 / cfg.gsd_m) * cfg.gsd_m
    geo = _Geo(epsg, e0, n0)

    scene_cfg = SceneConfig(extent_m=cfg.extent_m, resolution_m=cfg.gsd_m, target_spacing_m=400.0)
    scene = CityGenerator(scene_cfg, device)(gen)
    sun_az = 100.0 + 160.0 * float(torch.rand((), generator=gen))
    light = R.SeasonLight(scene, sun_az)
    half = scene.extent_m / 2
    transform = Affine(cfg.gsd_m, 0.0, e0 - half, 0.0, -cfg.gsd_m, n0 + half)  # north-up
    with staging_dir(out, overwrite) as tmp:
        _write_orthophoto(tmp / "world.tif", light.top("summer"), epsg, transform)
        rows, views, flights = [], [], []
        view_gen = random_stream(cfg.seed, 0, 5)
        poses = [
            random_view(view_gen, half, cfg.margin_m, cfg.altitude_m, cfg.pitch_deg, cfg.fov_deg)
            for _ in range(cfg.views)
        ]
        conditions = [draw_conditions(cfg.seasons, cfg.weather, view_gen) for _ in poses]
        bar = tqdm(total=cfg.views + cfg.flights, desc="imlnet synth --world", disable=not progress)
        if poses:
            (tmp / "drone").mkdir()
        for start in range(0, len(poses), RENDER_BATCH):
            chunk = slice(start, start + RENDER_BATCH)
            jpegs = _render(scene, light, poses[chunk], conditions[chunk], cfg, view_gen)
            for i, (pose, (season, weather), jpeg) in enumerate(
                zip(poses[chunk], conditions[chunk], jpegs, strict=True), start=start
            ):
                name = f"drone/view-{i + 1:04d}.jpeg"
                (tmp / name).write_bytes(jpeg)
                rows.append(geo.row(name, pose, "", "", ""))
                views.append({**rows[-1], "file": name, "season": season, "weather": weather})
            bar.update(len(jpegs))
        for f in range(1, cfg.flights + 1):
            fgen = random_stream(cfg.seed, f, 6)
            track = fly(fgen, half, cfg.margin_m, cfg.flight)
            season, weather = draw_conditions(cfg.seasons, cfg.weather, fgen)  # held per flight
            jpegs = _render(scene, light, track, [(season, weather)] * len(track), cfg, fgen)
            folder = tmp / "flights" / f"f{f:02d}"
            folder.mkdir(parents=True)
            frames = []
            for k, (pose, jpeg) in enumerate(zip(track, jpegs, strict=True), start=1):
                name = f"flights/f{f:02d}/frame-{k:04d}.jpeg"
                (tmp / name).write_bytes(jpeg)
                rows.append(geo.row(name, pose, str(f), str(k), f"{pose.t_s:g}"))
                frames.append({**rows[-1], "file": name})
            flights.append({"flight": f, "season": season, "weather": weather, "frames": frames})
            bar.update(1)
        bar.close()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TRUTH_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (tmp / "truth.csv").write_text(buf.getvalue())
        write_json(
            tmp / "metadata.json",
            {
                "generator": "imlnet synth --world",
                "config": asdict(cfg),
                "crs": f"EPSG:{epsg}",
                "transform": list(transform)[:6],
                "centre_utm": [e0, n0],
                "centre_lat_lon": list(reversed(geo.to_wgs.transform(e0, n0))),
                "orthophoto": "world.tif",
                "truth": "truth.csv: per image the aim point (the optical axis' ground-plane "
                "point, at the image centre) and the camera pose; easting/northing in `crs`",
                "truth_columns": list(TRUTH_COLUMNS),
                "views": views,
                "flights": flights,
            },
        )
    return out
