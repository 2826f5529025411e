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

import argparse
import contextlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.scene import CityGenerator, Scene, SceneConfig
from imlnet.data.synthetic.weather import WEATHERS, apply_weather
from imlnet.errors import ImlnetError
from imlnet.io import write_json

FORMAT_VERSION = 1
DEFAULT_WEATHER = {
    "clear": 0.5,
    "haze": 0.15,
    "fog": 0.07,
    "rain": 0.12,
    "snow": 0.06,
    "night": 0.10,
}
DEFAULT_SEASONS = {"spring": 0.25, "summer": 0.25, "autumn": 0.25, "winter": 0.25}
METRES_PER_DEGREE = 111_320.0  # local east/north metres -> degrees (spherical, < 1 km offsets)


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


def _location_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """Independent random stream per (seed, location, purpose), whatever the rendering order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 16 + stream)


def _draw(table: dict[str, float], gen: torch.Generator) -> str:
    names = list(table)
    weights = torch.tensor([table[n] for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(weights, 1, generator=gen))]


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


def _jpeg(img: torch.Tensor, quality: int) -> bytes:
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _latlon(lat0: float, lon0: float, x: float, y: float) -> tuple[float, float]:
    lat = lat0 + y / METRES_PER_DEGREE
    lon = lon0 + x / (METRES_PER_DEGREE * math.cos(math.radians(lat0)))
    return round(lat, 7), round(lon, 7)


@dataclass
class RenderedLocation:
    satellite: bytes
    views: list[bytes]
    meta: dict


def render_location(
    cfg: SynthConfig, index: int, device: str | torch.device = "cpu"
) -> RenderedLocation:
    """Generate one location's scene, satellite image and drone views (JPEG bytes) + metadata."""
    gen = _location_generator(cfg.seed, index, 0)
    scene = CityGenerator(cfg.scene, device)(gen)
    sun_az = 100.0 + 160.0 * float(torch.rand((), generator=gen))
    lat0 = round(-55.0 + 120.0 * float(torch.rand((), generator=gen)), 6)
    lon0 = round(-180.0 + 360.0 * float(torch.rand((), generator=gen)), 6)
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
    view_gen = _location_generator(cfg.seed, index, 1)
    views = []
    for i, cam in enumerate(orbit(cfg, scene, view_gen)):
        jpeg, season, weather = drone_view(
            scene, light, cam, cfg.size, cfg.seasons, cfg.weather, cfg.jpeg_quality, view_gen
        )
        views.append(jpeg)
        x, y, z = cam.position
        lat, lon = _latlon(lat0, lon0, x, y)
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
    return RenderedLocation(_jpeg(sat, cfg.jpeg_quality), views, meta)


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` that replaces ``out`` when the block succeeds.

    An interrupted run leaves no half dataset behind, and an existing ``out`` untouched (it is
    refused unless ``overwrite``).
    """
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ImlnetError(
            f"{out} exists and is not empty; choose another folder or pass "
            "--overwrite to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def draw_conditions(
    seasons: dict[str, float], weather: dict[str, float], gen: torch.Generator
) -> tuple[str, str]:
    """A (season, weather) pair; falling snow outside winter becomes rain (or clear)."""
    season, sky = _draw(seasons, gen), _draw(weather, gen)
    if sky == "snow" and season != "winter":
        sky = "rain" if weather.get("rain", 0) > 0 else "clear"
    return season, sky


def drone_view(
    scene: Scene,
    light: R.SeasonLight,
    cam: R.Camera,
    size: int,
    seasons: dict[str, float],
    weather: dict[str, float],
    jpeg_quality: int,
    gen: torch.Generator,
) -> tuple[bytes, str, str]:
    """One drone photo from ``cam`` in a drawn season and weather: (JPEG, season, weather)."""
    season, sky = draw_conditions(seasons, weather, gen)
    img, depth = R.render_drone(
        scene, light.top(season), cam, size, light.sun(season), night=sky == "night", gen=gen
    )
    img = apply_weather(img, sky, generator=gen, depth=depth)
    return _jpeg(img, jpeg_quality), season, sky


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
    order = torch.randperm(cfg.locations, generator=_location_generator(cfg.seed, -1, 2)).tolist()
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
    gen = _location_generator(seed, -1, 3)
    picks = torch.randperm(space, generator=gen)[:total].tolist()
    return [f"{p:0{width}d}" for p in picks]


def _config_dict(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["n_train"], d["n_test"], d["n_distractors"] = cfg.n_train, cfg.n_test, cfg.n_distractors
    return d


def _probabilities(text: str, allowed: Sequence[str]) -> dict[str, float]:
    """Parse ``clear=0.5,haze=0.2`` (or ``clean``)."""
    table = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in allowed or not value:
            raise argparse.ArgumentTypeError(
                f"expected NAME=WEIGHT pairs with NAME in {', '.join(allowed)}, got {part!r}"
            )
        table[name] = float(value)
    return table


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="imlnet synth",
        description="Generate the synthetic multi-domain cross-view benchmark "
        "(University-1652 layout + metadata.json).",
    )
    ap.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    ap.add_argument("--locations", type=int, default=40, help="locations with queries (train+test)")
    ap.add_argument("--views", type=int, default=54, help="drone views per location")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-fraction", type=float, default=0.5)
    ap.add_argument(
        "--distractors",
        type=int,
        default=None,
        help="gallery-only test locations (default: 250/701 of the test locations)",
    )
    ap.add_argument(
        "--seasons",
        type=lambda s: _probabilities(s, R.SEASONS),
        default=None,
        help="season weights, e.g. summer=1 or spring=1,winter=2 (default: uniform)",
    )
    ap.add_argument(
        "--weather",
        type=lambda s: _probabilities(s, WEATHERS),
        default=None,
        help="weather weights, e.g. clear=0.5,haze=0.2,fog=0.1,rain=0.1,night=0.1",
    )
    ap.add_argument(
        "--clean",
        action="store_true",
        help="every view in clear summer weather (the single-domain setting)",
    )
    ap.add_argument("--no-jitter", action="store_true", help="exact orbit, no random offsets")
    world = ap.add_argument_group("world mode (one georeferenced map + drone views over it)")
    world.add_argument(
        "--world",
        action="store_true",
        help="write a GeoTIFF orthophoto, drone views at known positions, truth.csv",
    )
    world.add_argument("--world-size-m", type=float, default=2000.0, help="side of the map")
    world.add_argument("--gsd", type=float, default=0.5, help="metres per orthophoto pixel")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seasons, weather = args.seasons or dict(DEFAULT_SEASONS), args.weather or dict(DEFAULT_WEATHER)
    if args.clean:
        seasons, weather = {"summer": 1.0}, {"clear": 1.0}
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.world:
        from imlnet.data.synthetic.world import WorldConfig, generate_world

        wcfg = WorldConfig(
            extent_m=args.world_size_m,
            gsd_m=args.gsd,
            views=args.views,
            size=args.size,
            seed=args.seed,
            seasons=seasons,
            weather=weather,
        )
        out = generate_world(
            wcfg, args.out, device=device, overwrite=args.overwrite, progress=not args.quiet
        )
        print(
            f"wrote {out}: world.tif ({args.world_size_m:.0f} m square at {args.gsd} m/px), "
            f"{args.views} drone views in drone/, truth.csv, metadata.json"
        )
        return 0
    cfg = SynthConfig(
        locations=args.locations,
        views=args.views,
        size=args.size,
        seed=args.seed,
        train_fraction=args.train_fraction,
        distractors=args.distractors,
        jitter=not args.no_jitter,
        seasons=seasons,
        weather=weather,
    )
    out = generate(cfg, args.out, device=device, overwrite=args.overwrite, progress=not args.quiet)
    n_img = (cfg.locations + cfg.n_distractors) * (cfg.views + 1)
    print(
        f"wrote {out}: {cfg.n_train} train, {cfg.n_test} test and {cfg.n_distractors} "
        f"distractor locations, {cfg.views} drone views each ({n_img} rendered images, "
        f"{cfg.size} px); metadata in {out / 'metadata.json'}"
    )
    return 0
