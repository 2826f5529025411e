"""The synthetic multi-domain benchmark: layout, determinism, geometry, weather, failure safety."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imlnet.cli import main as cli_main
from imlnet.data.synthetic import generate as G
from imlnet.data.synthetic import render as R
from imlnet.data.synthetic import targets as T
from imlnet.data.synthetic.scene import GRASS, ROOF, Scene, SceneConfig
from imlnet.data.synthetic.weather import WEATHERS, apply_weather
from imlnet.errors import ImlnetError
from imlnet.geo.coords import GEOD

SMALL_SCENE = SceneConfig(extent_m=400.0, resolution_m=1.0)


def tiny_config(**kw) -> G.SynthConfig:
    base = dict(locations=4, views=4, size=64, seed=7, distractors=1, scene=SMALL_SCENE)
    base.update(kw)
    return G.SynthConfig(**base)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return G.generate(tiny_config(), tmp_path_factory.mktemp("synth") / "out", progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_counts(tiny_dataset: Path) -> None:
    meta = json.loads((tiny_dataset / "metadata.json").read_text())
    locs = meta["locations"]
    by_split = {
        s: {k for k, v in locs.items() if v["split"] == s} for s in ("train", "test", "distractor")
    }
    assert [len(by_split[s]) for s in ("train", "test", "distractor")] == [2, 2, 1]
    assert all(len(k) == 4 and k.isdigit() for k in locs)

    def ids(folder: str) -> set[str]:
        return {p.name for p in (tiny_dataset / folder).iterdir()}

    assert ids("train/drone") == ids("train/satellite") == by_split["train"]
    assert ids("test/query_drone") == ids("test/query_satellite") == by_split["test"]
    gallery = by_split["test"] | by_split["distractor"]
    assert ids("test/gallery_satellite") == ids("test/gallery_drone") == gallery
    for bid in by_split["train"]:
        drones = sorted(p.name for p in (tiny_dataset / "train/drone" / bid).iterdir())
        assert drones == [f"image-{i:02d}.jpeg" for i in range(1, 5)]
        assert [p.name for p in (tiny_dataset / "train/satellite" / bid).iterdir()] == [
            f"{bid}.jpg"
        ]
    img = Image.open(tiny_dataset / "train/satellite" / bid / f"{bid}.jpg")
    assert img.size == (64, 64) and img.mode == "RGB"
    assert not list(tiny_dataset.parent.glob(".out.partial-*"))  # no temporary folder left


def test_same_seed_gives_identical_bytes(tiny_dataset: Path, tmp_path: Path) -> None:
    again = G.generate(tiny_config(), tmp_path / "again", progress=False)
    assert _files(again) == _files(tiny_dataset)
    other = G.generate(
        tiny_config(seed=8, locations=2, distractors=0), tmp_path / "other", progress=False
    )
    first = next((other / "train/satellite").rglob("*.jpg")).read_bytes()
    assert all(first != p.read_bytes() for p in tiny_dataset.rglob("*.jpg"))


def test_recorded_pose_projects_target_to_image_centre(tmp_path: Path) -> None:
    """Rebuild each camera from the metadata alone; the aim point lands at the image centre."""
    for jitter, tol in ((False, 0.51), (True, 0.12 * 64)):
        root = G.generate(
            tiny_config(locations=2, distractors=0, jitter=jitter),
            tmp_path / f"j{jitter}",
            progress=False,
        )
        meta = json.loads((root / "metadata.json").read_text())
        for loc in meta["locations"].values():
            aim = torch.tensor([loc["target"]["aim_enu_m"]])
            for view in loc["views"]:
                cam = R.Camera(
                    tuple(view["camera_enu_m"]), view["yaw_deg"], view["pitch_deg"], view["fov_deg"]
                )
                u, v = cam.project(aim, 64)[0].tolist()
                assert math.hypot(u - 32, v - 32) <= tol, (jitter, view)
                assert view["altitude_m"] == view["camera_enu_m"][2]
                # the camera looks back at the target from the orbit's azimuth (+- yaw jitter)
                off = (view["yaw_deg"] - view["azimuth_deg"] - 180.0 + 180.0) % 360.0 - 180.0
                assert abs(off) <= (4.0 if jitter else 1e-3)
                # lat/lon through pyproj: the geodesic distance and azimuth from the target
                lon, lat = view["camera_lon"], view["camera_lat"]
                az, _, dist = GEOD.inv(loc["lon"], loc["lat"], lon, lat)
                x, y = view["camera_enu_m"][:2]
                assert dist == pytest.approx(math.hypot(x, y), abs=0.05)
                assert math.radians(az) == pytest.approx(math.atan2(x, y), abs=1e-3)


def test_target_building_is_where_the_metadata_says(tiny_dataset: Path) -> None:
    meta = json.loads((tiny_dataset / "metadata.json").read_text())
    cfg = tiny_config()
    for bid, loc in meta["locations"].items():
        # The metadata footprint is the building's cells in the regenerated city.
        scene = T.make_city(cfg, loc["city"]["index"]).scene
        cx, cy = loc["city"]["target_centre_m"]
        mask = scene.building == loc["target"]["building_id"]
        rows, cols = mask.nonzero().unbind(1)
        res, half = scene.resolution_m, scene.half
        x0, x1, y0, y1 = loc["target"]["footprint_m"]
        assert (cols.min() + 0.5) * res - half - cx == pytest.approx(x0, abs=res)
        assert half - (rows.min() + 0.5) * res - cy == pytest.approx(y1, abs=res)
        assert (cols.max() + 0.5) * res - half - cx == pytest.approx(x1, abs=res)
        assert half - (rows.max() + 0.5) * res - cy == pytest.approx(y0, abs=res)
        # In the satellite image, the roof colour fills the building's recorded pixel box.
        folder = "train/satellite" if loc["split"] == "train" else "test/gallery_satellite"
        img = np.asarray(Image.open(tiny_dataset / folder / bid / f"{bid}.jpg"), np.float32) / 255
        left, top, right, bottom = loc["target"]["satellite_bbox_px"]
        gsd = loc["satellite"]["gsd_m"]
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        px_x, px_y = cx + (xs - 32) * gsd, cy + (32 - ys) * gsd  # pixel centres in metres
        n = scene.shape[0]
        on_roof = np.zeros((64, 64), bool)
        for r in range(64):
            for c in range(64):
                i = math.floor((half - px_y[r, c]) / res) % n
                j = math.floor((px_x[r, c] + half) / res) % n
                on_roof[r, c] = bool(mask[i, j]) and scene.kind[i, j] == ROOF
        tol = res / gsd  # a roof cell reaches half a cell past the footprint box on each side
        inside = (xs > left - tol) & (xs < right + tol) & (ys > top - tol) & (ys < bottom + tol)
        assert on_roof.sum() > 4 and (on_roof <= inside).all()
        roof = np.median(img[on_roof], axis=0)
        assert np.abs(roof - np.array(loc["target"]["roof_rgb"])).max() < 0.1, (bid, roof)


def test_train_and_test_come_from_different_cities(tiny_dataset: Path) -> None:
    meta = json.loads((tiny_dataset / "metadata.json").read_text())
    cities: dict[str, set[int]] = {}
    for loc in meta["locations"].values():
        cities.setdefault(loc["split"], set()).add(loc["city"]["index"])
    assert cities["train"].isdisjoint(cities["test"] | cities["distractor"])
    # several targets share a city, each on its own slot and in its own place
    slots = [(v["city"]["index"], v["city"]["slot"]) for v in meta["locations"].values()]
    assert len(set(slots)) == len(slots) and len({c for c, _ in slots}) < len(slots)
    assert meta["counts"]["cities"] == 2


def test_workers_give_the_same_bytes_and_a_rerun_is_a_no_op(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    again = G.generate(tiny_config(), tmp_path / "w2", progress=False, workers=2)
    assert _files(again) == _files(tiny_dataset)
    stamp = (again / "metadata.json").stat().st_mtime_ns
    assert G.up_to_date(tiny_config(), again) and not G.up_to_date(tiny_config(seed=8), again)
    assert G.generate(tiny_config(), again, progress=False) == again  # no --overwrite needed
    assert (again / "metadata.json").stat().st_mtime_ns == stamp
    assert cli_main(["synth", str(again), "--quiet", "--locations", "4"]) == 2  # other options
    next((again / "train/drone").rglob("*.jpeg")).unlink()
    assert not G.up_to_date(tiny_config(), again)  # incomplete: regenerated


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


def test_weather_effects() -> None:
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    depth = torch.full((32, 32), 300.0)
    for w in WEATHERS:
        a = apply_weather(img, w, generator=torch.Generator().manual_seed(1), depth=depth)
        b = apply_weather(img, w, generator=torch.Generator().manual_seed(1), depth=depth)
        assert a.shape == img.shape and torch.equal(a, b)
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        assert torch.equal(a, img) == (w == "clear")
    fog = apply_weather(img, "fog", generator=torch.Generator().manual_seed(1), depth=depth)
    assert fog.std() < 0.5 * img.std()  # fog washes out contrast
    night = apply_weather(img, "night", generator=torch.Generator().manual_seed(1))
    assert night.mean() < 0.5 * img.mean()
    with pytest.raises(ValueError, match="weather must be one of"):
        apply_weather(img, "tornado", generator=torch.Generator())


def test_failed_run_leaves_nothing_and_existing_output_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ImlnetError, match="--overwrite"):
        G.generate(tiny_config(), out, progress=False)
    calls = []

    def boom(job):
        calls.append(job)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(job)

    real = G._render_job
    monkeypatch.setattr(G, "_render_job", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        G.generate(tiny_config(), out, progress=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli_main(["synth", str(tmp_path / "full"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["synth", str(tmp_path / "o"), "--weather", "tornado=1"])
    cfg = G.SynthConfig(locations=2, views=2, size=32, scene=SMALL_SCENE)
    assert cfg.n_distractors == 0
    with pytest.raises(ImlnetError, match="at least 2"):
        G.SynthConfig(locations=1).validate()


def test_season_and_weather_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(
        locations=2,
        distractors=0,
        views=6,
        seasons={"winter": 1.0},
        weather={"fog": 1.0, "night": 1.0},
    )
    meta = json.loads(
        (G.generate(cfg, tmp_path / "w", progress=False) / "metadata.json").read_text()
    )
    views = [v for loc in meta["locations"].values() for v in loc["views"]]
    assert {v["season"] for v in views} == {"winter"}
    assert {v["weather"] for v in views} <= {"fog", "night"}
    seen = {}
    monkeypatch.setattr(G, "generate", lambda cfg, out, **kw: seen.update(cfg=cfg) or Path(out))
    assert cli_main(["synth", str(tmp_path / "c"), "--clean", "--views", "3", "--quiet"]) == 0
    assert seen["cfg"].seasons == {"summer": 1.0} and seen["cfg"].weather == {"clear": 1.0}
    assert seen["cfg"].views == 3
    # one dialect: --image-size, its hidden alias --size, --workers, --device auto
    assert cli_main(["synth", str(tmp_path / "c"), "--size", "48", "--quiet"]) == 0
    assert seen["cfg"].size == 48
    assert cli_main(["synth", str(tmp_path / "c"), "--image-size", "40", "--device", "cpu"]) == 0
    assert seen["cfg"].size == 40


def test_world_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imlnet.data.synthetic import world

    seen = {}
    monkeypatch.setattr(world, "generate_world", lambda cfg, out, **kw: seen.update(cfg=cfg))
    argv = ["synth", str(tmp_path / "w"), "--world", "--flights", "3", "--views", "0"]
    assert cli_main([*argv, "--world-size-m", "900", "--gsd", "1", "--image-size", "96"]) == 0
    cfg = seen["cfg"]
    assert (cfg.flights, cfg.views, cfg.extent_m, cfg.gsd_m, cfg.size) == (3, 0, 900, 1, 96)
    with pytest.raises(ImlnetError, match="at least one view or flight"):
        world.WorldConfig(views=0, flights=0).validate()


def test_montage_flag_writes_a_picture(tmp_path: Path) -> None:
    out = tmp_path / "montage.jpg"
    assert cli_main(["synth", str(out), "--montage", "--image-size", "32", "--seed", "1"]) == 0
    img = Image.open(out)
    assert img.format == "JPEG" and img.size == (5 * 36 + 4, 2 * (32 + 16 + 4) + 4)


def test_synthetic_package_has_no_import_circle() -> None:
    """Static walk of the package's own imports (module level and inside functions)."""
    import ast

    root = Path(G.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                if mod.startswith("imlnet.data.synthetic."):
                    deps.add(mod.split(".")[3])
        graph[name] = deps - {name}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        return seen

    assert [m for m in graph if m in reach(m)] == []


def test_world_mode_is_georeferenced(tmp_path: Path) -> None:
    import csv

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
