"""The synthetic multi-domain benchmark: layout, determinism, geometry, weather, failure safety."""

from __future__ import annotations

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
from imlnet.data.synthetic.scene import ROOF, SceneConfig
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


def test_anywhere_centres_locations_on_ground_points_between_landmarks(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--anywhere: the pair is the crop around a ground point away from the landmark and views
    aimed at that point; landmark locations of the same run are byte-identical to a run without
    the option (the choice draws from a stream of its own)."""
    cfg = tiny_config(anywhere=0.5, jitter=False)
    root = G.generate(cfg, tmp_path / "any", progress=False)
    meta = json.loads((root / "metadata.json").read_text())
    plain = G.generate(tiny_config(jitter=False), tmp_path / "plain", progress=False)
    plain_meta = json.loads((plain / "metadata.json").read_text())
    kinds = {bid: loc["target"]["kind"] for bid, loc in meta["locations"].items()}
    assert set(kinds.values()) == {"point", "landmark"}
    spacing = SMALL_SCENE.extent_m / SMALL_SCENE.targets_per_side
    for bid, loc in meta["locations"].items():
        folder = "train/satellite" if loc["split"] == "train" else "test/gallery_satellite"
        sat = (root / folder / bid / f"{bid}.jpg").read_bytes()
        before = (plain / folder / bid / f"{bid}.jpg").read_bytes()
        if kinds[bid] == "landmark":
            assert loc == plain_meta["locations"][bid] and sat == before
            continue
        assert loc["target"] == {"kind": "point", "height_m": 0.0, "aim_enu_m": [0.0, 0.0, 0.0]}
        city = T.make_city(cfg, loc["city"]["index"])
        point = loc["city"]["target_centre_m"]
        landmark = city.scene.targets[loc["city"]["slot"]]["centre_m"]
        for a, b in zip(point, landmark, strict=True):  # a quarter spacing or more, per axis
            d = (a - b) % SMALL_SCENE.extent_m
            assert 0.25 * spacing - 1e-6 <= d <= 0.75 * spacing + 1e-6
        # the satellite image is the clear summer crop centred on the point
        want = T.encode_jpeg(
            R.render_satellite(
                city.scene, city.light.top("summer"), 64, cfg.satellite_extent_m, tuple(point)
            ),
            cfg.jpeg_quality,
        )
        assert sat == want and sat != before
        for view in loc["views"]:  # every view aims at the point on the ground
            cam = R.Camera(
                tuple(view["camera_enu_m"]), view["yaw_deg"], view["pitch_deg"], view["fov_deg"]
            )
            u, v = cam.project(torch.zeros(1, 3), 64)[0].tolist()
            assert math.hypot(u - 32, v - 32) <= 0.51
    assert cli_main(["synth", str(tmp_path / "bad"), "--anywhere", "1.5", "--quiet"]) == 2
    assert "--anywhere must be a share in [0, 1]" in capsys.readouterr().err


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
    (tmp_path / "file").write_text("x")
    assert cli_main(["synth", str(tmp_path / "file"), "--quiet", "--locations", "2"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
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
