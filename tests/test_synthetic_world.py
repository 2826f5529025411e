"""The synthetic renderer and world mode: geometry, batches, georeferencing, truths, flights."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.city import CityGenerator
from imlnet.data.synthetic.scene import GRASS, ROOF, Scene, SceneConfig
from imlnet.data.synthetic.weather import WEATHERS
from imlnet.geo.coords import GEOD


def _flat_scene(extent: float = 100.0, res: float = 0.5) -> Scene:
    n = round(extent / res)
    return Scene(
        height=torch.zeros(n, n),
        kind=torch.full((n, n), GRASS, dtype=torch.uint8),
        building=torch.zeros(n, n, dtype=torch.int64),
        base_rgb=torch.full((3, n, n), 0.4),
        noise=torch.full((2, n, n), 0.5),
        roof_rgb=torch.zeros(2, 3),
        wall_rgb=torch.zeros(2, 3),
        floor_m=torch.full((2,), 3.0),
        window_m=torch.full((2,), 3.0),
        resolution_m=res,
        extent_m=extent,
        targets=[],
    )


def _paint(scene: Scene, box, height: float, rgb, building: int = 0) -> None:
    x0, x1, y0, y1 = box
    res, half = scene.resolution_m, scene.half
    rows = slice(int((half - y1) / res), int((half - y0) / res))
    cols = slice(int((x0 + half) / res), int((x1 + half) / res))
    scene.height[rows, cols] = height
    scene.base_rgb[:, rows, cols] = torch.tensor(rgb)[:, None, None]
    scene.kind[rows, cols] = ROOF
    scene.building[rows, cols] = building


def test_satellite_is_north_up_and_east_right() -> None:
    scene = _flat_scene()
    _paint(scene, (26, 34, 16, 24), 5.0, (1.0, 0.0, 0.0))  # red box 30 m east, 20 m north
    top = R.shaded_top(scene, "summer", R.sun_vector(180.0, 90.0))
    sat = R.render_satellite(scene, top, 100, 100.0)  # 1 m per pixel
    red = (sat[0] > 0.6) & (sat[1] < 0.2)
    rows, cols = red.nonzero().float().mean(0).tolist()
    assert (cols + 0.5 - 50, 50 - rows - 0.5) == (
        pytest.approx(30, abs=1),
        pytest.approx(20, abs=1),
    )


def test_tall_building_occludes_what_is_behind_it() -> None:
    scene = _flat_scene()
    _paint(scene, (-1, 1, 19, 21), 0.2, (0.0, 0.0, 1.0))  # blue marker on the ground, 20 m north
    _paint(scene, (-10, 10, 8, 12), 30.0, (1.0, 1.0, 1.0), building=1)  # wall between
    scene.wall_rgb[1] = torch.tensor([1.0, 0.0, 0.0])  # red facade
    scene.window_m[1] = 1e6  # no windows
    sun = R.sun_vector(180.0, 60.0)
    top = R.shaded_top(scene, "summer", sun)
    marker = torch.tensor([[0.0, 20.0, 0.2]])
    for yaw, expect_blue in ((0.0, False), (180.0, True)):  # from the south the wall is in front
        y = -20.0 if yaw == 0.0 else 45.0
        cam = R.Camera((0.0, y, 12.0), yaw, 10.0, 60.0)
        img, depth = R.render_drone(scene, top, cam, 64, sun)
        u, v = cam.project(marker, 64)[0].long().tolist()
        pixel = img[:, v, u]
        is_blue = bool(pixel[2] > 0.5 > pixel[0])
        assert is_blue == expect_blue, (yaw, pixel)
        if not expect_blue:
            assert pixel[0] > 0.3 and pixel[2] < 0.2  # the red wall
            assert depth[v, u] < math.dist((0.0, y, 12.0), (0.0, 20.0, 0.2))


def test_views_render_the_same_in_one_batch_or_several(monkeypatch: pytest.MonkeyPatch) -> None:
    scene = CityGenerator(SceneConfig(extent_m=400.0, resolution_m=1.0))(torch.Generator())
    light = R.SeasonLight(scene, 150.0)
    views = [
        R.View(R.Camera((10.0 * i, -80.0, 90.0), 20.0 * i, 45.0, 50.0, 3.0 * i), light.top(s),
               light.sun(s), night=s == "winter")
        for i, s in enumerate(("summer", "winter", "autumn"))
    ]  # fmt: skip
    whole = R.render_views(scene, views, 32, gen=torch.Generator().manual_seed(1))
    monkeypatch.setattr(R, "MAX_RAYS", 32 * 32)  # one view per batch
    split = R.render_views(scene, views, 32, gen=torch.Generator().manual_seed(1))
    for (a, da), (b, db) in zip(whole, split, strict=True):
        assert torch.equal(a, b) and torch.equal(da, db)
    single = R.render_drone(scene, views[2].top, views[2].camera, 32, views[2].sun)
    assert torch.equal(single[0], whole[2][0])


def test_world_mode_is_georeferenced(tmp_path: Path) -> None:
    import rasterio
    from pyproj import Transformer

    from imlnet.data.synthetic.flights import FlightConfig
    from imlnet.data.synthetic.world import TRUTH_COLUMNS, WorldConfig, generate_world

    flight = FlightConfig(length_m=(120.0, 150.0), frame_interval_s=4.0)
    cfg = WorldConfig(extent_m=600.0, gsd_m=1.0, views=3, flights=2, size=48, seed=1, flight=flight)
    root = generate_world(cfg, tmp_path / "world", progress=False)
    meta = json.loads((root / "metadata.json").read_text())
    with open(root / "truth.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == TRUTH_COLUMNS
        truth = list(reader)
    frames = [fr for fl in meta["flights"] for fr in fl["frames"]]
    assert [t["image"] for t in truth] == [v["file"] for v in meta["views"] + frames]
    with rasterio.open(root / "world.tif") as src:
        assert src.crs.to_epsg() == int(meta["crs"].split(":")[1])
        assert (src.width, src.height, src.count) == (600, 600, 3)
        assert src.res == (1.0, 1.0)
        to_wgs = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        for t in truth:
            assert (root / t["image"]).is_file()
            assert Image.open(root / t["image"]).size == (48, 48)
            num = {
                k: float(v) for k, v in t.items() if k not in ("image", "flight", "frame", "t_s")
            }
            assert (num["lat"], num["lon"]) == (num["aim_lat"], num["aim_lon"])
            # Both truths' UTM coordinates map to their recorded lat/lon (< 1 m), and the aim
            # point is inside the orthophoto.
            for who in ("aim", "cam"):
                e, n = num[f"{who}_easting"], num[f"{who}_northing"]
                lon, lat = to_wgs.transform(e, n)
                assert GEOD.inv(lon, lat, num[f"{who}_lon"], num[f"{who}_lat"])[2] < 1.0
            row, col = src.index(num["aim_easting"], num["aim_northing"])
            assert 0 <= row < 600 and 0 <= col < 600
            # The camera stands back from the aim point along its heading, at its height.
            de = num["aim_easting"] - num["cam_easting"]
            dn = num["aim_northing"] - num["cam_northing"]
            assert math.degrees(math.atan2(de, dn)) % 360 == pytest.approx(
                num["heading_deg"], abs=0.01
            )
            assert num["cam_height_m"] / math.hypot(de, dn) == pytest.approx(
                math.tan(math.radians(num["pitch_deg"])), rel=1e-3
            )
            # The rebuilt camera projects the aim point to the image centre.
            cam = R.Camera(
                (0.0, 0.0, num["cam_height_m"]),
                num["heading_deg"],
                num["pitch_deg"],
                num["fov_deg"],
                num["roll_deg"],
            )
            u, v = cam.project(torch.tensor([[de, dn, 0.0]]), 48)[0].tolist()
            assert math.hypot(u - 24, v - 24) < 1e-3
    singles = [t for t in truth if not t["flight"]]
    assert len(singles) == 3 and all(not t["frame"] and not t["t_s"] for t in singles)
    for fl in ("1", "2"):
        rows = [t for t in truth if t["flight"] == fl]
        assert [int(t["frame"]) for t in rows] == list(range(1, len(rows) + 1))
        times = [float(t["t_s"]) for t in rows]
        assert (
            len(rows) >= 3
            and times[0] == 0
            and all(b - a == pytest.approx(4.0) for a, b in itertools.pairwise(times))
        )
        cams = [(float(t["cam_easting"]), float(t["cam_northing"])) for t in rows]
        steps = [math.dist(a, b) for a, b in itertools.pairwise(cams)]
        assert all(4.0 * 6 - 0.5 <= s <= 4.0 * 12 + 0.5 for s in steps)  # speed 6-12 m/s
        heights = [float(t["cam_height_m"]) for t in rows]
        assert all(abs(b - a) < 25 for a, b in itertools.pairwise(heights))  # smooth
        assert all(abs(float(t["roll_deg"])) < 5 for t in rows)
        info = meta["flights"][int(fl) - 1]
        assert info["season"] in R.SEASONS and info["weather"] in WEATHERS  # held per flight
    assert oct(root.stat().st_mode & 0o777) != oct(0o700)
