"""Synthetic benchmark generator speed: rendered drone views per second, whole pipeline.

Runs ``imlnet.data.synthetic.generate`` (scene generation, shadows, satellite and drone rendering,
weather, JPEG encoding and writing) into a temporary folder and reports views per second, where
"views" counts every rendered drone view (satellite images are extra). Also reports the render
time of one drone view alone. Prints a Markdown table and writes bench/results/synth_speed.json.

    python bench/synth_speed.py --sizes 256 128 --locations 2 --views 54
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.generate import SynthConfig, generate, orbit
from imlnet.data.synthetic.scene import CityGenerator
from imlnet.io import write_json


def time_render_only(size: int, device: str, repeats: int = 10) -> float:
    """Median seconds to ray-cast one drone view (scene and shading cached)."""
    cfg = SynthConfig(size=size, views=repeats)
    scene = CityGenerator(cfg.scene, device)(torch.Generator().manual_seed(0))
    sun = R.sun_vector(150.0, R.SUN_ELEVATION["summer"])
    top = R.shaded_top(scene, "summer", sun)
    cams = orbit(cfg, scene, torch.Generator().manual_seed(1))
    R.render_drone(scene, top, cams[0], size, sun)  # warm-up
    times = []
    for cam in cams:
        t = time.perf_counter()
        R.render_drone(scene, top, cam, size, sun)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--locations", type=int, default=2)
    ap.add_argument("--views", type=int, default=54)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synth_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        cfg = SynthConfig(locations=args.locations, views=args.views, size=size, distractors=0)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            generate(cfg, Path(tmp) / "synth", device=args.device, progress=False)
            total = time.perf_counter() - t
        views = cfg.locations * cfg.views
        render = time_render_only(size, args.device)
        rows.append(
            {
                "size": size,
                "locations": cfg.locations,
                "views": views,
                "seconds": round(total, 2),
                "views_per_s": round(views / total, 2),
                "render_ms_per_view": round(1000 * render, 1),
            }
        )
    machine = {
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({platform.processor() or 'x86_64'})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"device: {machine['device']}, torch threads: {machine['threads']}")
    print("| size | locations x views | total s | views/s (pipeline) | render ms/view |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['size']} | {r['locations']} x {args.views} | {r['seconds']} | "
            f"{r['views_per_s']} | {r['render_ms_per_view']} |"
        )
    write_json(args.out, {"machine": machine, "rows": rows})
    assert all(math.isfinite(r["views_per_s"]) for r in rows)


if __name__ == "__main__":
    main()
