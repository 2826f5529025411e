"""How many agreeing matches should verify a tile? Right tiles against far ones, per threshold.

For each drone view of a synthetic world (``imlnet synth --world``) the :class:`Verifier` that
``imlnet localize`` uses is given, one at a time, the tile nearest the view's true aim point
(the best retrieval could do) and ``--negatives`` tiles whose centres lie more than 300 m from it
(they cannot hold the view: a window reaches half a tile beyond its 180 m tile). Per setting of
``min_inliers`` (and the fit's inlier threshold) it counts the right tiles that verify within
25 m, those that verify elsewhere, and the far tiles that verify at all, with the inlier counts
of every far tile's best fit: the margin between what chance gives and the threshold. Without
attitude, as the demo runs ``localize``. Prints one line per setting and writes JSON.

    python bench/verify_inliers.py runs/world96 runs/tiles96 --views 48 \\
        --settings 4:12 4:8 --out bench/results/verify_inliers.json
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np

from imlnet.geo.coords import geodesic_m
from imlnet.geo.tables import read_csv
from imlnet.geo.verify import Verifier, VerifyConfig
from imlnet.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="folder written by imlnet synth --world")
    ap.add_argument("tiles", type=Path, help="its tiles from imlnet tile")
    ap.add_argument("--views", type=int, default=48, help="the first N drone views")
    ap.add_argument("--negatives", type=int, default=3, help="far tiles per view")
    ap.add_argument(
        "--settings", nargs="+", default=["4:12", "8:12", "12:12", "4:8", "8:8"],
        help="THRESHOLD_PX:MIN_INLIERS pairs",
    )  # fmt: skip
    ap.add_argument("--fov-deg", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/verify_inliers.json"))
    args = ap.parse_args()

    truth = {r["image"]: r for r in read_csv(args.world / "truth.csv", ("image", "lat", "lon"))}
    rows = read_csv(args.tiles / "tiles.csv")
    lat = np.array([float(r["lat"]) for r in rows])
    lon = np.array([float(r["lon"]) for r in rows])
    names = sorted(k for k in truth if k.startswith("drone/"))[: args.views]
    rng = np.random.default_rng(0)  # the same far tiles for every setting
    pairs = []
    for name in names:
        tl, tn = float(truth[name]["lat"]), float(truth[name]["lon"])
        d = np.hypot((lat - tl) * 111e3, (lon - tn) * 111e3 * np.cos(np.radians(tl)))
        far = rng.choice(np.nonzero(d > 300)[0], args.negatives, replace=False)
        pairs.append((name, (tl, tn), int(np.argmin(d)), [int(j) for j in far]))
    out: dict = {"world": str(args.world), "views": len(names), "settings": {}}
    for setting in args.settings:
        thr, need = float(setting.split(":")[0]), int(setting.split(":")[1])
        cfg = VerifyConfig(k=1, fov_deg=args.fov_deg, threshold_px=thr, min_inliers=need)
        right = right_wrong = far_verified = 0
        far_inliers: Counter[int] = Counter()
        start = time.perf_counter()
        with Verifier(cfg) as verifier:
            for name, true, near, far in pairs:
                for i in (near, *far):
                    res = verifier.verify(args.world / name, [{**rows[i], "rank": 1}], true)
                    if i != near:
                        far_inliers[res.inliers] += 1
                        far_verified += res.verified
                    elif res.verified:
                        ok = geodesic_m(res.lat, res.lon, *true) <= 25.0
                        right, right_wrong = right + ok, right_wrong + (not ok)
        row = {
            "threshold_px": thr,
            "min_inliers": need,
            "right_tile_verified_within_25m": right,
            "right_tile_verified_elsewhere": right_wrong,
            "far_tiles_verified": far_verified,
            "far_tiles": len(pairs) * args.negatives,
            "far_tile_inliers": dict(sorted(far_inliers.items())),
            "seconds": round(time.perf_counter() - start, 1),
        }
        out["settings"][setting] = row
        print(
            f"threshold {thr:g} px, min {need}: right tile verified {right}/{len(pairs)}"
            f" within 25 m"
            f" ({right_wrong} elsewhere); far tiles verified {far_verified}/{row['far_tiles']},"
            f" their inliers {row['far_tile_inliers']}",
            flush=True,
        )
        write_json(args.out, out)


if __name__ == "__main__":
    main()
