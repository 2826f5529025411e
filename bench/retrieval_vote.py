"""Does a consensus of overlapping tiles place a view better than its top-1 tile?

The gallery's tiles overlap (180 m every 45 m: about 16 tiles hold any ground point), so a view's
true neighbourhood could gather several of its top-K tiles even when the top-1 is elsewhere.
This reads one ``imlnet localize --k K --verify 0`` output folder (``hits.csv``, ``results.csv``
with truth) and scores, per view, position rules side by side:

- ``top-1``: the best tile's centre; ``localize``: the package's :func:`estimate_position`
  (score-weighted mean of the top-k centres within one tile of the top-1).
- ``vote``: spatial voting. Each of the top-K tiles gets the softmax mass (temperature T) of the
  top-K tiles within r metres of it (``box``) or weighted by a Gaussian of width r (``gauss``);
  the estimate is the score-weighted mean of the tiles within r of the tile of most mass.

It also gives how often a tile within 50 m of the truth is among the top K at all, the ceiling of
any re-ranking of K tiles. Prints a table (best rows by median first) and writes JSON.

    imlnet localize runs/world96/drone --k 100 --verify 0 --no-map --index runs/idx96_demo \\
        --truth runs/world96/truth.csv --checkpoint runs/demo/model --out-dir runs/loc96_k100
    python bench/retrieval_vote.py runs/loc96_k100 --out bench/results/retrieval_vote.json
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np

from imlnet.geo.coords import LocalFrame
from imlnet.geo.localize import estimate_position
from imlnet.geo.refine import accuracy
from imlnet.geo.tables import read_csv
from imlnet.io import write_json


def vote(x: np.ndarray, y: np.ndarray, s: np.ndarray, temp: float, r: float, kernel: str):
    """The vote's estimate (metres) from the top-K centres ``x, y`` and scores ``s``."""
    w = np.exp((s - s.max()) / temp)
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    near = (d <= r).astype(float) if kernel == "box" else np.exp(-0.5 * (d / r) ** 2)
    keep = d[int((near @ w).argmax())] <= r
    return (w[keep] @ x[keep]) / w[keep].sum(), (w[keep] @ y[keep]) / w[keep].sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="an `imlnet localize --verify 0` output folder")
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    ap.add_argument("--temps", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--radii", type=float, nargs="+", default=[45.0, 90.0, 180.0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    hits = defaultdict(list)
    for row in read_csv(args.run / "hits.csv"):
        hits[row["image"]].append(row)
    truth = {r["image"]: (float(r["true_lat"]), float(r["true_lon"])) for r in read_csv(
        args.run / "results.csv") if r.get("true_lat")}  # fmt: skip
    views = sorted(set(hits) & set(truth))
    lat0 = float(np.mean([truth[v][0] for v in views]))
    frame = LocalFrame(lat0, float(np.mean([truth[v][1] for v in views])))
    rules: dict[str, list[float]] = defaultdict(list)
    ceiling = {k: 0 for k in args.ks}
    for v in views:
        rows = sorted(hits[v], key=lambda r: int(r["rank"]))
        lat = np.array([float(r["lat"]) for r in rows])
        lon = np.array([float(r["lon"]) for r in rows])
        s = np.array([float(r["score"]) for r in rows])
        x, y = frame.to_xy(lat, lon)
        tx, ty = frame.to_xy(np.array([truth[v][0]]), np.array([truth[v][1]]))
        d_true = np.hypot(x - tx, y - ty)
        for k in args.ks:
            ceiling[k] += bool((d_true[:k] <= 50).any())
        rules["top-1"].append(float(d_true[0]))
        elat, elon, _ = estimate_position(rows[:5])
        ex, ey = frame.to_xy(np.array([elat]), np.array([elon]))
        rules["localize (top-5)"].append(float(np.hypot(ex - tx, ey - ty)[0]))
        for k, temp, r, kern in itertools.product(
            args.ks, args.temps, args.radii, ("box", "gauss")
        ):
            vx, vy = vote(x[:k], y[:k], s[:k], temp, r, kern)
            rules[f"vote K={k} T={temp:g} r={r:g} {kern}"].append(
                float(np.hypot(vx - tx, vy - ty)[0])
            )
    table = {name: accuracy(errs, len(errs)) for name, errs in rules.items()}
    n = len(views)
    within = {f"top-{k}": round(100 * c / n, 1) for k, c in ceiling.items()}
    print(f"{n} views of {args.run}; a tile within 50 m among the top K: {within}")
    print("| rule | median m | MA@25 | MA@50 | MA@100 |\n|---|---:|---:|---:|---:|")
    fixed = [name for name in table if not name.startswith("vote")]
    best = sorted(
        (nm for nm in table if nm.startswith("vote")), key=lambda nm: table[nm]["median_m"]
    )
    for name in [*fixed, *best[:5], *best[-2:]]:
        t = table[name]
        shares = " | ".join(f"{100 * t[f'MA@{k}m']:.1f}" for k in (25, 50, 100))
        print(f"| {name} | {t['median_m']:.1f} | {shares} |")
    if args.out:
        write_json(args.out, {"run": str(args.run), "views": n, "tile_within_50m": within,
                              "rules": table})  # fmt: skip


if __name__ == "__main__":
    main()
