"""``imlnet serve``: the API in-process, bad input, load, and the page in a real Chromium.

One small georeferenced world (600 m, summer, clear) is made per module: nine 300 m tiles,
indexed with a tiny random model; every tile is verified, so the estimate of a drone view is
the verified aim point whatever the random model ranks first, within metres of the truth.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import clear_world

pytest.importorskip("fastapi", reason="the serve extra is part of imlnet[dev]")
from fastapi.testclient import TestClient

import imlnet
from imlnet.cli import main as cli_main
from imlnet.geo.coords import geodesic_m
from imlnet.geo.gallery import GalleryIndex
from imlnet.models.imlnet import IMLNet
from imlnet.serve.app import create_app, running
from imlnet.serve.jobs import Limits, Service

TILES = 9
#: a verified aim point lands within metres; the tolerance leaves room for a coarse match
TOLERANCE_M = 25.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from imlnet.geo.tiling import tile_geotiff

    root = tmp_path_factory.mktemp("serve")
    clear_world(root, seed=4)
    tiles = tile_geotiff(
        root / "world" / "world.tif", root / "tiles", tile_size_m=300, stride_m=150, out_px=64,
        progress=False,
    )  # fmt: skip
    assert len(tiles.rows) == TILES
    torch.manual_seed(0)
    folder = IMLNet(3, backbone="resnet18", irn=False, muml=False, descriptor_dim=16)
    folder = folder.save_pretrained(root / "model", {"image_size": 64})
    loaded = imlnet.load_model(folder, "cpu")
    imlnet.build_index(loaded, tiles, progress=False).save(root / "index")
    with open(root / "world" / "truth.csv", newline="") as handle:
        truth = {row["image"]: row for row in csv.DictReader(handle)}
    views = sorted((root / "world" / "drone").glob("*.jpeg"))
    return SimpleNamespace(root=root, model=folder, loaded=loaded, views=views, truth=truth)


def make_service(world: SimpleNamespace, work: Path, **limits) -> Service:
    index = GalleryIndex.load(world.root / "index")
    return Service(world.loaded, index, work, Limits(**limits))


@pytest.fixture
def client(world: SimpleNamespace, tmp_path: Path):
    service = make_service(world, tmp_path / "work", max_upload_mb=4, queue_size=4)
    with TestClient(create_app(service)) as c:
        c.service = service
        yield c
    service.close()


def truth_of(world: SimpleNamespace, view: Path) -> tuple[float, float]:
    row = world.truth[f"drone/{view.name}"]
    return float(row["aim_lat"]), float(row["aim_lon"])


def upload(*paths: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


# --------------------------------------------------------------------------- the API
def test_page_static_files_and_info(client: TestClient, world: SimpleNamespace) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "/static/vendor/leaflet/leaflet.js" in page.text
    for path in ("/static/vendor/leaflet/leaflet.js", "/static/app.js", "/static/app.css"):
        assert client.get(path).status_code == 200, path
    info = client.get("/api/info").json()
    assert info["tiles"] == TILES and info["model"]["image_size"] == 64
    (south, west), (north, east) = info["basemaps"][0]["bounds"]
    for view in world.views:
        lat, lon = truth_of(world, view)
        assert south < lat < north and west < lon < east
    png = client.get(info["basemaps"][0]["url"])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).mode == "RGBA"


def test_one_call_localises_a_view_as_imlnet_localize_does(
    client: TestClient, world: SimpleNamespace, tmp_path: Path
) -> None:
    view = world.views[0]
    r = client.post("/api/jobs?k=9&verify=9&wait=true", files=upload(view))
    assert r.status_code == 200, r.text
    job = r.json()
    (q,) = job["queries"]
    assert q["name"] == view.name and len(q["hits"]) == TILES
    assert all(len(h["footprint"]) >= 4 for h in q["hits"])
    v = q["verification"]
    assert v["verified"] and v["inliers"] >= 12 and 0 < v["confidence"] <= 1
    error = geodesic_m(q["estimate"]["lat"], q["estimate"]["lon"], *truth_of(world, view))
    assert error < TOLERANCE_M and q["estimate"]["kind"] == "verified aim point"
    for url in (q["thumb"], v["match"]):
        picture = client.get(url)
        assert picture.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(picture.content)).size[0] > 32
    geojson = client.get(job["downloads"]["results.geojson"])
    assert geojson.json()["type"] == "FeatureCollection"
    assert "attachment" in geojson.headers["content-disposition"]
    # the same files as `imlnet localize` on the saved photo with the same options
    photo = client.service.job(job["id"]).images[0]
    out = tmp_path / "cli"
    argv = ["localize", str(photo), "--index", str(world.root / "index"), "--k", "9"]
    assert cli_main([*argv, "--checkpoint", str(world.model), "--verify", "9", "--quiet",
                     "--no-map", "--out-dir", str(out)]) == 0  # fmt: skip
    for name in ("results.csv", "hits.csv", "fixes.csv"):
        served = list(csv.DictReader(io.StringIO(client.get(job["downloads"][name]).text)))
        with open(out / name, newline="") as handle:
            written = list(csv.DictReader(handle))
        for row in (*served, *written):
            row.pop("verify_s", None)  # the time verification took
        assert served == written, name


def test_jobs_report_progress_and_flights_are_tracks(client: TestClient) -> None:
    views = [Path(p) for p in sorted(client.service.index.metadata[i]["path"] for i in (0, 4, 8))]
    r = client.post("/api/jobs?k=3&verify=0&sequence=true", files=upload(*views))
    assert r.status_code == 202 and r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    status = r.json()
    assert status["state"] in ("queued", "running", "done") and status["total"] == 3
    job = client.service.job(status["id"])
    assert job.finished.wait(60)
    done = client.get(r.headers["location"]).json()
    assert done["state"] == "done" and done["done"] == 3 and done["seconds"] > 0
    (track,) = done["tracks"].values()
    assert len(track) == 3


def test_bad_input_gets_one_clear_error_and_the_server_keeps_serving(
    client: TestClient, world: SimpleNamespace, tmp_path: Path
) -> None:
    def refused(response, status: int, text: str) -> None:
        assert response.status_code == status, response.text
        body = response.json()
        assert text in body["error"] and "\n" not in body["error"], body

    jpeg = world.views[0].read_bytes()
    post = lambda files, q="": client.post(f"/api/jobs?wait=true{q}", files=files)  # noqa: E731
    refused(post([("files", ("notes.jpg", b"this is text", "image/jpeg"))]), 415, "not an image")
    refused(
        post([("files", ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))]),
        422,
        "corrupt or truncated image",
    )
    big = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(big, "PNG")  # 100 megapixels in a small file
    refused(post([("files", ("big.png", big.getvalue(), "image/png"))]), 413, "megapixels")
    noise = np.random.default_rng(0).integers(0, 255, (1400, 1400, 3), dtype=np.uint8)
    heavy = io.BytesIO()
    Image.fromarray(noise).save(heavy, "PNG")  # about 6 MB, over the 4 MB limit
    refused(post([("files", ("heavy.png", heavy.getvalue(), "image/png"))]), 413, "MB limit")
    refused(client.post("/api/jobs", data={"x": "1"}), 415, "multipart/form-data")
    refused(client.post("/api/jobs", files=[("other", ("a.txt", b"x"))]), 400, "no photo")
    refused(post(upload(world.views[0]), "&k=0"), 422, "k must be between 1 and 50")
    refused(post(upload(world.views[0]), "&k=x"), 422, "k")
    refused(client.get("/api/tiles/no_such_tile"), 404, "unknown tile id 'no_such_tile'")
    refused(client.get("/api/jobs/0123456789abcdef"), 404, "unknown job")
    # paths with .. in them name nothing on disk
    for url in (
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e/%2e%2e/__init__.py",
        "/api/jobs/x/files/..%2f..%2fmodel.safetensors",
        "/api/tiles/..%2f..%2fmodel",
    ):
        response = client.get(url)
        assert response.status_code == 404 and "error" in response.json(), url
    # a file name with .. is saved inside its job folder
    r = post([("files", ("../../evil.jpeg", jpeg, "image/jpeg"))], "&verify=0")
    assert r.status_code == 200 and r.json()["queries"][0]["name"] == "../../evil.jpeg"
    found = [p for p in world.root.parent.rglob("evil.jpeg")]
    work = client.service.work
    assert found and all(work in p.parents for p in found), found
    assert client.get("/api/info").status_code == 200  # still serving


def test_a_full_queue_refuses_at_once_and_loses_nothing(
    world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service(world, tmp_path / "work", queue_size=2)
    gate = threading.Event()
    run = service._run
    monkeypatch.setattr(service, "_run", lambda job: (gate.wait(30), run(job)))
    with TestClient(create_app(service)) as client:
        first = [client.post("/api/jobs?verify=0", files=upload(world.views[0])) for _ in "ab"]
        assert [r.status_code for r in first] == [202, 202]
        third = client.post("/api/jobs?verify=0", files=upload(world.views[0]))
        assert third.status_code == 503 and third.headers["retry-after"] == "2"
        assert "busy" in third.json()["error"]
        gate.set()
        for r in first:
            assert service.job(r.json()["id"]).finished.wait(60)
            assert client.get(f"/api/jobs/{r.json()['id']}").json()["state"] == "done"
    service.close()


def test_fifty_queries_at_once_are_answered_or_refused_none_lost(
    world: SimpleNamespace, tmp_path: Path
) -> None:
    service = make_service(world, tmp_path / "work", queue_size=8, keep_jobs=16)
    app = create_app(service)
    import httpx

    photo = world.views[1].read_bytes()

    def one(i: int) -> int:
        files = [("files", (f"q{i}.jpeg", photo, "image/jpeg"))]
        r = httpx.post(f"{url}/api/jobs?verify=0&k=3&wait=true", files=files, timeout=120)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            assert r.json()["queries"][0]["name"] == f"q{i}.jpeg"
        return r.status_code

    with running(app) as url, ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(50)))
        assert len(codes) == 50 and codes.count(200) >= 8 and set(codes) <= {200, 503}
        assert httpx.get(f"{url}/api/info").status_code == 200
    assert len(service.jobs) <= 16 + 8  # finished jobs are pruned: memory stays bounded
    assert len(list((service.work / "jobs").iterdir())) == len(service.jobs)
    service.close()


# --------------------------------------------------------------------------- the page
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="no Chromium: install Debian's chromium package (apt-get install chromium); "
    ".ci/run installs it",
)
def test_page_in_chromium_shows_the_estimate_on_the_map(
    world: SimpleNamespace, tmp_path: Path
) -> None:
    """A person's use: open the page, choose a drone photo, see its estimate on the map."""
    from playwright.sync_api import sync_playwright

    service = make_service(world, tmp_path / "work")
    view = world.views[1]
    want = truth_of(world, view)
    shots = os.environ.get("IMLNET_SCREENSHOTS")
    with running(create_app(service)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.wait_for_function(
            "document.querySelector('#gallery-info').textContent.includes('9 tiles')"
        )
        page.fill("#k", "9")
        page.fill("#verify", "9")
        page.set_input_files("#file-input", str(view))
        marker = page.wait_for_selector(".estimate-marker", timeout=90_000)
        lat, lon = float(marker.get_attribute("data-lat")), float(marker.get_attribute("data-lon"))
        assert geodesic_m(lat, lon, *want) < TOLERANCE_M
        # on the map: the marker lies inside the map's box, where the map draws (lat, lon)
        box, frame = marker.bounding_box(), page.query_selector("#map").bounding_box()
        assert frame["x"] < box["x"] < frame["x"] + frame["width"]
        assert frame["y"] < box["y"] < frame["y"] + frame["height"]
        assert "verified" in page.inner_text("#results")
        assert page.is_visible("#match-img") and "results.geojson" in page.inner_text("#downloads")
        if shots:
            page.wait_for_timeout(500)
            page.screenshot(path=str(Path(shots) / "serve_single.png"))
        browser.close()
        assert not errors, errors
    service.close()


def test_serve_command_needs_a_gallery_that_matches_the_model(
    world: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(1)
    other = IMLNet(3, backbone="resnet18", irn=False, muml=False, descriptor_dim=16)
    other = other.save_pretrained(tmp_path / "other")
    argv = ["serve", "--index", str(world.root / "index"), "--checkpoint", str(other)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "imlnet serve: error:" in err and len(err.strip().splitlines()) == 1
    assert "cannot be compared: use that checkpoint or rebuild the gallery" in err
    assert GalleryIndex.load(world.root / "index").count == TILES  # nothing changed


def test_tiles_of_a_one_pass_gallery_are_read_from_the_raster(
    world: SimpleNamespace, tmp_path: Path
) -> None:
    """`imlnet index MAP.tif` writes no tile files: the page's tile images come from the map."""
    tif = world.root / "world" / "world.tif"
    argv = ["index", str(tif), "--tile-size-m", "300", "--stride-m", "150", "--quiet"]
    assert cli_main([*argv, "--checkpoint", str(world.model), "--out", str(tmp_path / "g")]) == 0
    index = GalleryIndex.load(tmp_path / "g")
    service = Service(world.loaded, index, tmp_path / "work", Limits())
    with TestClient(create_app(service)) as client:
        tile_id = index.metadata[4]["tile_id"]
        r = client.get(f"/api/tiles/{tile_id}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (256, 256)
        job = client.post("/api/jobs?k=9&verify=9&wait=true", files=upload(world.views[0]))
        assert job.json()["queries"][0]["verification"]["verified"]
    service.close()
