"""Single-view localisation from retrieval alone over a synthetic world, for several models.

The demo's world has 24 views, too few to tell two models apart; this one draws more over the
same kind of map (``imlnet synth --world``, views only), tiles it once as the demo does (180 m
every 45 m at the models' size) and runs ``imlnet index`` + ``imlnet localize --verify 0`` per
model, through the users' commands. Prints one line per model and writes JSON.

    python bench/world_eval.py runs/levers/a/export runs/levers/b/export \\
        --world runs/world96 --views 96 --out bench/results/world_eval.json

Columns: median / mean error of the retrieval estimate (score-weighted top-5 centre) and of the
top-1 tile centre, and MA@25/50/100 m of each (share of all views within K m). ``--plot`` draws
the share of views within K m of the top-1 tile against K for each model (``--names`` labels
them), with chance: a tile drawn uniformly from the gallery.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from imlnet.data.synthetic.world import WorldConfig, generate_world
from imlnet.geo import index, localize, tiling
from imlnet.geo.coords import GEOD
from imlnet.geo.tables import read_csv
from imlnet.io import write_json


def _run(command, argv: list[str]) -> None:
    code = command(argv)
    if code:
        raise SystemExit(f"{' '.join(argv[:2])} failed (exit {code})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="exported model folders")
    ap.add_argument("--world", default="runs/world96", help="world folder (made when missing)")
    ap.add_argument("--views", type=int, default=96)
    ap.add_argument("--world-size-m", type=float, default=1000.0)
    ap.add_argument("--seed", type=int, default=1, help="the demo's world is seed 1")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--plot", default=None, help="PNG of the error curves")
    ap.add_argument("--names", nargs="*", default=None, help="one label per model")
    args = ap.parse_args()
    world = Path(args.world)
    if not (world / "truth.csv").is_file():
        cfg = WorldConfig(
            extent_m=args.world_size_m,
            views=args.views,
            flights=0,
            size=256,
            seed=args.seed,
            margin_m=min(250.0, args.world_size_m / 3),
        )
        generate_world(cfg, world, progress=False)
    tiles = world / f"tiles_{args.image_size}"
    if not (tiles / "tiles.csv").is_file():
        _run(
            tiling.main,
            [
                str(world / "world.tif"),
                str(tiles),
                "--tile-size-m",
                "180",
                "--stride-m",
                "45",
                "--image-size",
                str(args.image_size),
                "--quiet",
            ],
        )
    results = {}
    for model in args.models:
        name = str(model)
        work = Path(model).parent / "world_eval"
        common = ["--checkpoint", str(model), "--workers", "0", "--quiet"]
        t = time.perf_counter()
        _run(index.main, [str(tiles), "--out", str(work / "index"), "--overwrite", *common])
        _run(
            localize.main,
            [
                str(world / "drone"),
                "--verify",
                "0",
                "--no-map",
                "--index",
                str(work / "index"),
                "--truth",
                str(world / "truth.csv"),
                "--out-dir",
                str(work / "localise"),
                *common,
            ],
        )
        m = json.loads((work / "localise" / "metrics.json").read_text())
        row = {"seconds": round(time.perf_counter() - t, 1)}
        for est in ("retrieval", "top-1 tile"):
            e = m.get(est) or {}
            row[est] = {k: e.get(k) for k in ("median_m", "mean_m", "MA@25m", "MA@50m", "MA@100m")}
        results[name] = row
        r, t1 = row["retrieval"], row["top-1 tile"]
        print(
            f"{name}: retrieval median {r['median_m']:.1f} m, MA@25/50/100 "
            f"{100 * r['MA@25m']:.0f}/{100 * r['MA@50m']:.0f}/{100 * r['MA@100m']:.0f} %; "
            f"top-1 median {t1['median_m']:.1f} m, MA@25/50/100 {100 * t1['MA@25m']:.0f}/"
            f"{100 * t1['MA@50m']:.0f}/{100 * t1['MA@100m']:.0f} %",
            flush=True,
        )
    if args.out:
        write_json(args.out, {"world": str(world), "views": args.views, "models": results})
    if args.plot:
        names = args.names or [str(m) for m in args.models]
        plot(args.plot, world, tiles, args.models, names)


def _top1_errors(model: str) -> list[float]:
    fixes = Path(model).parent / "world_eval" / "localise" / "fixes.csv"
    return [float(r["top1_error_m"]) for r in read_csv(fixes, ["top1_error_m"])]


def _chance_errors(world: Path, tiles: Path) -> list[float]:
    """Errors of every (view, tile) pair: the top-1 error of a uniformly drawn tile."""
    import numpy as np

    centres = np.array([(float(r["lat"]), float(r["lon"])) for r in read_csv(tiles / "tiles.csv")])
    truths = np.array([(float(r["lat"]), float(r["lon"])) for r in read_csv(world / "truth.csv")])
    t, c = np.repeat(truths, len(centres), 0), np.tile(centres, (len(truths), 1))
    return GEOD.inv(t[:, 1], t[:, 0], c[:, 1], c[:, 0])[2].tolist()


def plot(path: str, world: Path, tiles: Path, models: list[str], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ks = np.arange(0, 601, 5)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    curves = [(n, _top1_errors(m)) for n, m in zip(names, models, strict=True)]
    curves.append(("chance (a random tile)", _chance_errors(world, tiles)))
    for name, errs in curves:
        e = np.sort(np.asarray(errs))
        share = np.searchsorted(e, ks, side="right") / len(e)
        style = {"color": "grey", "linestyle": "--"} if name.startswith("chance") else {}
        ax.plot(ks, 100 * share, label=name, **style)
    ax.axvline(50, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("K: distance from the view's aim point to the top-1 tile centre (m)")
    ax.set_ylabel("views within K m (%)")
    ax.set_title(f"single-view retrieval over the world ({len(curves[0][1])} views, {world.name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
