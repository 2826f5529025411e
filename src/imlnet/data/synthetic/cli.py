"""``imlnet synth``: the command line of the synthetic benchmark, world and montage writers."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from imlnet.cliargs import add_common, resolve_device
from imlnet.data.synthetic import generate as G
from imlnet.data.synthetic import render as R
from imlnet.data.synthetic import targets as T
from imlnet.data.synthetic.common import DEFAULT_SEASONS, DEFAULT_WEATHER, recover_staging
from imlnet.data.synthetic.scene import SceneConfig
from imlnet.data.synthetic.weather import WEATHERS, apply_weather
from imlnet.io import atomic_path

#: (season, weather) of the drone views in the montage, in orbit order.
MONTAGE_CONDITIONS = (
    ("summer", "clear"),
    ("spring", "haze"),
    ("autumn", "clear"),
    ("autumn", "rain"),
    ("winter", "clear"),
    ("winter", "snow"),
    ("summer", "night"),
    ("spring", "fog"),
    ("summer", "clear"),
)


def make_montage(
    seed: int = 3, size: int = 256, conditions: Sequence[tuple[str, str]] = MONTAGE_CONDITIONS
) -> Image.Image:
    """One location of the benchmark: its satellite image, then one drone view per condition.

    Five tiles per row, each captioned with its season, weather, altitude and pitch.
    """
    cfg = G.SynthConfig(views=len(conditions), size=size, seed=seed)
    city = T.make_city(cfg, 0)
    target, light = city.scene.targets[0], city.light
    tiles = [(T.satellite_image(cfg, city, target), "satellite (nadir, summer)")]
    cams = G.orbit(cfg, target, T.view_stream(seed, 0, 0))
    cx, cy = target["centre_m"]
    for i, (cam, (season, weather)) in enumerate(zip(cams, conditions, strict=True)):
        x, y, z = cam.position
        cam = R.Camera((x + cx, y + cy, z), cam.yaw_deg, cam.pitch_deg, cam.fov_deg)
        img, depth = R.render_drone(
            city.scene, light.top(season), cam, size, light.sun(season), night=weather == "night"
        )
        img = apply_weather(img, weather, generator=torch.Generator().manual_seed(i), depth=depth)
        text = f"{season}, {weather}, {cam.position[2]:.0f} m, {cam.pitch_deg:.0f} deg"
        tiles.append((img, text))
    cols, pad, caption = 5, 4, 16
    rows = -(-len(tiles) // cols)
    canvas = Image.new(
        "RGB", (cols * (size + pad) + pad, rows * (size + caption + pad) + pad), "white"
    )
    pen = ImageDraw.Draw(canvas)
    for k, (img, text) in enumerate(tiles):
        r, c = divmod(k, cols)
        x, y = pad + c * (size + pad), pad + r * (size + caption + pad)
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        canvas.paste(Image.fromarray(arr), (x, y))
        pen.text((x + 2, y + size + 2), text, fill="black")
    return canvas


def _probabilities(text: str, allowed: Sequence[str]) -> dict[str, float]:
    """Parse ``clear=0.5,haze=0.2``."""
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
    """The ``imlnet synth`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="imlnet synth",
        description="Generate the synthetic multi-domain cross-view benchmark "
        "(University-1652 layout + metadata.json), a georeferenced world (--world), "
        "or a picture of one location (--montage).",
    )
    ap.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    ap.add_argument("--locations", type=int, default=40, help="locations with queries (train+test)")
    ap.add_argument("--views", type=int, default=54, help="drone views per location")
    add_common(ap, image_size=256, workers=True, device=True)
    workers = next(a for a in ap._actions if a.dest == "workers" and a.help != argparse.SUPPRESS)
    workers.default = None
    workers.help = "rendering processes (default: one per core for large runs, else 0)"
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
    ap.add_argument(
        "--anywhere",
        type=float,
        default=0.0,
        help="share of locations centred on an arbitrary ground point between the landmarks "
        "(views aimed at the ground there, as a drone photo of a map anywhere) instead of on a "
        "landmark building (default 0: University-1652's kind)",
    )
    ap.add_argument(
        "--city-size-m",
        type=float,
        default=SceneConfig.extent_m,
        help=f"side of each generated city; its targets lie about "
        f"{SceneConfig.target_spacing_m:.0f} m apart (default {SceneConfig.extent_m:.0f})",
    )
    world = ap.add_argument_group("world mode (one georeferenced map + drone views over it)")
    world.add_argument(
        "--world",
        action="store_true",
        help="write a GeoTIFF orthophoto, drone views at known positions, truth.csv",
    )
    world.add_argument("--world-size-m", type=float, default=2000.0, help="side of the map")
    world.add_argument("--gsd", type=float, default=0.5, help="metres per orthophoto pixel")
    world.add_argument(
        "--flights",
        type=int,
        default=0,
        help="also fly N drones along smooth trajectories (frames every 3 s, per-frame truth)",
    )
    ap.add_argument(
        "--montage",
        action="store_true",
        help="write OUT as a JPEG picture of one location (satellite + drone views in "
        "several conditions; docs/synthetic_montage.jpg) instead of a dataset",
    )
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``imlnet synth``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.montage:
        image = make_montage(args.seed, args.image_size)
        with atomic_path(args.out) as tmp:
            image.save(tmp, format="JPEG", quality=90)
        print(f"wrote {args.out}")
        return 0
    seasons, weather = args.seasons or dict(DEFAULT_SEASONS), args.weather or dict(DEFAULT_WEATHER)
    if args.clean:
        seasons, weather = {"summer": 1.0}, {"clear": 1.0}
    device = str(resolve_device(args.device))
    if args.world:
        from imlnet.data.synthetic.world import WorldConfig, generate_world

        wcfg = WorldConfig(
            extent_m=args.world_size_m,
            gsd_m=args.gsd,
            views=args.views,
            flights=args.flights,
            size=args.image_size,
            seed=args.seed,
            seasons=seasons,
            weather=weather,
        )
        out = generate_world(
            wcfg, args.out, device=device, overwrite=args.overwrite, progress=not args.quiet
        )
        print(
            f"wrote {out}: world.tif ({args.world_size_m:.0f} m square at {args.gsd} m/px), "
            f"{args.views} drone views in drone/, {args.flights} flights in flights/, "
            "truth.csv, metadata.json"
        )
        return 0
    cfg = G.SynthConfig(
        locations=args.locations,
        views=args.views,
        size=args.image_size,
        seed=args.seed,
        train_fraction=args.train_fraction,
        distractors=args.distractors,
        jitter=not args.no_jitter,
        anywhere=args.anywhere,
        seasons=seasons,
        weather=weather,
        scene=SceneConfig(extent_m=args.city_size_m),
    )
    recover_staging(Path(args.out))  # what a killed run left beside OUT
    if G.up_to_date(cfg, args.out):
        print(f"{args.out} is already complete for these options: nothing to do")
        return 0
    out = G.generate(
        cfg,
        args.out,
        device=device,
        overwrite=args.overwrite,
        progress=not args.quiet,
        workers=args.workers,
    )
    n_img = (cfg.locations + cfg.n_distractors) * (cfg.views + 1)
    print(
        f"{out}: {cfg.n_train} train, {cfg.n_test} test and {cfg.n_distractors} "
        f"distractor locations, {cfg.views} drone views each ({n_img} images, "
        f"{cfg.size} px); metadata in {os.path.join(out, 'metadata.json')}"
    )
    return 0
