"""One-pass indexing from a raster at 1x, 10x and 100x the demo world's area: memory and speed.

Builds GeoTIFFs whose side is sqrt(F) times the demo world's (``runs/demo/world/world.tif``,
1 km at 0.5 m: the orthophoto repeated, mirrored at every other copy so the seams match; tiled,
DEFLATE-compressed, with overviews as an operator's orthophoto would have), then runs

    imlnet index BIG.tif --tile-size-m 180 --stride-m 45 --checkpoint runs/demo/model ...

(the demo's tiling) in a subprocess per map and records its peak resident memory
(``getrusage(RUSAGE_CHILDREN)``), wall time and tiles per second; the same for ``--onnx``.
Peak memory of the embedding pass should not grow with the map; the gallery (a flat index of
512-d float32 and the metadata rows) does, by design, and is reported beside it.

    python bench/raster_index_scale.py [--factors 1 10 100] [--runtime torch onnx]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from imlnet.io import write_json

REPO = Path(__file__).resolve().parents[1]


def make_map(world: Path, factor: float, out: Path) -> tuple[int, float]:
    """A raster ``sqrt(factor)`` times the world's side, written block by block."""
    with rasterio.open(world) as src:
        base = src.read()
        profile = src.profile
        transform = src.transform
    _, h, w = base.shape
    side = round(w * math.sqrt(factor))
    tiles = {
        (fy, fx): np.ascontiguousarray(base[:, :: -1 if fy else 1, :: -1 if fx else 1])
        for fy in (0, 1)
        for fx in (0, 1)
    }
    profile.update(
        width=side, height=side, tiled=True, blockxsize=512, blockysize=512,
        compress="deflate", predictor=2, BIGTIFF="IF_SAFER",
    )  # fmt: skip
    profile["transform"] = transform
    block = 2048
    with rasterio.open(out, "w", **profile) as dst:
        for r0 in range(0, side, block):
            for c0 in range(0, side, block):
                hh, ww = min(block, side - r0), min(block, side - c0)
                rows = np.arange(r0, r0 + hh)
                cols = np.arange(c0, c0 + ww)
                ry, rx = rows // h, cols // w
                iy, ix = rows % h, cols % w
                data = np.empty((base.shape[0], hh, ww), base.dtype)
                for fy in (0, 1):
                    for fx in (0, 1):
                        ys = np.where(ry % 2 == fy)[0]
                        xs = np.where(rx % 2 == fx)[0]
                        if len(ys) and len(xs):
                            data[:, ys[:, None], xs[None, :]] = tiles[(fy, fx)][
                                :, iy[ys][:, None], ix[xs][None, :]
                            ]
                dst.write(data, window=Window(c0, r0, ww, hh))
        dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return side, out.stat().st_size / 1e6


_LAUNCHER = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(p.returncode)"
)


def run_index(args: list[str]) -> dict:
    """Run ``args`` under a fresh launcher process, whose only child it is: the launcher's
    RUSAGE_CHILDREN peak is that run's peak resident memory."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    lines = proc.stdout.splitlines()
    peak_kb = int(next(x for x in lines if x.startswith("PEAK_KB")).split()[1])
    report = [x for x in lines if x.startswith("gallery ")][-1]
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024, 1), "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--factors", type=float, nargs="+", default=[1, 10, 100])
    ap.add_argument("--runtime", nargs="+", default=["torch", "onnx"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "raster_index.json")
    args = ap.parse_args()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
        tmp = Path(tmp)
        onnx = tmp / "model.onnx"
        if "onnx" in args.runtime:
            subprocess.run(
                [sys.executable, "-m", "imlnet", "export", str(args.demo / "model"), "--onnx",
                 str(onnx)], check=True, capture_output=True,
            )  # fmt: skip
        for factor in args.factors:
            t = time.perf_counter()
            big = tmp / f"map-{factor:g}x.tif"
            side, mb = make_map(args.demo / "world" / "world.tif", factor, big)
            made = time.perf_counter() - t
            print(f"{factor:g}x: {side} x {side} px ({side * 0.5 / 1000:.2f} km a side), "
                  f"{mb:.0f} MB on disk, made in {made:.0f} s", flush=True)  # fmt: skip
            for runtime in args.runtime:
                model = ["--onnx", str(onnx)] if runtime == "onnx" else [
                    "--checkpoint", str(args.demo / "model")]  # fmt: skip
                gallery = tmp / f"gallery-{factor:g}x-{runtime}"
                cmd = [sys.executable, "-m", "imlnet", "index", str(big), "--tile-size-m",
                       "180", "--stride-m", "45", "--out", str(gallery), "--quiet",
                       "--threads", str(args.threads), "--allow-large", *model]  # fmt: skip
                env_threads = {"OMP_NUM_THREADS": str(args.threads)}
                os.environ.update(env_threads)
                result = run_index(cmd)
                tiles = int(result["report"].split(":")[1].split()[0])
                index_mb = (gallery / "index.faiss").stat().st_size / 1e6
                meta_mb = (gallery / "metadata.csv").stat().st_size / 1e6
                row = {
                    "factor": factor, "side_px": side, "area_km2": round((side * 0.5e-3) ** 2, 2),
                    "raster_mb": round(mb, 1), "runtime": runtime, "tiles": tiles,
                    "tiles_per_s": round(tiles / result["wall_s"], 1),
                    "index_mb": round(index_mb, 1), "metadata_mb": round(meta_mb, 1), **result,
                }  # fmt: skip
                rows.append(row)
                print(row, flush=True)
                import shutil

                shutil.rmtree(gallery)
            big.unlink()
    report = {
        "command": "python bench/raster_index_scale.py " + " ".join(sys.argv[1:]),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
