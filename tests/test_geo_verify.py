"""Verification and pose: a known homography, a rendered view with known pose, the fallback,
planar PnP by hand, the attitude CSV's errors, and the outputs of a refined run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from pyproj import Transformer
from rasterio.transform import Affine

from imlnet.data.synthetic import render as R
from imlnet.data.synthetic.city import CityGenerator
from imlnet.data.synthetic.scene import SceneConfig
from imlnet.errors import GeoError
from imlnet.geo.coords import geodesic_m
from imlnet.geo.pose import Attitude, angles, intrinsics, read_attitude, rotation, solve_pose
from imlnet.geo.verify import Verifier, VerifyConfig

E0, N0, EPSG = 480_000.0, 5_260_000.0, 32632  # map centre, UTM 32N
GSD, EXTENT = 0.5, 200.0
TO_WGS = Transformer.from_crs(f"EPSG:{EPSG}", "EPSG:4326", always_xy=True)


def latlon(x: float, y: float) -> tuple[float, float]:
    """Scene metres (relative to the map centre) -> WGS84 (lat, lon)."""
    lon, lat = TO_WGS.transform(E0 + x, N0 + y)
    return lat, lon


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 200 m synthetic scene (no shadows) as a UTM GeoTIFF, and the whole map as one hit."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("verify")
    scene = CityGenerator(SceneConfig(extent_m=EXTENT, resolution_m=GSD), "cpu")(
        torch.Generator().manual_seed(1)
    )
    top = R.albedo(scene, "summer")
    rgb = (top.clamp(0, 1) * 255).round().byte().numpy()
    half = EXTENT / 2
    transform = Affine(GSD, 0.0, E0 - half, 0.0, -GSD, N0 + half)
    with rasterio.open(
        root / "map.tif", "w", driver="GTiff", width=rgb.shape[2], height=rgb.shape[1], count=3,
        dtype="uint8", crs=f"EPSG:{EPSG}", transform=transform,
    ) as dst:  # fmt: skip
        dst.write(rgb)
    side = rgb.shape[1]
    lat, lon = latlon(0.0, 0.0)
    hit = {
        "rank": 1, "tile_id": "map_r0_c0", "path": "map.jpg", "source": str(root / "map.tif"),
        "col_off": side // 4, "row_off": side // 4, "width": side // 2, "height": side // 2,
        "lat": lat, "lon": lon, "score": 0.9, "size_m": EXTENT / 2,
    }  # fmt: skip
    return SimpleNamespace(root=root, scene=scene, top=top, hit=hit)


def render(world: SimpleNamespace, camera: R.Camera, size: int = 192) -> Path:
    img, _ = R.render_drone(
        world.scene, world.top, camera, size, R.sun_vector(150.0, 60.0), samples=48
    )
    path = world.root / f"view-{camera.yaw_deg:.0f}-{camera.pitch_deg:.0f}.png"
    Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


def test_known_homography_is_recovered_within_a_pixel(world: SimpleNamespace) -> None:
    verifier = Verifier(VerifyConfig(margin=0.0))
    win = verifier.map_window(world.hit)
    h, w = win.shape
    # A perspective warp of the tile: rotation, scale, shear and a little tilt.
    H0 = np.array([[0.9, -0.25, 30.0], [0.2, 0.85, 10.0], [2e-4, -1e-4, 1.0]])
    query = cv2.warpPerspective(win.grey, H0, (w, h), flags=cv2.INTER_LINEAR)
    H, inliers, matches = verifier.match(verifier.features(query), win.features)
    assert H is not None and inliers.sum() >= 50, (matches, inliers.sum())
    grid = np.array(
        [[x, y] for x in np.linspace(40, w - 40, 5) for y in np.linspace(40, h - 40, 5)]
    )
    want = cv2.perspectiveTransform(grid[None], np.linalg.inv(H0))[0]
    got = cv2.perspectiveTransform(grid[None], H)[0]
    assert np.abs(got - want).max() < 1.0


def test_planar_pnp_by_hand() -> None:
    K = intrinsics(640, 480, 60.0)
    R_true = rotation(heading_deg=75.0, pitch_deg=50.0, roll_deg=4.0)
    centre = np.array([12.0, -80.0, 95.0])
    ground = np.random.default_rng(0).uniform(-60, 60, (40, 2)) + np.array([60.0, -20.0])
    pts = (K @ (R_true @ (np.c_[ground, np.zeros(40)] - centre).T)).T
    pix = pts[:, :2] / pts[:, 2:]
    pose = solve_pose(pix, ground, K)
    assert pose is not None
    assert np.allclose([pose.east_m, pose.north_m, pose.height_m], centre, atol=1e-4)
    assert np.allclose([pose.heading_deg, pose.pitch_deg, pose.roll_deg], [75, 50, 4], atol=1e-4)
    assert np.allclose(angles(R_true), (75.0, 50.0, 4.0))


@pytest.mark.parametrize("with_attitude", [False, True])
def test_rendered_view_gives_its_camera_position(
    world: SimpleNamespace, with_attitude: bool
) -> None:
    camera = R.Camera((-60.0, -20.0, 90.0), 0.0, 65.0, 55.0)
    image = render(world, camera)
    att = Attitude(camera.pitch_deg, 0.0, camera.yaw_deg, camera.position[2], 55.0)
    verifier = Verifier(VerifyConfig(fov_deg=55.0))
    res = verifier.verify(image, [world.hit], (0.0, 0.0), attitude=att if with_attitude else None)
    assert res.verified, res.note
    # Where the optical axis meets the ground, and the camera itself.
    yaw, pitch = math.radians(camera.yaw_deg), math.radians(camera.pitch_deg)
    reach = camera.position[2] / math.tan(pitch)
    aim = latlon(
        camera.position[0] + reach * math.sin(yaw), camera.position[1] + reach * math.cos(yaw)
    )
    assert geodesic_m(res.lat, res.lon, *aim) < 3.0
    cam = latlon(*camera.position[:2])
    assert res.camera_lat is not None and res.camera_lon is not None and res.pose is not None
    assert geodesic_m(res.camera_lat, res.camera_lon, *cam) < 5.0
    assert abs(res.pose.height_m - camera.position[2]) < 5.0
    assert abs((res.pose.heading_deg - camera.yaw_deg + 180) % 360 - 180) < 3.0
    assert abs(res.pose.pitch_deg - camera.pitch_deg) < 3.0
    assert 0.5 < res.confidence <= 1.0


@pytest.mark.parametrize("similarity", [True, False], ids=["similarity", "homography"])
def test_a_fit_does_not_depend_on_the_threads_generator(similarity: bool) -> None:
    import cv2

    from imlnet.geo.verify import _Features

    # 60 matches, a third of them a noisy similarity and the rest anywhere: a fit whose inliers
    # depend on which samples RANSAC draws
    rng = np.random.default_rng(0)
    n = 60
    pts = rng.uniform(0, 200, (n, 2)).astype(np.float32)
    c, s_ = np.cos(0.3) * 1.2, np.sin(0.3) * 1.2
    ref = pts @ np.array([[c, s_], [-s_, c]], np.float32) + 15 + rng.normal(0, 2.5, (n, 2))
    ref[20:] = rng.uniform(0, 240, (n - 20, 2))
    desc = np.eye(128, dtype=np.float32)[:n] + rng.uniform(0, 0.01, (n, 128)).astype(np.float32)
    query, target = _Features(pts, desc), _Features(ref.astype(np.float32), desc)
    verifier = Verifier(VerifyConfig())
    results = []
    for seed in (1, 987654, 5):  # what the thread drew before (other queries, other fits)
        cv2.setRNGSeed(seed)
        H, mask, matches = verifier.match(query, target, similarity=similarity)
        assert matches == n and H is not None
        results.append((H.round(9).tolist(), mask.tolist()))
    assert results[0] == results[1] == results[2]


def test_a_large_photo_is_shrunk_and_still_gives_its_camera(world: SimpleNamespace) -> None:
    camera = R.Camera((-60.0, -20.0, 90.0), 0.0, 65.0, 55.0)
    small = render(world, camera)
    big = world.root / "big.png"
    Image.open(small).resize((960, 960), Image.BICUBIC).save(big)
    res = Verifier(VerifyConfig(fov_deg=55.0, max_query_px=192)).verify(big, [world.hit], (0, 0))
    assert res.verified, res.note
    assert geodesic_m(res.camera_lat, res.camera_lon, *latlon(*camera.position[:2])) < 5.0  # type: ignore[arg-type]


def test_no_match_falls_back_and_says_so(world: SimpleNamespace) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (160, 160), dtype=np.uint8)
    path = world.root / "noise.png"
    Image.fromarray(cv2.GaussianBlur(noise, (0, 0), 3)).save(path)
    res = Verifier().verify(path, [world.hit], (47.1, 8.2))
    assert not res.verified and (res.lat, res.lon) == (47.1, 8.2)
    assert res.note.startswith("fallback to retrieval") and res.camera_lat is None


@pytest.mark.parametrize("with_attitude", [False, True], ids=["as-is", "attitude"])
def test_a_view_of_another_city_does_not_verify(
    world: SimpleNamespace, with_attitude: bool
) -> None:
    """A look-alike of the same generator (another seed: streets, blocks, roofs of the same
    palette) must not verify against this map at the default ``min_inliers``: what chance gives
    stays below it, while a view of this map passes (test above)."""
    other = CityGenerator(SceneConfig(extent_m=EXTENT, resolution_m=GSD), "cpu")(
        torch.Generator().manual_seed(7)
    )
    elsewhere = SimpleNamespace(root=world.root, scene=other, top=R.albedo(other, "summer"))
    camera = R.Camera((-60.0, -20.0, 90.0), 0.0, 65.0, 55.0)
    image = render(elsewhere, camera).rename(world.root / "elsewhere.png")
    att = Attitude(camera.pitch_deg, 0.0, camera.yaw_deg, camera.position[2], 55.0)
    verifier = Verifier(VerifyConfig(fov_deg=55.0))
    res = verifier.verify(image, [world.hit], (47.1, 8.2), attitude=att if with_attitude else None)
    assert not res.verified, res.note
    assert res.inliers < VerifyConfig.min_inliers, res.inliers


def test_missing_window_columns_and_raster_are_clear_errors(world: SimpleNamespace) -> None:
    verifier = Verifier()
    with pytest.raises(GeoError, match=r"col_off.*rebuild the gallery"):
        verifier.map_window({k: v for k, v in world.hit.items() if k != "col_off"})
    with pytest.raises(GeoError, match=r"gone\.tif.*put it back"):
        verifier.map_window({**world.hit, "source": str(world.root / "gone.tif")})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("b.jpg,abc,0,10,100,", "line 3: pitch_deg 'abc' is not a number"),
        ("b.jpg,120,0,10,100,", "line 3: pitch_deg '120' must be in"),
        ("b.jpg,45,0,10,-5,", "line 3: altitude_m -5.0 must be above the ground"),
        ("b.jpg,45,95,10,100,", "line 3: roll_deg 95.0 must be within"),
        ("b.jpg,45,0,10,100,200", "line 3: fov_deg 200.0 must be in"),
        ("a.jpg,45,0,10,100,", "line 3: image 'a.jpg' appears twice"),
        (",45,0,10,100,", "line 3: the image cell is empty"),
        ("b.jpg,45,0,inf,100,", "line 3: heading_deg 'inf' is not finite"),
    ],
)
def test_bad_attitude_rows_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "att.csv"
    header = "image,pitch_deg,roll_deg,heading_deg,altitude_m,fov_deg\n"
    path.write_text(header + "a.jpg,45,0,10,100,\n" + row + "\n")
    with pytest.raises(GeoError, match=rf"att\.csv, {message}"):
        read_attitude(path)


def test_attitude_csv_reads_and_needs_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "att.csv"
    path.write_text("image,pitch_deg,heading_deg\na.jpg,90,\nb.jpg,45.5,270\n")
    att = read_attitude(path)
    assert att["a.jpg"] == Attitude(90.0, 0.0, None, None, None)
    assert att["b.jpg"].heading_deg == 270.0
    path.write_text("image,heading_deg\na.jpg,10\n")
    with pytest.raises(GeoError, match=r"missing column.*pitch_deg"):
        read_attitude(path)
    with pytest.raises(GeoError, match="attitude file not found"):
        read_attitude(tmp_path / "none.csv")


def test_refined_run_writes_fixes_geojson_and_map(world: SimpleNamespace, tmp_path: Path) -> None:
    from imlnet.geo.fixes_io import write_refined
    from imlnet.geo.mapping import draw_map
    from imlnet.geo.refine import refine

    camera = R.Camera((-60.0, -20.0, 90.0), 0.0, 65.0, 55.0)
    image = str(render(world, camera))
    lat, lon = world.hit["lat"], world.hit["lon"]
    result = SimpleNamespace(
        image=image, hits=[world.hit], lat=lat, lon=lon, true_lat=lat, true_lon=lon,
        error_m=0.0, top1_error_m=0.0,
    )  # fmt: skip
    cam = (*latlon(*camera.position[:2]), camera.position[2])
    fixes = refine(
        [result], verifier=Verifier(VerifyConfig(fov_deg=55.0)), camera_truth=lambda _: cam
    )
    assert fixes[0].verified and fixes[0].camera_error_m is not None
    assert fixes[0].camera_error_m < 5.0 and fixes[0].height_error_m < 5.0
    geojson = tmp_path / "results.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    paths = write_refined(fixes, tmp_path, geojson=geojson)
    kinds = [f["properties"]["kind"] for f in json.loads(geojson.read_text())["features"]]
    assert kinds == ["aim", "camera", "camera_truth"]
    assert "camera_error_m" in paths["fixes"].read_text().splitlines()[0]
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["verified"] == 1 and metrics["+ verification: camera"]["MA@5m"] == 1.0
    png = draw_map(fixes, [result], tmp_path / "map.png")
    assert Image.open(png).size[0] > 500


def test_a_flight_looks_near_its_last_fix_when_retrieval_misses(
    world: SimpleNamespace, tmp_path: Path
) -> None:
    from imlnet.geo.refine import refine

    far = {**world.hit, "tile_id": "corner", "col_off": 0, "row_off": 0, "width": 40, "height": 40}
    flight = tmp_path / "f01"
    flight.mkdir()
    results = []
    for i, (pos, yaw) in enumerate((((-60.0, -20.0, 90.0), 0.0), ((-52.0, -8.0, 90.0), 6.0))):
        image = render(world, R.Camera(pos, yaw, 65.0, 55.0))
        frame = flight / f"frame-{i + 1:04d}.png"
        image.rename(frame)
        hit = world.hit if i == 0 else far  # retrieval finds the place for frame 1 only
        lat, lon = hit["lat"], hit["lon"]
        results.append(SimpleNamespace(image=str(frame), hits=[{**hit, "id": i}], lat=lat,
                                       lon=lon, true_lat=None, true_lon=None, error_m=None,
                                       top1_error_m=None))  # fmt: skip
    gallery = [{**world.hit, "id": 0}, {**far, "id": 1}]
    verifier = Verifier(VerifyConfig(fov_deg=55.0))
    alone = refine(results, verifier=verifier, sequence=True)
    assert [f.verified for f in alone] == [True, False]
    assert [f.track.kind for f in alone] == ["fix", "held"]  # type: ignore[union-attr]
    guided = refine(results, verifier=verifier, sequence=True, gallery=gallery, prior_tiles=1)
    assert [f.verified for f in guided] == [True, True]
    assert guided[1].verification.tile_rank == 0  # type: ignore[union-attr]
    assert guided[1].verification.note.endswith("near the flight's last fix")  # type: ignore[union-attr]


def test_localize_options_are_checked_before_retrieval(tmp_path: Path) -> None:
    import argparse

    from imlnet.geo.fixes_io import add_args, prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--truth", type=Path)
    add_args(ap)
    bad = tmp_path / "att.csv"
    bad.write_text("image,pitch_deg\na.jpg,45\nb.jpg,north\n")
    with pytest.raises(GeoError, match=r"att\.csv, line 3: pitch_deg 'north'"):
        prepare(ap.parse_args(["--attitude", str(bad)]))
    with pytest.raises(GeoError, match="--verify must be >= 0"):
        prepare(ap.parse_args(["--verify", "-1"]))
    plan = prepare(ap.parse_args(["--verify", "0"]))
    assert plan.verifier is None and plan.attitude is None


def test_finish_refines_and_writes_in_one_call(world: SimpleNamespace, tmp_path: Path) -> None:
    from imlnet.geo.fixes_io import finish, make_plan

    image = str(render(world, R.Camera((-60.0, -20.0, 90.0), 0.0, 65.0, 55.0)))
    result = SimpleNamespace(
        image=image, hits=[world.hit], lat=world.hit["lat"], lon=world.hit["lon"],
        true_lat=None, true_lon=None, error_m=None, top1_error_m=None,
    )  # fmt: skip
    fixes, paths = finish(make_plan(verify=1, fov_deg=55.0), [result], tmp_path, seconds=2.0)
    assert fixes[0].verified
    assert sorted(paths) == ["candidates", "fixes", "map", "metrics"]
    assert json.loads(paths["metrics"].read_text())["retrieval_s_per_query"] == 2.0
