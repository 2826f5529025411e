"""Hardening of tile / index / localize on odd rasters and bad tables (issue 13, points 1-4).

Every raster is made here with rasterio: a 300 m-per-pixel map, a tiled GeoTIFF whose blocks are
garbled, a geostationary view wider than the Earth's disk. Each failure must be one line naming
the file (exit 2) and leave the output as it was.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.transform import from_origin
from torchvision.transforms.functional import pil_to_tensor

from imlnet import inference
from imlnet.cli import main as cli_main
from imlnet.errors import GeoError
from imlnet.geo import tiling
from imlnet.geo.gallery import GalleryIndex
from imlnet.geo.index import build_index
from imlnet.geo.localize import read_truth, truth_outside
from imlnet.geo.outputs import QueryResult, write_outputs
from imlnet.geo.tables import TILE_COLUMNS, parse_footprint, read_tileset, write_csv
from imlnet.geo.tiling import tile_geotiff
from imlnet.inference import LoadedModel
from imlnet.io import recover_staged_dir, staged_dir

GEOS = "+proj=geos +h=35785831 +lon_0=0 +datum=WGS84 +units=m +no_defs"


def raster(path: Path, size=(64, 64), *, crs="EPSG:32632", transform=None, **extra) -> Path:
    """A random RGB GeoTIFF of ``size`` (width, height) pixels."""
    w, h = size
    data = np.random.default_rng(0).integers(1, 255, (3, h, w), dtype=np.uint8)
    transform = transform or from_origin(480_000, 5_300_000, 0.5, 0.5)
    profile = dict(driver="GTiff", width=w, height=h, count=3, dtype="uint8", **extra)
    with rasterio.open(path, "w", crs=crs, transform=transform, **profile) as ds:
        ds.write(data)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show a folder is as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_tiles_under_a_few_pixels_and_sub_pixel_strides_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = raster(tmp_path / "coarse.tif", transform=from_origin(480_000, 5_300_000, 300, 300))
    out = tmp_path / "out"
    tile = ["tile", str(src), str(out), "--quiet"]
    assert cli_main([*tile, "--tile-size-m", "180", "--stride-m", "45"]) == 2
    err = one_line_error(capsys)
    assert "coarse.tif: a tile of 180 m is 1 x 1 px" in err and "(300 x 300 m)" in err
    assert "a tile needs at least 8 px a side" in err
    assert "--tile-size-m between 2.4e+03 and 1.92e+04" in err
    assert cli_main([*tile, "--tile-size-m", "3000", "--stride-m", "45"]) == 2
    err = one_line_error(capsys)
    assert "a stride of 45 m is under one pixel (300 x 300 m)" in err
    assert "--stride-m between 300 and 3000" in err
    assert not out.exists()  # refused before any work


def test_very_large_plans_need_allow_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tiling, "DEFAULT_MAX_TILES", 10)
    src = raster(tmp_path / "map.tif", size=(128, 128))
    out = tmp_path / "out"
    argv = ["tile", str(src), str(out), "--tile-size-m", "8", "--stride-m", "8", "--quiet"]
    assert cli_main([*argv, "--image-size", "16"]) == 2
    err = one_line_error(capsys)
    assert "map.tif: the plan has 64 tiles (8 x 8; about 0.0 GB of JPG at 16 px)" in err
    assert "pass --allow-large to go on" in err and not out.exists()
    assert cli_main([*argv, "--image-size", "16", "--allow-large"]) == 0
    assert len(read_tileset(out)) == 64


def test_index_refuses_duplicate_tile_ids_naming_the_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiles = tile_geotiff(
        raster(tmp_path / "map.tif"), tmp_path / "t", tile_size_m=8, stride_m=8, progress=False
    )
    # a table written before strides under a pixel were refused: one window listed twice
    rows = [*tiles.rows, {**tiles.rows[1]}]
    write_csv(tiles.table, rows, TILE_COLUMNS)
    encoder = ProjEncoder()
    with pytest.raises(GeoError) as info:
        build_index(encoder, tiles.root, transform=to_tensor, progress=False)
    message = str(info.value)
    assert f"tiles.csv, line {len(rows) + 1}: tile {tiles.rows[1]['tile_id']!r}" in message
    assert "is also on " in message and "tiles.csv, line 3;" in message
    assert "each tile must be indexed once" in message
    # another window under a tile_id already used (two tables of the same stem)
    write_csv(tiles.table, [*tiles.rows, {**tiles.rows[1], "path": "x.jpg"}], TILE_COLUMNS)
    with pytest.raises(GeoError, match=rf"{len(rows) + 1} and .*, line 3 have the same tile_id"):
        build_index(encoder, tiles.root, transform=to_tensor, progress=False)
    # the same tiles again (appending a folder twice) names the gallery row
    write_csv(tiles.table, tiles.rows, TILE_COLUMNS)
    index = build_index(encoder, tiles.root, transform=to_tensor, progress=False)
    with pytest.raises(GeoError, match=r"tiles\.csv, line 2: .* is already in the gallery \(row 0"):
        build_index(encoder, tiles.root, transform=to_tensor, index=index, progress=False)


def garble_block(path: Path, row: int, col: int) -> None:
    """Overwrite one compressed block of a tiled GeoTIFF (band 1) with noise."""
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = np.random.default_rng(1).bytes(size)
    path.write_bytes(bytes(data))


def test_corrupt_blocks_give_one_message_and_leave_the_output_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiles"
    good = raster(tmp_path / "good.tif", size=(128, 128))
    argv = ["--tile-size-m", "16", "--stride-m", "16", "--image-size", "16", "--quiet"]
    assert cli_main(["tile", str(good), str(out), *argv]) == 0
    before = snapshot(out)
    bad = raster(
        tmp_path / "corrupt.tif",
        size=(128, 128),
        tiled=True,
        blockxsize=32,
        blockysize=32,
        compress="deflate",
        interleave="band",
    )
    garble_block(bad, 2, 1)  # pixels 32..63 across, 64..95 down
    assert cli_main(["tile", str(bad), str(out), *argv]) == 2
    err = one_line_error(capsys)
    # (bilinear resampling reads a margin, so the window just above the block may be first)
    assert re.search(
        rf"{re.escape(str(bad))}: cannot read the window at column \d+, row \d+ "
        r"\(32 x 32 px\)",
        err,
    ), err
    assert "the file is damaged" in err
    assert snapshot(out) == before  # no new tile, no half-written table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.tif", "good.tif", "tiles"]


def test_geostationary_tiles_off_the_disk_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 64 x 64 px of 200 km: +-6,400 km, wider than the Earth's disk (about +-5,430 km)
    full_disk = from_origin(-6_400_000, 6_400_000, 200_000, 200_000)
    src = raster(tmp_path / "goes.tif", crs=GEOS, transform=full_disk)
    out = tmp_path / "t"
    argv = ["tile", str(src), str(out), "--tile-size-m", "1600000", "--stride-m", "1600000"]
    assert cli_main([*argv, "--image-size", "16", "--quiet"]) == 0
    tiles = read_tileset(out)
    off = tiles.params["unprojectable"]
    assert off > 0 and len(tiles) + off == 64
    assert f"{off} without a latitude/longitude in the raster's CRS" in capsys.readouterr().out
    for row in tiles.rows:
        assert np.isfinite([row["lat"], row["lon"]]).all()
        assert parse_footprint(row["footprint"]) is not None  # finite, in range
    index = build_index(ProjEncoder(), tiles, transform=to_tensor, progress=False)
    assert index.count == len(tiles)
    # a raster whose centre is off the disk: refused with the reason, nothing written
    corner = raster(
        tmp_path / "corner.tif", crs=GEOS, transform=from_origin(5_500_000, 6_400_000, 1000, 1000)
    )
    assert cli_main(["tile", str(corner), str(tmp_path / "c"), "--quiet"]) == 2
    assert "has no latitude/longitude in its CRS" in one_line_error(capsys)
    assert not (tmp_path / "c").exists()


def test_bad_gallery_rows_are_refused_and_localize_writes_all_or_nothing(tmp_path: Path) -> None:
    row = {"path": "a.jpg", "lat": 47.0, "lon": 8.0, "crs": "EPSG:4326", "source": "m.tif"}
    inf = "POLYGON ((inf inf, inf inf, inf inf, inf inf))"
    index = GalleryIndex(4)
    with pytest.raises(
        GeoError, match=r"metadata row 0 \(a\.jpg\): footprint 'POLYGON \(\(inf"
    ) as e:
        index.add(np.ones((1, 4)), [{**row, "footprint": inf}])
    assert "is not a closed WKT POLYGON of lon/lat corners" in str(e.value)
    with pytest.raises(GeoError, match="out of range or not finite"):
        index.add(np.ones((1, 4)), [{**row, "lat": float("nan")}])
    # outputs are prepared before any is written: a bad footprint leaves the old ones
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("old\n")
    hit = {**row, "rank": 0, "id": 0, "score": 1.0, "footprint": inf, "tile_id": "t"}
    with pytest.raises(GeoError, match="is not a closed WKT POLYGON of lon/lat corners"):
        write_outputs([QueryResult("q.jpg", [hit], 47.0, 8.0, 1)], out)
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]
    assert (out / "results.csv").read_text() == "old\n"


def test_truth_listing_an_image_twice_is_refused(tmp_path: Path) -> None:
    truth = tmp_path / "truth.csv"
    truth.write_text("image,lat,lon\na.jpg,47.0,8.0\nb.jpg,47.1,8.1\n./a.jpg,48.5,8.0\n")
    with pytest.raises(
        GeoError, match=r"truth\.csv, lines 2 and 4: image './a\.jpg' is listed twice"
    ):
        read_truth(truth)


# -- a tiny model for the commands ------------------------------------------------------------
class ProjEncoder:
    """Deterministic encoder: a fixed random projection of 8x8-pooled, mean-centred pixels."""

    def __init__(self, dim: int = 32) -> None:
        self.weight = torch.randn(3 * 64, dim, generator=torch.Generator().manual_seed(0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return (f - f.mean(1, keepdim=True)) @ self.weight


class FakeModel:
    descriptor_dim, radius, config = 32, 1.0, {"backbone": "fake"}

    def __init__(self) -> None:
        self.encoder = ProjEncoder()

    def encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return self.encoder(x)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image.resize((64, 64))).float() / 255


def fake_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint folder whose model is :class:`FakeModel` (inference.load_model patched)."""
    monkeypatch.setattr(
        inference, "load_model", lambda c, *a, **k: LoadedModel(FakeModel(), 64, to_tensor, Path(c))
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    return ckpt


def test_truth_outside_every_tile_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = fake_checkpoint(tmp_path, monkeypatch)
    tiles = tile_geotiff(
        raster(tmp_path / "map.tif", size=(128, 128)),
        tmp_path / "t",
        tile_size_m=16,
        stride_m=16,
        out_px=32,
        progress=False,
    )
    common = ["--checkpoint", str(ckpt), "--quiet", "--workers", "0"]
    assert cli_main(["index", str(tiles.root), "--out", str(tmp_path / "g"), *common]) == 0
    chosen = tiles.rows[:3]
    swapped = tmp_path / "swapped.csv"
    with open(swapped, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "lat", "lon"])
        writer.writerows([[str(tiles.image_path(r)), r["lon"], r["lat"]] for r in chosen])
    index = GalleryIndex.load(tmp_path / "g")
    assert truth_outside(index, read_truth(swapped)) == (3, 3)
    right = {str(tiles.image_path(r)): (r["lat"], r["lon"]) for r in chosen}
    assert truth_outside(index, right) == (0, 3)
    images = [str(tiles.image_path(r)) for r in chosen]
    argv = ["localize", *images, "--index", str(tmp_path / "g"), *common]
    assert cli_main([*argv, "--truth", str(swapped), "--out-dir", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning: 3 of 3 positions in" in err and "lat,lon (not lon,lat)" in err
    assert "lie outside every tile of the gallery" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["estimate"]["median_error_m"] > 1e6  # what the warning is about


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(target) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("disk full")
    assert snapshot(target) == {"old.txt": b"old"}
    with staged_dir(target) as stage:
        (stage / "new.txt").write_text("new")
    assert snapshot(target) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a kill between the swap's two renames: the old folder is aside, the target missing
    aside = tmp_path / ".out.old-x1"
    target.rename(aside)
    (tmp_path / ".out.staging-x2").mkdir()
    recover_staged_dir(target)
    assert snapshot(target) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_inputs_and_foreign_output_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = raster(tmp_path / "map.tif")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    argv = ["--tile-size-m", "8", "--stride-m", "8", "--quiet"]
    assert cli_main(["tile", str(src), str(mine), *argv]) == 2
    assert "mine: holds files that are not tiles (e.g. notes.txt)" in one_line_error(capsys)
    assert snapshot(mine) == {"notes.txt": b"keep me"}
    index = GalleryIndex(4)
    index.add(np.ones((1, 4)), [{"path": "a", "lat": 1, "lon": 2, "crs": "c", "source": "s"}])
    with pytest.raises(GeoError, match="holds files that are not part of a gallery"):
        index.save(mine)
    ckpt = fake_checkpoint(tmp_path, monkeypatch)
    common = ["--checkpoint", str(ckpt), "--quiet"]
    assert cli_main(["index", str(tmp_path / "none"), "--out", str(tmp_path / "g"), *common]) == 2
    assert "none/tiles.csv: no tile table; run `imlnet tile" in one_line_error(capsys)
    assert cli_main(["tile", str(src), str(tmp_path / "t"), *argv]) == 0
    assert cli_main(["index", str(tmp_path / "t"), "--out", str(tmp_path / "g"), *common]) == 0
    capsys.readouterr()
    loc = ["localize", "--index", str(tmp_path / "g"), *common]
    default_out = Path("localize-out").exists()  # the default --out-dir, never written below
    assert cli_main([*loc, str(tmp_path / "nothere.jpg")]) == 2
    assert "nothere.jpg: query image not found" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert cli_main([*loc, str(tmp_path / "empty")]) == 2
    assert "no query images found in" in one_line_error(capsys)
    assert cli_main([*loc, str(tmp_path / "empty"), "--k", "0"]) == 2
    assert "--k must be >= 1" in one_line_error(capsys)
    assert Path("localize-out").exists() == default_out
