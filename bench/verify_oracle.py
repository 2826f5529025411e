"""Verification and pose with retrieval taken out: each image is given its right tile.

``imlnet localize`` can only verify a place that retrieval put in its top K, so with a weak
model the verification rows of its metrics measure the model as much as the geometry. Here
every image of a synthetic world (``imlnet synth --world``) is matched against the gallery tile
whose centre is nearest its true aim point (the best retrieval could do), through the same
:class:`imlnet.geo.verify.Verifier` that ``localize`` uses: the share that verifies, the
aim-point and camera errors (MA@K, median) and the seconds per image, without and with the
attitude (the truth file as a perfect IMU). Prints a Markdown table and writes a JSON file.

    python bench/verify_oracle.py WORLD TILES [--images drone] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from imlnet.geo.coords import geodesic_m
from imlnet.geo.pose import read_attitude
from imlnet.geo.refine import MA_THRESHOLDS_M, accuracy, read_camera_truth
from imlnet.geo.tables import read_csv
from imlnet.geo.verify import Verifier, VerifyConfig
from imlnet.io import write_json


def _seasons(world: Path) -> dict[str, str]:
    """Image (as truth.csv names it) -> season, from the world's metadata.json."""
    meta = json.loads((world / "metadata.json").read_text())
    out = {v["file"]: v["season"] for v in meta.get("views", [])}
    for flight in meta.get("flights", []):
        out.update({frame["file"]: flight["season"] for frame in flight.get("frames", [])})
    return out


def run(world: Path, tiles: Path, images: str, fov_deg: float, attitude: bool) -> dict[str, Any]:
    """Verify every image under ``world/images`` against its nearest tile."""
    truth = {r["image"]: r for r in read_csv(world / "truth.csv", ("image", "lat", "lon"))}
    cams = read_camera_truth(world / "truth.csv")
    att = read_attitude(world / "truth.csv") if attitude else {}
    rows = read_csv(tiles / "tiles.csv")
    lat = np.array([float(r["lat"]) for r in rows])
    lon = np.array([float(r["lon"]) for r in rows])
    verifier = Verifier(VerifyConfig(k=1, fov_deg=fov_deg))
    aim_err, cam_err, seconds, wrong = [], [], [], 0
    by_season: dict[str, list[int]] = {}  # season -> [verified, images]
    season = _seasons(world)
    names = sorted(k for k in truth if k.startswith(images.rstrip("/") + "/"))
    for name in names:
        t = truth[name]
        tl, tn = float(t["lat"]), float(t["lon"])
        near = int(np.argmin((lat - tl) ** 2 + ((lon - tn) * np.cos(np.radians(tl))) ** 2))
        hit = {**rows[near], "rank": 1, "source": rows[near]["source"]}
        start = time.perf_counter()
        res = verifier.verify(world / name, [hit], (tl, tn), attitude=att.get(name))
        seconds.append(time.perf_counter() - start)
        aim_err.append(geodesic_m(res.lat, res.lon, tl, tn) if res.verified else None)
        wrong += aim_err[-1] is not None and aim_err[-1] > 25.0
        tally = by_season.setdefault(season.get(name, "?"), [0, 0])
        tally[0] += res.verified
        tally[1] += 1
        cam = cams.get(name)
        ok = res.verified and cam is not None and res.camera_lat is not None
        cam_err.append(geodesic_m(res.camera_lat, res.camera_lon, *cam[:2]) if ok else None)  # type: ignore[arg-type]
    verifier.close()
    return {
        "images": len(names),
        "verified": sum(e is not None for e in aim_err),
        "verified_wrong_25m": wrong,
        "verified_by_season": {k: f"{v}/{n}" for k, (v, n) in sorted(by_season.items())},
        "aim": accuracy(aim_err, len(names)),
        "camera": accuracy(cam_err, len(names)),
        "seconds_per_image": float(np.mean(seconds)) if seconds else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="folder written by imlnet synth --world")
    ap.add_argument("tiles", type=Path, help="its tiles from imlnet tile")
    ap.add_argument("--images", default="drone", help="subfolder: drone or flights")
    ap.add_argument("--fov-deg", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/verify_oracle.json"))
    args = ap.parse_args()
    out = {}
    for attitude in (False, True):
        key = "with attitude" if attitude else "without attitude"
        out[key] = run(args.world, args.tiles, args.images, args.fov_deg, attitude)
    head = " | ".join(f"MA@{k} m" for k in MA_THRESHOLDS_M)
    print(f"| right tile given | verified | estimate | {head} | median m | s/image |")
    print("|---|---:|---|" + "---:|" * (len(MA_THRESHOLDS_M) + 2))
    for key, r in out.items():
        for what in ("aim", "camera"):
            m = r[what]
            shares = " | ".join(f"{100 * m[f'MA@{k}m']:.0f} %" for k in MA_THRESHOLDS_M)
            med = f"{m['median_m']:.1f}" if m["median_m"] is not None else "-"
            print(
                f"| {key} | {r['verified']}/{r['images']} | {what} | {shares} | {med} "
                f"| {r['seconds_per_image']:.2f} |"
            )
    write_json(args.out, out)


if __name__ == "__main__":
    main()
