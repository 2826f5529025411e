"""The map of a localisation run (PNG): orthophoto, truths, estimates, errors, tiles, tracks.

The background is the orthophoto behind the gallery (the source raster of the first query's
top-1 tile), cropped to everything drawn plus a margin and decimated to at most ``max_px`` on a
side; the axes are the raster's CRS coordinates (metres east/north for a projected CRS). The
raster is drawn axis-aligned: a rotated geotransform is not supported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.windows import Window, from_bounds
from rasterio.windows import bounds as window_bounds

from imlnet.errors import GeoError
from imlnet.geo.coords import WGS84, as_crs
from imlnet.geo.refine import Fix
from imlnet.geo.tables import parse_footprint
from imlnet.geo.track import PLACED
from imlnet.io import atomic_path


def _latlon_points(fixes: Sequence[Fix], results: Sequence[Any]) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    for f in fixes:
        pts += [(f.aim_lat, f.aim_lon), (f.retrieval_lat, f.retrieval_lon)]
        if f.true_lat is not None and f.true_lon is not None:
            pts.append((f.true_lat, f.true_lon))
        if f.camera is not None:
            pts.append(f.camera)
        if f.true_camera is not None:
            pts.append(f.true_camera[:2])
        if f.track is not None and math.isfinite(f.track.lat):
            pts.append((f.track.lat, f.track.lon))
    for r in results:
        pts += [(float(h["lat"]), float(h["lon"])) for h in r.hits]
    return [p for p in pts if all(math.isfinite(v) for v in p)]


def draw_map(
    fixes: Sequence[Fix],
    results: Sequence[Any],
    out: str | Path,
    *,
    margin_m: float = 60.0,
    max_px: int = 1400,
    max_footprints: int = 200,
) -> Path:
    """Draw the run's map to ``out`` (PNG, written atomically) and return its path.

    Args:
        fixes: refined queries (:func:`imlnet.geo.refine.refine`).
        results: the retrieval results (their hits give the top-k footprints).
        out: the PNG path.
        margin_m: map margin around everything drawn, in CRS units.
        max_px: longest side of the background image.
        max_footprints: draw at most this many tile footprints (the first queries' top-k).

    Raises:
        GeoError: the orthophoto cannot be opened.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    source = str(results[0].hits[0].get("source") or "") if results and results[0].hits else ""
    if not source:
        raise GeoError("no source raster recorded in the gallery; use --no-map")
    try:
        ds = rasterio.open(source)
    except rasterio.errors.RasterioIOError as err:
        raise GeoError(
            f"{source}: cannot open the orthophoto for the map ({err}); use --no-map"
        ) from err
    with ds:
        crs = as_crs(ds.crs)
        fwd = Transformer.from_crs(WGS84, crs, always_xy=True)

        def xy(pts: Sequence[tuple[float, float]]) -> np.ndarray:
            if not pts:
                return np.empty((0, 2))
            lat, lon = np.array(pts, float).T
            x, y = fwd.transform(lon, lat)
            return np.c_[x, y]

        every = xy(_latlon_points(fixes, results))
        lo, hi = every.min(0) - margin_m, every.max(0) + margin_m
        win = from_bounds(lo[0], lo[1], hi[0], hi[1], ds.transform).round_offsets().round_lengths()
        win = win.intersection(Window(0, 0, ds.width, ds.height))
        step = max(1, math.ceil(max(win.width, win.height) / max_px))
        shape = (max(int(win.height) // step, 1), max(int(win.width) // step, 1))
        bands = [1, 2, 3] if ds.count >= 3 else [1]
        img = ds.read(bands, window=win, out_shape=(len(bands), *shape))
        left, bottom, right, top = window_bounds(win, ds.transform)
    img = np.moveaxis(img, 0, -1)
    if img.dtype != np.uint8:
        lo_v, hi_v = np.percentile(img, (2, 98))
        img = np.clip((img - lo_v) / max(hi_v - lo_v, 1e-9), 0, 1)
    aspect = shape[0] / max(shape[1], 1)
    fig, ax = plt.subplots(figsize=(11.5, max(4.0, 8.5 * aspect)), dpi=110)
    ax.imshow(
        img.squeeze(), extent=(left, right, bottom, top), cmap="gray", interpolation="bilinear"
    )

    drawn = 0
    for r in results:
        for h in r.hits:
            ring = parse_footprint(str(h.get("footprint") or ""), where=f"tile {h.get('path')}")
            if ring is None or drawn >= max_footprints:
                continue
            poly = xy([(lat, lon) for lon, lat in ring])
            ax.plot(poly[:, 0], poly[:, 1], color="gold", lw=0.5, alpha=0.5, zorder=1)
            drawn += 1
    style = {"ms": 6, "ls": "none", "zorder": 4, "mec": "black", "mew": 0.5}
    truth = [f for f in fixes if f.true_lat is not None]
    aims = xy([(f.aim_lat, f.aim_lon) for f in fixes])
    for f, (ax_x, ax_y) in zip(fixes, aims, strict=True):
        if f.true_lat is not None:
            ((tx, ty),) = xy([(f.true_lat, f.true_lon)])
            ax.plot([ax_x, tx], [ax_y, ty], color="red", lw=0.8, zorder=3)
        if f.camera is not None and f.true_camera is not None:
            (cx, cy), (tx, ty) = xy([f.camera, f.true_camera[:2]])
            ax.plot([cx, tx], [cy, ty], color="red", lw=0.8, ls="--", zorder=3)
    ret = xy([(f.retrieval_lat, f.retrieval_lon) for f in fixes])
    ax.plot(
        ret[:, 0],
        ret[:, 1],
        marker="x",
        color="orange",
        label="retrieval estimate",
        **{**style, "mec": "orange"},
    )
    ver = xy([(f.aim_lat, f.aim_lon) for f in fixes if f.verified])
    if len(ver):
        ax.plot(
            ver[:, 0],
            ver[:, 1],
            marker="o",
            color="dodgerblue",
            label="verified aim point",
            **{**style, "ms": 4, "zorder": 6},
        )
    cams = xy([f.camera for f in fixes if f.camera is not None])
    if len(cams):
        ax.plot(
            cams[:, 0],
            cams[:, 1],
            marker="^",
            color="dodgerblue",
            label="camera estimate",
            **{**style, "ms": 4, "zorder": 6},
        )
    if truth:
        t = xy([(f.true_lat, f.true_lon) for f in truth])
        ax.plot(t[:, 0], t[:, 1], marker="o", color="lime", label="true aim point", **style)
    tc = xy([f.true_camera[:2] for f in fixes if f.true_camera is not None])
    if len(tc):
        ax.plot(tc[:, 0], tc[:, 1], marker="^", color="lime", label="true camera", **style)
    labelled = False
    for flight in dict.fromkeys(f.flight for f in fixes if f.track is not None):
        members = sorted(
            (f for f in fixes if f.flight == flight and f.track), key=lambda f: f.image
        )
        placed = [f.track for f in members if f.track.kind in PLACED]  # type: ignore[union-attr]
        path = xy([(t.lat, t.lon) for t in placed])  # type: ignore[union-attr]
        ax.plot(
            path[:, 0],
            path[:, 1],
            color="magenta",
            lw=1.8,
            zorder=5,
            label=None if labelled else "track",
        )
        real = xy([(f.true_lat, f.true_lon) for f in members if f.true_lat is not None])
        if len(real) >= 2:
            ax.plot(
                real[:, 0],
                real[:, 1],
                color="lime",
                lw=1.2,
                ls=":",
                zorder=4,
                label=None if labelled else "true track",
            )
        labelled = True
    ax.plot([], [], color="red", lw=0.8, label="error (aim / camera dashed)")
    ax.plot([], [], color="gold", lw=0.8, label="top-k tile footprints")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.set_xlabel(f"easting ({crs.to_string()[:40]})")
    ax.set_ylabel("northing")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    n_ver = sum(f.verified for f in fixes)
    ax.set_title(f"{len(fixes)} queries, {n_ver} verified", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
