"""A picture of one synthetic location: its satellite image and drone views across domains.

python -m imlnet.data.synthetic.montage docs/synthetic_montage.jpg --seed 3
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.generate import SynthConfig, _location_generator, orbit
from imlnet.data.synthetic.scene import CityGenerator
from imlnet.data.synthetic.weather import apply_weather
from imlnet.io import atomic_path

#: (season, weather) of the drone views shown, in orbit order.
CONDITIONS = (
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


def make_montage(seed: int = 3, size: int = 256, conditions=CONDITIONS) -> Image.Image:
    """Satellite image then one drone view per ``(season, weather)``, five tiles per row."""
    cfg = SynthConfig(views=len(conditions), size=size, seed=seed)
    gen = _location_generator(seed, 0, 0)
    scene = CityGenerator(cfg.scene)(gen)
    sun_az = 150.0
    tops = {s: R.shaded_top(scene, s, R.sun_vector(sun_az, R.SUN_ELEVATION[s])) for s in R.SEASONS}
    tiles = [
        (
            R.render_satellite(scene, tops["summer"], size, cfg.satellite_extent_m),
            "satellite (nadir, summer)",
        )
    ]
    cams = orbit(cfg, scene, _location_generator(seed, 0, 1))
    for i, (cam, (season, weather)) in enumerate(zip(cams, conditions, strict=True)):
        sun = R.sun_vector(sun_az, R.SUN_ELEVATION[season])
        img, depth = R.render_drone(scene, tops[season], cam, size, sun, night=weather == "night")
        img = apply_weather(img, weather, generator=torch.Generator().manual_seed(i), depth=depth)
        tiles.append(
            (img, f"{season}, {weather}, {cam.position[2]:.0f} m, {cam.pitch_deg:.0f} deg")
        )
    cols, pad, caption = 5, 4, 16
    rows = -(-len(tiles) // cols)
    canvas = Image.new(
        "RGB", (cols * (size + pad) + pad, rows * (size + caption + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for k, (img, text) in enumerate(tiles):
        r, c = divmod(k, cols)
        x, y = pad + c * (size + pad), pad + r * (size + caption + pad)
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(arr), (x, y))
        draw.text((x + 2, y + size + 2), text, fill="black")
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Montage of one synthetic location.")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    image = make_montage(args.seed, args.size)
    with atomic_path(args.out) as tmp:
        image.save(tmp, quality=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
