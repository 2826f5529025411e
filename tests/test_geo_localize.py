"""Localisation: the estimate rule by hand, self-queries land on their tile, outputs, CLI."""

from __future__ import annotations

import csv
import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from pyproj import Geod, Transformer
from rasterio.transform import from_origin
from torchvision.transforms.functional import pil_to_tensor

from imlnet import inference
from imlnet.cli import main as cli_main
from imlnet.errors import GeoError
from imlnet.geo.index import build_index
from imlnet.geo.localize import estimate_position, localize, read_truth, to_geojson, write_outputs
from imlnet.geo.tables import TILE_COLUMNS, TileSet, read_tileset, write_csv
from imlnet.geo.tiling import tile_geotiff
from imlnet.inference import LoadedModel

GEOD = Geod(ellps="WGS84")
LAT0, LON0 = 47.5, 8.5


class ProjEncoder:
    """Deterministic encoder: a fixed random projection of 8x8-pooled, mean-centred pixels."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self.weight = torch.randn(3 * 64, dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return (f - f.mean(1, keepdim=True)) @ self.weight


def to_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image.resize((64, 64))).float() / 255


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> TileSet:
    root = tmp_path_factory.mktemp("loc")
    blocks = np.random.default_rng(3).integers(0, 255, (3, 48, 64), dtype=np.uint8)
    profile = dict(driver="GTiff", width=512, height=384, count=3, dtype="uint8")
    transform = from_origin(480_000, 5_300_000, 0.5, 0.5)
    with rasterio.open(
        root / "map.tif", "w", crs="EPSG:32632", transform=transform, **profile
    ) as d:
        d.write(np.kron(blocks, np.ones((1, 8, 8), np.uint8)))
    return tile_geotiff(
        root / "map.tif", root / "tiles", tile_size_m=60, stride_m=30, out_px=64, progress=False
    )


def hit(lat: float, lon: float, score: float, **kw) -> dict:
    return {"lat": lat, "lon": lon, "score": score, **kw}


def test_estimate_hand_example() -> None:
    lon_e, lat_e, _ = GEOD.fwd(LON0, LAT0, 90.0, 10.0)  # 10 m east of the top-1
    lon_n, lat_n, _ = GEOD.fwd(LON0, LAT0, 0.0, 5000.0)  # 5 km north: another place
    hits = [hit(LAT0, LON0, 0.9, size_m=60.0), hit(lat_e, lon_e, 0.8), hit(lat_n, lon_n, 0.1)]
    lat, lon, used = estimate_position(hits, temperature=0.1)
    # weights softmax([0.9, 0.8] / 0.1) = [e, 1] / (e + 1): 10 m / (e + 1) = 2.689 m east
    az, _, dist = GEOD.inv(LON0, LAT0, lon, lat)
    assert used == 2 and dist == pytest.approx(10 / (math.e + 1), abs=0.01)
    assert az == pytest.approx(90.0, abs=0.5)
    # the far tile joins when the spread allows it: its weight is e^-8 of the top-1's
    lat, lon, used = estimate_position(hits, temperature=0.1, max_spread_m=10_000)
    w = np.exp([0.0, -1.0, -8.0])
    w /= w.sum()
    _, _, dist = GEOD.inv(LON0, LAT0, lon, lat)
    assert used == 3 and dist == pytest.approx(math.hypot(10 * w[1], 5000 * w[2]), abs=0.02)
    assert estimate_position(hits, temperature=0) == (LAT0, LON0, 1)
    with pytest.raises(GeoError, match="no gallery tiles"):
        estimate_position([])


def _truth_csv(path: Path, tiles: TileSet, rows: list[dict], relative: bool) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "lat", "lon"])
        for row in rows:
            name = f"tiles/{row['path']}" if relative else row["path"]
            writer.writerow([name, row["lat"], row["lon"]])
    return path


def test_self_queries_find_their_tile_with_zero_error(tiles: TileSet, tmp_path: Path) -> None:
    encoder = ProjEncoder()
    index = build_index(encoder, tiles, transform=to_tensor, progress=False)
    chosen = [tiles.rows[i] for i in (0, 9, 17, len(tiles) - 1)]
    images = [str(tiles.image_path(r)) for r in chosen]
    truth_file = _truth_csv(tiles.root.parent / "truth.csv", tiles, chosen, relative=True)
    results = localize(
        encoder,
        index,
        images,
        transform=to_tensor,
        k=5,
        truth=read_truth(truth_file),
        truth_base=truth_file.parent,
        progress=False,
    )
    assert len(results) == 4
    for res, row, image in zip(results, chosen, images, strict=True):
        assert res.hits[0]["path"] == image and res.hits[0]["score"] == pytest.approx(1, abs=1e-5)
        assert [h["rank"] for h in res.hits] == [0, 1, 2, 3, 4]
        assert res.error_m is not None and res.error_m < 0.5
        assert res.top1_error_m == pytest.approx(0, abs=1e-6)
        assert (res.true_lat, res.true_lon) == (row["lat"], row["lon"])
    # truth given by bare file names matches too; a query without truth gets no error
    by_name = read_truth(_truth_csv(tmp_path / "t.csv", tiles, chosen[:1], relative=False))
    out = localize(encoder, index, images[:2], transform=to_tensor, truth=by_name, progress=False)
    assert out[0].error_m is not None and out[1].error_m is None


def test_outputs_and_geojson(tiles: TileSet, tmp_path: Path) -> None:
    encoder = ProjEncoder()
    index = build_index(encoder, tiles, transform=to_tensor, progress=False)
    images = [str(tiles.image_path(tiles.rows[i])) for i in (2, 5)]
    truth = {images[0]: (tiles.rows[2]["lat"], tiles.rows[2]["lon"])}
    results = localize(
        encoder, index, images, transform=to_tensor, k=3, truth=truth, progress=False
    )
    paths = write_outputs(results, tmp_path / "out")
    geo = json.loads(paths["geojson"].read_text())
    assert geo == to_geojson(results) and geo["type"] == "FeatureCollection"
    kinds = [f["properties"]["kind"] for f in geo["features"]]
    assert kinds == [
        "estimate",
        "truth",
        "tile",
        "tile",
        "tile",
        "estimate",
        "tile",
        "tile",
        "tile",
    ]
    for feature, kind in zip(geo["features"], kinds, strict=True):
        geometry = feature["geometry"]
        assert feature["type"] == "Feature"
        assert geometry["type"] == ("Polygon" if kind == "tile" else "Point")
        positions = geometry["coordinates"][0] if kind == "tile" else [geometry["coordinates"]]
        for lon, lat in positions:
            assert -180 <= lon <= 180 and -90 <= lat <= 90
            assert 8.0 < lon < 9.5 and 47.0 < lat < 48.5  # [lon, lat] order, not [lat, lon]
    first = geo["features"][0]
    assert first["geometry"]["coordinates"] == [results[0].lon, results[0].lat]
    assert first["properties"]["error_m"] == pytest.approx(results[0].error_m)
    assert geo["features"][5]["properties"]["error_m"] is None
    tile_props = geo["features"][2]["properties"]
    assert tile_props["rank"] == 0 and tile_props["path"] == images[0]
    with open(paths["results"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == images and rows[1]["error_m"] == ""
    assert float(rows[0]["lat"]) == results[0].lat
    with open(paths["hits"], newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    summary = json.loads(paths["summary"].read_text())
    assert summary["queries"] == 2 and summary["with_truth"] == 1
    assert summary["estimate"]["within_25m"] == 1.0


def _signed_area(ring: list[list[float]]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairwise(ring)) / 2


def _inside(lon: float, lat: float, ring: list[list[float]]) -> bool:
    """Ray casting, written plainly."""
    inside = False
    for (x0, y0), (x1, y1) in pairwise(ring):
        if (y0 > lat) != (y1 > lat) and lon < x0 + (lat - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def test_tile_footprints(tiles: TileSet) -> None:
    encoder = ProjEncoder()
    index = build_index(encoder, tiles, transform=to_tensor, progress=False)
    images = [str(tiles.image_path(tiles.rows[i])) for i in (0, 7)]
    results = localize(encoder, index, images, transform=to_tensor, k=4, progress=False)
    rows = {str(tiles.image_path(r)): r for r in tiles.rows}
    to_ll = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    polygons = [f for f in to_geojson(results)["features"] if f["properties"]["kind"] == "tile"]
    assert len(polygons) == 8
    for feature in polygons:
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert _signed_area(ring) > 0  # counter-clockwise (RFC 7946 exterior ring)
        props, row = feature["properties"], rows[feature["properties"]["path"]]
        assert (props["lon"], props["lat"]) == (row["lon"], row["lat"])
        assert _inside(row["lon"], row["lat"], ring)
        # the corners are the pixel window's corners, through the raster transform by hand
        c0, r0, c1, r1 = (
            row["col_off"],
            row["row_off"],
            row["col_off"] + row["width"],
            row["row_off"] + row["height"],
        )
        expected = {
            to_ll.transform(480_000 + 0.5 * c, 5_300_000 - 0.5 * r)
            for c, r in ((c0, r0), (c0, r1), (c1, r1), (c1, r0))
        }
        np.testing.assert_allclose(sorted(map(tuple, ring[:4])), sorted(expected), atol=1e-9)
        sides = [GEOD.inv(*a, *b)[2] for a, b in pairwise(ring)]
        assert sides == pytest.approx([row["size_m"]] * 4, abs=0.01)


def test_galleries_without_footprints_give_points(tiles: TileSet, tmp_path: Path) -> None:
    # a tile table written before footprints were recorded: no footprint column at all
    old = tmp_path / "old_tiles"
    old.mkdir()
    columns = [c for c in TILE_COLUMNS if c != "footprint"]
    rows = [{**r, "path": str(tiles.image_path(r))} for r in tiles.rows[:6]]
    write_csv(old / "tiles.csv", rows, columns)
    assert "footprint" not in read_tileset(old).rows[0]
    encoder = ProjEncoder()
    index = build_index(encoder, old, transform=to_tensor, progress=False)
    results = localize(encoder, index, [rows[0]["path"]], transform=to_tensor, k=2, progress=False)
    tiles_out = [f for f in to_geojson(results)["features"] if f["properties"]["kind"] == "tile"]
    assert tiles_out[0]["geometry"] == {
        "type": "Point",
        "coordinates": [rows[0]["lon"], rows[0]["lat"]],
    }
    assert all(f["geometry"]["type"] == "Point" for f in tiles_out)
    # an empty cell (galleries appended across versions) and a tile on the antimeridian: Points
    hit0 = results[0].hits[0]
    for footprint in ("", "POLYGON ((179.9 0, -179.9 0, -179.9 1, 179.9 1, 179.9 0))"):
        results[0].hits[0] = {**hit0, "footprint": footprint}
        assert to_geojson(results)["features"][1]["geometry"]["type"] == "Point"
    results[0].hits[0] = {**hit0, "footprint": "POLYGON ((8 47, 8.1 47))"}
    with pytest.raises(GeoError, match=r"tile .*: footprint .* is not a closed WKT POLYGON"):
        to_geojson(results)


def test_read_truth_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,latitude,lon\na.jpg,1,2\n")
    with pytest.raises(GeoError, match=r"bad\.csv: missing column\(s\) lat"):
        read_truth(bad)
    bad.write_text("image,lat,lon\na.jpg,1,2\nb.jpg,north,2\n")
    with pytest.raises(GeoError, match=r"bad\.csv, line 3: lat/lon are not numbers"):
        read_truth(bad)
    bad.write_text("image,lat,lon\na.jpg,91,2\n")
    with pytest.raises(GeoError, match="out of range"):
        read_truth(bad)
    with pytest.raises(GeoError, match=r"nothere\.csv: file not found"):
        read_truth(tmp_path / "nothere.csv")


class FakeModel:
    radius, config = 1.0, {"backbone": "fake"}

    def __init__(self, dim: int = 32) -> None:
        self.descriptor_dim = dim
        self.encoder = ProjEncoder(dim)
        self.domains: set[str] = set()

    def input_size(self, default: int = 256) -> int:
        return 64  # the training size a saved model records

    def encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        self.domains.add(domain)
        return self.encoder(x)


def test_cli_localize(
    tiles: TileSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models: list[FakeModel] = []

    def fake_load(ckpt, device, image_size=None, threads=None, dim: int = 32) -> LoadedModel:
        models.append(FakeModel(dim))
        return LoadedModel(models[-1], 64, to_tensor, Path(ckpt))

    monkeypatch.setattr(inference, "load_model", fake_load)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights-one")
    gallery, out = tmp_path / "gallery", tmp_path / "out"
    base = ["--checkpoint", str(ckpt), "--quiet"]
    assert cli_main(["index", str(tiles.root), "--out", str(gallery), *base]) == 0
    chosen = tiles.rows[4:7]
    truth = _truth_csv(tiles.root.parent / "truth3.csv", tiles, chosen, relative=True)
    images = [str(tiles.image_path(r)) for r in chosen]
    argv = ["localize", *images, "--index", str(gallery), *base, "--k", "3"]
    assert cli_main([*argv, "--truth", str(truth), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 queries with truth" in printed and "100% <= 25 m" in printed
    assert models[-1].domains == {"drone"} and models[0].domains == {"satellite"}
    assert sorted(p.name for p in out.iterdir()) == [
        "candidates.csv",
        "fixes.csv",
        "hits.csv",
        "map.png",
        "metrics.json",
        "results.csv",
        "results.geojson",
        "summary.json",
    ]
    # a folder of images works as well
    assert (
        cli_main(
            [
                "localize",
                str(tiles.root),
                "--index",
                str(gallery),
                *base,
                "--out-dir",
                str(tmp_path / "all"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    # another model's descriptors: refused before any image is read
    monkeypatch.setattr(inference, "load_model", lambda c, d, **k: fake_load(c, d, dim=64))
    assert cli_main([*argv, "--out-dir", str(tmp_path / "x")]) == 2
    assert "but the model in use makes 64-d" in capsys.readouterr().err
    (ckpt / "model.safetensors").write_bytes(b"weights-two")
    assert cli_main([*argv, "--out-dir", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "built by" in err and str(ckpt) in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
